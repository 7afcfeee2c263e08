"""
Tune a LLaMA model with LoRA, or pretrain the tiny built-in base, in one plain training loop.

    python train.py                                    # build the built-in base if missing, then tune it on "arith"
    python train.py --init /path/to/llama-2-7b --data data/gsm8k --lr 3e-4 --batch-size 16 --grad-accum 4
    python train.py --mod-k 4                          # + MoD: ensemble of the last 4 layers (mod.py)
    python train.py --molex                            # + MoLEx: every layer mixed with a gated layer expert (molex.py)
    python train.py --resume runs/arith-20250101-120000   # continue a stopped run exactly where it stopped
    torchrun --standalone --nproc_per_node 2 train.py ...  # data parallel: each rank takes its share of each batch
    python train.py --pretrain --out checkpoints/my-base   # full-parameter pretraining of a new tiny model

A run folder (--out) holds:
    args.json       every setting of the run (also inside ckpt.pt)
    ckpt.pt         trainable parameters, optimizer state, step, data position, RNG states (torch.load(...,
                    weights_only=True) reads it); the frozen base is not copied, the args say where it is
    metrics.jsonl   one JSON object per line: {"step", "loss", "lr", "grad_norm", "tokens_per_s", ...} every step,
                    {"step", "val_loss"} at each evaluation
and after --pretrain also config.json + model.safetensors (Hugging Face format), which from_pretrained loads.

The same build_model() makes the model here and in eval.py, so an add-on's flags live in one place.
"""
import argparse
import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import BUILTIN_TASKS, load_examples, resolve_path
from data.builtin import make_corpus
from data.format import IGNORE_INDEX, encode_example
from mod import MoDConfig, attach_mod
from model import LORA_TARGETS, Llama, LlamaConfig, apply_lora, from_pretrained, save_hf
from molex import GATE_MODES, RULES, SHARES, VOTES, MoLExConfig, attach_molex, prompt_end_from_targets
from tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent
BUILTIN_BASE = REPO / "checkpoints" / "builtin-base"  # gitignored; built by the first `python train.py`
CHECKPOINT_FORMAT = "llama-layers train.py checkpoint v1"

# The built-in base: 4 layers, dim 128, 8 query heads sharing 4 KV heads, byte tokenizer, context 512, pretrained
# on data.builtin's corpus for 1,200 steps of 8 x 128 tokens. Calibrated on 2 CPU cores: building it (101 s) and
# tuning it (183 s, 1,200 steps) take 4 m 48 s with 2 idle cores (BENCHMARKS.md). 6 layers cost 1.5x per step and,
# at this budget, did not learn to copy the question's numbers reliably; 4 query heads per 2 KV heads learned it
# less often. Tuning for 800 steps gave 11-70% over three seeds, 1,200 steps 54-79%; lr 5e-3 or 2e-2 was worse.
BUILTIN_BASE_ARGV = ["--pretrain", "--dim", "128", "--n-layers", "4", "--n-heads", "8", "--n-kv-heads", "4",
                     "--context", "512", "--tokenizer", "byte", "--data", "corpus", "--corpus-chars", "400000",
                     "--max-len", "128", "--batch-size", "8", "--max-steps", "1200", "--lr", "3e-3",
                     "--warmup-steps", "30", "--weight-decay", "0.1", "--eval-every", "0", "--save-every", "400",
                     "--seed", "0"]
BUILTIN_DIFFICULTY = 2  # difficulty of the built-in tasks when --difficulty is not given (train.py and eval.py)

# Settings that --resume may change; any other flag given with --resume must equal the saved value.
RESUME_OVERRIDABLE = {"resume", "max_steps", "epochs", "eval_every", "save_every", "device", "compile",
                      "eval_n", "out", "threads"}


# ----------------------------------------------------------------------------------------------------------
# Command line

# Defaults that depend on what is trained; a flag that is given always wins. "builtin": LoRA on the built-in
# base (calibrated so that `python train.py` fits in a few CPU minutes and clearly beats the untuned base);
# "init": LoRA on a LLaMA checkpoint (--init; LLM-Adapters' GSM8K settings, 1 epoch); "pretrain": --pretrain.
CASE_DEFAULTS = {
    "builtin": dict(lr=1e-2, batch_size=8, warmup_steps=30, weight_decay=0.0, max_steps=1200),
    "init": dict(lr=3e-4, batch_size=16, warmup_steps=100, weight_decay=0.0, epochs=1.0),
    "pretrain": dict(lr=3e-3, batch_size=8, warmup_steps=30, weight_decay=0.1, max_steps=1200),
}
CASE_HELP = {k: "; default " + ", ".join(f"{c[k]:g} {name}" for name, c in
                                        (("on the built-in base", CASE_DEFAULTS["builtin"]),
                                         ("with --init", CASE_DEFAULTS["init"]),
                                         ("with --pretrain", CASE_DEFAULTS["pretrain"])) if k in c)
             for k in ("lr", "batch_size", "warmup_steps", "weight_decay", "max_steps", "epochs")}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where it is None (the help text then says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def get_parser():
    p = argparse.ArgumentParser(description="Tune a LLaMA model with LoRA (or pretrain the built-in base).",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--init", default=None,
                   help="LLaMA checkpoint folder (Meta's params.json + consolidated.*.pth, or Hugging Face's "
                        "config.json + *.safetensors); default: the built-in base, built on first use")
    g.add_argument("--tokenizer", default=None,
                   help="'byte' or a tokenizer.model (or its folder); default: the --init folder's tokenizer.model, "
                        "else the tokenizer its config.json names, else 'byte' for --pretrain")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help=f"built-in task ({', '.join(BUILTIN_TASKS)}), a prepared folder holding train.jsonl, or a "
                        ".jsonl file; with --pretrain: 'corpus' (data.builtin's) or a .txt file. "
                        "Default: arith, or corpus with --pretrain")
    g.add_argument("--difficulty", type=int, default=None,
                   help=f"difficulty of a built-in task (data.builtin.LEVELS); default {BUILTIN_DIFFICULTY}")
    g.add_argument("--n-train", type=int, default=None,
                   help="use this many training records (default: all of a file, the task's default size for a "
                        "built-in task)")
    g.add_argument("--max-len", type=int, default=None,
                   help="longest training sequence in tokens (longer examples lose the start of their prompt); "
                        "default: 128 with --pretrain, else the model's context")
    g.add_argument("--prompt-loss", action="store_true", help="include the prompt tokens in the loss")
    g.add_argument("--eval-n", type=int, default=64,
                   help="validation loss on this many records of the test split (held-out text with --pretrain)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=8, help="rank r of the LoRA update B A")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale is alpha / r")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    g.add_argument("--lora-targets", default="q,k,v,o,gate,up,down",
                   help=f"comma list of projections to adapt, from {','.join(LORA_TARGETS)}")
    g.add_argument("--lora-layers", default="all", help="'all', or k: adapt only the last k layers")
    g.add_argument("--lora-plus", type=float, default=1.0,
                   help="LoRA+ (Hayou et al., 2024): the B factors learn this many times faster than the A "
                        "factors (1 = plain LoRA)")
    # add-ons: MoD (mod.py), MoLEx (molex.py) add their flags here (build_model reads them)
    g = p.add_argument_group("MoD: Mixture-of-Depths ensemble of the last k layers (mod.py)")
    g.add_argument("--mod-k", type=int, default=0,
                   help="mix the logits of the last k layers, each read out through its own trainable norm and the "
                        "frozen LM head (0: off; 1: the plain model)")
    g.add_argument("--mod-router", default="token", choices=["token", "sequence", "vector"],
                   help="routing weights: token = a zero-initialized linear layer on each token's final normed "
                        "state; sequence = the same on its running mean over the sequence so far; vector = k "
                        "learned weights shared by all tokens (all start as the uniform average)")
    g.add_argument("--mod-top-k", type=int, default=None,
                   help="keep only the K largest routing weights per token, renormalized (default: all k)")
    g.add_argument("--mod-router-lr", type=float, default=None,
                   help="peak lr of the router alone, in its own AdamW group without weight decay (default: --lr)")
    g.add_argument("--mod-distill-weight", type=float, default=1.0,
                   help="lambda: weight of the final layer's distillation into the other late layers (0: off)")
    g.add_argument("--mod-distill-temp", type=float, default=1.0,
                   help="distillation temperature T (the KL is multiplied by T^2)")
    g.add_argument("--mod-distill-direction", default="forward", choices=["forward", "reverse"],
                   help="forward: KL(p_final || p_layer); reverse: KL(p_layer || p_final); the final layer is the "
                        "detached teacher")
    g.add_argument("--mod-layer-ce", action="store_true",
                   help="also train each late layer alone with its own CE loss (averaged over the k layers)")
    g.add_argument("--mod-chunk-size", type=int, default=None,
                   help="compute the MoD loss this many tokens at a time, recomputed in backward, so the k "
                        "vocab-size logits tensors of the whole batch never exist (e.g. 1024 for LLaMA-2-7B, k=4); "
                        "default: all at once")
    g = p.add_argument_group("MoLEx (molex.py: each layer mixed with another layer picked by a gate)")
    g.add_argument("--molex", action="store_true",
                   help="MoLEx: z' = alpha * layer_t(z) + (1 - alpha) * layer_j(z), layer j picked by a gate")
    g.add_argument("--molex-layers", default="all",
                   help="mixed layers: all, first:n or last:n (each chooses among all layers)")
    g.add_argument("--molex-share", default="shared", choices=SHARES,
                   help="one gate Linear(dim, n_layers) for all mixed layers, or one per layer")
    g.add_argument("--molex-cosine", action="store_true",
                   help="cosine gate: scale * cos(z, w_e) + b_e, blind to the size of the hidden state")
    g.add_argument("--molex-cosine-scale", type=float, default=10.0, help="scale of the cosine gate's scores")
    g.add_argument("--molex-rule", default="paper", choices=RULES,
                   help="training: paper = one expert per layer for the whole batch (the mode of the tokens' top-1 "
                        "choices); sequence = one per sequence. Evaluation always routes per sequence")
    g.add_argument("--molex-vote", default="prompt", choices=VOTES,
                   help="training: which tokens vote for the expert: prompt (as at generation, where only the "
                        "prompt exists) or all (the paper)")
    g.add_argument("--molex-alpha", type=float, default=0.5,
                   help="weight of the layer itself (the paper: 0.5; 0.95 for CoLA and GPT-2); the start value "
                        "with --molex-learn-alpha")
    g.add_argument("--molex-learn-alpha", action="store_true",
                   help="learn alpha per mixed layer (a softmax of two scalars)")
    g.add_argument("--molex-gate-mode", default="balance", choices=GATE_MODES,
                   help="what trains the gate: balance = only the load-balance loss (the paper); task = the task "
                        "loss too (expert output x p_j / p_j.detach()); aux_free = the task loss, balanced by a "
                        "selection bias instead of a loss")
    g.add_argument("--molex-balance-weight", type=float, default=None,
                   help="weight of the load-balance loss L * mean p_j, summed over mixed layers (default 0.01; "
                        "0 with aux_free)")
    g.add_argument("--molex-bias-rate", type=float, default=0.001,
                   help="aux_free: step u of the selection bias after each optimizer step")
    g.add_argument("--molex-gate-lr", type=float, default=None,
                   help="peak lr of the gate and alpha (default: --lr; the paper's 0.1 was for RoBERTa and "
                        "saturates a gate reading LLaMA's hidden states)")
    g.add_argument("--molex-gate-weight-decay", type=float, default=0.1,
                   help="AdamW weight decay of the gate and alpha (the paper's)")
    g.add_argument("--molex-seed", type=int, default=0, help="seed of the gate's initialization")
    g = p.add_argument_group("pretraining (--pretrain: a new model, every parameter trained)")
    g.add_argument("--pretrain", action="store_true",
                   help="train a new randomly initialized model (all parameters) instead of LoRA on --init")
    g.add_argument("--dim", type=int, default=128, help="model width")
    g.add_argument("--n-layers", type=int, default=4, help="number of transformer blocks")
    g.add_argument("--n-heads", type=int, default=8, help="query heads")
    g.add_argument("--n-kv-heads", type=int, default=4, help="key/value heads (grouped-query attention)")
    g.add_argument("--context", type=int, default=512, help="max_seq_len of the new model")
    g.add_argument("--corpus-chars", type=int, default=400_000, help="size of data.builtin's corpus (--data corpus)")
    g = p.add_argument_group("optimization (AdamW, linear warmup then cosine decay)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate" + CASE_HELP["lr"])
    g.add_argument("--min-lr", type=float, default=None, help="learning rate at the end of the cosine; default lr/10")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup from 0 over this many steps" + CASE_HELP["warmup_steps"])
    g.add_argument("--weight-decay", type=float, default=None,
                   help="AdamW weight decay (matrices only)" + CASE_HELP["weight_decay"])
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.99, help="AdamW beta2")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this; 0 = off")
    g.add_argument("--batch-size", type=int, default=None,
                   help="examples per micro-batch, over all processes together (each rank takes its share)"
                        + CASE_HELP["batch_size"])
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (global batch = batch-size * grad-accum)")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps" + CASE_HELP["max_steps"])
    g.add_argument("--epochs", type=float, default=None,
                   help="passes over the training data, instead of --max-steps" + CASE_HELP["epochs"])
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype: auto = bfloat16 autocast on a GPU that supports it, else float32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block in the backward pass (less memory, ~30%% more compute)")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch; 0 = auto: the cores that are idle now (see choose_threads)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialization, the data order and dropout")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None,
                   help="run folder; default runs/<data>-<date-time> (--pretrain: runs/pretrain-<date-time>)")
    g.add_argument("--resume", default=None, metavar="RUN",
                   help="continue the run in this folder (or this ckpt.pt) with its saved settings")
    g.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps (0: only at the end)")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    return p


def explicit_flags(argv):
    """{dest: value} of only the flags written on the command line (argparse hides which ones were given)."""
    parser = get_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def parse_args(argv=None):
    """Parse and check the flags; with --resume the saved settings come back, overridden by RESUME_OVERRIDABLE."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.resume is not None:
        ckpt_path = checkpoint_path(args.resume)
        if not ckpt_path.is_file():
            parser.error(f"--resume {args.resume}: no checkpoint there (looked for {ckpt_path})")
        saved = load_checkpoint(ckpt_path)["args"]
        given = explicit_flags(argv)
        changed = [f"--{k.replace('_', '-')} (saved {saved.get(k)!r}, given {v!r})" for k, v in given.items()
                   if k not in RESUME_OVERRIDABLE and saved.get(k) != v]
        if changed:
            parser.error("--resume continues a run with its saved settings; these flags differ: " + ", ".join(changed))
        defaults = vars(parser.parse_args([]))  # flags newer than the checkpoint get their defaults
        overrides = {k: v for k, v in given.items() if k in RESUME_OVERRIDABLE}
        args = argparse.Namespace(**{**defaults, **saved, **overrides})
        args.resume, args.out = str(ckpt_path), str(ckpt_path.parent)
        if "max_steps" in given or "epochs" in given:  # a new length replaces the saved one
            args.max_steps, args.epochs = given.get("max_steps"), given.get("epochs")
    else:
        case = "pretrain" if args.pretrain else "builtin" if args.init in (None, "builtin") else "init"
        for key, value in CASE_DEFAULTS[case].items():
            if key in ("max_steps", "epochs"):
                if args.max_steps is None and args.epochs is None:
                    setattr(args, key, value)
            elif getattr(args, key) is None:
                setattr(args, key, value)
    check_args(parser, args)
    check_addons(parser, args)
    return args


def check_args(parser, a):
    """Reject bad values before anything is loaded, naming the flag."""
    if a.lora_rank < 1:
        parser.error(f"--lora-rank must be >= 1, got {a.lora_rank}")
    if a.lora_plus <= 0:
        parser.error(f"--lora-plus must be > 0, got {a.lora_plus}")
    if a.lora_alpha <= 0:
        parser.error(f"--lora-alpha must be > 0, got {a.lora_alpha}")
    if not 0 <= a.lora_dropout < 1:
        parser.error(f"--lora-dropout must be in [0, 1), got {a.lora_dropout}")
    targets = [t.strip() for t in a.lora_targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if not targets or unknown:
        parser.error(f"--lora-targets {a.lora_targets!r}: unknown {unknown or 'empty list'}; "
                     f"choose from {','.join(LORA_TARGETS)}")
    if a.lora_layers != "all" and not (a.lora_layers.isdigit() and int(a.lora_layers) >= 1):
        parser.error(f"--lora-layers must be 'all' or a positive number of last layers, got {a.lora_layers!r}")
    for flag in ("lr", "batch_size", "grad_accum", "dim", "n_layers", "n_heads", "n_kv_heads", "context",
                 "corpus_chars"):
        if getattr(a, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(a, flag)}")
    for flag in ("min_lr", "warmup_steps", "weight_decay", "grad_clip", "eval_every", "save_every", "eval_n"):
        if getattr(a, flag) is not None and getattr(a, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(a, flag)}")
    if a.min_lr is not None and a.min_lr > a.lr:
        parser.error(f"--min-lr ({a.min_lr}) must not exceed --lr ({a.lr})")
    for flag in ("beta1", "beta2"):
        if not 0 <= getattr(a, flag) < 1:
            parser.error(f"--{flag} must be in [0, 1), got {getattr(a, flag)}")
    if a.max_steps is not None and a.epochs is not None:
        parser.error("give --max-steps or --epochs, not both")
    if a.max_steps is not None and a.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {a.max_steps}")
    if a.epochs is not None and a.epochs <= 0:
        parser.error(f"--epochs must be > 0, got {a.epochs}")
    if a.max_len is not None and a.max_len < 8:
        parser.error(f"--max-len must be at least 8 tokens, got {a.max_len}")
    if a.n_train is not None and a.n_train < 1:
        parser.error(f"--n-train must be >= 1, got {a.n_train}")
    if a.pretrain and a.init is not None:
        parser.error("--pretrain trains a new model from scratch: it takes no --init")
    if a.init is not None and a.init != "builtin" and not Path(a.init).is_dir():
        parser.error(f"--init {a.init}: no such checkpoint folder")
    if a.difficulty is not None and a.data is not None and a.data not in BUILTIN_TASKS:
        parser.error(f"--difficulty applies to the built-in tasks ({', '.join(BUILTIN_TASKS)}), not to --data {a.data}")
    if a.pretrain:
        if a.data is not None and a.data != "corpus" and not (a.data.endswith(".txt") and Path(a.data).is_file()):
            parser.error(f"--pretrain --data must be 'corpus' or an existing .txt file, got {a.data!r}")
    elif a.data is not None and a.data not in BUILTIN_TASKS:
        try:
            resolve_path(a.data, "train")
        except FileNotFoundError as e:
            parser.error(f"--data: {e}")
    if a.device not in ("auto", "cpu") and not a.device.startswith("cuda"):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {a.device!r}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {a.device}: CUDA is not available on this machine")


def check_addons(parser, a):
    if a.mod_router_lr is not None and (not a.mod_k or a.mod_router_lr <= 0):
        parser.error(f"--mod-router-lr needs --mod-k and a value > 0, got {a.mod_router_lr} with --mod-k {a.mod_k}")
    if a.mod_k:
        if a.pretrain:
            parser.error("--mod-k tunes a pretrained model: it cannot be combined with --pretrain")
        try:
            mod_config(vars(a))
        except ValueError as e:
            parser.error(str(e))

    if a.molex:
        try:
            molex_config(a)
        except ValueError as e:
            parser.error(str(e))
        if a.prompt_loss and a.molex_vote == "prompt":
            parser.error("--molex-vote prompt needs the prompt/answer boundary, which --prompt-loss removes from "
                         "the labels: use --molex-vote all")

def die(msg):
    """Stop with a message and exit status 1 (bad input found after parsing: files, data, NaN loss)."""
    raise SystemExit(f"train.py: error: {msg}")


# ----------------------------------------------------------------------------------------------------------
# The model: ONE function for train.py and eval.py

def base_folder(init):
    """The checkpoint folder --init stands for (None or 'builtin': the built-in base)."""
    return BUILTIN_BASE if init in (None, "builtin") else Path(init)


def molex_config(args):
    """MoLExConfig from the --molex-* settings (a Namespace or the dict saved in a checkpoint)."""
    a = args if isinstance(args, dict) else vars(args)
    return MoLExConfig(**{f.name: a[f"molex_{f.name}"] for f in dataclasses.fields(MoLExConfig)})


def build_model(args, vocab_size=None, device="cpu", dtype=torch.float32, verbose=True):
    """The model a run trains or evaluates, from its settings (an argparse.Namespace or the dict saved in a
    checkpoint): the base (loaded from init, or new for pretrain), LoRA on it, then the add-ons.
    dtype: of the frozen base weights (trainable parameters stay float32). lora_rank None: no LoRA."""
    a = args if isinstance(args, dict) else vars(args)
    if a["pretrain"]:
        cfg = LlamaConfig(dim=a["dim"], n_layers=a["n_layers"], n_heads=a["n_heads"], n_kv_heads=a["n_kv_heads"],
                          vocab_size=vocab_size or a["vocab_size"], multiple_of=32, max_seq_len=a["context"])
        model = Llama(cfg).init_weights(seed=a["seed"], std=0.02).to(device)
        model.requires_grad_(True)
    else:
        model = from_pretrained(base_folder(a["init"]), dtype=dtype, device=device)
        if a.get("lora_rank"):
            torch.manual_seed(a["seed"])  # LoRA's A init
            last = None if a["lora_layers"] == "all" else int(a["lora_layers"])
            targets = tuple(t.strip() for t in a["lora_targets"].split(",") if t.strip())
            apply_lora(model, a["lora_rank"], a["lora_alpha"], a["lora_dropout"], targets, last, verbose=verbose)
    # add-ons: MoD (mod.py), MoLEx (molex.py) attach here, after LoRA (which freezes the model)
    if a.get("mod_k"):
        attach_mod(model, mod_config(a), verbose=verbose)
    if a.get("molex"):  # after LoRA and MoD (attach_mod freezes every parameter but LoRA's)
        attach_molex(model, molex_config(a), verbose=verbose)
    model.grad_checkpointing = bool(a.get("grad_checkpointing"))
    return model.to(device)


def mod_config(a):
    """MoDConfig from the run settings (a dict); keys missing from older checkpoints take the defaults."""
    return MoDConfig(k=a["mod_k"], router=a.get("mod_router", "token"), top_k=a.get("mod_top_k"),
                     distill_weight=a.get("mod_distill_weight", 1.0), distill_temp=a.get("mod_distill_temp", 1.0),
                     distill_direction=a.get("mod_distill_direction", "forward"),
                     layer_ce=a.get("mod_layer_ce", False), chunk_size=a.get("mod_chunk_size"))


def param_groups(model, args):
    """AdamW parameter groups, each with its own peak lr and weight decay (the schedule scales every group's lr
    by the same factor). Matrices decay, norms and vectors do not; LoRA's B factors get lr * lora_plus (LoRA+).
    An add-on with settings of its own appends a group here."""
    gate = model.molex.gate_parameters() if model.molex is not None else []  # MoLEx's gate: its own group
    router = []  # MoD's router: its own group when --mod-router-lr is given
    if model.mod is not None and getattr(args, "mod_router_lr", None) is not None:
        router = [p for n, p in model.mod.named_parameters() if n.startswith(("router.", "scores"))]
    own = {id(p) for p in gate + router}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in own]
    lora_b = [p for n, p in trainable if n.endswith("lora_B")]
    decay = [p for n, p in trainable if p.dim() >= 2 and not n.endswith("lora_B")]
    no_decay = [p for n, p in trainable if p.dim() < 2]
    groups = [{"name": "decay", "params": decay, "peak_lr": args.lr, "weight_decay": args.weight_decay},
              {"name": "lora_B", "params": lora_b, "peak_lr": args.lr * args.lora_plus,
               "weight_decay": args.weight_decay},
              {"name": "no_decay", "params": no_decay, "peak_lr": args.lr, "weight_decay": 0.0}]
    if router:
        groups.append({"name": "mod_router", "params": router, "peak_lr": args.mod_router_lr, "weight_decay": 0.0})
    if gate:
        cfg = model.molex.cfg
        groups.append({"name": "molex_gate", "params": gate, "peak_lr": cfg.gate_lr or args.lr,
                       "weight_decay": cfg.gate_weight_decay})
    return [g for g in groups if g["params"]]


def lr_factor(step, args, max_steps):
    """Linear warmup from 0 to 1 over warmup_steps, then cosine down to min_lr/lr at max_steps."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    min_factor = (args.lr / 10 if args.min_lr is None else args.min_lr) / args.lr
    progress = min(1.0, (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def trainable_state(model):
    state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    if model.molex is not None:  # MoLEx's aux_free selection bias: a buffer, trained without gradients
        state["molex.select_bias"] = model.molex.select_bias.detach().cpu()
    return state


def load_trainable(model, state, where):
    """Copy saved trainable parameters into the model, naming any mismatch."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if model.molex is not None:
        params["molex.select_bias"] = model.molex.select_bias
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"{where}: its parameters do not fit the model built from its settings: missing "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{'...' if len(unexpected) > 3 else ''}")
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise ValueError(f"{where}: {name} has shape {tuple(state[name].shape)}, the model {tuple(p.shape)}")
            p.copy_(state[name])


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and data

def resolve_tokenizer(spec, init, pretrain=False):
    """What --tokenizer means when not given: the init folder's tokenizer.model, else the tokenizer its
    config.json names (the built-in base says "byte"), else byte for a new model."""
    if spec:
        return str(spec)
    if pretrain:
        return "byte"
    folder = base_folder(init)
    if (folder / "tokenizer.model").is_file():
        return str(folder / "tokenizer.model")
    config = folder / "config.json"
    if config.is_file():
        named = json.loads(config.read_text()).get("tokenizer")
        if named:
            return named
    die(f"no tokenizer for {folder}: it has no tokenizer.model and its config.json names none; pass --tokenizer")


def lm_examples(text, tokenizer, max_len):
    """Language-modeling examples from plain text: documents (split at blank lines) as [bos] doc [eos], joined
    into one stream and cut into windows of max_len + 1 tokens (input = window[:-1], labels = window[1:])."""
    stream = []
    for doc in text.split("\n\n"):
        if doc.strip():
            stream += tokenizer.encode(doc.strip(), bos=True, eos=True)
    n = (len(stream) - 1) // max_len
    return [(stream[i * max_len:(i + 1) * max_len], stream[i * max_len + 1:(i + 1) * max_len + 1]) for i in range(n)]


def load_data(args, tokenizer, max_len):
    """(train examples, validation examples), each a list of (ids, labels); labels are -100 where not trained."""
    if args.pretrain:
        if args.data in (None, "corpus"):
            text = make_corpus(args.corpus_chars, seed=args.seed)
        else:
            text = Path(args.data).read_text(encoding="utf-8")
        examples = lm_examples(text, tokenizer, max_len)
        n_val = min(max(1, len(examples) // 50), args.eval_n)  # hold out the last ~2% (never trained on)
        if len(examples) < 2:
            die(f"--data {args.data or 'corpus'}: {len(text):,} characters make fewer than 2 sequences of "
                f"--max-len {max_len}")
        return examples[:-n_val], examples[-n_val:]

    builtin = args.data in BUILTIN_TASKS
    difficulty = args.difficulty if builtin else None
    try:
        records = load_examples(args.data, "train", n=args.n_train, seed=0, difficulty=difficulty)
    except (FileNotFoundError, ValueError) as e:
        die(f"--data {args.data}: {e}")
    if args.n_train is not None and len(records) < args.n_train:
        print(f"note: --n-train {args.n_train} but {args.data} has {len(records)} training records")
    train = [encode_example(tokenizer, r, prompt_loss=args.prompt_loss, max_len=max_len) for r in records]
    train = [ex for ex in train if any(t != IGNORE_INDEX for t in ex[1])]
    if not train:
        die(f"--data {args.data}: no training example keeps a target token within --max-len {max_len}")
    val = []
    if args.eval_n and (builtin or (Path(args.data).is_dir() and (Path(args.data) / "test.jsonl").is_file())):
        try:
            val_records = load_examples(args.data, "test", n=args.eval_n, seed=0, difficulty=difficulty)
            val = [encode_example(tokenizer, r, max_len=max_len) for r in val_records]
        except (FileNotFoundError, ValueError) as e:
            print(f"note: no validation loss ({e})")
    return train, val


class DataOrder:
    """The order examples are trained in: a seeded permutation per epoch, read from a position. Saving
    (epoch, pos) and starting again from it gives the same batches as never stopping."""

    def __init__(self, n, seed, epoch=0, pos=0):
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos
        self.perm = self.permutation(epoch)

    def permutation(self, epoch):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)).tolist()

    def take(self, k):
        """The next k example indices (continuing into the next epoch when this one ends)."""
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self.perm = self.permutation(self.epoch)
            m = min(k - len(out), self.n - self.pos)
            out += self.perm[self.pos:self.pos + m]
            self.pos += m
        return out

    def state(self):
        return {"epoch": self.epoch, "pos": self.pos}


def collate(examples, pad_id, device):
    """Right-pad a list of (ids, labels) into two (B, T) tensors (padding labels are -100)."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.tensor([x + [pad_id] * (T - len(x)) for x, _ in examples], device=device)
    labels = torch.tensor([y + [IGNORE_INDEX] * (T - len(y)) for _, y in examples], device=device)
    return ids, labels


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: written atomically, read without running pickle code

def checkpoint_path(run):
    run = Path(run)
    return run if run.suffix == ".pt" else run / "ckpt.pt"


def save_checkpoint(state, path):
    """Write to a temporary file in the same folder, fsync, then rename over the old checkpoint: a crash at any
    moment leaves either the old or the new checkpoint, never a torn one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # not every platform can fsync a directory
        pass


def load_checkpoint(path):
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise SystemExit(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"{path}: not a train.py checkpoint (no format tag {CHECKPOINT_FORMAT!r})")
    return ckpt


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------------------
# Distributed (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)

def setup_distributed(device_flag):
    """(rank, world size, device, whether we started the process group)."""
    if "RANK" not in os.environ:
        if device_flag == "auto":
            device_flag = "cuda" if torch.cuda.is_available() else "cpu"
        return 0, 1, torch.device(device_flag), False
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = device_flag.startswith("cuda") or (device_flag == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device, started


AUTO_THREADS = None


def choose_threads(flag, world=1):
    """CPU threads for torch. flag > 0: that many. 0 (auto): torch's current setting (all cores, or what
    OMP_NUM_THREADS / torch.set_num_threads asked for), lowered to the cores other programs leave idle now,
    split between the processes of this machine, at least 1. Why: torch's threads spin while they wait for each
    other; on 2 cores with another busy process, 2 threads made a training step of the built-in model 10x slower
    than 1 thread (on an idle machine 2 threads are 1.5x faster)."""
    global AUTO_THREADS
    if flag > 0:
        return flag
    if AUTO_THREADS is None:  # decided once per process: later our own threads would count as busy
        idle = (os.cpu_count() or 1) - busy_cores()
        AUTO_THREADS = max(1, min(torch.get_num_threads(), idle // world))
    return AUTO_THREADS


def busy_cores(interval=0.3):
    """Cores busy with other programs now: the non-idle share of /proc/stat's CPU time over `interval` seconds
    (Linux), else the 1-minute load average. Not the load average first: it lags by a minute, so the pip install
    just before `python train.py` would still count as a busy core."""
    def cpu_times():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = cpu_times()
        time.sleep(interval)
        total1, idle1 = cpu_times()
        return round((os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0)))
    except (OSError, ValueError, IndexError):
        return round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0


def all_reduce_sum(x):
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def validation_loss(model, examples, batch_size, pad_id, device, autocast):
    """Token-weighted mean loss over examples (computed whole on every rank: no communication)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, labels = collate(examples[i:i + batch_size], pad_id, device)
        with autocast:
            prompt_end = prompt_end_from_targets(labels) if model.molex is not None else None  # MoLEx routing
            _, loss = model(ids, labels, prompt_end=prompt_end)
        n = int((labels != IGNORE_INDEX).sum())
        total, count = total + float(loss) * n, count + n
    model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------------------

def ensure_builtin_base():
    """Pretrain the built-in base with this same training loop when checkpoints/builtin-base is missing."""
    if (BUILTIN_BASE / "config.json").is_file():
        return
    print(f"The built-in base model is missing: building it now (pretraining a tiny LLaMA on data.builtin's "
          f"corpus into {BUILTIN_BASE}; first run only)")
    argv = BUILTIN_BASE_ARGV + ["--out", str(BUILTIN_BASE)]
    if (BUILTIN_BASE / "ckpt.pt").is_file():  # an earlier build was interrupted: continue it
        argv = ["--resume", str(BUILTIN_BASE)]
    main(argv)


def main(argv=None):
    """Train; returns {"run": folder, "losses": [loss per step run here], "val_loss": last validation loss}."""
    args = parse_args(argv)
    rank, world, device, started_group = setup_distributed(args.device)
    master = rank == 0
    if device.type == "cpu":
        torch.set_num_threads(choose_threads(args.threads, world))
    if args.data is None:
        args.data = "corpus" if args.pretrain else "arith"
    if not args.pretrain and args.init in (None, "builtin"):
        args.init = "builtin"
        ensure_builtin_base()  # every rank joins (the build runs on all of them); only rank 0 writes
        if world > 1:
            dist.barrier()  # rank 0 writes the model files after the others have left the build
    if args.init != "builtin" and args.init is not None:
        args.init = str(Path(args.init).resolve())
    if args.pretrain and args.data != "corpus":
        args.data = str(Path(args.data).resolve())
    elif args.data in BUILTIN_TASKS and args.difficulty is None:
        args.difficulty = BUILTIN_DIFFICULTY  # saved with the run, so eval.py scores the same difficulty
    elif not args.pretrain and args.data not in BUILTIN_TASKS:  # a prepared folder, or a .jsonl file
        path = resolve_path(args.data, "train")
        args.data = str((path.parent if path.name == "train.jsonl" else path).resolve())
    ckpt = load_checkpoint(args.resume) if args.resume else None

    # dtype: bfloat16 autocast where the GPU supports it; the frozen base then also lives in bfloat16
    if args.dtype == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        use_bf16 = args.dtype == "bfloat16"
    weight_dtype = torch.bfloat16 if use_bf16 and not args.pretrain else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    args.tokenizer = resolve_tokenizer(args.tokenizer, args.init, args.pretrain)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        die(f"--tokenizer {args.tokenizer}: {e}")
    args.vocab_size = tokenizer.vocab_size
    torch.manual_seed(args.seed)
    try:
        model = build_model(args, tokenizer.vocab_size, device, weight_dtype, verbose=master)
    except (FileNotFoundError, ValueError) as e:
        die(f"--init {args.init}: {e}")
    if tokenizer.vocab_size > model.config.vocab_size:
        die(f"--tokenizer {args.tokenizer} has {tokenizer.vocab_size} tokens but the model's vocabulary is "
            f"{model.config.vocab_size}")
    max_len = args.max_len or (128 if args.pretrain else model.config.max_seq_len)
    if max_len > model.config.max_seq_len:
        die(f"--max-len {max_len} exceeds the model's context ({model.config.max_seq_len})")
    pad_id = tokenizer.pad_id if getattr(tokenizer, "pad_id", None) is not None else tokenizer.eos_id
    train, val = load_data(args, tokenizer, max_len)

    global_batch = args.batch_size * args.grad_accum
    if args.batch_size < world:
        die(f"--batch-size {args.batch_size} is smaller than the number of processes ({world}): some would get "
            f"no examples")
    max_steps = args.max_steps or max(1, math.ceil((args.epochs or 1.0) * len(train) / global_batch))

    groups = param_groups(model, args)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay)
    params = [p for g in groups for p in g["params"]]
    step, order = 0, DataOrder(len(train), args.seed)
    if ckpt is not None:
        load_trainable(model, ckpt["model"], args.resume)
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        order = DataOrder(len(train), args.seed, **ckpt["data"])
    # dropout RNG: one stream per rank (restored exactly on resume with the same number of processes)
    torch.manual_seed(args.seed + rank)
    if ckpt is not None:
        states = ckpt["rng"]
        if len(states) == world:
            set_rng_state(states[rank], device)
        elif master:
            print(f"note: the checkpoint has RNG states of {len(states)} processes, this run has {world}: "
                  f"dropout masks will differ from an uninterrupted run")

    run = Path(args.out or REPO / "runs" / f"{'pretrain' if args.pretrain else Path(args.data).stem}-"
                                           f"{datetime.now():%Y%m%d-%H%M%S}")
    args.out = str(run)
    ckpt_file, metrics_file = run / "ckpt.pt", run / "metrics.jsonl"
    if master:
        if ckpt is None and ckpt_file.exists():
            die(f"{run} already holds a run: continue it with --resume {run}, or pick another --out")
        run.mkdir(parents=True, exist_ok=True)
        saved_args = {k: v for k, v in vars(args).items() if k != "resume"}
        (run / "args.json").write_text(json.dumps(saved_args, indent=2) + "\n")
        if ckpt is not None and metrics_file.exists():  # drop what was logged after the checkpoint
            lines = [ln for ln in metrics_file.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
            metrics_file.write_text("".join(ln + "\n" for ln in kept))

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint_state(step):
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state(device))
        else:
            rngs = [rng_state(device)]
        saved_args = {k: v for k, v in vars(args).items() if k != "resume"}
        return {"format": CHECKPOINT_FORMAT, "args": saved_args, "model": trainable_state(raw_model),
                "optimizer": optimizer.state_dict(), "step": step, "data": order.state(), "rng": rngs,
                "model_config": dict(vars(raw_model.config))}

    def log(record):
        if master:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    if master:
        what = "pretraining" if args.pretrain else f"tuning {Path(str(args.init)).name}"
        print(f"{what} on {Path(args.data).name}: {len(train):,} examples, {max_steps} steps of {global_batch} "
              f"examples ({world} process{'es' if world > 1 else ''}, {device}"
              f"{f' with {torch.get_num_threads()} threads' if device.type == 'cpu' else ''}, "
              f"{'bfloat16' if use_bf16 else 'float32'}) -> {run}")
    model.train()
    losses, val_loss = [], None
    t_start, tokens_seen = time.time(), 0
    bar = tqdm(total=max_steps, initial=step, disable=not master, desc="train", dynamic_ncols=True)
    while step < max_steps:
        t0 = time.time()
        factor = lr_factor(step, args, max_steps)
        for g in optimizer.param_groups:
            g["lr"] = g["peak_lr"] * factor
        # this step's examples: grad_accum micro-batches of batch_size; each rank takes every world-th one
        micro = [[train[i] for i in order.take(args.batch_size)][rank::world] for _ in range(args.grad_accum)]
        # normalize by the target tokens of the whole step on all ranks, so any split gives the same gradient
        n_local = torch.tensor([sum(sum(t != IGNORE_INDEX for t in y) for _, y in mb) for mb in micro],
                               dtype=torch.float64, device=device)
        n_global = float(all_reduce_sum(n_local.sum().clone()))
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_tokens = torch.tensor(float(sum(len(x) for mb in micro for x, _ in mb)), device=device)
        for i, mb in enumerate(micro):
            ids, labels = collate(mb, pad_id, device)
            last = i == len(micro) - 1
            with model.no_sync() if world > 1 and not last else nullcontext():
                with autocast:
                    prompt_end = prompt_end_from_targets(labels) if raw_model.molex is not None else None
                    _, loss = model(ids, labels, prompt_end=prompt_end)  # mean over this micro-batch's targets
                # the sum over our tokens / all tokens of the step; * world undoes DDP's gradient averaging
                (loss * (n_local[i] * world / n_global)).backward()
            loss_sum += loss.detach().double() * n_local[i]
        step_loss = float(all_reduce_sum(loss_sum)) / n_global
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        if not math.isfinite(step_loss) or not math.isfinite(float(grad_norm)):
            bar.close()
            what = f"loss is {step_loss}" if not math.isfinite(step_loss) else f"gradient norm is {float(grad_norm)}"
            kept = (f"the last good checkpoint {ckpt_file} (step {load_checkpoint(ckpt_file)['step']}) is kept"
                    if ckpt_file.exists() else "no checkpoint had been written yet")
            die(f"{what} at step {step + 1}: stopping without applying this update; {kept}. Try a lower --lr, "
                f"--grad-clip or float32.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if raw_model.molex is not None:
            raw_model.molex.update_bias()  # aux_free's selection bias (nothing in the other modes)
        step += 1
        losses.append(step_loss)

        tokens_seen_step = float(all_reduce_sum(n_tokens))
        tokens_seen += tokens_seen_step
        dt = time.time() - t0
        lr = args.lr * factor
        log({"step": step, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
             "tokens_per_s": tokens_seen_step / dt, "time_s": time.time() - t_start, "epoch": order.epoch})
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_seen / (time.time() - t_start):.0f}", lr=f"{lr:.2e}")

        if (args.eval_every and step % args.eval_every == 0) or step == max_steps:
            val_loss = validation_loss(raw_model, val, args.batch_size, pad_id, device, autocast)
            if val_loss is not None:
                log({"step": step, "val_loss": val_loss})
                if master:
                    bar.write(f"step {step}: train loss {step_loss:.4f}, val loss {val_loss:.4f}")
        if (args.save_every and step % args.save_every == 0) or step == max_steps:
            state = checkpoint_state(step)  # every rank joins the RNG gather
            if master:
                save_checkpoint(state, ckpt_file)
    bar.close()

    if master:
        elapsed = time.time() - t_start
        print(f"done: {step} steps in {elapsed:.0f} s, final loss {losses[-1] if losses else float('nan'):.4f}"
              + (f", val loss {val_loss:.4f}" if val_loss is not None else "") + f"; checkpoint {ckpt_file}")
        if args.pretrain:  # a base model others can load: Hugging Face format, tokenizer named in config.json
            save_hf(raw_model, run, extra_config={"tokenizer": args.tokenizer})
            print(f"saved the model in Hugging Face format to {run} (from_pretrained loads it)")
        else:
            print(f"evaluate it with:  python eval.py --ckpt {run}   (--baseline adds the untuned base's score)")
    if started_group:
        dist.destroy_process_group()
    return {"run": str(run), "losses": losses, "val_loss": val_loss, "step": step}


if __name__ == "__main__":
    main()
