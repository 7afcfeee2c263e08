"""
What a run folder is, and how a run's model is rebuilt from it: one module for train.py, eval.py and every other
command.

A run folder (train.py --out) holds:
    args.json       every setting of the run (also inside ckpt.pt): the plain ones, then one object per config
                    (CONFIGS: {"optim": {...}, "base": {...}, "lora": {...}, "mod": {...} or null, "molex": ...})
    ckpt.pt         trainable parameters, optimizer state, step, data position, RNG states; read with
                    torch.load(weights_only=True). The frozen base is not copied: the settings say where it is.
    metrics.jsonl   one JSON object per line ({"step", "loss", "lr", ...} every step, {"step", "val_loss"})
and after --pretrain also config.json + model.safetensors (Hugging Face format), which from_pretrained loads.
While a run trains, its folder also holds a `lock` file (the process id; flock-ed, so a crashed run's lock is free
again). A folder belongs to one run: a second process on it is refused (claim_run_folder), and a new run refuses a
folder holding another run's files unless --overwrite is given.

A run's settings are a dict of plain values and config dataclasses (train.py's args; run_settings builds them
from what a run saved, saved_settings writes them). build_model(settings) makes the model of a run from them: the
base (loaded, or new for --pretrain), frozen here and only here, then LoRA, then the add-ons (MoD's head hook,
MoLEx's layer hook).
"""
import dataclasses
import hashlib
import json
import signal
from pathlib import Path

import torch

from cli import UserError, all_reduce_sum, key, make_config
from lora import LoRAConfig, apply_lora, freeze_base
from mod import MoDConfig, attach_mod
from model import Llama, LlamaConfig
from molex import MoLExConfig, attach_molex
from optim import OptimConfig
from quant import QuantConfig
from run_folder import claim_run_folder, release_run_folder, truncate_metrics
from tokenizer import check_tokenizer_fits, load_tokenizer
from weights import atomic_write, find_format, from_pretrained, plain_error, read_json

REPO = Path(__file__).resolve().parent
# gitignored; built by the first `python train.py`; the name says its shape (8 layers of dim 64)
BUILTIN_BASE = REPO / "checkpoints" / "builtin-base-8x64"
CHECKPOINT_FORMAT = "llama-layers train.py checkpoint v1"


# The configs a run carries: their key in its settings (args.lora, args.json's "lora") -> (dataclass, the prefix of
# their flags: --lora-rank is LoRAConfig.rank, --lr OptimConfig.lr). An add-on's config is None when it is off.
CONFIGS = {"optim": (OptimConfig, ""), "base": (QuantConfig, "base"), "lora": (LoRAConfig, "lora"),
           "mod": (MoDConfig, "mod"), "molex": (MoLExConfig, "molex")}
ADDONS = {"mod": "--mod", "molex": "--molex"}  # the add-ons and their switches

# Config fields a run folder may lack, with the value that reproduces the run that wrote it (a run folder that
# saves every setting never needs these).
BEFORE_DEFAULTS = {"mod": {"start": "uniform", "router_input": "normed", "top_k_weights": "renormalized",
                           "weight_range": "free"},
                   "molex": {"gate_init": "uniform"}}


def base_folder(init):
    """The checkpoint --init stands for (None or 'builtin': the built-in base)."""
    return BUILTIN_BASE if init in (None, "builtin") else Path(init)


def run_settings(saved):
    """A run's settings as saved (ckpt.pt's args, as args.json shows them) -> the settings it runs with: each
    config built (and so checked) once, here; a field the run did not save (or saved as None) takes
    BEFORE_DEFAULTS' value, else its default. A run saved with flat keys ({prefix}_{field}, before the configs were
    nested) is read too."""
    saved = nested_settings(saved)
    settings = dict(saved)
    for name, (cls, prefix) in CONFIGS.items():
        if saved.get(name) is not None or name not in ADDONS:
            fields = {f.name for f in dataclasses.fields(cls)}
            values = {**BEFORE_DEFAULTS.get(name, {}), **(saved.get(name) or {})}
            settings[name] = make_config(cls, {k: v for k, v in values.items() if k in fields and v is not None},
                                         prefix)
    return settings


def nested_settings(saved):
    """A run's saved settings in today's form, one dict per config. A run saved before that has every config field
    as a flat key ({prefix}_{field}: lora_rank, mod_k, lr) and the add-ons' switches as mod_k (MoD on unless None
    or 0) and molex (a bool): it is converted, once, as it is read."""
    if isinstance(saved.get("optim"), dict):
        return saved
    nested = dict(saved)
    on = {"mod": bool(saved.get("mod_k")), "molex": bool(saved.get("molex"))}
    for name, (cls, prefix) in CONFIGS.items():
        nested.pop(name, None)  # the add-ons' switches
        values = {f.name: nested.pop(key(prefix, f.name)) for f in dataclasses.fields(cls)
                  if key(prefix, f.name) in nested}
        nested[name] = values if on.get(name, True) else None
    return nested


def saved_settings(settings):
    """What a run saves of its settings (ckpt.pt's args, args.json): the plain values, then each config as a dict
    of its fields (run_settings reads them back)."""
    return {**{k: v for k, v in settings.items() if k not in CONFIGS},
            **{k: dataclasses.asdict(settings[k]) if settings[k] is not None else None
               for k in CONFIGS if k in settings}}


def build_model(settings, device="cpu", dtype=torch.float32, verbose=True, with_addons=True):
    """The model a run trains or evaluates, from its settings (a dict: train.py's args, or run_settings of a saved
    run; a missing "lora" or "base" is its default config, a missing add-on is off). dtype: of the frozen base
    weights (trainable parameters stay float32). with_addons=False: the base alone (frozen), as eval.py --baseline
    scores it."""
    a = settings
    if a["pretrain"]:
        try:
            cfg = LlamaConfig(dim=a["dim"], n_layers=a["n_layers"], n_heads=a["n_heads"], n_kv_heads=a["n_kv_heads"],
                              vocab_size=a["vocab_size"], multiple_of=32, max_seq_len=a["context"])
        except ValueError as e:
            raise UserError(f"--dim {a['dim']} / --n-heads {a['n_heads']} / --n-kv-heads {a['n_kv_heads']}: "
                            f"{e}") from None
        return Llama(cfg).init_weights(seed=a["seed"], std=0.02).to(device)
    try:
        model = from_pretrained(base_folder(a["init"]), dtype=dtype, device=device,
                                base=a.get("base") or QuantConfig())  # --base-bits: 4 or 8 bits
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--init {a['init']}: {e}") from None
    model.base_fingerprint = base_fingerprint(model)
    freeze_base(model)
    if with_addons:
        torch.manual_seed(a["seed"])  # LoRA's A init
        try:
            apply_lora(model, cfg=a.get("lora") or LoRAConfig(), verbose=verbose)
            if a.get("mod") is not None:
                attach_mod(model, a["mod"], verbose=verbose)
            if a.get("molex") is not None:  # the gate's seed: the run's unless --molex-seed is given
                seed = a["seed"] if a["molex"].seed is None else a["molex"].seed
                attach_molex(model, dataclasses.replace(a["molex"], seed=seed), verbose=verbose)
        except ValueError as e:  # a setting that does not fit this model (e.g. --mod-k above its layers)
            raise UserError(str(e)) from None
    model.grad_checkpointing = bool(a.get("grad_checkpointing"))
    return model.to(device)


def tokenizer_label(spec, given, init, saved=False):
    """How a message names the tokenizer: the --tokenizer flag only when the user gave it."""
    if given:
        return f"--tokenizer {spec}"
    if saved:
        return f"the run's tokenizer {spec} (saved in its settings)"
    base = "the built-in base" if init in (None, "builtin") else f"--init {init}"
    return f"the tokenizer of {base} ({spec})"


def open_tokenizer(spec, label):
    try:
        return load_tokenizer(spec)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{label}: {e}") from None


def check_base_is_there(settings, where):
    """A run's saved base (not given by --init now) must still exist; else say so, not "--init X: no such"."""
    init = settings.get("init")
    if not settings.get("pretrain") and init not in (None, "builtin") and not Path(init).exists():
        raise UserError(f"the base of {where}, {init} (saved in its settings), is not there any more: {where} "
                        f"needs it; pass --init where it is now")


def base_fingerprint(model):
    """What tells one base from another of the same shape, saved with a run: a hash of the embedding's first 65,536
    values, every norm weight and the head's first values (any fine-tune changes some of them), rounded to bfloat16
    so the base loaded in float32 or bfloat16 gives the same. File names, sizes and dates cannot tell two bases of
    one shape apart (and change when a base is copied); hashing every weight would read a 7B base twice."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.dim() == 1 or name in ("embed.weight", "lm_head.weight"):
            h.update(name.encode())
            h.update(p.detach().flatten()[:65536].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_same_base(settings, model, where, given):
    """The base just loaded is the one the run was trained on (its saved fingerprint), then record it."""
    fp = getattr(model, "base_fingerprint", None)
    if fp is None:
        return
    saved = settings.get("base_fingerprint")
    if saved is not None and saved != fp:
        what = f"--init {settings['init']}" if given else f"the base at {settings['init']} (saved in its settings)"
        raise UserError(f"{what} is not the base {where} was trained on: its weights differ from the fingerprint "
                        f"saved with the run ({fp} != {saved}); give the run's own base with --init")
    settings["base_fingerprint"] = fp


def resolve_tokenizer(spec, init, pretrain=False):
    """What --tokenizer means when not given: the base's own tokenizer (tokenizer.model or tokenizer.json in its
    folder, or the one inside its GGUF file), else the one its config.json names (the built-in base: "byte"),
    else "byte" for a new model."""
    if spec:
        return str(spec)
    if pretrain:
        return "byte"
    try:
        kind, path = find_format(base_folder(init))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--init {init}: {e}") from None
    if kind == "gguf":
        return str(path)
    for name in ("tokenizer.model", "tokenizer.json"):
        if (path / name).is_file():
            return str(path / name)
    try:
        named = read_json(path / "config.json").get("tokenizer") if (path / "config.json").is_file() else None
    except ValueError as e:
        raise UserError(f"--init {init}: {e}") from None
    if named:
        return named
    raise UserError(f"no tokenizer for {path}: it has no tokenizer.model or tokenizer.json and its config.json "
                    f"names none; pass --tokenizer")


# ----------------------------------------------------------------------------------------------------------
# Trainable state and checkpoint files

def trainable_state(model):
    """The parameters training changes, plus the add-ons' buffers (MoLEx's aux_free bias is trained without
    gradients): everything a run saves on top of its frozen base."""
    state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    for prefix, hook in (("mod.", model.mod), ("molex.", model.molex)):
        if hook is not None:
            state.update({prefix + n: b.detach().cpu() for n, b in hook.named_buffers()})
    return state


# Parameters saved under another name by older run folders: old name -> name now
RENAMED = {"mod.share": "mod.ensemble_weight", "molex.share": "molex.mix_weight"}


def load_trainable(model, state, where):
    """Copy saved trainable state into the model, naming any mismatch (older names are read as RENAMED says)."""
    state = {RENAMED.get(n, n): v for n, v in state.items()}
    targets = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for prefix, hook in (("mod.", model.mod), ("molex.", model.molex)):
        if hook is not None:
            targets.update({prefix + n: b for n, b in hook.named_buffers()})
    missing, unexpected = sorted(targets.keys() - state.keys()), sorted(state.keys() - targets.keys())
    if missing or unexpected:
        raise UserError(f"{where}: its parameters do not fit the model built from its settings: missing "
                        f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                        f"{'...' if len(unexpected) > 3 else ''}")
    with torch.no_grad():
        for name, p in targets.items():
            if state[name].shape != p.shape:
                raise UserError(f"{where}: {name} has shape {tuple(state[name].shape)}, the model {tuple(p.shape)}")
            p.copy_(state[name])


def checkpoint_path(run):
    run = Path(run)
    return run if run.suffix == ".pt" else run / "ckpt.pt"


def save_checkpoint(state, path, on_error=None):
    """Atomic (weights.atomic_write): a crash leaves the old checkpoint or the new one, never a torn one. A failed
    write (a full disk) removes its temporary file and ends the run with one line saying why; the previous
    checkpoint stays. on_error: called before the message (e.g. to close a progress bar)."""
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:  # torch wraps the OSError of a failed write in a RuntimeError
        cause = e if isinstance(e, OSError) else (e.__cause__ or e.__context__ or e)
        reason = getattr(cause, "strerror", None) or plain_error(cause)
        if on_error is not None:  # e.g. close the progress bar, so the message has its own line
            on_error()
        kept = (f"the previous checkpoint (step {torch.load(path, weights_only=True, mmap=True)['step']}) is kept"
                if Path(path).is_file() else "no checkpoint had been written yet")
        raise UserError(f"could not write the checkpoint of step {state['step']} to {path} ({reason}): {kept}; "
                        f"free some space and continue with --resume {Path(path).parent}") from None


def load_checkpoint(path):
    """A train.py checkpoint, read without running pickle code."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint there")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise UserError(f"{path}: not a readable train.py checkpoint: it is damaged or holds more than tensors "
                        f"({plain_error(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a train.py checkpoint (no format tag {CHECKPOINT_FORMAT!r})")
    if isinstance(ckpt.get("args"), dict):
        check_args_file(path.parent / "args.json", ckpt["args"])
        ckpt["args"] = run_settings(ckpt["args"])  # an older run resumes and evaluates as it was trained
    return ckpt


# Settings that train.py --resume may change (a run's length, how often it logs, where it goes, where its base now
# is): any other flag given with --resume must equal the saved value.
CHANGEABLE_ON_RESUME = {"resume", "max_steps", "epochs", "eval_every", "save_every", "device", "compile",
                        "eval_n", "out", "threads", "overwrite", "init"}


def check_args_file(args_file, saved):
    """args.json is a copy of the settings inside ckpt.pt, for people to read. A hand edit there would be ignored
    (the checkpoint's settings are what its parameters were trained with), so it is refused, naming the keys."""
    if not args_file.is_file():
        return
    try:
        shown = json.loads(args_file.read_text())
    except (OSError, ValueError):
        raise UserError(f"{args_file}: not valid JSON (edited by hand?); restore it from ckpt.pt's settings") from None
    saved = json.loads(json.dumps(saved))  # as JSON shows them (tuples as lists)
    saved, shown = nested_settings(saved), nested_settings(shown)  # a resumed older run rewrites args.json first
    skip = CHANGEABLE_ON_RESUME | {"base_fingerprint"}  # may lag behind in ckpt.pt until its next save
    differ = []  # (name, in ckpt.pt, in args.json) of each setting the run saved; a config's fields named as flags
    for k in sorted(saved.keys() - skip):
        if k in CONFIGS and isinstance(saved[k], dict) and isinstance(shown.get(k), dict):
            differ += [(key(CONFIGS[k][1], f), v, shown[k].get(f)) for f, v in saved[k].items()
                       if key(CONFIGS[k][1], f) not in skip and shown[k].get(f) != v]
        elif shown.get(k) != saved[k]:
            differ.append((k, saved[k], shown.get(k)))
    if differ:
        raise UserError(f"{args_file} differs from the settings saved in ckpt.pt ("
                        + ", ".join(f"{k}: {a!r} in ckpt.pt, {b!r} in args.json" for k, a, b in differ[:4])
                        + "): edits to args.json are not used (ckpt.pt's parameters were trained with its settings). "
                        "Restore args.json; with train.py --resume, change the run's length or schedule with flags")


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def checkpoint_state(model, optimizer, order, step, settings, world, device):
    """What ckpt.pt holds (every rank joins the gather of the RNG states)."""
    rngs = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(rngs, rng_state(device))
    else:
        rngs = [rng_state(device)]
    return {"format": CHECKPOINT_FORMAT, "args": saved_settings(settings), "model": trainable_state(model),
            "optimizer": optimizer.state_dict(), "step": step, "data": order.state(), "rng": rngs,
            "model_config": dict(vars(model.config))}


def restore_rng(ckpt, rank, world, device, verbose):
    """This rank's dropout RNG as saved (a run resumed with another number of processes gets fresh streams)."""
    if len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank], device)
    elif verbose:
        print(f"note: the checkpoint has RNG states of {len(ckpt['rng'])} processes, this run has {world}: "
              f"dropout masks will differ from an uninterrupted run")


def open_run_folder(run, settings, resume_from, step, overwrite=False):
    """Claim the run folder (claim_run_folder: refused if in use or holding another run; --resume A --out B starts
    B as a copy of A) and write args.json; a resumed run drops what metrics.jsonl logged after its checkpoint."""
    claim_run_folder(run, resume_from, overwrite)
    (run / "args.json").write_text(json.dumps(saved_settings(settings), indent=2) + "\n")
    if resume_from is not None:
        truncate_metrics(run / "metrics.jsonl", step)


def load_run(ckpt=None, init=None, tokenizer=None, device="cpu", dtype=torch.float32, verbose=False, base=None):
    """(model in eval mode, tokenizer, settings, checkpoint or None) of a tuned run folder (`ckpt`), or of a base
    alone (`init`, default the built-in base) without tuning. `init` with `ckpt`: where the run's base is now.
    base: the quant.QuantConfig of a base alone (a run keeps its own)."""
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        settings = dict(state["args"])
        if init is not None:
            settings["init"] = init
        check_base_is_there(settings, f"the run {checkpoint_path(ckpt).parent}")
    else:
        state, settings = None, {"init": init or "builtin", "pretrain": False, "seed": 0, "data": None,
                                 "difficulty": None, "tokenizer": None, "base": base or QuantConfig()}
    builtin = not settings["pretrain"] and settings["init"] in (None, "builtin")
    if builtin and not (BUILTIN_BASE / "config.json").is_file():
        raise UserError(f"the built-in base is not built yet ({BUILTIN_BASE}): run python train.py, which builds it "
                        f"first")
    spec = resolve_tokenizer(tokenizer or settings.get("tokenizer"), settings["init"], settings["pretrain"])
    label = tokenizer_label(spec, tokenizer is not None, settings["init"], saved=bool(settings.get("tokenizer")))
    tok = open_tokenizer(spec, label)
    if settings["pretrain"]:
        settings.setdefault("vocab_size", tok.vocab_size)
    model = build_model(settings, device, dtype, verbose=verbose, with_addons=state is not None)
    check_tokenizer_fits(tok, model.config.vocab_size, label)
    if state is not None:
        check_same_base(settings, model, f"the run {checkpoint_path(ckpt).parent}", given=init is not None)
        load_trainable(model, state["model"], checkpoint_path(ckpt))
    return model.eval(), tok, settings, state


class StopSignal:
    """Ctrl-C (SIGINT) or SIGTERM asks the training loop to stop after the step it is in, so that step can be saved;
    a second signal stops at once. Handlers are ours until restore()."""

    def __init__(self):
        self.requested, self.before = None, {}
        try:
            self.before = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: signals cannot be caught here
            pass

    def handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: stopping after this step (saving it); press Ctrl-C again to stop at once",
              flush=True)

    def check(self, world, device):
        """Whether any process was asked to stop (every process joins the all-reduce under DDP)."""
        if world == 1:
            return self.requested is not None
        return bool(all_reduce_sum(torch.tensor([float(self.requested is not None)], device=device)))

    def save_and_stop(self, state, ckpt_file, step, max_steps):
        """Save the last finished step (ckpt_file None: not the saving process) and end the run with how to resume."""
        if ckpt_file is not None:
            save_checkpoint(state, ckpt_file)
            release_run_folder(ckpt_file.parent)
        self.restore()
        raise UserError(f"stopped ({self.requested or 'by another process'}) after step {step} of {max_steps}: "
                        f"saved {ckpt_file or 'the checkpoint'}; continue with: python train.py --resume "
                        f"{ckpt_file.parent if ckpt_file else 'RUN'}")

    def restore(self):
        for s, handler in self.before.items():
            signal.signal(s, handler)
        self.before = {}
