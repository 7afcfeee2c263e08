"""
train.py's flags, checked before anything is loaded: the parser, --resume's saved settings, the checks of the
values, and the paths a run saves (so that eval.py finds the same data and base later). The flags of a config
dataclass become that config once, here (configs_from_flags: args.optim, args.base, args.lora, args.mod, args.molex;
an add-on's None when it is off), or come from the run's saved settings with --resume.
"""
import argparse
import dataclasses
from pathlib import Path

from checkpoint import ADDONS, CHANGEABLE_ON_RESUME, CONFIGS, check_base_is_there, checkpoint_path, load_checkpoint
from cli import (
    HelpFormatter,
    UserError,
    add_config_flags,
    add_device_flags,
    config_from,
    given_fields,
    key,
    make_config,
)
from data import BUILTIN_TASKS, resolve_path
from data.builtin import DEFAULT_DIFFICULTY
from data.format import CHOICE_TARGETS
from errors import bad_flag
from lora import LoRAConfig
from mod import MoDConfig
from molex import MoLExConfig
from optim import CASE_DEFAULTS, OptimConfig, case_help, fill_case_defaults
from quant import QuantConfig

# Settings that --resume may change (checkpoint.py: the run's length and logging, where it goes, where its base
# now is: --init only for a run with a base fingerprint, which checks it); any other must equal the saved value.
RESUME_OVERRIDABLE = CHANGEABLE_ON_RESUME

def get_parser():
    p = argparse.ArgumentParser(description="Tune a LLaMA model with LoRA (or pretrain the built-in base).",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--init", default=None,
                   help="LLaMA checkpoint: Meta's folder (params.json + consolidated.*.pth), Hugging Face's "
                        "(config.json + *.safetensors) or a .gguf file; default: the built-in base, built on first use")
    g.add_argument("--tokenizer", default=None,
                   help="'byte', a tokenizer.model, a tokenizer.json or a .gguf (or a folder with one); default: "
                        "the --init checkpoint's own, else the one its config.json names, else 'byte' for --pretrain")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help=f"built-in task ({', '.join(BUILTIN_TASKS)}), a prepared folder holding train.jsonl, or a "
                        ".jsonl file; with --pretrain: 'corpus' (data.builtin's) or a .txt file. "
                        "Default: arith, or corpus with --pretrain")
    g.add_argument("--difficulty", type=int, default=None,
                   help=f"difficulty of a built-in task (data.builtin.LEVELS); default {DEFAULT_DIFFICULTY}")
    g.add_argument("--n-train", type=int, default=None,
                   help="use this many training records (default: all of a file, the task's default size for a "
                        "built-in task)")
    g.add_argument("--max-len", type=int, default=None,
                   help="longest training sequence in tokens (longer examples lose the start of their prompt); "
                        "default: 128 with --pretrain, else the model's context")
    g.add_argument("--prompt-loss", action="store_true", help="include the prompt tokens in the loss")
    g.add_argument("--choice-target", default="text", choices=CHOICE_TARGETS,
                   help="what a multiple-choice record teaches: its gold option's text after the prompt without the "
                        "options (what acc / acc_norm score), its label after the prompt with them (what acc_gen "
                        "reads), or both (two examples per record)")
    g.add_argument("--length-groups", action=argparse.BooleanOptionalAction, default=True,
                   help="batches of examples of similar length (seeded; less padding); --no-length-groups: "
                        "random batches")
    g.add_argument("--eval-n", type=int, default=64,
                   help="validation loss on this many records of the test split (held-out text with --pretrain)")
    add_config_flags(p, QuantConfig, "base", "the frozen base in 4 or 8 bits (quant.py)")
    add_config_flags(p, LoRAConfig, "lora", "LoRA")
    g = add_config_flags(p, MoDConfig, "mod", "MoD: Mixture-of-Depths ensemble of the last k layers (mod.py; the "
                                              "--mod-* flags need --mod or --mod-k)")
    g.add_argument("--mod", action="store_true",
                   help=f"MoD with k = {MoDConfig.k} unless --mod-k is given (--mod-k N alone also switches it on)")
    g = add_config_flags(p, MoLExConfig, "molex", "MoLEx (molex.py: each layer mixed with another layer picked by "
                                                  "a gate; the --molex-* flags need --molex)")
    g.add_argument("--molex", action="store_true",
                   help="MoLEx: z' = alpha * layer_t(z) + (1 - alpha) * layer_j(z), layer j picked by a gate")
    g = p.add_argument_group("pretraining (--pretrain: a new model, every parameter trained)")
    g.add_argument("--pretrain", action="store_true",
                   help="train a new randomly initialized model (all parameters) instead of LoRA on --init")
    g.add_argument("--dim", type=int, default=128, help="model width")
    g.add_argument("--n-layers", type=int, default=4, help="number of transformer blocks")
    g.add_argument("--n-heads", type=int, default=8, help="query heads")
    g.add_argument("--n-kv-heads", type=int, default=4, help="key/value heads (grouped-query attention)")
    g.add_argument("--context", type=int, default=512, help="max_seq_len of the new model")
    g.add_argument("--corpus-chars", type=int, default=400_000, help="size of data.builtin's corpus (--data corpus)")
    g = add_config_flags(p, OptimConfig, "", "optimization (AdamW, linear warmup then cosine decay)")
    for action in g._group_actions:  # defaults that depend on what is trained
        if any(action.dest in c for c in CASE_DEFAULTS.values()):
            action.help += case_help(action.dest)
    g = p.add_argument_group("system")
    add_device_flags(g, "compute dtype: auto = bfloat16 autocast on a GPU that supports it, else float32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block in the backward pass (less memory, ~30%% more compute)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialization, the data order and dropout")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None,
                   help="run folder; default runs/<data>-<date-time> (--pretrain: runs/pretrain-<date-time>)")
    g.add_argument("--resume", default=None, metavar="RUN",
                   help="continue the run in this folder (or this ckpt.pt) with its saved settings; with --out, "
                        "continue into that folder (a copy: RUN stays as it was)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run files (ckpt.pt, args.json, metrics.jsonl) of another run in --out")
    g.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps (0: only at the end)")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    return p


def parse_args(argv=None):
    """Parse and check the flags; with --resume the saved settings come back, overridden by RESUME_OVERRIDABLE."""
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        if args.resume is not None:
            args = resumed_args(parser, args, argv)
        else:
            switch_mod_on(args)
            check_switches(args)
            case = "pretrain" if args.pretrain else "builtin" if args.init in (None, "builtin") else "init"
            fill_case_defaults(vars(args), case)
            configs_from_flags(args)
        check_args(args)
    except UserError as e:
        parser.error(str(e))
    return args


def explicit_flags(argv):
    """{dest: value} of only the flags written on the command line (argparse hides which ones were given)."""
    parser = get_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def config_flags():
    """{dest: (config name, field)} of every flag made from a config's field (--lora-rank: ("lora", "rank"))."""
    return {key(prefix, f.name): (name, f.name) for name, (cls, prefix) in CONFIGS.items()
            for f in dataclasses.fields(cls)}


def saved_flag(saved, dest):
    """The value of flag `dest` in a run's settings: a config's field (None when the add-on is off), whether an
    add-on is on (its switch), or a plain setting."""
    if dest in ADDONS:
        return saved[dest] is not None
    name, field = config_flags().get(dest, (None, None))
    if name is not None:
        return None if saved[name] is None else getattr(saved[name], field)
    return saved.get(dest)


def resumed_args(parser, args, argv):
    ckpt_path = checkpoint_path(args.resume)
    saved = load_checkpoint(ckpt_path)["args"]  # its configs built and checked
    given = explicit_flags(argv)
    overridable = RESUME_OVERRIDABLE - ({"init"} if "base_fingerprint" not in saved else set())
    changed = [f"--{k.replace('_', '-')} (saved {saved_flag(saved, k)!r}, given {v!r})" for k, v in given.items()
               if k not in overridable and saved_flag(saved, k) != v]
    if changed:
        raise UserError("--resume continues a run with its saved settings; these flags differ: " + ", ".join(changed))
    flags = config_flags()
    defaults = {k: v for k, v in vars(parser.parse_args([])).items() if k not in flags}  # flags newer than the
    defaults["choice_target"] = "label"  # checkpoint get their defaults, except this one: a run saved before it
    defaults["length_groups"] = False  # trained on labels; and a run saved before length grouping had random batches
    args = argparse.Namespace(**{**defaults, **saved, **{k: v for k, v in given.items()
                                                         if k in RESUME_OVERRIDABLE and k not in flags}})
    if "init" not in given:
        check_base_is_there(saved, f"the run {ckpt_path.parent}")
    args.resume, args.out = str(ckpt_path), given.get("out") or str(ckpt_path.parent)  # --out: a copy goes on
    if "max_steps" in given or "epochs" in given:  # a new length replaces the saved one
        length = {"max_steps": given.get("max_steps"), "epochs": given.get("epochs")}
        args.optim = make_config(OptimConfig, {**vars(args.optim), **length}, "")
    return args


def switch_mod_on(a):
    """--mod and --mod-k N both switch MoD on (a.mod, until configs_from_flags makes it the config); --mod-k 0 is
    refused."""
    if a.mod_k is not None and a.mod_k < 1:
        raise UserError(f"--mod-k must be >= 1, got {a.mod_k} (leave out --mod and --mod-k for no MoD)")
    if a.mod and a.mod_k is None:
        a.mod_k = MoDConfig.k
    a.mod = a.mod_k is not None


def check_switches(a):
    """An add-on's flags given without its switch are refused, naming the switch."""
    for prefix, switch in ADDONS.items():
        given = [f"--{prefix}-{n.replace('_', '-')}" for n in given_fields(vars(a), CONFIGS[prefix][0], prefix)
                 if n != "k"]
        if given and not getattr(a, prefix):
            raise UserError(f"{', '.join(given)} given without {switch}: these flags set up "
                            f"{'MoD' if prefix == 'mod' else 'MoLEx'}, which is off unless {switch} is given")


def configs_from_flags(a):
    """Each config built (and so checked) from its flags, which it then replaces in `a`: args.lora is a LoRAConfig,
    args.mod a MoDConfig or None (off), and so on (CONFIGS)."""
    for name, (cls, prefix) in CONFIGS.items():
        cfg = config_from(cls, vars(a), prefix) if name not in ADDONS or getattr(a, name) else None
        for f in dataclasses.fields(cls):
            delattr(a, key(prefix, f.name))
        setattr(a, name, cfg)


def check_args(a):
    """Reject bad values before anything is loaded, naming the flag (UserError)."""
    checks = [(flag, getattr(a, flag) <= 0, "> 0")
              for flag in ("dim", "n_layers", "n_heads", "n_kv_heads", "context", "corpus_chars")]
    checks += [("eval_every", a.eval_every < 0, ">= 0"), ("save_every", a.save_every < 0, ">= 0"),
               ("eval_n", a.eval_n < 0, ">= 0"), ("max_len", a.max_len is not None and a.max_len < 8, ">= 8"),
               ("n_train", a.n_train is not None and a.n_train < 1, ">= 1")]
    if message := bad_flag(checks, a):
        raise UserError(message)
    if a.pretrain and a.init is not None:
        raise UserError("--pretrain trains a new model from scratch: it takes no --init")
    if a.init not in (None, "builtin") and not Path(a.init).exists():
        raise UserError(f"--init {a.init}: no such checkpoint folder or .gguf file")
    if a.difficulty is not None and a.data is not None and a.data not in BUILTIN_TASKS:
        raise UserError(f"--difficulty applies to the built-in tasks ({', '.join(BUILTIN_TASKS)}), "
                        f"not to --data {a.data}")
    if a.pretrain:
        if a.data is not None and a.data != "corpus" and not (a.data.endswith(".txt") and Path(a.data).is_file()):
            raise UserError(f"--pretrain --data must be 'corpus' or an existing .txt file, got {a.data!r}")
    elif a.data is not None and a.data not in BUILTIN_TASKS:
        try:
            resolve_path(a.data, "train")
        except FileNotFoundError as e:
            raise UserError(f"--data: {e}") from None
    for name, switch in ADDONS.items():
        if getattr(a, name) is not None and a.pretrain:
            raise UserError(f"{switch} tunes a pretrained model: it cannot be combined with --pretrain")
    if a.pretrain and a.base.bits:
        raise UserError("--base-bits holds a frozen base in 4 or 8 bits: --pretrain trains every weight")
    if a.molex is not None and a.prompt_loss and a.molex.vote == "prompt":
        raise UserError("--molex-vote prompt needs the prompt/answer boundary, which --prompt-loss removes from the "
                        "labels: use --molex-vote all")


def resolve_paths(args):
    """The data and base a run saves, as absolute paths (and a built-in task's difficulty), so eval.py finds them."""
    if args.data is None:
        args.data = "corpus" if args.pretrain else "arith"
    if args.init != "builtin" and args.init is not None:
        args.init = str(Path(args.init).resolve())
    if args.pretrain and args.data != "corpus":
        args.data = str(Path(args.data).resolve())
    elif args.data in BUILTIN_TASKS and args.difficulty is None:
        args.difficulty = DEFAULT_DIFFICULTY  # saved with the run, so eval.py scores the same difficulty
    elif not args.pretrain and args.data not in BUILTIN_TASKS:  # a prepared folder, or a .jsonl file
        path = resolve_path(args.data, "train")
        args.data = str((path.parent if path.name == "train.jsonl" else path).resolve())
