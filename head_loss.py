"""
The LM head and its cross-entropy at the target positions only, a chunk of rows at a time: model.py's loss and
MoD's (mod.py) read out only the rows that have a target, and no (tokens x vocab) tensor beyond one chunk is kept
for backward.
"""
import torch

# rows per chunk: logits of at most this many elements at once (64 MB in fp32: 341 rows of SmolLM2's 49,152
# vocabulary, 130 of LLaMA-3's 128,256)
HEAD_CHUNK_ELEMENTS = 2 ** 24


def target_rows(targets, *tensors):
    """([rows of each (B, T, ...) tensor], y (n,), real): the rows that have a target (targets != -100),
    flattened to (n, ...), and their targets. Under torch.compile every row is kept and `real` (n,) weighs them
    0/1 (a data-dependent selection would break the graph); real is None otherwise. The plain loss and MoD's
    use it."""
    y = targets.reshape(-1)
    flat = [t.reshape(len(y), *t.shape[2:]) for t in tensors]
    if torch.compiler.is_compiling():
        return flat, y.clamp(min=0), (y != -100).float()
    rows = (y != -100).nonzero().squeeze(1)
    return [t[rows] for t in flat], y[rows], None


def head_loss(x, weight, y, real=None, chunk_rows=None):
    """Mean cross-entropy of the logits x @ weight.T (x (n, dim) normed states, weight the LM head (V, dim))
    against y (n,), rows weighed by real (n,) 0/1 if given (0 when nothing counts). The same loss and
    gradients as F.cross_entropy on the whole float32 logits, but made chunk_rows rows at a time (default:
    HEAD_CHUNK_ELEMENTS // V), gradients included: no (n, V) tensor is kept for backward."""
    chunk_rows = chunk_rows or max(1, HEAD_CHUNK_ELEMENTS // weight.size(0))
    grad_enabled = torch.is_grad_enabled()
    return _HeadLoss.apply(x, weight, y, real, chunk_rows, grad_enabled and x.requires_grad,
                           grad_enabled and weight.requires_grad)


class _HeadLoss(torch.autograd.Function):
    """The gradients are worked out in forward, chunk by chunk (the loss is a scalar, so backward only scales
    them): each chunk's logits become their own gradient in place and are freed before the next chunk."""

    @staticmethod
    def forward(ctx, x, weight, y, real, chunk_rows, need_x, need_w):
        n = x.size(0)
        count = (real.sum() if real is not None else torch.tensor(float(n), device=x.device)).clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
        for s in range(0, n, chunk_rows):
            xc, yc = x[s:s + chunk_rows], y[s:s + chunk_rows]
            logits = xc @ weight.T  # in the compute dtype (bf16 under autocast), as the LM head's output
            z = logits.float()
            lse = torch.logsumexp(z, -1)
            rows = torch.arange(len(yc), device=x.device)
            ones = torch.ones_like(lse)
            w = (real[s:s + chunk_rows] if real is not None else ones) / count  # d loss / d CE of each row
            total = total + ((lse - z[rows, yc]) * w).sum()
            if need_x or need_w:  # d CE / d z = softmax(z) - onehot(y), times each row's weight
                g = z.sub_(lse[:, None]).exp_()
                g[rows, yc] -= 1
                g = g.mul_(w[:, None]).to(logits.dtype)
                if need_x:
                    grad_x[s:s + chunk_rows] = (g @ weight).to(x.dtype)
                if need_w:
                    grad_w += (g.T @ xc).float()
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        ctx.save_for_backward(*(t for t in (grad_x, grad_w) if t is not None))
        ctx.need = (need_x, need_w)
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)
        grads = [saved.pop(0) if need else None for need in ctx.need]
        grad_x, grad_w = (g * grad_loss.to(g.dtype) if g is not None else None for g in grads)
        return grad_x, grad_w, None, None, None, None, None
