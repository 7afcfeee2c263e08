"""
Tune a LLaMA model with LoRA, or pretrain the tiny built-in base, in one plain training loop.

    python train.py                                    # build the built-in base if missing, then tune it on "arith"
    python train.py --init /path/to/llama-2-7b --data data/gsm8k --lr 3e-4 --batch-size 16 --grad-accum 4
    python train.py --init model.gguf --data data/arc-easy   # a GGUF file (e.g. SmolLM2), its own tokenizer
    python train.py --mod-k 4                          # + MoD: ensemble of the last 4 layers (mod.py; --mod: k=4)
    python train.py --molex                            # + MoLEx: every layer mixed with a gated layer expert (molex.py)
    python train.py --resume runs/arith-20250101-120000   # continue a stopped run exactly where it stopped
    torchrun --standalone --nproc_per_node 2 train.py ...  # data parallel: each rank takes its share of each batch
    python train.py --pretrain --out checkpoints/my-base   # full-parameter pretraining of a new tiny model

What a run folder holds and how its model is rebuilt: checkpoint.py. The LoRA, MoD and MoLEx flags are made from
their config dataclasses (model.LoRAConfig, mod.MoDConfig, molex.MoLExConfig), which check the values.
"""
import argparse
import json
import math
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import (BUILTIN_BASE, CHECKPOINT_FORMAT, REPO, build_model, checkpoint_path, load_checkpoint,
                        load_trainable, mod_on, resolve_tokenizer, rng_state, save_checkpoint, set_rng_state,
                        trainable_state)
from cli import (HelpFormatter, Threads, UserError, add_config_flags, all_reduce_sum, config_from, given_fields,
                 run_main, setup_distributed, store_config, use_bf16)
from data import BUILTIN_TASKS, resolve_path
from data.batching import DataOrder, collate, load_training_data
from data.builtin import DEFAULT_DIFFICULTY
from data.format import CHOICE_TARGETS, IGNORE_INDEX
from mod import MoDConfig
from model import LoRAConfig
from molex import MoLExConfig, prompt_end_from_targets
from optim import CASE_DEFAULTS, OptimConfig, case_help, fill_case_defaults, lr_factor, param_groups
from tokenizer import check_tokenizer_fits, load_tokenizer
from weights import save_hf

# The built-in base: 8 layers of dim 64 (so that MoD's "last k layers" are late layers), 4 query heads sharing
# 2 KV heads, byte tokenizer, context 512, pretrained on data.builtin's corpus for 700 steps of 8 x 128 tokens, then tuned for 700 on the
# built-in tasks' default difficulty 1: about 3 CPU-minutes in all (BENCHMARKS.md).
BUILTIN_BASE_ARGV = ["--pretrain", "--dim", "64", "--n-layers", "8", "--n-heads", "4", "--n-kv-heads", "2",
                     "--context", "512", "--tokenizer", "byte", "--data", "corpus", "--corpus-chars", "400000",
                     "--max-len", "128", "--batch-size", "8", "--max-steps", "700", "--lr", "3e-3",
                     "--warmup-steps", "30", "--weight-decay", "0.1", "--eval-every", "0", "--save-every", "350",
                     "--seed", "0"]

# Models below this many parameters train with one CPU thread under --threads 0 (auto). Measured on the built-in
# base: 2 threads made a step 1.5x faster for 2x the CPU time, and 10x slower when another program held a core.
SMALL_MODEL = 10_000_000

# Settings that --resume may change; any other flag given with --resume must equal the saved value.
RESUME_OVERRIDABLE = {"resume", "max_steps", "epochs", "eval_every", "save_every", "device", "compile",
                      "eval_n", "out", "threads"}

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
    g.add_argument("--eval-n", type=int, default=64,
                   help="validation loss on this many records of the test split (held-out text with --pretrain)")
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
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype: auto = bfloat16 autocast on a GPU that supports it, else float32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block in the backward pass (less memory, ~30%% more compute)")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch; 0 = auto: the cores other programs leave idle, re-checked as the "
                        "run goes (cli.Threads)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialization, the data order and dropout")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None,
                   help="run folder; default runs/<data>-<date-time> (--pretrain: runs/pretrain-<date-time>)")
    g.add_argument("--resume", default=None, metavar="RUN",
                   help="continue the run in this folder (or this ckpt.pt) with its saved settings")
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


def resumed_args(parser, args, argv):
    ckpt_path = checkpoint_path(args.resume)
    saved = load_checkpoint(ckpt_path)["args"]
    given = explicit_flags(argv)
    changed = [f"--{k.replace('_', '-')} (saved {saved.get(k)!r}, given {v!r})" for k, v in given.items()
               if k not in RESUME_OVERRIDABLE and saved.get(k) != v]
    if changed:
        raise UserError("--resume continues a run with its saved settings; these flags differ: " + ", ".join(changed))
    defaults = vars(parser.parse_args([]))  # flags newer than the checkpoint get their defaults
    defaults["choice_target"] = "label"  # except this one: a run saved before it trained on labels
    args = argparse.Namespace(**{**defaults, **saved, **{k: v for k, v in given.items() if k in RESUME_OVERRIDABLE}})
    args.resume, args.out = str(ckpt_path), str(ckpt_path.parent)
    if "max_steps" in given or "epochs" in given:  # a new length replaces the saved one
        args.max_steps, args.epochs = given.get("max_steps"), given.get("epochs")
    return args


ADDONS = [(MoDConfig, "mod", mod_on, "--mod"), (MoLExConfig, "molex", lambda a: a["molex"], "--molex")]


def switch_mod_on(a):
    """--mod and --mod-k N both switch MoD on (the run folder keeps mod_k, its switch); --mod-k 0 is refused."""
    if a.mod_k is not None and a.mod_k < 1:
        raise UserError(f"--mod-k must be >= 1, got {a.mod_k} (leave out --mod and --mod-k for no MoD)")
    if a.mod and a.mod_k is None:
        a.mod_k = MoDConfig.k
    a.mod = a.mod_k is not None


def check_switches(a):
    """An add-on's flags given without its switch are refused, naming the switch."""
    for cls, prefix, on, switch in ADDONS:
        given = [f"--{prefix}-{n.replace('_', '-')}" for n in given_fields(vars(a), cls, prefix) if n != "k"]
        if given and not on(vars(a)):
            raise UserError(f"{', '.join(given)} given without {switch}: these flags set up "
                            f"{'MoD' if prefix == 'mod' else 'MoLEx'}, which is off unless {switch} is given")


def check_args(a):
    """Reject bad values before anything is loaded, naming the flag (UserError)."""
    for flag in ("dim", "n_layers", "n_heads", "n_kv_heads", "context", "corpus_chars"):
        if getattr(a, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(a, flag)}")
    for flag, bad, rule in [("eval_every", a.eval_every < 0, ">= 0"), ("save_every", a.save_every < 0, ">= 0"),
                            ("eval_n", a.eval_n < 0, ">= 0"), ("max_len", a.max_len is not None and a.max_len < 8,
                                                             ">= 8"),
                            ("n_train", a.n_train is not None and a.n_train < 1, ">= 1")]:
        if bad:
            raise UserError(f"--{flag.replace('_', '-')} must be {rule}, got {getattr(a, flag)}")
    store_config(vars(a), config_from(OptimConfig, vars(a), ""), "")
    if a.pretrain and a.init is not None:
        raise UserError("--pretrain trains a new model from scratch: it takes no --init")
    if a.init not in (None, "builtin") and not Path(a.init).exists():
        raise UserError(f"--init {a.init}: no such checkpoint folder or .gguf file")
    if a.difficulty is not None and a.data is not None and a.data not in BUILTIN_TASKS:
        raise UserError(f"--difficulty applies to the built-in tasks ({', '.join(BUILTIN_TASKS)}), not to --data {a.data}")
    if a.pretrain:
        if a.data is not None and a.data != "corpus" and not (a.data.endswith(".txt") and Path(a.data).is_file()):
            raise UserError(f"--pretrain --data must be 'corpus' or an existing .txt file, got {a.data!r}")
    elif a.data is not None and a.data not in BUILTIN_TASKS:
        try:
            resolve_path(a.data, "train")
        except FileNotFoundError as e:
            raise UserError(f"--data: {e}") from None
    # the add-ons' configs check their values, which are then saved complete
    settings = vars(a)
    for cls, prefix, on, switch in ADDONS:
        if on(settings):
            if a.pretrain:
                raise UserError(f"{switch} tunes a pretrained model: it cannot be combined with --pretrain")
            store_config(settings, config_from(cls, settings, prefix), prefix)
    store_config(settings, config_from(LoRAConfig, settings, "lora"), "lora")
    if a.molex and a.prompt_loss and a.molex_vote == "prompt":
        raise UserError("--molex-vote prompt needs the prompt/answer boundary, which --prompt-loss removes from the "
                        "labels: use --molex-vote all")


# ----------------------------------------------------------------------------------------------------------

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
            prompt_end = prompt_end_from_targets(labels)  # where an add-on's routing may look (MoLEx's vote)
            _, loss = model(ids, labels, prompt_end=prompt_end)
        n = int((labels != IGNORE_INDEX).sum())
        total, count = total + float(loss) * n, count + n
    model.train(was_training)
    return total / max(count, 1)


def ensure_builtin_base():
    """Pretrain the built-in base with this same training loop when its folder (checkpoint.BUILTIN_BASE) is missing."""
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
    threads = Threads(args.threads, world) if device.type == "cpu" else None
    if args.data is None:
        args.data = "corpus" if args.pretrain else "arith"
    if not args.pretrain and args.init in (None, "builtin"):
        args.init = "builtin"
        ensure_builtin_base()  # every rank joins (the build runs on all of them); only rank 0 writes
        if world > 1:
            torch.distributed.barrier()  # rank 0 writes the model files after the others have left the build
    if args.init != "builtin" and args.init is not None:
        args.init = str(Path(args.init).resolve())
    if args.pretrain and args.data != "corpus":
        args.data = str(Path(args.data).resolve())
    elif args.data in BUILTIN_TASKS and args.difficulty is None:
        args.difficulty = DEFAULT_DIFFICULTY  # saved with the run, so eval.py scores the same difficulty
    elif not args.pretrain and args.data not in BUILTIN_TASKS:  # a prepared folder, or a .jsonl file
        path = resolve_path(args.data, "train")
        args.data = str((path.parent if path.name == "train.jsonl" else path).resolve())
    ckpt = load_checkpoint(args.resume) if args.resume else None

    # dtype: bfloat16 autocast where the GPU supports it; the frozen base then also lives in bfloat16
    bf16 = use_bf16(args.dtype, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    args.tokenizer = resolve_tokenizer(args.tokenizer, args.init, args.pretrain)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--tokenizer {args.tokenizer}: {e}") from None
    args.vocab_size = tokenizer.vocab_size
    torch.manual_seed(args.seed)
    model = build_model(vars(args), device, torch.bfloat16 if bf16 and not args.pretrain else torch.float32,
                        verbose=master)
    check_tokenizer_fits(tokenizer, model.config.vocab_size, f"--tokenizer {args.tokenizer}")
    if threads and sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        threads.limit(1)  # a tiny model gains little from a second thread and pays double in CPU time
    max_len = args.max_len or (128 if args.pretrain else model.config.max_seq_len)
    if max_len > model.config.max_seq_len:
        raise UserError(f"--max-len {max_len} exceeds the model's context ({model.config.max_seq_len})")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    train, val = load_training_data(vars(args), tokenizer, max_len)

    global_batch = args.batch_size * args.grad_accum
    if args.batch_size < world:
        raise UserError(f"--batch-size {args.batch_size} is smaller than the number of processes ({world}): some "
                        f"would get no examples")
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
    first_step = step
    # dropout RNG: one stream per rank (restored exactly on resume with the same number of processes)
    torch.manual_seed(args.seed + rank)
    if ckpt is not None:
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank], device)
        elif master:
            print(f"note: the checkpoint has RNG states of {len(ckpt['rng'])} processes, this run has {world}: "
                  f"dropout masks will differ from an uninterrupted run")

    run = Path(args.out or REPO / "runs" / f"{'pretrain' if args.pretrain else Path(args.data).stem}-"
                                           f"{datetime.now():%Y%m%d-%H%M%S}")
    args.out = str(run)
    ckpt_file, metrics_file = run / "ckpt.pt", run / "metrics.jsonl"
    saved_args = {k: v for k, v in vars(args).items() if k != "resume"}
    if master:
        if ckpt is None and ckpt_file.exists():
            raise UserError(f"{run} already holds a run: continue it with --resume {run}, or pick another --out")
        run.mkdir(parents=True, exist_ok=True)
        (run / "args.json").write_text(json.dumps(saved_args, indent=2) + "\n")
        if ckpt is not None and metrics_file.exists():  # drop what was logged after the checkpoint
            lines = [ln for ln in metrics_file.read_text().splitlines() if ln.strip()]
            metrics_file.write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= step))

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint_state(step):
        rngs = [None] * world
        if world > 1:
            torch.distributed.all_gather_object(rngs, rng_state(device))
        else:
            rngs = [rng_state(device)]
        return {"format": CHECKPOINT_FORMAT, "args": saved_args, "model": trainable_state(raw_model),
                "optimizer": optimizer.state_dict(), "step": step, "data": order.state(), "rng": rngs,
                "model_config": dict(vars(raw_model.config))}

    def log(record):
        if master:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    if master:
        what = "pretraining" if args.pretrain else f"tuning {Path(str(args.init)).name}"
        if ckpt is not None:
            print(f"resuming {run} at step {step} of {max_steps} (epoch {order.epoch}, example {order.pos})")
        print(f"{what} on {Path(args.data).name}: {len(train):,} examples, {max_steps} steps of {global_batch} "
              f"examples ({world} process{'es' if world > 1 else ''}, {device}"
              f"{f' with {torch.get_num_threads()} threads' if threads else ''}, "
              f"{'bfloat16' if bf16 else 'float32'}) -> {run}")
    model.train()
    losses, val_loss = [], None
    t_start, tokens_seen = time.time(), 0
    bar = tqdm(total=max_steps, initial=step, disable=not master, desc="train", dynamic_ncols=True)
    while step < max_steps:
        t0 = time.time()
        if threads:
            threads.update()
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
            with model.no_sync() if world > 1 and i < len(micro) - 1 else nullcontext():
                with autocast:
                    # mean over this micro-batch's targets; prompt_end: where an add-on's routing may look
                    _, loss = model(ids, labels, prompt_end=prompt_end_from_targets(labels))
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
            raise UserError(f"{what} at step {step + 1}: stopping without applying this update; {kept}. Try a "
                            f"lower --lr, --grad-clip or float32.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for addon in raw_model.addons():
            addon.after_step()
        step += 1
        losses.append(step_loss)

        tokens_seen_step = float(all_reduce_sum(n_tokens))
        tokens_seen += tokens_seen_step
        lr = args.lr * factor
        addon_numbers = {k: v for addon in raw_model.addons() for k, v in addon.log_numbers().items()}
        log({"step": step, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
             "tokens_per_s": tokens_seen_step / (time.time() - t0), "time_s": time.time() - t_start,
             "epoch": order.epoch, **addon_numbers})
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
        ran = step - first_step
        print(f"done: {ran} step{'s' * (ran != 1)} in this run" + (f" (steps {first_step + 1}-{step}; {step} in all)"
                                                                 if first_step else "")
              + f" in {time.time() - t_start:.0f} s, final loss {losses[-1] if losses else float('nan'):.4f}"
              + (f", val loss {val_loss:.4f}" if val_loss is not None else "") + f"; checkpoint {ckpt_file}")
        if args.pretrain:  # a base model others can load: Hugging Face format, tokenizer named in config.json
            save_hf(raw_model, run, extra_config={"tokenizer": args.tokenizer},
                    bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
            print(f"saved the model in Hugging Face format to {run} (from_pretrained loads it)")
        else:
            print(f"evaluate it with:  python eval.py --ckpt {run}   (--baseline adds the untuned base's score)")
    if started_group:
        torch.distributed.destroy_process_group()
    return {"run": str(run), "losses": losses, "val_loss": val_loss, "step": step}


if __name__ == "__main__":
    run_main(main, "train.py")
