"""
LLaMA-2 in one file: the model (RMSNorm, RoPE, grouped-query attention, SwiGLU), KV-cache generation,
LoRA written by hand, and direct loading of Meta and Hugging Face checkpoints (plus export to the latter).

Layout choice: RoPE pairs x[i] with x[i + head_dim/2] (Hugging Face's layout), so HF weights load as they are
and Meta's q/k rows are permuted once at load time (DESIGN.md §2.2).
"""
import json
import math
import mmap
import os
import pickle
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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


def rope_tables(head_dim, max_len, theta, device=None):
    """cos and sin of every (position, frequency) angle, each (max_len, head_dim), in HF's half-split layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
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
        self.mod = None  # mod.py: the depth ensemble replaces the output head
        self.molex = None  # molex.py: each layer is mixed with a gated layer expert
        self.grad_checkpointing = False
        self.build_rope()

    def build_rope(self, device=None):
        # not in checkpoints (persistent=False): rebuilt after loading onto the meta device
        cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed=0, std=0.02):
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                p.copy_(torch.ones_like(p) if p.dim() == 1 else torch.randn(p.shape, generator=g) * std)
        return self

    def forward(self, idx, targets=None, *, cache=None, n_pad=None, prompt_end=None, return_hidden=False):
        """idx (B, T) -> logits (B, T, vocab); with targets also the loss (-100 = ignored); with return_hidden
        also the hidden state after every layer. n_pad (B,): left-padding length of each row. prompt_end (B,)
        or int: the columns before it hold each row's prompt; MoLEx routes a sequence on its prompt only."""
        B, T = idx.shape
        start = 0
        if cache is not None:
            start, n_pad = cache.pos, cache.n_pad
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
            if return_hidden or self.mod is not None:
                hidden.append(x)
        if cache is not None:
            cache.pos += T

        if self.mod is not None:
            logits, loss = self.mod(self, hidden, targets, cache=cache, n_pad=n_pad)
        else:
            logits = self.lm_head(self.norm(x))
            loss = None
            if targets is not None:
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                       ignore_index=-100)
        if self.molex is not None and loss is not None:
            loss = loss + self.molex.aux_loss()  # the gate's load-balancing loss of this pass (0 when off)
        out = (logits,) if targets is None else (logits, loss)
        if return_hidden:
            out = out + (hidden,)
        return out[0] if len(out) == 1 else out

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, use_cache=True,
                 generator=None):
        """prompts: list of token-id lists (any lengths; left-padded here). Returns the new tokens of each
        row, stopping at (and leaving out) eos_id. temperature 0 is greedy. use_cache=False recomputes the
        whole sequence at every step (slow; the reference the cache is tested against)."""
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
        done = torch.zeros(B, dtype=torch.bool, device=device)
        new = []
        for step in range(max_new_tokens):
            if use_cache:
                logits = self(seq if step == 0 else seq[:, -1:], cache=cache)
            else:
                logits = self(seq, n_pad=n_pad if bool(n_pad.any()) else None, prompt_end=longest)
            logits = logits[:, -1].float()
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
            if eos_id is not None:
                done |= nxt == eos_id
                if bool(done.all()):
                    break
        rows = torch.stack(new, 1).tolist() if new else [[] for _ in prompts]
        return [r[:r.index(eos_id)] if eos_id in r else r for r in rows]


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


def apply_lora(model, rank=8, alpha=16, dropout=0.0, targets=("q", "v"), last_layers=None, verbose=True):
    """Freeze the model, then wrap the `targets` projections of all layers (or of the last `last_layers`)
    with LoRA. Returns the number of trainable parameters."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {list(LORA_TARGETS)}")
    n = model.config.n_layers
    if last_layers is not None and not 1 <= last_layers <= n:
        raise ValueError(f"LoRA on the last {last_layers} layers: the model has {n}")
    if lora_layers(model):
        raise ValueError("LoRA is already applied to this model: merge_lora(model) and rebuild, or build a new one")
    model.requires_grad_(False)
    for i in range(n - (last_layers or n), n):
        for t in targets:
            parent_name, attr = LORA_TARGETS[t].split(".")
            parent = getattr(model.layers[i], parent_name)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if verbose:
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA r={rank} on {','.join(targets)} of {last_layers or n} layers: {trainable:,} trainable "
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


# ----------------------------------------------------------------------------------------------------------
# Loading. Both formats map their key names onto ours; tensors are mmapped and assigned (never copied) into a
# model built on the meta device, so loading holds one copy of the weights.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}

HF_NAMES = [(r"model\.embed_tokens\.", "embed."), (r"model\.norm\.", "norm."), (r"lm_head\.", "lm_head."),
            (r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.", r"layers.\1.attn.\2."),
            (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.", r"layers.\1.mlp.\2."),
            (r"model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attn_norm."),
            (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.mlp_norm.")]

META_NAMES = [(r"tok_embeddings\.", "embed."), (r"norm\.", "norm."), (r"output\.", "lm_head."),
              (r"layers\.(\d+)\.attention\.w(q|k|v|o)\.", r"layers.\1.attn.\2."),
              (r"layers\.(\d+)\.feed_forward\.w1\.", r"layers.\1.mlp.gate."),
              (r"layers\.(\d+)\.feed_forward\.w3\.", r"layers.\1.mlp.up."),
              (r"layers\.(\d+)\.feed_forward\.w2\.", r"layers.\1.mlp.down."),
              (r"layers\.(\d+)\.attention_norm\.", r"layers.\1.attn_norm."),
              (r"layers\.(\d+)\.ffn_norm\.", r"layers.\1.mlp_norm.")]


OURS_TO_HF = [(r"embed\.weight", "model.embed_tokens.weight"), (r"norm\.weight", "model.norm.weight"),
              (r"lm_head\.weight", "lm_head.weight"),
              (r"layers\.(\d+)\.attn\.(q|k|v|o)\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
              (r"layers\.(\d+)\.mlp\.(gate|up|down)\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
              (r"layers\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
              (r"layers\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight")]


def rename(key, table):
    """Map a key through the first (pattern, replacement) of `table` that matches its start; None if none."""
    for pattern, repl in table:
        if re.match(pattern, key):
            return re.sub("^" + pattern, repl, key)
    return None


def read_safetensors(path):
    """{name: tensor} backed by a copy-on-write mmap of the file: nothing is read until it is used."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{path}: corrupt safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else b""
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape, (begin, end) = info["shape"], info["data_offsets"]
            if not all(type(v) is int and v >= 0 for v in [*shape, begin, end]):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors entry for {name!r}: {info}") from None
        count = math.prod(shape)
        if not 0 <= begin <= end <= size - 8 - n or end - begin != count * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} ({info['dtype']} {shape}) has data offsets "
                             f"{[begin, end]} that do not fit its shape or the file ({size} bytes)")
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + begin) if count else torch.empty(0, dtype=dtype)
        tensors[name] = t.view(shape)
    return tensors


def load_pickled(path):
    """torch.load that never runs pickle code: weights_only=True, mmapped."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load: this checkpoint needs weights_only=False, i.e. it would run "
                         f"arbitrary pickle code. Convert it to safetensors from a source you trust.\n({e})") from None
    except RuntimeError as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e})") from None


def meta_to_hf_rows(w, n_heads):
    """Meta rotates adjacent pairs (x[2i], x[2i+1]); we rotate halves: permute the rows inside each head."""
    out_dim, d = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, d).transpose(1, 2).reshape(out_dim, d)


def config_from_meta(params):
    return LlamaConfig(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                       n_kv_heads=params.get("n_kv_heads"), vocab_size=params.get("vocab_size", -1),
                       multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                       norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
                       max_seq_len=params.get("max_seq_len", 4096))


def config_from_hf(c):
    rope = c.get("rope_parameters") or {}  # transformers >= 5 writes rope_theta (and any scaling) here
    if c.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.json: rope_scaling={c.get('rope_scaling') or rope} is not supported "
                         f"(LLaMA-2 has none)")
    return LlamaConfig(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                       n_kv_heads=c.get("num_key_value_heads"), vocab_size=c["vocab_size"],
                       hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
                       rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
                       max_seq_len=c.get("max_position_embeddings", 4096))


def iter_meta(folder):
    """Yield (our key, tensor, where) from params.json + consolidated.NN.pth, merging shards."""
    params = json.loads((folder / "params.json").read_text())
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{folder}: params.json but no consolidated.NN.pth shard")
    states = [load_pickled(p) for p in shards]
    if params.get("vocab_size", -1) <= 0:  # -1 in Meta's release: the tokenizer's size, i.e. the embedding's
        params["vocab_size"] = states[0]["tok_embeddings.weight"].shape[0]
    cfg = config_from_meta(params)
    for p, state in zip(shards[1:], states[1:]):  # every shard holds a slice of every tensor
        if state.keys() != states[0].keys():
            diff = sorted(state.keys() ^ states[0].keys())
            raise ValueError(f"{p}: its tensors differ from {shards[0].name}'s (e.g. {diff[:3]}): shards of "
                             f"different checkpoints?")
    yield cfg
    for key in states[0]:
        if key == "rope.freqs":
            continue
        name = rename(key, META_NAMES)
        parts = [s[key] for s in states]
        if len(parts) == 1 or parts[0].dim() == 1:  # 1-D tensors are replicated in every shard
            w = parts[0]
        else:  # embeddings, wo and w2 are split along the input dim, the rest along the output dim
            split_dim = 1 if re.search(r"tok_embeddings|attention\.wo|feed_forward\.w2", key) else 0
            w = torch.cat(parts, dim=split_dim)
        if name and (name.endswith("attn.q.weight") or name.endswith("attn.k.weight")):
            heads = cfg.n_heads if ".q." in name else cfg.n_kv_heads
            if w.shape[0] % (2 * heads) == 0:  # else the shape check below names the problem
                w = meta_to_hf_rows(w, heads)
        yield name, w, f"{key} in {shards[0].parent}/consolidated.*.pth ({len(shards)} shards)"


def iter_hf(folder):
    """Yield (our key, tensor, where) from config.json + safetensors or pytorch_model*.bin (through the index)."""
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    yield cfg
    for index_name, single, reader in [("model.safetensors.index.json", "model.safetensors", read_safetensors),
                                       ("pytorch_model.bin.index.json", "pytorch_model.bin", load_pickled)]:
        if (folder / index_name).exists():
            weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            break
        if (folder / single).exists():
            files = [single]
            break
    else:
        raise FileNotFoundError(f"{folder}: config.json but no model.safetensors, model.safetensors.index.json, "
                                f"pytorch_model.bin or pytorch_model.bin.index.json")
    for file in files:
        if not (folder / file).exists():
            raise FileNotFoundError(f"{folder / file}: shard named in {folder / index_name} is missing")
    for file in files:
        for key, w in reader(folder / file).items():
            if "rotary_emb.inv_freq" not in key:
                yield rename(key, HF_NAMES), w, f"{key} in {folder / file}"


def from_pretrained(folder, dtype=None, device="cpu"):
    """Load a LLaMA checkpoint folder in Meta's or Hugging Face's format. dtype None keeps the file's."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    if (folder / "params.json").exists():
        stream = iter_meta(folder)
    elif (folder / "config.json").exists():
        stream = iter_hf(folder)
    else:
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise ValueError(f"{folder}: neither Meta's format (params.json + consolidated.NN.pth) nor Hugging Face's "
                         f"(config.json + *.safetensors or pytorch_model*.bin); it holds {found}")
    cfg = next(stream)
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = {}
    for name, w, where in stream:
        if name is None or name not in expected:
            raise ValueError(f"unexpected tensor {where}: not a LLaMA weight")
        if w.shape != expected[name]:
            raise ValueError(f"shape mismatch for {name} ({where}): checkpoint has {tuple(w.shape)}, the config "
                             f"implies {tuple(expected[name])}")
        state[name] = w.to(device=device, dtype=dtype or w.dtype)
    if "lm_head.weight" not in state and "embed.weight" in state:  # tied embeddings (not LLaMA-2, some others)
        state["lm_head.weight"] = state["embed.weight"]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(state, assign=True)
    model.build_rope(device)
    return model.eval()


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as safetensors, atomically (a temporary file renamed at the end)."""
    inv_dtypes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": inv_dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():
            f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def save_hf(model, folder, dtype=None, extra_config=None):
    """Export in Hugging Face's format (config.json + model.safetensors), LoRA merged into the weights.
    Only the LLaMA weights are written: MoD / MoLEx add-ons have no place in LlamaForCausalLM."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    tensors = {}
    for name, w in model.state_dict().items():
        hf = rename(name, OURS_TO_HF)
        if hf is None:  # LoRA factors (merged below), MoD / MoLEx parameters
            continue
        module = name.rsplit(".", 1)[0]
        if module in lora and not lora[module].merged:
            w = w + lora[module].delta_weight().to(w.dtype)
        tensors[hf] = w.to(dtype or w.dtype)
    save_safetensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
              "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
              "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
              "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu", "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."), **(extra_config or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
