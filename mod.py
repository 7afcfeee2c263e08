"""
MoD: Mixture-of-Depths ensemble tuning (Luo & Specia, 2024; docs/design.md#mod). Not DeepMind's token skipping.

The last k layers each read out logits through their own trainable RMSNorm and the shared, frozen LM head; a
router mixes them in logit space, z = sum_i w_i * lm_head(N_i(h_i)), and the final layer (with the model's own
frozen norm) distills into the others. Training loss, averaged over unmasked tokens (targets != -100):

    CE(z, y) + distill_weight * mean_{i < k} T^2 * KL(p_final.detach() || p_i)  [+ mean_{all k} CE(logits_i, y)]

with p = softmax(logits / T). T^2 keeps the distillation gradients the same size for every T (Hinton et al.).

Usage: attach_mod(model, MoDConfig(k=4)) registers the ensemble as model.mod, the model's head hook; then
model(idx) returns the ensemble logits and model.generate() generates with them. It freezes nothing: the base is
frozen where a run's model is built (checkpoint.build_model, or apply_lora).
"""
import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ROUTERS = ("token", "sequence", "vector")
DIRECTIONS = ("forward", "reverse")


@dataclass
class MoDConfig:
    """MoD's settings; train.py's --mod-* flags are made from these fields (help text included)."""
    k: int = field(default=4, metadata={"switch": True, "help": (
        "MoD: mix the logits of the last k layers, each read out through its own trainable norm and the frozen LM "
        "head (off unless given; 1: the plain model)")})
    # sequence: causal, so cached generation equals the full forward (needs model.forward's cache= and n_pad=)
    router: str = field(default="token", metadata={"choices": ROUTERS, "help": (
        "routing weights: token = a zero-initialized linear layer on each token's final normed state; sequence = "
        "the same on its running mean over the sequence so far; vector = k learned weights shared by all tokens "
        "(all start as the uniform average)")})
    top_k: int | None = field(default=None, metadata={"help": (
        "keep only the K largest routing weights per token, renormalized (default: all k)")})
    router_lr: float | None = field(default=None, metadata={"help": (
        "peak lr of the router alone, in its own AdamW group without weight decay (default: --lr)")})
    distill_weight: float = field(default=1.0, metadata={"help": (
        "lambda: weight of the final layer's distillation into the other late layers (0: off)")})
    distill_temp: float = field(default=1.0, metadata={"help": "distillation temperature T (the KL is multiplied by T^2)"})
    distill_direction: str = field(default="forward", metadata={"choices": DIRECTIONS, "help": (
        "forward: KL(p_final || p_layer); reverse: KL(p_layer || p_final); the final layer is the detached teacher")})
    layer_ce: bool = field(default=False, metadata={"help": (
        "also train each late layer alone with its own CE loss (averaged over the k layers)")})
    chunk_size: int | None = field(default=None, metadata={"help": (
        "compute the MoD loss this many tokens at a time, recomputed in backward, so the k vocab-size logits "
        "tensors of the whole batch never exist (e.g. 1024 for LLaMA-2-7B, k=4); default: all at once")})

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"MoD k (--mod-k) must be >= 1, got {self.k}")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown MoD router (--mod-router) {self.router!r}; choose from {ROUTERS}")
        if self.top_k is not None and not 1 <= self.top_k <= self.k:
            raise ValueError(f"MoD top_k (--mod-top-k) must be between 1 and k={self.k}, got {self.top_k}")
        if self.distill_direction not in DIRECTIONS:
            raise ValueError(f"unknown MoD distill_direction (--mod-distill-direction) {self.distill_direction!r};"
                             f" choose from {DIRECTIONS}")
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
            nn.init.zeros_(self.router.weight)  # zero scores: the uniform average at step 0
            nn.init.zeros_(self.router.bias)
        self.only_layer = None  # evaluation: an index 0..k-1 uses that late layer alone (k-1 = the final layer)
        self.last_losses = {}  # the loss terms of the last call with targets, detached tensors (for logging)

    def head(self, model, i, h):
        """Late layer i's logits (fp32): its own norm (the model's final norm for i = k-1), then the LM head."""
        x = (self.norms[i] if i < self.k - 1 else model.norm)(h)
        return model.lm_head(x.to(model.lm_head.weight.dtype)).float()

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
        """(B, T, k) mixing weights of the last k layers, after Top-K (each row sums to 1)."""
        B, T, _ = hidden[-1].shape
        if self.only_layer is not None:
            if not 0 <= self.only_layer < self.k:
                raise ValueError(f"MoD only_layer={self.only_layer}: must be 0..{self.k - 1} (k-1 = the final layer)")
            return F.one_hot(torch.tensor(self.only_layer, device=hidden[-1].device), self.k).float().expand(B, T, -1)
        if self.cfg.router == "vector":
            scores = self.scores.expand(B, T, -1)
        else:
            x = model.norm(hidden[-1]).float()
            if self.cfg.router == "sequence":
                x = self.running_mean(x, cache, n_pad)
            scores = self.router(x)
        top_k = self.cfg.top_k or self.k
        if top_k < self.k:
            # ties (e.g. the zero-initialized router) go to the later layers: a stable sort of the reversed scores
            order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices[..., :top_k]
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, self.k - 1 - order, True)
            scores = scores.masked_fill(~keep, float("-inf"))
        return F.softmax(scores, dim=-1)

    def loss_sums(self, model, hs, w, y, return_logits=False):
        """Sums over the unmasked tokens of one chunk (hs: k tensors (n, dim), w: (n, k), y: (n,)) of the
        ensemble CE, the distillation KL (mean over the non-final layers, times T^2) and the per-layer CE."""
        cfg = self.cfg
        logits = [self.head(model, i, h) for i, h in enumerate(hs)]
        z = sum(w[:, i:i + 1] * l for i, l in enumerate(logits))
        ce = F.cross_entropy(z, y, ignore_index=-100, reduction="sum")
        distill = layer_ce = z.new_zeros(())
        if cfg.distill_weight > 0 and self.k > 1:
            real = (y != -100).float()
            logp_final = F.log_softmax(logits[-1] / cfg.distill_temp, dim=-1).detach()
            if cfg.distill_direction == "forward":
                # KL(p_f || p_i) = sum p_f log p_f - sum p_f s_i + logsumexp(s_i), s_i = l_i / T (sum p_f = 1):
                # the teacher's terms once, and no log-softmax of each student over the vocabulary
                p_final = logp_final.exp()
                neg_entropy = (p_final * logp_final).sum(-1)
                for l in logits[:-1]:
                    s = l / cfg.distill_temp
                    distill = distill + ((neg_entropy - (p_final * s).sum(-1) + torch.logsumexp(s, -1)) * real).sum()
            else:  # KL(p_i || p_f)
                for l in logits[:-1]:
                    logp = F.log_softmax(l / cfg.distill_temp, dim=-1)
                    distill = distill + ((logp.exp() * (logp - logp_final)).sum(-1) * real).sum()
            distill = distill * cfg.distill_temp ** 2 / (self.k - 1)
        if cfg.layer_ce:
            layer_ce = sum(F.cross_entropy(l, y, ignore_index=-100, reduction="sum") for l in logits) / self.k
        sums = torch.stack([ce, distill, layer_ce])
        return (sums, z) if return_logits else sums

    def forward(self, model, hidden, targets=None, cache=None, n_pad=None):
        """Without targets: the ensemble logits (B, T, V), fp32. With targets: (logits, loss); with chunk_size
        set the loss is computed chunk by chunk (recomputed in backward) and logits is None. last_losses gets
        the per-token means of the terms: ce, distill (before distill_weight, T^2 included), layer_ce."""
        hs = hidden[-self.k:]
        B, T, dim = hs[-1].shape
        w = self.routing_weights(model, hidden, cache, n_pad)
        if targets is None:  # summed layer by layer: one layer's logits besides z at a time
            return sum(w[..., i:i + 1] * self.head(model, i, h) for i, h in enumerate(hs)), None
        if targets.shape != (B, T):
            raise ValueError(f"MoD: targets of shape {tuple(targets.shape)} for hidden states of shape {(B, T)}")
        hs, w, y = [h.reshape(B * T, dim) for h in hs], w.reshape(B * T, self.k), targets.reshape(B * T)
        logits = None
        if self.cfg.chunk_size is None:
            sums, logits = self.loss_sums(model, hs, w, y, return_logits=True)
            logits = logits.view(B, T, -1)
        else:
            sums, c = 0, self.cfg.chunk_size
            for s in range(0, B * T, c):
                args = (model, [h[s:s + c] for h in hs], w[s:s + c], y[s:s + c])
                # checkpoint: keep only the inputs, recompute the chunk's k logits tensors in backward
                sums = sums + (checkpoint(self.loss_sums, *args, use_reentrant=False) if torch.is_grad_enabled()
                               else self.loss_sums(*args))
        ce, distill, layer_ce = sums / (y != -100).sum().clamp(min=1)  # an all-masked batch gives 0, not NaN
        self.last_losses = {"ce": ce.detach(), "distill": distill.detach(), "layer_ce": layer_ce.detach()}
        return logits, ce + self.cfg.distill_weight * distill + layer_ce


def attach_mod(model, cfg: MoDConfig, verbose=True):
    """Build the ensemble and register it as model.mod (its own parameters trainable; nothing else changes)."""
    n = model.config.n_layers
    if not 1 <= cfg.k <= n:
        raise ValueError(f"MoD k (--mod-k) = {cfg.k}: the model has {n} layers")
    model.mod = DepthEnsemble(model, cfg)
    if verbose:
        own = sum(p.numel() for p in model.mod.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"MoD over the last {cfg.k} of {n} layers ({cfg.router} router, top_k={cfg.top_k or cfg.k}): "
              f"{own:,} new parameters, {trainable:,} trainable in all")
    return model.mod


def layer_logits(model, hidden):
    """Each of the last k layers alone through its own norm and the LM head: a list of k (B, T, V) tensors."""
    return [model.mod.head(model, i, h) for i, h in enumerate(hidden[-model.mod.k:])]


def routing_weights(model, hidden, n_pad=None):
    """(B, T, k) routing weights after Top-K, as the ensemble uses them."""
    return model.mod.routing_weights(model, hidden, n_pad=n_pad)


def routing_stats(weights, mask=None, eps=1e-3):
    """Per-layer figures over the tokens where mask (B, T) is true (all if None), index 0 = the earliest late
    layer: mean_weight; sparsity = the fraction of tokens on which the layer's weight is below eps (exactly
    the fraction dropped by Top-K when it is on); top1 = the fraction of tokens on which it has the largest."""
    w = weights.reshape(-1, weights.size(-1)).float()
    if mask is not None:
        w = w[mask.reshape(-1).bool()]
    top1 = F.one_hot(w.argmax(-1), w.size(-1)).float()
    return {"tokens": w.size(0), "mean_weight": w.mean(0).tolist(), "sparsity": (w < eps).float().mean(0).tolist(),
            "top1": top1.mean(0).tolist()}
