"""
The optimizer of a run: AdamW with parameter groups, linear warmup then cosine decay, and the batch and length
settings. train.py's optimization flags are made from OptimConfig's fields.
"""
import math
from dataclasses import dataclass, field

from errors import bad_flag

# Defaults that depend on what is trained; a flag that is given always wins. "builtin": LoRA on the built-in
# base (calibrated so that `python train.py` fits in a few CPU minutes and clearly beats the untuned base);
# "init": LoRA on a LLaMA checkpoint (--init; LLM-Adapters' GSM8K settings, 1 epoch); "pretrain": --pretrain.
CASE_DEFAULTS = {
    "builtin": dict(lr=1e-2, batch_size=8, warmup_steps=30, weight_decay=0.0, max_steps=700),
    "init": dict(lr=3e-4, batch_size=16, warmup_steps=100, weight_decay=0.0, epochs=1.0),
    "pretrain": dict(lr=3e-3, batch_size=8, warmup_steps=30, weight_decay=0.1, max_steps=1200),
}


@dataclass
class OptimConfig:
    """A None field takes its CASE_DEFAULTS value (fill_case_defaults) before the checks run."""
    lr: float | None = field(default=None, metadata={"help": "peak learning rate"})
    min_lr: float | None = field(default=None, metadata={"help": "learning rate at the end of the cosine; "
                                                                 "default lr/10"})
    warmup_steps: int | None = field(default=None, metadata={"help": "linear warmup from 0 over this many steps"})
    weight_decay: float | None = field(default=None, metadata={"help": "AdamW weight decay (matrices only)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this; 0 = off"})
    batch_size: int | None = field(default=None, metadata={"help": (
        "examples per micro-batch, over all processes together (each rank takes its share)")})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (global batch = "
                                                         "batch-size * grad-accum)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps"})
    epochs: float | None = field(default=None, metadata={"help": "passes over the training data, instead of "
                                                                 "--max-steps"})

    def __post_init__(self):
        checks = [("lr", self.lr is not None and self.lr <= 0, "> 0"),
                  ("min_lr", self.min_lr is not None and not 0 <= self.min_lr <= (self.lr or math.inf), "in [0, lr]"),
                  ("warmup_steps", (self.warmup_steps or 0) < 0, ">= 0"),
                  ("weight_decay", (self.weight_decay or 0) < 0, ">= 0"),
                  ("beta1", not 0 <= self.beta1 < 1, "in [0, 1)"), ("beta2", not 0 <= self.beta2 < 1, "in [0, 1)"),
                  ("grad_clip", self.grad_clip < 0, ">= 0"),
                  ("batch_size", self.batch_size is not None and self.batch_size < 1, ">= 1"),
                  ("grad_accum", self.grad_accum < 1, ">= 1"),
                  ("max_steps", self.max_steps is not None and self.max_steps < 1, ">= 1"),
                  ("epochs", self.epochs is not None and self.epochs <= 0, "> 0")]
        if message := bad_flag(checks, self):
            raise ValueError(message)
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("give --max-steps or --epochs, not both")


def case_help(key):
    """'; default X on the built-in base, Y with --init, ...' for the help of a case-dependent flag."""
    return "; default " + ", ".join(f"{c[key]:g} {name}" for name, c in (
        ("on the built-in base", CASE_DEFAULTS["builtin"]), ("with --init", CASE_DEFAULTS["init"]),
        ("with --pretrain", CASE_DEFAULTS["pretrain"])) if key in c)


def fill_case_defaults(settings, case):
    """Set the case's defaults in `settings` (a dict) where no flag was given; a length given as --max-steps or
    --epochs replaces both defaults."""
    for key, value in CASE_DEFAULTS[case].items():
        if key in ("max_steps", "epochs"):
            if settings.get("max_steps") is None and settings.get("epochs") is None:
                settings[key] = value
        elif settings.get(key) is None:
            settings[key] = value


def param_groups(model, args):
    """AdamW parameter groups of a run (args.optim, args.lora), each with its own peak lr and weight decay (the
    schedule scales every group's lr by the same factor). Matrices decay, norms and vectors do not; LoRA's B factors
    get lr * --lora-plus (LoRA+); MoLEx's gate and (with --mod-router-lr) MoD's router have groups of their own."""
    lr, weight_decay = args.optim.lr, args.optim.weight_decay
    gate = model.molex.gate_parameters() if model.molex is not None else []
    router_lr = model.mod.cfg.router_lr if model.mod is not None else None
    router = [p for n, p in model.mod.named_parameters() if n.startswith(("router.", "scores"))] if router_lr else []
    own = {id(p) for p in gate + router}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in own]
    lora_b = [p for n, p in trainable if n.endswith("lora_B")]
    decay = [p for n, p in trainable if p.dim() >= 2 and not n.endswith("lora_B")]
    no_decay = [p for n, p in trainable if p.dim() < 2]
    groups = [{"name": "decay", "params": decay, "peak_lr": lr, "weight_decay": weight_decay},
              {"name": "lora_B", "params": lora_b, "peak_lr": lr * args.lora.plus, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "peak_lr": lr, "weight_decay": 0.0}]
    if router:
        groups.append({"name": "mod_router", "params": router, "peak_lr": router_lr, "weight_decay": 0.0})
    if gate:
        cfg = model.molex.cfg
        groups.append({"name": "molex_gate", "params": gate, "peak_lr": cfg.gate_lr or lr,
                       "weight_decay": cfg.gate_weight_decay})
    return [g for g in groups if g["params"]]


def lr_factor(step, opt, max_steps):
    """Linear warmup from 0 to 1 over warmup_steps, then cosine down to min_lr/lr at max_steps (opt: OptimConfig)."""
    if step < opt.warmup_steps:
        return (step + 1) / opt.warmup_steps
    min_factor = (opt.lr / 10 if opt.min_lr is None else opt.min_lr) / opt.lr
    progress = min(1.0, (step - opt.warmup_steps) / max(1, max_steps - opt.warmup_steps))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
