"""
LoRA written by hand: y = W x + (alpha / r) * B A dropout(x), with W frozen, A Kaiming-uniform and B zero (so it
starts at W). apply_lora wraps the chosen projections of model.py's blocks; W may be a float nn.Linear's weight or
a 4/8-bit QuantizedLinear (quant.py).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import QuantizedLinear


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear | QuantizedLinear, rank, alpha, dropout=0.0):
        super().__init__()
        if isinstance(base, QuantizedLinear):
            self.quantized = base  # a 4/8-bit frozen weight: its forward dequantizes it
            device = base.blocks.device
        else:
            self.quantized = None
            self.weight = base.weight  # the same Parameter, so the state-dict key of the base weight is unchanged
            self.weight.requires_grad_(False)
            device = base.weight.device
        # adapters are fp32 even on a bf16 base: the optimizer needs the precision
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight) if self.quantized is None else self.quantized(x)
        if self.merged:
            return y
        delta = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (delta * self.scale).to(y.dtype)

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def merge(self):
        if self.quantized is not None:
            raise ValueError("LoRA cannot be merged into a quantized base: dequantize it first "
                             "(weights.dequantize_model)")
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
