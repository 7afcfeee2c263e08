"""
LLaMA in one file: the model (RMSNorm, RoPE, grouped-query attention, SwiGLU) and KV-cache generation. LoRA is in
lora.py, the loss at the target positions in head_loss.py, reading and writing checkpoint files (Meta, Hugging
Face, GGUF) in weights.py.

Layout choice: RoPE pairs x[i] with x[i + head_dim/2] (Hugging Face's layout), so HF weights load as they are
and Meta's and GGUF's q/k rows are permuted once at load time (docs/design.md#rope-layouts).

Two hooks let the add-ons change the forward pass without this file knowing them:
    model.molex  the layer hook: called instead of each block (molex.py mixes in a second block)
    model.mod    the head hook: gets every layer's output and returns (logits, loss) (mod.py's depth ensemble,
                 whose logits are None when it computes a loss; scoring.py's logit lens stands in for it to read
                 out one layer)

Logits only where something reads them: with targets, the LM head and the cross-entropy run at the target
positions only, a chunk of rows at a time (head_loss.py: no (tokens x vocab) tensor beyond one chunk is kept for
backward); without targets, `where` (a (B, T) mask) reads out only the chosen positions (eval's scored tokens,
generation's last prompt position).
"""
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from head_loss import head_loss, target_rows

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
