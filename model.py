"""
LLaMA in one file: the model (RMSNorm, RoPE, grouped-query attention, SwiGLU), KV-cache generation and LoRA
written by hand. Reading and writing checkpoint files (Meta, Hugging Face, GGUF) is in weights.py.

Layout choice: RoPE pairs x[i] with x[i + head_dim/2] (Hugging Face's layout), so HF weights load as they are
and Meta's and GGUF's q/k rows are permuted once at load time (docs/design.md#rope-layouts).

Two hooks let the add-ons change the forward pass without this file knowing them:
    model.molex  the layer hook: called instead of each block (molex.py mixes in a second block)
    model.mod    the head hook: gets every layer's output and returns (logits, loss) (mod.py's depth ensemble,
                 whose logits are None when it computes a loss; eval.py's logit lens stands in for it to read
                 out one layer)

Logits only where something reads them: with targets, the LM head and the cross-entropy run at the target
positions only, a chunk of rows at a time (head_loss: no (tokens x vocab) tensor beyond one chunk is kept for
backward); without targets, `where` (a (B, T) mask) reads out only the chosen positions (eval's scored tokens,
generation's last prompt position).
"""
import math
from dataclasses import dataclass, field, fields
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no grouping)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # FFN width; None: LLaMA's rule from dim, ffn_dim_multiplier, multiple_of
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False  # the LM head is the embedding matrix (one Parameter), as in SmolLM2
    # LLaMA-3.1+'s RoPE scaling in Hugging Face's spelling: {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}; None: plain RoPE
    rope_scaling: dict | None = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            h = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                h = int(self.ffn_dim_multiplier * h)
            self.hidden_dim = self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"bad config: dim={self.dim} must split into n_heads={self.n_heads} heads of even "
                             f"size, and n_heads must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rope_scaling is not None:
            s = self.rope_scaling
            if s.get("rope_type") != "llama3" or set(s) != {"rope_type", *LLAMA3_ROPE_KEYS}:
                raise ValueError(f"bad config: rope_scaling {s} is not LLaMA-3's (rope_type 'llama3' with "
                                 f"{', '.join(LLAMA3_ROPE_KEYS)})")
            if not s["high_freq_factor"] > s["low_freq_factor"] > 0 or s["factor"] <= 0:
                raise ValueError(f"bad config: rope_scaling {s} needs factor > 0 and "
                                 f"high_freq_factor > low_freq_factor > 0")

    @property
    def head_dim(self):
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in fp32 (as the reference does), cast back, then scale
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def llama3_scaled(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """LLaMA-3.1's longer context: frequencies whose wavelength exceeds original / low_freq_factor positions
    turn `factor` times slower, those below original / high_freq_factor stay, and those between blend the two."""
    wavelen = 2 * math.pi / inv_freq
    slow = inv_freq / factor
    s = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - s) * slow + s * inv_freq
    out = torch.where(wavelen > original_max_position_embeddings / low_freq_factor, slow, blended)
    return torch.where(wavelen < original_max_position_embeddings / high_freq_factor, inv_freq, out)


def rope_tables(head_dim, max_len, theta, device=None, scaling=None):
    """cos and sin of every (position, frequency) angle, each (max_len, head_dim), in HF's half-split layout.
    scaling: LlamaConfig.rope_scaling (LLaMA-3's) or None."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    if scaling is not None:
        inv_freq = llama3_scaled(inv_freq, *(scaling[k] for k in LLAMA3_ROPE_KEYS))
    angles = torch.outer(torch.arange(max_len, device=device).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # real arithmetic instead of complex numbers: torch.compile generates code for this
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, rope, mask=None, kv_store=None):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = (t.to(x.dtype) for t in rope)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_store is not None:  # generation: append to the cache, attend to everything cached so far
            k, v = kv_store(k, v)
        # no mask: plain causal attention (training), or one new token that may see the whole cache
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask=None, kv_store=None):
        x = x + self.attn(self.attn_norm(x), rope, mask, kv_store)
        return x + self.mlp(self.mlp_norm(x))


class KVCache:
    """Keys and values for generation, one slot per attention call site (a layer; MoLEx adds its experts)."""

    def __init__(self, cfg, n_sites, batch, max_len, device, dtype):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_sites)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_sites)]
        self.pos = 0  # tokens cached so far
        self.n_pad = None  # left-padding length of each row
        self.state = {}  # per-generation decisions of add-ons (MoLEx keeps its routing here)

    def store(self, site, k, v, rows=None):
        """Write the new keys/values at self.pos and return all cached so far (for `rows` of the batch)."""
        end = self.pos + k.size(2)
        K, V = self.keys[site], self.values[site]
        if rows is None:
            K[:, :, self.pos:end], V[:, :, self.pos:end] = k, v
            return K[:, :, :end], V[:, :, :end]
        K[rows, :, self.pos:end], V[rows, :, self.pos:end] = k, v
        return K[rows, :, :end], V[rows, :, :end]

    def slot(self, site, rows=None):
        return partial(self.store, site, rows=rows)


def attention_mask(n_pad, start, T, device):
    """Boolean (B, 1, T, start + T) mask: query i sees key j iff j <= start + i and j is not left padding."""
    q_pos = torch.arange(start, start + T, device=device)[:, None]
    k_pos = torch.arange(start + T, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None]
    if n_pad is not None:
        allowed = allowed & (k_pos >= n_pad[:, None, None])
        allowed = allowed | (k_pos == q_pos)  # a padding query sees itself, so no row is all -inf (NaN)
    return allowed[:, None]


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.mod = None  # the head hook (mod.py's depth ensemble replaces the output head)
        self.molex = None  # the layer hook (molex.py mixes each layer with a gated layer expert)
        self.grad_checkpointing = False
        self.build_rope()

    def build_rope(self, device=None):
        # not in checkpoints (persistent=False): rebuilt after loading onto the meta device
        c = self.config
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, device, c.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed=0, std=0.02):
        """N(0, std) matrices and unit norms, drawn in place on the parameters' device and dtype (a model made on
        the meta device and moved with to_empty gets no float32 copy)."""
        g = torch.Generator(device=self.embed.weight.device).manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g, device=p.device) * std)
        return self

    def addons(self):
        """The add-ons attached (model.mod, model.molex): each offers after_step() and log_numbers(), which
        train.py calls without naming them."""
        return [addon for addon in (self.mod, self.molex) if addon is not None]

    def forward(self, idx, targets=None, *, cache=None, n_pad=None, prompt_end=None, where=None):
        """idx (B, T) -> (logits, loss). Without targets: (logits (B, T, vocab), None), or with where, a
        (B, T) bool mask, the logits of those positions only, (n, vocab) in row-major order. With targets
        (-100 = ignored): (None, the mean loss over the targets), the logits made at the target positions only.
        n_pad (B,): left-padding length of each row. prompt_end (B,) or int: the columns before it hold each
        row's prompt (MoLEx routes a sequence on its prompt only)."""
        if cache is not None:
            n_pad = cache.n_pad  # generation: the cache knows each row's padding
        hidden = self.trunk(idx, cache, n_pad, prompt_end, keep_all=self.mod is not None)
        return self.output(hidden, targets, cache, n_pad, where)

    def forward_hidden(self, idx, *, n_pad=None, prompt_end=None, where=None):
        """(logits, hidden): the model's logits (at `where` only, as in forward) and the hidden state after
        every layer (for layer readouts)."""
        hidden = self.trunk(idx, None, n_pad, prompt_end, keep_all=True)
        return self.output(hidden, None, None, n_pad, where)[0], hidden

    def trunk(self, idx, cache, n_pad, prompt_end, keep_all):
        """Embedding and blocks: the list of every layer's output (only the last one unless keep_all)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        pos = torch.arange(start, start + T, device=idx.device)
        mask = None
        if n_pad is not None:  # per-row positions: each row's first real token is at position 0
            pos = (pos[None] - n_pad[:, None]).clamp(min=0)[:, None]  # (B, 1, T) broadcasts over heads
        if n_pad is not None or (start > 0 and T > 1):
            mask = attention_mask(n_pad, start, T, idx.device)
        rope = (self.rope_cos[pos], self.rope_sin[pos])

        x = self.embed(idx)
        hidden = []
        for i, block in enumerate(self.layers):
            if self.molex is not None:
                x = self.molex(self, i, x, rope, mask, cache, n_pad=n_pad, prompt_end=prompt_end)
            elif self.grad_checkpointing and self.training:
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache.slot(i) if cache is not None else None)
            if keep_all:
                hidden.append(x)
        if cache is not None:
            cache.pos += T
        return hidden if keep_all else [x]

    def output(self, hidden, targets, cache, n_pad, where=None):
        if self.mod is not None:
            logits, loss = self.mod(self, hidden, targets, cache=cache, n_pad=n_pad, where=where)
        elif targets is not None:  # the head at the target positions only, a chunk at a time
            (h,), y, real = target_rows(targets, hidden[-1])
            logits, loss = None, head_loss(self.norm(h), self.lm_head.weight, y, real)
        else:
            logits, loss = self.lm_head(self.norm(hidden[-1] if where is None else hidden[-1][where])), None
        if self.molex is not None and loss is not None:
            loss = loss + self.molex.aux_loss()  # the gate's load-balancing loss of this pass (0 when off)
        return logits, loss

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, use_cache=True,
                 generator=None, on_token=None):
        """prompts: list of token-id lists (any lengths; left-padded here). Returns the new tokens of each
        row, stopping at (and leaving out) eos_id: one id, or several (instruct models end a turn with any of
        their end tokens). temperature 0 is greedy. use_cache=False recomputes the whole sequence at every
        step (slow; the reference the cache is tested against). on_token(list of B ids) is called after every
        step (streaming)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs at least one prompt and no empty prompt (start with BOS)")
        device = self.embed.weight.device
        B, longest = len(prompts), max(len(p) for p in prompts)
        total = longest + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) > max_seq_len "
                             f"({self.config.max_seq_len})")
        n_pad = torch.tensor([longest - len(p) for p in prompts], device=device)
        seq = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
        cache = None
        if use_cache:
            n_sites = self.config.n_layers * (2 if self.molex is not None else 1)
            cache = KVCache(self.config, n_sites, B, total, device, self.embed.weight.dtype)
            cache.n_pad = n_pad if bool(n_pad.any()) else None
        stop = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else sorted(set(eos_id))
        stop_t = torch.tensor(stop, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        new = []
        for step in range(max_new_tokens):
            inp = seq if step == 0 or not use_cache else seq[:, -1:]
            last = torch.zeros(inp.shape, dtype=torch.bool, device=device)
            last[:, -1] = True  # only the last position is sampled: the prefill reads out nothing else
            if use_cache:
                logits, _ = self(inp, cache=cache, where=last)
            else:
                n_pad_or_none = n_pad if bool(n_pad.any()) else None
                logits, _ = self(inp, n_pad=n_pad_or_none, prompt_end=longest, where=last)
            logits = logits.float()  # (B, vocab)
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)
            new.append(nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if on_token is not None:
                on_token(nxt.tolist())
            if stop:
                done |= torch.isin(nxt, stop_t)
                if bool(done.all()):
                    break
        rows = torch.stack(new, 1).tolist() if new else [[] for _ in prompts]
        return [r[:min((r.index(i) for i in stop if i in r), default=len(r))] for r in rows]


# ----------------------------------------------------------------------------------------------------------
# The LM head and its cross-entropy at the target positions only, a chunk of rows at a time

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


# ----------------------------------------------------------------------------------------------------------
# LoRA: y = W x + (alpha / r) * B A dropout(x), with W frozen, A Kaiming-uniform and B zero (so it starts at W)

class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0):
        super().__init__()
        self.weight = base.weight  # the same Parameter, so the state-dict key of the base weight is unchanged
        self.weight.requires_grad_(False)
        # adapters are fp32 even on a bf16 base: the optimizer needs the precision
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.merged:
            return y
        delta = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (delta * self.scale).to(y.dtype)

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False


LORA_TARGETS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o",
                "gate": "mlp.gate", "up": "mlp.up", "down": "mlp.down"}


def check_choices(cfg, method, prefix):
    """Each field of a config dataclass whose metadata lists "choices" holds one of them (else a ValueError
    naming the flag); the add-ons' configs call it from __post_init__."""
    for f in fields(cfg):
        allowed, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if allowed is not None and value not in allowed:
            raise ValueError(f"unknown {method} {f.name} (--{prefix}-{f.name.replace('_', '-')}) {value!r}; "
                             f"choose from {allowed}")


@dataclass
class LoRAConfig:
    """LoRA's settings; train.py's --lora-* flags are made from these fields (help text included)."""
    rank: int = field(default=8, metadata={"help": "rank r of the LoRA update B A"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scale is alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    targets: str = field(default="q,k,v,o,gate,up,down",
                         metadata={"help": f"comma list of projections to adapt, from {','.join(LORA_TARGETS)}"})
    layers: str = field(default="all", metadata={"help": "'all', or k: adapt only the last k layers"})
    plus: float = field(default=1.0, metadata={"help": "LoRA+ (Hayou et al., 2024): the B factors learn this many "
                                                       "times faster than the A factors (1 = plain LoRA)"})

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"--lora-rank must be >= 1, got {self.rank} (the LoRA rank)")
        if self.alpha <= 0 or self.plus <= 0:
            raise ValueError(f"LoRA alpha and plus (--lora-alpha, --lora-plus) must be > 0, got {self.alpha}, "
                             f"{self.plus}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout (--lora-dropout) must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.target_list if t not in LORA_TARGETS]
        if not self.target_list or unknown:
            raise ValueError(f"--lora-targets {self.targets!r}: unknown LoRA targets {unknown or 'empty list'}; "
                             f"choose from {','.join(LORA_TARGETS)}")
        if self.layers != "all" and not (self.layers.isdigit() and int(self.layers) >= 1):
            raise ValueError(f"--lora-layers: LoRA on the last {self.layers} layers: give 'all' or a number >= 1")

    @property
    def target_list(self):
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    @property
    def last_layers(self):
        return None if self.layers == "all" else int(self.layers)


def freeze_base(model):
    """Freeze the LLaMA weights; the add-ons' own parameters (model.mod, model.molex) stay as they are."""
    for part in (model.embed, model.layers, model.norm, model.lm_head):
        part.requires_grad_(False)


def apply_lora(model, rank=8, alpha=16, dropout=0.0, targets=("q", "v"), last_layers=None, verbose=True, cfg=None):
    """Freeze the LLaMA weights, then wrap the `targets` projections of all layers (or of the last
    `last_layers`) with LoRA; cfg (a LoRAConfig) replaces the other arguments. Returns the number of
    trainable parameters."""
    if cfg is None:
        cfg = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout,
                         targets=targets if isinstance(targets, str) else ",".join(targets),
                         layers="all" if last_layers is None else str(last_layers))
    n, last = model.config.n_layers, cfg.last_layers
    if last is not None and last > n:
        raise ValueError(f"--lora-layers: LoRA on the last {last} layers: the model has {n}")
    if lora_layers(model):
        raise ValueError("LoRA is already applied to this model: merge_lora(model) and rebuild, or build a new one")
    freeze_base(model)
    for i in range(n - (last or n), n):
        for t in cfg.target_list:
            parent_name, attr = LORA_TARGETS[t].split(".")
            parent = getattr(model.layers[i], parent_name)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), cfg.rank, cfg.alpha, cfg.dropout))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if verbose:
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA r={cfg.rank} on {cfg.targets} of {last or n} layers: {trainable:,} trainable "
              f"parameters of {total:,} ({100 * trainable / total:.3f}%)")
    return trainable


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model):
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model):
    for m in lora_layers(model):
        m.unmerge()


