"""
MoD: Mixture-of-Depths ensemble tuning (Luo & Specia, 2024; docs/design.md#mod). Not DeepMind's token skipping.

The last k layers each read out logits l_i = lm_head(N_i(h_i)) through their own trainable RMSNorm N_i and the
shared, frozen LM head (the final layer keeps the model's own norm). A router gives each token weights w over
the k layers, and the ensemble logits are

    start "final" (default):  z = l_final + g * (sum_i w_i l_i - l_final),  g a learned scalar that starts at 0
    start "uniform" (paper):  z = sum_i w_i l_i                              (g = 1: the router's uniform start)

so by default a tuned model starts exactly at its base, as LoRA's zero B does, and g has a gradient at 0 (the
ensemble grows in; a saturated softmax on the final layer would give the other layers none). g stays in [0, 1]
(weight range "bounded", the default), so z stays an interpolation between the final layer and the router mix:
a smooth map onto [0, 1] has a zero derivative where it reaches 0, so g is not squashed but clamped, at use (clamp
passes the gradient at the bounds: 1 at g = 0) and after each optimizer step (after_step: projected gradient
descent). A "free" g grew to about 3 on the built-in task, an extrapolation past the final layer.
Training loss, averaged over the target tokens (targets != -100):

    CE(z, y) + distill_weight * mean_{i < k} T^2 * KL(p_final.detach() || p_i)  + mean_{all k} CE(l_i, y)

with p = softmax(l / T); the last term (layer_ce, the paper's per-layer loss) keeps every late layer learning
the task. T^2 keeps the distillation gradients the same size for every T (Hinton et al.).

The loss is computed only at the target positions, by one fused function (mod_loss) that also works out the
gradient of every readout in its forward pass, chunk by chunk, so no vocab-size tensor is kept for backward.
tests/test_mod.py checks it against the plain autograd computation.

Usage: attach_mod(model, MoDConfig(k=4)) registers the ensemble as model.mod, the model's head hook; then
model(idx) returns the ensemble logits and model.generate() generates with them. It freezes nothing: the base is
frozen where a run's model is built (checkpoint.build_model, or apply_lora).
"""
import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import check_choices
from head_loss import target_rows

ROUTERS = ("token", "sequence", "vector")
STARTS = ("final", "uniform")
WEIGHT_RANGES = ("free", "bounded")
ROUTER_INPUTS = ("scaled", "normed")
TOP_K_WEIGHTS = ("kept", "renormalized")
DIRECTIONS = ("forward", "reverse")


@dataclass
class MoDConfig:
    """MoD's settings; train.py's --mod-* flags are made from these fields (help text included)."""
    k: int = field(default=4, metadata={"switch": True, "help": (
        "MoD: mix the logits of the last k layers, each read out through its own trainable norm and the frozen LM "
        "head (off unless given; 1: the plain model)")})
    start: str = field(default="final", metadata={"choices": STARTS, "help": (
        "final: z = l_final + g * (router mix - l_final) with a learned g from 0, so step 0 is the base model; "
        "uniform: z = the router mix, which starts as the average of the k layers (the paper)")})
    weight_range: str = field(default="bounded", metadata={"choices": WEIGHT_RANGES, "help": (
        "with start final, the ensemble weight g: bounded = kept in [0, 1], so z interpolates between the final "
        "layer and the router mix (clamped, with its gradient at 0); free = any real number (it grew to about 3 "
        "on the built-in task, an extrapolation past the final layer, and scored lower there)")})
    # sequence: causal, so cached generation equals the full forward (needs model.forward's cache= and n_pad=)
    router: str = field(default="token", metadata={"choices": ROUTERS, "help": (
        "routing weights: token = a zero-initialized linear layer on each token's final hidden state; sequence = "
        "the same on its running mean over the sequence so far; vector = k learned weights shared by all tokens")})
    # A router reading the normed state (L1 norm ~ dim) moves each score ~dim times faster under AdamW than a
    # learned vector of k scores: at dim 128 and lr 1e-2 one step moved a score by ~1.4 and the softmax saturated.
    router_input: str = field(default="scaled", metadata={"choices": ROUTER_INPUTS, "help": (
        "what the token / sequence router reads: scaled = the final hidden state divided by its RMS and by dim, "
        "so one AdamW step moves a score by about lr whatever the model's width; normed = the final norm's output")})
    top_k: int | None = field(default=None, metadata={"help": (
        "keep only the K largest routing weights per token (default: all k)")})
    top_k_weights: str = field(default="kept", metadata={"choices": TOP_K_WEIGHTS, "help": (
        "with --mod-top-k: kept = the kept softmax weights as they are (Switch-style, so the router gets a "
        "gradient); renormalized = divided by their sum (the paper; Top-1 then gives the router no gradient)")})
    router_lr: float | None = field(default=None, metadata={"help": (
        "peak lr of the router alone, in its own AdamW group without weight decay (default: --lr)")})
    distill_weight: float = field(default=1.0, metadata={"help": (
        "lambda: weight of the final layer's distillation into the other late layers (0: off)")})
    distill_temp: float = field(default=1.0, metadata={"help": (
        "distillation temperature T (the KL is multiplied by T^2)")})
    distill_direction: str = field(default="forward", metadata={"choices": DIRECTIONS, "help": (
        "forward: KL(p_final || p_layer); reverse: KL(p_layer || p_final); the final layer is the detached teacher")})
    layer_ce: bool = field(default=True, metadata={"help": (
        "also train each late layer alone with its own CE loss, averaged over the k layers (the paper's per-layer "
        "loss; without it the router collapsed onto the earliest layer)")})
    chunk_size: int | None = field(default=None, metadata={"help": (
        "compute the loss this many target tokens at a time, so at most k vocab-size logits tensors of one chunk "
        "exist at once (e.g. 1024 for LLaMA-2-7B); default: all at once")})

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"MoD k (--mod-k) must be >= 1, got {self.k}")
        check_choices(self, "MoD", "mod")
        if self.top_k is not None and not 1 <= self.top_k <= self.k:
            raise ValueError(f"MoD top_k (--mod-top-k) must be between 1 and k={self.k}, got {self.top_k}")
        if self.distill_temp <= 0 or self.distill_weight < 0:
            raise ValueError(f"MoD needs distill_temp > 0 and distill_weight >= 0 (--mod-distill-temp, "
                             f"--mod-distill-weight), got {self.distill_temp} and {self.distill_weight}")
        if self.router_lr is not None and self.router_lr <= 0:
            raise ValueError(f"MoD router_lr (--mod-router-lr) must be > 0, got {self.router_lr}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"MoD chunk_size (--mod-chunk-size) must be >= 1 or None, got {self.chunk_size}")


class DepthEnsemble(nn.Module):
    """Registered as model.mod; model.forward calls it with the list of every layer's output. Its parameters
    are fp32 (like LoRA's: the optimizer needs the precision) and appear in model.state_dict() as mod.*."""

    def __init__(self, model, cfg: MoDConfig):
        super().__init__()
        self.cfg, self.k = cfg, cfg.k
        device = model.norm.weight.device
        # one norm per non-final late layer, a copy of the final norm: at step 0 each is its plain logit lens
        self.norms = nn.ModuleList(copy.deepcopy(model.norm).float().requires_grad_(True) for _ in range(cfg.k - 1))
        if cfg.router == "vector":
            self.scores = nn.Parameter(torch.zeros(cfg.k, device=device, dtype=torch.float32))
        else:
            self.router = nn.Linear(model.config.dim, cfg.k, device=device, dtype=torch.float32)
            nn.init.zeros_(self.router.weight)  # zero scores: uniform weights at step 0
            nn.init.zeros_(self.router.bias)
        # g, the ensemble weight: 0 = the final layer alone (start "final"); None = fixed at 1 (start "uniform")
        self.ensemble_weight = nn.Parameter(torch.zeros((), device=device)) if cfg.start == "final" else None
        self.only_layer = None  # evaluation: an index 0..k-1 uses that late layer alone (k-1 = the final layer)
        self.fused = True  # the fused mod_loss (False: the plain ensemble_loss; the same numbers)
        self.last_losses = {}  # the loss terms of the last call with targets, detached (log_numbers)

    @torch.no_grad()
    def after_step(self):
        """The add-on interface (model.addons), after each optimizer step: with weight_range "bounded", g is put back
        into [0, 1] (projected gradient descent), so that at a bound it keeps the gradient the clamp passes there;
        a g left below 0 would get none and never come back."""
        if self.ensemble_weight is not None and self.cfg.weight_range == "bounded":
            self.ensemble_weight.clamp_(0, 1)

    def log_numbers(self):
        """The add-on interface: the last training loss's parts and the ensemble weight g, for metrics.jsonl."""
        numbers = {f"mod_{name}": float(value) for name, value in self.last_losses.items()}
        if self.ensemble_weight is not None:
            numbers["mod_g"] = float(self.ensemble_weight.detach())
        return numbers

    def head(self, model, i, h):
        """Late layer i's logits (fp32): its own norm (the model's final norm for i = k-1), then the LM head."""
        return model.lm_head(self.normed(model, i, h)).float()

    def normed(self, model, i, h):
        """Late layer i's hidden state through its norm, in the LM head's dtype: what the head multiplies."""
        return (self.norms[i] if i < self.k - 1 else model.norm)(h).to(model.lm_head.weight.dtype)

    def running_mean(self, x, cache, n_pad):
        """Mean of x over each row's real (non-padding) tokens up to and including each position. With a KV
        cache the sums carry over in cache.state, so a cached step sees the same mean as a full forward."""
        B, T, _ = x.shape
        total, count, seen = x.new_zeros(B, x.size(-1)), x.new_zeros(B, 1), 0
        if cache is not None and "mod" in cache.state:
            total, count, seen = cache.state["mod"]
        pos = torch.arange(seen, seen + T, device=x.device)
        real = (pos[None] >= n_pad[:, None] if n_pad is not None else torch.ones(B, T, device=x.device))
        real = real.to(x.dtype)[..., None]
        sums, counts = total[:, None] + (x * real).cumsum(1), count[:, None] + real.cumsum(1)
        if cache is not None:
            cache.state["mod"] = (sums[:, -1], counts[:, -1], seen + T)
        return sums / counts.clamp(min=1)

    def routing_weights(self, model, hidden, cache=None, n_pad=None):
        """(B, T, k) router weights w of the last k layers, after Top-K (rows sum to 1 unless Top-K keeps them)."""
        B, T, _ = hidden[-1].shape
        if self.cfg.router == "vector":
            scores = self.scores.expand(B, T, -1)
        else:
            h = hidden[-1].float()
            if self.cfg.router_input == "scaled":
                x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) / h.size(-1)
            else:
                x = model.norm(hidden[-1]).float()
            if self.cfg.router == "sequence":
                x = self.running_mean(x, cache, n_pad)
            scores = self.router(x)
        top_k = self.cfg.top_k or self.k
        if top_k == self.k:
            return F.softmax(scores, dim=-1)
        # ties (e.g. the zero-initialized router) go to the later layers: a stable sort of the reversed scores
        order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices[..., :top_k]
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, self.k - 1 - order, True)
        if self.cfg.top_k_weights == "renormalized":  # a softmax over the kept scores
            return F.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        return F.softmax(scores, dim=-1) * keep

    def mixing(self, model, hidden, cache=None, n_pad=None):
        """(w, g): the (B, T, k) router weights and the ensemble weight g (None: start "uniform", g = 1);
        with only_layer, w is one-hot on that layer and g None."""
        if self.only_layer is not None:
            if not 0 <= self.only_layer < self.k:
                raise ValueError(f"MoD only_layer={self.only_layer}: must be 0..{self.k - 1} "
                                 "(k-1 = the final layer)")
            B, T, _ = hidden[-1].shape
            one_hot = F.one_hot(torch.tensor(self.only_layer, device=hidden[-1].device), self.k)
            return one_hot.float().expand(B, T, -1), None
        g = self.ensemble_weight
        if g is not None and self.cfg.weight_range == "bounded":
            g = g.clamp(0, 1)  # the clamp passes the gradient at the bounds: 1 at g = 0
        return self.routing_weights(model, hidden, cache, n_pad), g

    def coefficients(self, model, hidden, cache=None, n_pad=None):
        """(B, T, k) coefficients c of the readouts, z = sum_i c_i l_i: c = g w + (1 - g) on the final layer."""
        w, g = self.mixing(model, hidden, cache, n_pad)
        if g is None:
            return w
        final = F.one_hot(torch.tensor(self.k - 1, device=w.device), self.k).float()
        return g * w + (1 - g) * final

    def forward(self, model, hidden, targets=None, cache=None, n_pad=None, where=None):
        """Without targets: (the ensemble logits (B, T, V) fp32, None). With targets: (None, loss), the readouts
        computed at the target positions only, by the fused path (self.fused, the default) or by
        ensemble_loss, its plain definition. last_losses gets the per-token means of the terms: ce, distill
        (before distill_weight, T^2 included), layer_ce."""
        states = hidden[-self.k:]
        B, T, dim = states[-1].shape
        if targets is None:  # summed layer by layer: one layer's logits besides z at a time
            coef = self.coefficients(model, hidden, cache, n_pad)
            if where is not None:  # only these positions are read out (the router has seen them all)
                coef, states = coef[where], [h[where] for h in states]
            return sum(coef[..., i:i + 1] * self.head(model, i, h) for i, h in enumerate(states)), None
        if targets.shape != (B, T):
            raise ValueError(f"MoD: targets of shape {tuple(targets.shape)} for hidden states of shape {(B, T)}")
        if not self.fused:  # the definition, on the target positions
            w, g = self.mixing(model, hidden, cache, n_pad)
            keep = targets.reshape(B * T) != -100
            logits = [self.head(model, i, h.reshape(B * T, dim)[keep]) for i, h in enumerate(states)]
            loss, parts = ensemble_loss(logits, w.reshape(B * T, self.k)[keep], g, targets.reshape(B * T)[keep],
                                        self.cfg)
        else:
            loss, parts = self.fused_loss(model, states, self.coefficients(model, hidden, cache, n_pad), targets)
        self.last_losses = dict(zip(("ce", "distill", "layer_ce"), parts))
        return None, loss

    def fused_loss(self, model, states, coef, targets):
        """ensemble_loss by mod_loss: states k (B, T, dim), coef (B, T, k), targets (B, T) with -100 on the
        positions that are not targets."""
        (coef, *states), y, row_weight = target_rows(targets, coef, *states)  # as the plain loss selects them
        cfg = self.cfg
        states = [self.normed(model, i, h) for i, h in enumerate(states)]
        return mod_loss(states, model.lm_head.weight, coef, y, cfg.distill_weight if self.k > 1 else 0.0,
                        cfg.distill_temp, cfg.distill_direction == "forward", cfg.layer_ce, cfg.chunk_size,
                        row_weight)


def ensemble_loss(logits, w, g, y, cfg):
    """The MoD loss as the paper writes it, with autograd: the definition the fused mod_loss is tested equal to.
    logits: the k readouts l_1 .. l_k (n, V) (l_k = l_final), w (n, k) router weights, g the ensemble weight
    (None: z = sum_i w_i l_i), y (n,) the targets. Returns (loss, (ce, distill, layer_ce) detached)."""
    k, T = len(logits), cfg.distill_temp
    l_final = logits[-1]
    mix = sum(w[:, i:i + 1] * l for i, l in enumerate(logits))  # sum_i w_i l_i
    z = mix if g is None else l_final + g * (mix - l_final)  # z = l_final + g (sum_i w_i l_i - l_final)
    ce = F.cross_entropy(z, y)  # CE(z, y)
    log_p_final = F.log_softmax(l_final.detach() / T, -1)  # the teacher: log softmax(l_final / T), no gradient
    kls = []
    for l in logits[:-1]:
        log_p = F.log_softmax(l / T, -1)  # log p_i = log softmax(l_i / T)
        a, b = (log_p_final, log_p) if cfg.distill_direction == "forward" else (log_p, log_p_final)
        kls.append((a.exp() * (a - b)).sum(-1).mean())  # forward: KL(p_final || p_i); reverse: KL(p_i || p_final)
    distill = T * T * torch.stack(kls).mean() if kls else z.new_zeros(())  # T^2 mean_{i < k} KL
    layer_ce = z.new_zeros(())
    if cfg.layer_ce:
        layer_ce = torch.stack([F.cross_entropy(l, y) for l in logits]).mean()  # mean_{all k} CE(l_i, y)
    distill_weight = cfg.distill_weight if k > 1 else 0.0
    loss = ce + distill_weight * distill + layer_ce
    return loss, (ce.detach(), distill.detach(), layer_ce.detach())


def mod_loss(states, weight, coef, y, distill_weight, temp, forward_kl, layer_ce, chunk_size=None,
             row_weight=None):
    """ensemble_loss, fused: (loss, (ce, distill, layer_ce)) over n target tokens: states = k (n, dim) normed
    states, weight = the frozen LM head (V, dim), coef (n, k) the ensemble coefficients, y (n,); row_weight (n,)
    0/1 weighs the rows (None: all count). The loss is [CE(z) + distill_weight * distill + layer_ce] / (counted
    rows); the parts are per-token means (detached)."""
    need_grad = torch.is_grad_enabled() and (coef.requires_grad or any(x.requires_grad for x in states))
    if need_grad and weight.requires_grad:
        raise ValueError("MoD's loss does not train the LM head: freeze the base first (lora.freeze_base)")
    opts = (distill_weight, temp, forward_kl, layer_ce, chunk_size, need_grad)
    return _ModLoss.apply(coef, y, weight, row_weight, opts, *states)


class _ModLoss(torch.autograd.Function):
    """The gradients are worked out in forward, chunk by chunk (the loss is a scalar, so backward only scales
    them): the k (chunk, V) logits tensors are freed after each chunk, and no softmax is saved for backward."""

    @staticmethod
    def forward(ctx, coef, y, weight, row_weight, opts, *states):
        distill_weight, temp, forward_kl, layer_ce, chunk_size, need_grad = opts
        n, k = coef.shape
        step = chunk_size or max(n, 1)
        sums = torch.zeros(3, dtype=torch.float32, device=coef.device)
        grad_coef, grad_states = torch.zeros_like(coef), [torch.zeros_like(x) for x in states]
        for s in range(0, n, step):
            rows = slice(s, s + step)
            part = _chunk(coef[rows], y[rows], weight, [x[rows] for x in states], distill_weight, temp,
                          forward_kl, layer_ce, need_grad, None if row_weight is None else row_weight[rows])
            sums += part[0]
            if need_grad:
                grad_coef[rows] = part[1]
                for grad, grad_state in zip(grad_states, part[2]):
                    grad[rows] = grad_state
        count = row_weight.sum() if row_weight is not None else torch.tensor(float(n), device=coef.device)
        count = count.clamp(min=1)
        means = sums / count  # no target at all: 0, not NaN
        ctx.save_for_backward(grad_coef / count, *(g / count.to(g.dtype) for g in grad_states))
        ctx.mark_non_differentiable(means)
        return means[0] + distill_weight * means[1] + means[2], means

    @staticmethod
    def backward(ctx, grad_loss, _):
        grad_coef, *grad_states = ctx.saved_tensors
        grad_states = [g * grad_loss.to(g.dtype) for g in grad_states]
        return (grad_coef * grad_loss, None, None, None, None, *grad_states)


def rowdot(a, b):
    """(n,) row-wise dot products of two (n, V) tensors, without an (n, V) temporary."""
    return torch.bmm(a[:, None, :], b[:, :, None]).view(-1)


def _chunk(coef, y, weight, states, distill_weight, temp, forward_kl, layer_ce, need_grad, row_weight):
    """One chunk of mod_loss: the summed terms (ce, distill, layer_ce), and with need_grad the gradients of
    ce + distill_weight * distill + layer_ce with respect to coef and each state; rows weighed by row_weight if
    given. Each (n, V) pass costs about a tenth of a readout's matmul on a CPU, so the tensors are reused in place."""
    k, T, distilled = len(states), temp, distill_weight > 0
    rows = torch.arange(len(y), device=y.device)
    total = (lambda t: t.sum()) if row_weight is None else (lambda t: (t * row_weight).sum())  # noqa: E731
    logits = [(x @ weight.T).float() for x in states]
    z = logits[0] * coef[:, :1]
    for i in range(1, k):
        z.addcmul_(logits[i], coef[:, i:i + 1])
    lse_z = torch.logsumexp(z, -1)
    ce = total(lse_z - z[rows, y])
    lse = [torch.logsumexp(l, -1) for l in logits]
    layer = sum(total(lse[i] - l[rows, y]) for i, l in enumerate(logits)) / k if layer_ce else ce.new_zeros(())
    kls = []
    if distilled:
        logp_final = logits[-1] - lse[-1][:, None] if T == 1 else F.log_softmax(logits[-1] / T, -1)
        p_final = logp_final.exp()
        for i, l in enumerate(logits[:-1]):
            # forward KL(p_f || p_i) = sum p_f log p_f - sum p_f l_i / T + logsumexp(l_i / T): no log-softmax
            if forward_kl:
                lse_t = lse[i] if T == 1 else torch.logsumexp(l / T, -1)
                kls.append(rowdot(p_final, logp_final) - rowdot(p_final, l) / T + lse_t)
            else:  # KL(p_i || p_f)
                logp = F.log_softmax(l / T, -1)
                kls.append(rowdot(logp.exp(), logp - logp_final))
    distill = sum(total(kl) for kl in kls) * T * T / (k - 1) if kls else ce.new_zeros(())
    sums = torch.stack([ce, distill, layer])
    if not need_grad:
        return sums, None, None
    g_z = z.sub_(lse_z[:, None]).exp_()  # dCE(z)/dz = softmax(z) - onehot(y); z = sum_i c_i l_i
    g_z[rows, y] -= 1
    grad_coef = torch.stack([rowdot(g_z, l) for l in logits], 1)
    w_layer, w_distill = (1 / k if layer_ce else 0.0), distill_weight * T / max(k - 1, 1)
    grad_states = []
    for i, l in enumerate(logits):  # each l becomes its own gradient, in place
        is_student = distilled and i < k - 1
        # dKL/dl_i = softmax(l_i) - p_f: reuses the softmax(l_i) of the layer CE
        same_softmax = is_student and forward_kl and T == 1
        grad_kl = None
        if is_student and not same_softmax:  # d(T^2 KL)/dl_i = T dKL/d(l_i / T)
            logp_t = F.log_softmax(l / T, -1)
            p_t = logp_t.exp()
            grad_kl = p_t - p_final if forward_kl else p_t * (logp_t - logp_final - kls[i][:, None])
        if layer_ce or same_softmax:
            weight_i = w_layer + (w_distill if same_softmax else 0.0)
            l.sub_(lse[i][:, None]).exp_().mul_(weight_i)  # softmax(l_i), weighted
            if same_softmax:
                l.sub_(p_final, alpha=w_distill)
            if layer_ce:  # dCE(l_i)/dl_i = softmax(l_i) - onehot(y), mean over the k layers
                l[rows, y] -= w_layer
        else:
            l.zero_()
        if grad_kl is not None:
            l.add_(grad_kl, alpha=w_distill)
        l.addcmul_(g_z, coef[:, i:i + 1])
        grad_states.append((l.to(weight.dtype) @ weight).to(states[i].dtype))
    if row_weight is not None:  # rows that do not count: no gradient (zeroed after the matmuls: (n, dim))
        grad_coef = grad_coef * row_weight[:, None]
        grad_states = [g * row_weight[:, None].to(g.dtype) for g in grad_states]
    return sums, grad_coef, grad_states


def attach_mod(model, cfg: MoDConfig, verbose=True):
    """Build the ensemble and register it as model.mod (its own parameters trainable; nothing else changes)."""
    n = model.config.n_layers
    if not 1 <= cfg.k <= n:
        raise ValueError(f"MoD k (--mod-k) = {cfg.k}: the model has {n} layers")
    model.mod = DepthEnsemble(model, cfg)
    if verbose:
        own = sum(p.numel() for p in model.mod.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"MoD over the last {cfg.k} of {n} layers ({cfg.router} router, start {cfg.start}, top_k="
              f"{cfg.top_k or cfg.k}): {own:,} new parameters, {trainable:,} trainable in all")
    return model.mod


def layer_logits(model, hidden):
    """Each of the last k layers alone through its own norm and the LM head: a list of k (B, T, V) tensors."""
    return [model.mod.head(model, i, h) for i, h in enumerate(hidden[-model.mod.k:])]


def ensemble_coefficients(model, hidden, n_pad=None):
    """(B, T, k) routing weights of the ensemble: the coefficients c of z = sum_i c_i l_i (start "final": the
    weight g of the router's weights plus 1 - g on the final layer)."""
    return model.mod.coefficients(model, hidden, n_pad=n_pad)


def routing_stats(weights, mask=None, eps=1e-3):
    """Per-layer figures over the tokens where mask (B, T) is true (all if None), index 0 = the earliest late
    layer: mean_weight; sparsity = the fraction of tokens on which the layer's |weight| is below eps (exactly
    the fraction dropped by Top-K when it is on); top1 = the fraction of tokens on which it has the largest."""
    w = weights.reshape(-1, weights.size(-1)).float()
    if mask is not None:
        w = w[mask.reshape(-1).bool()]
    top1 = F.one_hot(w.argmax(-1), w.size(-1)).float()
    return {"tokens": w.size(0), "mean_weight": w.mean(0).tolist(),
            "sparsity": (w.abs() < eps).float().mean(0).tolist(), "top1": top1.mean(0).tolist()}
