"""
What a run folder is, and how a run's model is rebuilt from it: one module for train.py, eval.py and every other
command.

A run folder (train.py --out) holds:
    args.json       every setting of the run (also inside ckpt.pt)
    ckpt.pt         trainable parameters, optimizer state, step, data position, RNG states; read with
                    torch.load(weights_only=True). The frozen base is not copied: the settings say where it is.
    metrics.jsonl   one JSON object per line ({"step", "loss", "lr", ...} every step, {"step", "val_loss"})
and after --pretrain also config.json + model.safetensors (Hugging Face format), which from_pretrained loads.

build_model(settings) makes the model of a run from its settings: the base (loaded, or new for --pretrain),
frozen here and only here, then LoRA, then the add-ons (MoD's head hook, MoLEx's layer hook), whose configs
run_configs reads from the settings.
"""
import json
from pathlib import Path

import torch

from cli import UserError, config_from
from mod import MoDConfig, attach_mod
from model import Llama, LlamaConfig, LoRAConfig, apply_lora, freeze_base
from molex import MoLExConfig, attach_molex
from tokenizer import check_tokenizer_fits, load_tokenizer
from weights import atomic_write, find_format, from_pretrained, plain_error, read_json

REPO = Path(__file__).resolve().parent
# gitignored; built by the first `python train.py`; the name says its shape (8 layers of dim 64)
BUILTIN_BASE = REPO / "checkpoints" / "builtin-base-8x64"
CHECKPOINT_FORMAT = "llama-layers train.py checkpoint v1"


# Settings a run folder may lack, with the value that reproduces the run that wrote it (a run folder that
# saves every setting never needs these).
BEFORE_DEFAULTS = {"mod_start": "uniform", "mod_router_input": "normed", "mod_top_k_weights": "renormalized",
                   "molex_gate_init": "uniform"}


def base_folder(init):
    """The checkpoint --init stands for (None or 'builtin': the built-in base)."""
    return BUILTIN_BASE if init in (None, "builtin") else Path(init)


def mod_on(settings):
    return bool(settings.get("mod_k"))  # None (not given) or 0 (older runs): off


# The add-ons: prefix of their settings -> (config dataclass, whether a run's settings switch it on, the switch)
ADDONS = {"mod": (MoDConfig, mod_on, "--mod"), "molex": (MoLExConfig, lambda s: bool(s.get("molex")), "--molex")}


def run_configs(settings):
    """A run's LoRA and add-on configs, built (and so checked) from its settings, the one place that reads them:
    {"lora": LoRAConfig, "mod": MoDConfig or None, "molex": MoLExConfig or None} (None: the add-on is off). A
    field the settings lack (an older run) takes its default; a bad value is a UserError naming the flag."""
    return {"lora": config_from(LoRAConfig, settings, "lora"),
            **{prefix: config_from(cls, settings, prefix) if on(settings) else None
               for prefix, (cls, on, _) in ADDONS.items()}}


def build_model(settings, device="cpu", dtype=torch.float32, verbose=True, with_addons=True):
    """The model a run trains or evaluates, from its settings (a dict: parsed flags or a run's args.json).
    dtype: of the frozen base weights (trainable parameters stay float32). with_addons=False: the base alone
    (frozen), as eval.py --baseline scores it."""
    a = settings
    if a["pretrain"]:
        cfg = LlamaConfig(dim=a["dim"], n_layers=a["n_layers"], n_heads=a["n_heads"], n_kv_heads=a["n_kv_heads"],
                          vocab_size=a["vocab_size"], multiple_of=32, max_seq_len=a["context"])
        return Llama(cfg).init_weights(seed=a["seed"], std=0.02).to(device)
    try:
        model = from_pretrained(base_folder(a["init"]), dtype=dtype, device=device)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--init {a['init']}: {e}") from None
    freeze_base(model)
    if with_addons:
        torch.manual_seed(a["seed"])  # LoRA's A init
        cfg = run_configs(a)
        try:
            apply_lora(model, cfg=cfg["lora"], verbose=verbose)
            if cfg["mod"] is not None:
                attach_mod(model, cfg["mod"], verbose=verbose)
            if cfg["molex"] is not None:
                if cfg["molex"].seed is None:  # the gate's seed: the run's unless --molex-seed is given
                    cfg["molex"].seed = a["seed"]
                attach_molex(model, cfg["molex"], verbose=verbose)
        except ValueError as e:  # a setting that does not fit this model (e.g. --mod-k above its layers)
            raise UserError(str(e)) from None
    model.grad_checkpointing = bool(a.get("grad_checkpointing"))
    return model.to(device)


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


def save_checkpoint(state, path):
    """Atomic (weights.atomic_write): a crash leaves the old checkpoint or the new one, never a torn one."""
    atomic_write(path, lambda f: torch.save(state, f))


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
        ckpt["args"] = {**BEFORE_DEFAULTS, **ckpt["args"]}  # an older run resumes and evaluates as it was trained
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


def checkpoint_state(model, optimizer, order, step, settings, world, device):
    """What ckpt.pt holds (every rank joins the gather of the RNG states)."""
    rngs = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(rngs, rng_state(device))
    else:
        rngs = [rng_state(device)]
    return {"format": CHECKPOINT_FORMAT, "args": settings, "model": trainable_state(model),
            "optimizer": optimizer.state_dict(), "step": step, "data": order.state(), "rng": rngs,
            "model_config": dict(vars(model.config))}


def restore_rng(ckpt, rank, world, device, verbose):
    """This rank's dropout RNG as saved (a run resumed with another number of processes gets fresh streams)."""
    if len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank], device)
    elif verbose:
        print(f"note: the checkpoint has RNG states of {len(ckpt['rng'])} processes, this run has {world}: "
              f"dropout masks will differ from an uninterrupted run")


def open_run_folder(run, settings, resuming, step):
    """Make the run folder and write args.json; a new run refuses a folder holding a run, a resumed one drops what
    metrics.jsonl logged after its checkpoint."""
    ckpt_file, metrics_file = run / "ckpt.pt", run / "metrics.jsonl"
    if not resuming and ckpt_file.exists():
        raise UserError(f"{run} already holds a run: continue it with --resume {run}, or pick another --out")
    run.mkdir(parents=True, exist_ok=True)
    (run / "args.json").write_text(json.dumps(settings, indent=2) + "\n")
    if resuming and metrics_file.exists():
        lines = [ln for ln in metrics_file.read_text().splitlines() if ln.strip()]
        metrics_file.write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= step))


def load_run(ckpt=None, init=None, tokenizer=None, device="cpu", dtype=torch.float32, verbose=False):
    """(model in eval mode, tokenizer, settings, checkpoint or None) of a tuned run folder (`ckpt`), or of a base
    alone (`init`, default the built-in base) without tuning. `init` with `ckpt`: where the run's base is now."""
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        settings = dict(state["args"])
        if init is not None:
            settings["init"] = init
    else:
        state, settings = None, {"init": init or "builtin", "pretrain": False, "seed": 0, "data": None,
                                 "difficulty": None, "tokenizer": None}
    builtin = not settings["pretrain"] and settings["init"] in (None, "builtin")
    if builtin and not (BUILTIN_BASE / "config.json").is_file():
        raise UserError(f"the built-in base is not built yet ({BUILTIN_BASE}): run python train.py, which builds it "
                        f"first")
    spec = resolve_tokenizer(tokenizer or settings.get("tokenizer"), settings["init"], settings["pretrain"])
    try:
        tok = load_tokenizer(spec)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--tokenizer {spec}: {e}") from None
    if settings["pretrain"]:
        settings.setdefault("vocab_size", tok.vocab_size)
    model = build_model(settings, device, dtype, verbose=verbose, with_addons=state is not None)
    check_tokenizer_fits(tok, model.config.vocab_size, f"--tokenizer {spec}")
    if state is not None:
        load_trainable(model, state["model"], checkpoint_path(ckpt))
    return model.eval(), tok, settings, state
