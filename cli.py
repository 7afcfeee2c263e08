"""
What the commands share: flags made from config dataclasses, the shared flag groups (device / dtype / threads,
--ckpt / --init), the device and dtype choice, and torchrun's process group. User errors are errors.UserError;
the CPU-thread governor is threads.Threads.

A config dataclass (lora.LoRAConfig, mod.MoDConfig, molex.MoLExConfig) is the one place a setting is written:
its field gives the flag's type, default and help (`metadata={"help": ..., "choices": ...}`), its __post_init__
checks the value. add_config_flags makes the flags; config_from builds the config from them, once: from then on
a command carries the dataclass itself (train.py's args.lora, args.mod, ...; checkpoint.CONFIGS).
"""
import argparse
import dataclasses
import math
import os
import types
import typing

import torch
import torch.distributed as dist

from errors import UserError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where it is None (the help text then says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def field_type(f):
    """The flag type of a dataclass field: int, float, str or bool (`int | None` is int)."""
    t = f.type if not isinstance(f.type, str) else eval(f.type, {})  # noqa: S307 - our own annotations
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def key(prefix, name):
    """The settings key (argparse dest) of a config field: {prefix}_{name}, or the name alone without prefix."""
    return f"{prefix}_{name}" if prefix else name


def add_config_flags(parser, cls, prefix, title):
    """One flag --{prefix}-{field} per field of `cls` (--{field} for prefix ""). The parsed value is None when
    the flag is not given (so a command can tell given flags from defaults); config_from fills in the defaults."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        flag, t = "--" + key(prefix, f.name).replace("_", "-"), field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if default is None or t is bool or f.metadata.get("switch") else f" (default {default})"
        help_text = f.metadata.get("help", "") + shown
        if t is bool and default:  # on by default: --x / --no-x
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif t is bool:
            group.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            group.add_argument(flag, type=t, default=None, choices=f.metadata.get("choices"), help=help_text,
                               metavar=None if f.metadata.get("choices") else t.__name__.upper())
    return group


def given_fields(settings, cls, prefix):
    """The fields of `cls` whose flags have a value in `settings` (a dict of dest -> value)."""
    return [f.name for f in dataclasses.fields(cls) if settings.get(key(prefix, f.name)) is not None]


def config_from(cls, settings, prefix):
    """cls built from parsed flags (a dict of dest -> value): the flags not given (None) take their defaults."""
    return make_config(cls, {f.name: settings[key(prefix, f.name)] for f in dataclasses.fields(cls)
                             if settings.get(key(prefix, f.name)) is not None}, prefix)


def make_config(cls, values, prefix):
    """cls(**values), checked: a bad value raises UserError with __post_init__'s message (which names the flag)."""
    for name, v in values.items():  # NaN passes every `x <= 0` check below it: refused here, for every float
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"--{key(prefix, name).replace('_', '-')} must be a finite number, got {v}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None


# ----------------------------------------------------------------------------------------------------------
# Flag groups the commands share

def add_run_flags(parser, base_use):
    """--ckpt (a tuned run) and --init (a base checkpoint); base_use says what the base is without --ckpt."""
    parser.add_argument("--ckpt", default=None, help="a run folder of train.py (or its ckpt.pt); default: no tuning")
    parser.add_argument("--init", default=None,
                        help=f"base checkpoint (folder or .gguf): {base_use} without --ckpt (default: the built-in "
                             "base); with --ckpt, where its base now is (default: the path saved in the run)")


def add_device_flags(parser, dtype_help="auto = bfloat16 on a GPU that supports it, else float32"):
    """--device, --dtype and --threads (read with pick_device, use_bf16 and threads.Threads)."""
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help=dtype_help)
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch; 0 = auto: the cores other programs leave idle, re-checked as "
                             "the command runs (threads.Threads)")


# ----------------------------------------------------------------------------------------------------------
# Device and dtype

def mps_available():
    """Whether torch reports an Apple GPU (Metal Performance Shaders)."""
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(flag):
    """--device: auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps (Apple GPUs: untested
    here, no machine of the project has one)."""
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    if flag not in ("cpu", "mps") and not flag.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {flag!r}")
    if flag.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {flag}: CUDA is not available on this machine")
    if flag == "mps" and not mps_available():
        raise UserError("--device mps: torch reports no MPS device (an Apple GPU with a torch built for it) here")
    return torch.device(flag)


def use_bf16(flag, device):
    """--dtype: auto = bfloat16 on a GPU that supports it, else float32. MPS computes in bfloat16 from macOS 14 on
    only; auto keeps float32 there (bfloat16 on MPS is untested here)."""
    if flag == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    if flag == "bfloat16" and device.type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise UserError("--dtype bfloat16 on --device mps needs macOS 14 or newer: use --dtype float32")
    return flag == "bfloat16"


def sum_dtype(device):
    """The dtype of exact running sums (token counts, a step's loss): float64, which MPS lacks (float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


# ----------------------------------------------------------------------------------------------------------
# Distributed (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)

def setup_distributed(device_flag):
    """(rank, world size, device, whether we started the process group)."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_flag), False
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = device_flag.startswith("cuda") or (device_flag == "auto" and torch.cuda.is_available())
    if device_flag == "mps" or (device_flag == "auto" and not use_cuda and mps_available()):
        raise UserError("torchrun on --device mps is not supported (one Apple GPU per machine): run train.py alone")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device, started


def all_reduce_sum(x):
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def run_main(main, name):
    """Run a command's main(); a UserError prints `name: error: message` and exits 1, with no traceback."""
    try:
        return main()
    except UserError as e:
        raise SystemExit(f"{name}: error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(f"{name}: interrupted") from None
