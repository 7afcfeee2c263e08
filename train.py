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

One step is train_step (forward and backward over the micro-batches, clip, update); main sets up the run and
loops. The flags and their checks: train_args.py (the optimizer, LoRA, MoD and MoLEx flags are made from their
config dataclasses, which check the values; args carries the configs: args.optim, args.lora, args.mod, ...). What a
run folder holds and how its model is rebuilt: checkpoint.py.
"""
import json
import math
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import (
    BUILTIN_BASE,
    REPO,
    StopSignal,
    build_model,
    check_same_base,
    checkpoint_state,
    load_checkpoint,
    load_trainable,
    open_run_folder,
    open_tokenizer,
    resolve_tokenizer,
    restore_rng,
    save_checkpoint,
    tokenizer_label,
)
from cli import UserError, all_reduce_sum, run_main, setup_distributed, sum_dtype, use_bf16
from data.batching import DataOrder, collate, load_training_data
from data.format import IGNORE_INDEX
from molex import prompt_end_from_targets
from optim import lr_factor, param_groups
from run_folder import release_run_folder
from threads import Threads
from tokenizer import check_tokenizer_fits
from train_args import get_parser, parse_args, resolve_paths  # noqa: F401 - get_parser: train.get_parser for tests
from weights import save_hf

# The built-in base: 8 layers of dim 64 (so that MoD's "last k layers" are late layers), 4 query heads sharing
# 2 KV heads, byte tokenizer, context 512, pretrained on data.builtin's corpus for 700 steps of 8 x 128 tokens,
# then tuned for 700 on the built-in tasks' default difficulty 1: about 3 CPU-minutes in all (BENCHMARKS.md).
BUILTIN_BASE_ARGV = ["--pretrain", "--dim", "64", "--n-layers", "8", "--n-heads", "4", "--n-kv-heads", "2",
                     "--context", "512", "--tokenizer", "byte", "--data", "corpus", "--corpus-chars", "400000",
                     "--max-len", "128", "--batch-size", "8", "--max-steps", "700", "--lr", "3e-3",
                     "--warmup-steps", "30", "--weight-decay", "0.1", "--eval-every", "0", "--save-every", "350",
                     "--seed", "0"]

# Models below this many parameters train with one CPU thread under --threads 0 (auto). Measured on the built-in
# base: 2 threads made a step 1.5x faster for 2x the CPU time, and 10x slower when another program held a core.
SMALL_MODEL = 10_000_000


@torch.no_grad()
def validation_loss(model, examples, batch_size, pad_id, device, autocast):
    """Token-weighted mean loss over examples (computed whole on every rank: no communication)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    examples = sorted(examples, key=lambda ex: len(ex[0]))  # batches of similar length: little padding
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
    argv = BUILTIN_BASE_ARGV + ["--out", str(BUILTIN_BASE), "--overwrite"]  # a build stopped before a checkpoint
    if (BUILTIN_BASE / "ckpt.pt").is_file():  # an earlier build was interrupted: continue it
        argv = ["--resume", str(BUILTIN_BASE)]
    main(argv)


def load_model_and_data(args, device, bf16, master):
    """The run's model (initialized from --seed), its tokenizer and the tokenized training and validation data."""
    given_tokenizer = args.tokenizer is not None and not args.resume
    args.tokenizer = resolve_tokenizer(args.tokenizer, args.init, args.pretrain)
    tokenizer_name = tokenizer_label(args.tokenizer, given_tokenizer, args.init, saved=bool(args.resume))
    tokenizer = open_tokenizer(args.tokenizer, tokenizer_name)
    args.vocab_size = tokenizer.vocab_size
    torch.manual_seed(args.seed)
    model = build_model(vars(args), device, torch.bfloat16 if bf16 and not args.pretrain else torch.float32,
                        verbose=master)
    check_tokenizer_fits(tokenizer, model.config.vocab_size, tokenizer_name)
    check_same_base(vars(args), model, f"the run {args.resume}", given=True)  # and records it for a new run
    max_len = args.max_len or (128 if args.pretrain else model.config.max_seq_len)
    if max_len > model.config.max_seq_len:
        raise UserError(f"--max-len {max_len} exceeds the model's context ({model.config.max_seq_len})")
    train, val = load_training_data(vars(args), tokenizer, max_len)
    return model, tokenizer, train, val


def nothing_to_do(args, step, max_steps, master, started_group):
    """A resume whose run is already as long as asked: say so, write nothing."""
    if master:
        print(f"nothing to do: {args.resume} is at step {step} and the run ends at step {max_steps}; give a "
              f"--max-steps above {step} (or more --epochs) to train further")
    if started_group:
        torch.distributed.destroy_process_group()
    return {"run": str(Path(args.resume).parent), "losses": [], "val_loss": None, "step": step}


def log(metrics_file, record):
    """One line of metrics.jsonl."""
    with open(metrics_file, "a") as f:
        f.write(json.dumps(record) + "\n")


def print_start(args, run, ckpt, step, max_steps, order, n_train, global_batch, world, device, threads, bf16):
    """What is trained on what, how long, where and how (and, resuming, from which step)."""
    what = "pretraining" if args.pretrain else f"tuning {Path(str(args.init)).name}"
    if ckpt is not None:
        print(f"resuming {run} at step {step} of {max_steps} (epoch {order.epoch}, example {order.pos})")
    print(f"{what} on {Path(args.data).name}: {n_train:,} examples, {max_steps} steps of {global_batch} "
          f"examples ({world} process{'es' if world > 1 else ''}, {device}"
          f"{f' with {torch.get_num_threads()} threads' if threads else ''}, "
          f"{'bfloat16' if bf16 else 'float32'}) -> {run}")


def stop_not_finite(loss, grad_norm, step, ckpt_file):
    """End the run (UserError) when a step's loss or gradient norm is not finite, saying which checkpoint is kept."""
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
    kept = (f"the last good checkpoint {ckpt_file} (step {load_checkpoint(ckpt_file)['step']}) is kept"
            if ckpt_file.exists() else "no checkpoint had been written yet")
    raise UserError(f"{what} at step {step + 1}: stopping without applying this update; {kept}. Try a "
                    f"lower --lr, --grad-clip or float32.")


def finish_run(args, run, model, tokenizer, first_step, step, losses, val_loss, seconds):
    """The run's summary; after --pretrain the model is saved in Hugging Face format, else eval.py is suggested."""
    ran = step - first_step
    print(f"done: {ran} step{'s' * (ran != 1)} in this run"
          + (f" (steps {first_step + 1}-{step}; {step} in all)" if first_step else "")
          + f" in {seconds:.0f} s, final loss {losses[-1] if losses else float('nan'):.4f}"
          + (f", val loss {val_loss:.4f}" if val_loss is not None else "") + f"; checkpoint {run / 'ckpt.pt'}")
    if args.pretrain:  # a base model others can load: Hugging Face format, tokenizer named in config.json
        save_hf(model, run, extra_config={"tokenizer": args.tokenizer}, bos_id=tokenizer.bos_id,
                eos_id=tokenizer.eos_id)
        print(f"saved the model in Hugging Face format to {run} (from_pretrained loads it)")
    else:
        print(f"evaluate it with:  python eval.py --ckpt {run}   (--baseline adds the untuned base's score)")


def train_step(model, optimizer, micro, params, grad_clip, pad_id, device, autocast, world):
    """One optimizer step on this rank's micro-batches -> (loss per target token of the whole step, gradient norm,
    tokens of the step on all ranks). A loss or gradient norm that is not finite is not applied (main stops)."""
    # normalize by the target tokens of the whole step on all ranks, so any split gives the same gradient
    n_local = torch.tensor([sum(sum(t != IGNORE_INDEX for t in y) for _, y in mb) for mb in micro],
                           dtype=sum_dtype(device), device=device)
    n_global = float(all_reduce_sum(n_local.sum().clone()))
    loss_sum = torch.zeros((), dtype=sum_dtype(device), device=device)
    for i, mb in enumerate(micro):
        ids, labels = collate(mb, pad_id, device)
        with model.no_sync() if world > 1 and i < len(micro) - 1 else nullcontext():
            with autocast:
                # mean over this micro-batch's targets; prompt_end: where an add-on's routing may look
                _, loss = model(ids, labels, prompt_end=prompt_end_from_targets(labels))
            # the sum over our tokens / all tokens of the step; * world undoes DDP's gradient averaging
            (loss * (n_local[i] * world / n_global)).backward()
        loss_sum += loss.detach().to(loss_sum.dtype) * n_local[i]
    step_loss = float(all_reduce_sum(loss_sum)) / n_global
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))
    if math.isfinite(step_loss) and math.isfinite(grad_norm):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    n_tokens = torch.tensor(float(sum(len(x) for mb in micro for x, _ in mb)), device=device)
    return step_loss, grad_norm, float(all_reduce_sum(n_tokens))


def main(argv=None):
    """Train; returns {"run": folder, "losses": [loss per step run here], "val_loss": last validation loss}."""
    args = parse_args(argv)
    rank, world, device, started_group = setup_distributed(args.device)
    master = rank == 0
    threads = Threads(args.threads, world) if device.type == "cpu" else None
    if not args.pretrain and args.init in (None, "builtin"):
        args.init = "builtin"
        ensure_builtin_base()  # every rank joins (the build runs on all of them); only rank 0 writes
        if world > 1:
            torch.distributed.barrier()  # rank 0 writes the model files after the others have left the build
    resolve_paths(args)
    ckpt = load_checkpoint(args.resume) if args.resume else None

    # dtype: bfloat16 autocast where the GPU supports it; the frozen base then also lives in bfloat16
    bf16 = use_bf16(args.dtype, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    model, tokenizer, train, val = load_model_and_data(args, device, bf16, master)
    if threads and sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        threads.limit(1)  # a tiny model gains little from a second thread and pays double in CPU time
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    opt = args.optim
    if opt.batch_size < world:
        raise UserError(f"--batch-size {opt.batch_size} is smaller than the number of processes ({world}): some "
                        f"would get no examples")
    global_batch = opt.batch_size * opt.grad_accum
    max_steps = opt.max_steps or max(1, math.ceil((opt.epochs or 1.0) * len(train) / global_batch))

    groups = param_groups(model, args)
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay)
    params = [p for g in groups for p in g["params"]]
    lengths = [len(ids) for ids, _ in train] if args.length_groups else None
    step, order = 0, DataOrder(len(train), args.seed, lengths, opt.batch_size)
    if ckpt is not None:
        load_trainable(model, ckpt["model"], args.resume)
        optimizer.load_state_dict(ckpt["optimizer"])
        step, order = ckpt["step"], DataOrder(len(train), args.seed, lengths, opt.batch_size, **ckpt["data"])
    if step >= max_steps:
        return nothing_to_do(args, step, max_steps, master, started_group)
    torch.manual_seed(args.seed + rank)  # dropout: one RNG stream per rank, restored on resume (same world size)
    if ckpt is not None:
        restore_rng(ckpt, rank, world, device, master)
    run = Path(args.out or REPO / "runs" / f"{'pretrain' if args.pretrain else Path(args.data).stem}-"
                                           f"{datetime.now():%Y%m%d-%H%M%S}")
    args.out = str(run)
    saved_args = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    ckpt_file, metrics_file = run / "ckpt.pt", run / "metrics.jsonl"
    if master:  # refused if in use or holding another run; --resume A --out B copies A into B
        open_run_folder(run, saved_args, Path(args.resume) if ckpt else None, step, args.overwrite)
        print_start(args, run, ckpt, step, max_steps, order, len(train), global_batch, world, device, threads, bf16)

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    first_step, losses, val_loss = step, [], None
    t_start, tokens_seen = time.time(), 0
    bar = tqdm(total=max_steps, initial=step, disable=not master, desc="train", dynamic_ncols=True)
    stop = StopSignal()  # Ctrl-C / SIGTERM: finish the step, save it, say how to go on
    while step < max_steps:
        t0 = time.time()
        if threads:
            threads.update()
        factor = lr_factor(step, opt, max_steps)
        for g in optimizer.param_groups:
            g["lr"] = g["peak_lr"] * factor
        lr = opt.lr * factor
        # this step's examples: grad_accum micro-batches of batch_size; each rank takes every world-th one
        micro = [[train[i] for i in order.take(opt.batch_size)][rank::world] for _ in range(opt.grad_accum)]
        loss, grad_norm, n_tokens = train_step(model, optimizer, micro, params, opt.grad_clip, pad_id, device,
                                               autocast, world)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            bar.close()
            stop_not_finite(loss, grad_norm, step, ckpt_file)
        for addon in raw_model.addons():
            addon.after_step()
        step += 1
        losses.append(loss)
        tokens_seen += n_tokens
        if master:  # with what the add-ons computed (MoD's loss parts and g, MoLEx's balance loss)
            addon_numbers = {k: v for addon in raw_model.addons() for k, v in addon.log_numbers().items()}
            log(metrics_file, {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                               "tokens_per_s": n_tokens / (time.time() - t0), "time_s": time.time() - t_start,
                               "epoch": order.epoch, **addon_numbers})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_seen / (time.time() - t_start):.0f}", lr=f"{lr:.2e}")

        if (args.eval_every and step % args.eval_every == 0) or step == max_steps:
            val_loss = validation_loss(raw_model, val, opt.batch_size, pad_id, device, autocast)
            if val_loss is not None and master:
                log(metrics_file, {"step": step, "val_loss": val_loss})
                bar.write(f"step {step}: train loss {loss:.4f}, val loss {val_loss:.4f}")
        if (args.save_every and step % args.save_every == 0) or step == max_steps:
            state = checkpoint_state(raw_model, optimizer, order, step, saved_args, world, device)  # all ranks
            if master:
                save_checkpoint(state, ckpt_file, on_error=bar.close)
        if stop.check(world, device) and step < max_steps:
            bar.close()
            stop.save_and_stop(checkpoint_state(raw_model, optimizer, order, step, saved_args, world, device),
                               ckpt_file if master else None, step, max_steps)
    bar.close()
    stop.restore()

    if master:
        finish_run(args, run, raw_model, tokenizer, first_step, step, losses, val_loss, time.time() - t_start)
        release_run_folder(run)
    if started_group:
        torch.distributed.destroy_process_group()
    return {"run": str(run), "losses": losses, "val_loss": val_loss, "step": step}


if __name__ == "__main__":
    run_main(main, "train.py")
