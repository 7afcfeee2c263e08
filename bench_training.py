"""bench.py's training-step benchmark: ours (LoRA, MoD, MoLEx) against transformers + PEFT on the same shapes,
time, memory and MFU per row, each row in a fresh process (`bench.py train --row ROW`); --explain lists the
torch.compile graphs and graph breaks instead.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

from benchkit import (
    RESULT_TAG,
    SHAPES,
    SHAPES_HELP,
    StepTimer,
    build_row,
    explain,
    matmul_rate,
    pool_rounds,
    print_explained,
    reset_peak_rss,
    rss_mib,
    run_child,
    train_flops,
    warm_meta,
)

TRAIN_ROWS = {"hf": "transformers + PEFT, LoRA", "lora": "ours, LoRA",
              "mod": "ours, LoRA + MoD k={k}, fused loss (all tokens at once)",
              "mod-chunked": "ours, LoRA + MoD k={k}, fused loss in chunks of {chunk} tokens",
              "molex": "ours, LoRA + MoLEx, all layers"}
LORA_RANK, LORA_ALPHA, LORA_TARGETS = 8, 16, ("q", "k", "v", "o")
# --batch-shape: (prompt tokens, target tokens) ranges of each row, drawn uniformly; rows right-padded
BATCH_SHAPES = {"arc": ((60, 120), (2, 2)), "gsm8k": ((60, 120), (60, 160))}


def train_batch(args, vocab_size):
    """(idx, targets) of one step: --batch-shape lm = every position predicts the next token (seq tokens a row);
    arc / gsm8k = prompts and targets of BATCH_SHAPES' lengths, only the targets in the loss, right padding."""
    g = torch.Generator().manual_seed(1)
    if args.batch_shape == "lm":
        idx = torch.randint(0, vocab_size, (args.batch, args.seq), generator=g)
        return idx, torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], 1)  # next token; the last has none
    (p_lo, p_hi), (t_lo, t_hi) = BATCH_SHAPES[args.batch_shape]
    rows = [(int(torch.randint(p_lo, p_hi + 1, (), generator=g)), int(torch.randint(t_lo, t_hi + 1, (), generator=g)))
            for _ in range(args.batch)]
    T = max(p + t for p, t in rows)
    idx = torch.randint(0, vocab_size, (args.batch, T), generator=g)
    targets = torch.full_like(idx, -100)
    for b, (p, t) in enumerate(rows):
        targets[b, p - 1:p + t - 1] = idx[b, p:p + t]  # position i predicts token i + 1
        idx[b, p + t:] = 0  # padding
    return idx, targets


def run_row(args):
    """One row in this (sub)process: build, warm up, time `steps` training steps; print the JSON result."""
    import importlib
    import importlib.util

    from model import LlamaConfig
    device, dtype, row = torch.device(args.device), getattr(torch, args.dtype), args.row
    # Everything a row's process loads once, whatever the row, happens before the memory baseline: the imports
    # (transformers and peft in every row: importing them alone adds about 25 MiB) and the first use of the meta
    # device (it loads torch's Python meta kernels: about 70 MiB of RSS measured here, not model memory).
    for name in ("transformers", "peft", "mod", "molex"):
        if importlib.util.find_spec(name):
            importlib.import_module(name)
    warm_meta()
    cfg = LlamaConfig(**SHAPES[args.shape], max_seq_len=max(args.seq, 4096))
    cuda = device.type == "cuda"
    base_rss = rss_mib()
    torch.manual_seed(0)  # LoRA's A factors (ours and PEFT's) draw from the global RNG: the same run every time
    model, loss_fn = build_row(row, cfg, device, dtype, (LORA_RANK, LORA_ALPHA, args.lora_targets.split(",")),
                               args.mod_k, args.mod_chunk, grad_checkpointing=args.grad_checkpointing,
                               explain=args.explain)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    idx, targets = (t.to(device) for t in train_batch(args, cfg.vocab_size))
    loaded = torch.cuda.memory_allocated() / 2 ** 20 if cuda else rss_mib()  # the weights, before any step
    fn = torch.compile(model) if args.compile else model

    if args.explain:
        found = explain(model, {"input_ids": idx, "labels": idx, "use_cache": False} if row == "hf"
                        else {"idx": idx, "targets": targets})
        print(RESULT_TAG + json.dumps({"row": row, **found}), flush=True)
        return

    def step():
        loss = loss_fn(fn, idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if row == "molex":
            model.molex.update_bias()
        return loss.detach()

    from tqdm import tqdm
    losses, timer = [], StepTimer(device)
    load_before = os.getloadavg()[0]
    bar = tqdm(total=args.warmup + args.steps, desc=f"{row} ({args.shape}, {device.type})", file=sys.stderr,
               dynamic_ncols=True)
    t = time.perf_counter()
    for _ in range(args.warmup):
        losses.append(step())
        bar.update(1)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - t
    peak_reset = reset_peak_rss()
    if row == "molex":
        model.molex.stats.zero_()
    for _ in range(args.steps):  # CUDA: events, no host-device sync inside the timed loop (see StepTimer)
        losses.append(timer(step))
        bar.update(1)
    wall, cpu = timer.times()
    bar.close()
    losses = [float(l) for l in losses]
    result = {"row": row, "wall": wall, "cpu": cpu, "warmup_s": warmup_s,
              "first_loss": losses[0], "last_loss": losses[-1], "trainable": sum(p.numel() for p in params),
              "load_before": load_before, "load_after": os.getloadavg()[0], "lm_heads": 1, "expert_blocks": 0.0}
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
        result.update(peak_mib=peak, added_mib=peak - loaded, peak_how="CUDA max allocated")
    else:
        peak = rss_mib("VmHWM:")
        result.update(peak_mib=peak - base_rss, added_mib=peak - loaded, base_rss_mib=base_rss,
                      peak_how=("peak RSS of the timed steps" if peak_reset else "peak RSS of the whole process")
                      + " minus the RSS before the model was built")
    if row in ("mod", "mod-chunked"):
        result["lm_heads"] = args.mod_k
    if row == "molex":  # stats[t, j]: sequences whose layer t used expert j; j = t runs no second block
        s = model.molex.stats.double()
        result["expert_blocks"] = float((s.sum() - s.diagonal().sum()) / (args.batch * args.steps))
    if not all(map(math.isfinite, losses)):
        raise RuntimeError(f"{row}: non-finite loss {losses}")
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_train_child(args, row):
    """One row in a fresh process (so peak RSS and CUDA peaks never mix): its result, or {"row", "error"}."""
    cmd = ["train", "--row", row, "--shape", args.shape, "--device", args.device, "--dtype", args.dtype,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
           "--mod-k", str(args.mod_k), "--mod-chunk", str(args.mod_chunk), "--threads", str(args.threads),
           "--batch-shape", args.batch_shape, "--lora-targets", args.lora_targets]
    cmd += ["--compile"] * args.compile + ["--grad-checkpointing"] * args.grad_checkpointing
    cmd += ["--explain"] * args.explain
    env = dict(os.environ)
    if args.malloc_mmap_threshold:  # glibc: fixed threshold, so every freed tensor above it goes back to the OS
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    return {"row": row, **run_child(cmd, env)}


def train_defaults(args):
    """Fill in what depends on the shape and device; check the flags."""
    args.device = args.device or ("cpu" if args.shape in ("small", "smollm2") else "cuda")
    if args.batch_shape != "lm":  # the batch's size is its shape's (seq is the longest row, for the figures)
        args.batch = args.batch or {"arc": 16, "gsm8k": 4}[args.batch_shape]
        args.seq = int(train_batch(args, 2)[0].size(1))
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    cpu_smollm2 = args.shape == "smollm2" and args.device == "cpu"
    args.seq = args.seq or (256 if args.shape == "small" or cpu_smollm2 else 512)
    args.batch = args.batch or (4 if cpu_smollm2 else 8)
    rows = args.rows.split(",") if isinstance(args.rows, str) else args.rows
    unknown = [r for r in rows if r not in TRAIN_ROWS]
    if unknown:
        sys.exit(f"--rows: unknown {unknown}; choose from {','.join(TRAIN_ROWS)}")
    args.rows = rows
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (this torch build or machine has none); use --device cpu")
    if args.dtype not in ("float32", "bfloat16"):  # float16 would need a gradient scaler
        sys.exit(f"--dtype {args.dtype}: choose float32 or bfloat16")
    if min(args.steps, args.batch, args.seq, args.mod_chunk, args.rounds) < 1 or args.warmup < 0:
        sys.exit("--steps, --batch, --seq, --mod-chunk and --rounds must be >= 1, --warmup >= 0")
    if args.seq > 4096:
        sys.exit(f"--seq {args.seq}: at most 4096 (LLaMA-2's context)")


def bench_train(args):
    import importlib.util
    train_defaults(args)
    if args.threads:  # the parent's matmul-rate measurement uses the same number of threads as the rows
        torch.set_num_threads(args.threads)
    if args.row:  # a child: one configuration
        return run_row(args)
    from model import LlamaConfig
    cfg = LlamaConfig(**SHAPES[args.shape])
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    B, T = args.batch, args.seq
    have_hf = all(importlib.util.find_spec(m) for m in ("transformers", "peft"))
    names = {r: TRAIN_ROWS[r].format(k=args.mod_k, chunk=args.mod_chunk) for r in args.rows}
    n_targets = int((train_batch(args, 2)[1] != -100).sum())
    what = (f"{args.shape}: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads ({cfg.n_kv_heads} KV), FFN "
            f"{cfg.hidden_dim}, vocab {cfg.vocab_size}{', tied head' * cfg.tie_embeddings}; batch {B} x seq {T} = "
            f"{B * T} tokens/step ({args.batch_shape}-shaped: {n_targets} target tokens); {args.dtype} "
            f"on {args.device}{', compiled' if args.compile else ', eager'}"
            f"{', gradient checkpointing' if args.grad_checkpointing else ''}; LoRA r={LORA_RANK} alpha={LORA_ALPHA} "
            f"on {args.lora_targets}")
    malloc = f", MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}" if args.malloc_mmap_threshold else ""
    print(f"{what}\ntorch {torch.__version__}, threads {args.threads or torch.get_num_threads()}, cpus "
          f"{os.cpu_count()}{malloc}, load average before: {os.getloadavg()[0]:.2f}\n", flush=True)
    runs = {row: [] for row in args.rows}
    for i in range(args.rounds):  # round-robin, so a change in the machine's load hits every row alike
        for row in args.rows:
            if row == "hf" and not have_hf:
                runs[row] = [{"row": row, "error": "skipped: transformers and peft are not installed (optional, "
                                                   "benchmark only: pip install transformers peft)"}]
                continue
            if args.rounds > 1:
                print(f"round {i + 1}/{args.rounds}: {row}", file=sys.stderr, flush=True)
            runs[row].append(run_train_child(args, row))
    results = {row: pool_rounds(r) for row, r in runs.items()}

    if args.explain:
        return print_explained(results, names)

    peak_flops = matmul_rate(device, dtype)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}; measured {args.dtype} matmul rate "
          f"{peak_flops / 1e9:,.0f} GFLOP/s ({'8192' if device.type == 'cuda' else '2048'}^3)\n")
    ref, ours = results.get("hf", {}), results.get("lora", {})
    cpu = device.type == "cpu"
    print(f"| configuration | ms/step (median) | min-max ms | {'CPU ms/step | ' if cpu else ''}tokens/s | "
          f"speed vs HF+PEFT | time vs ours LoRA | peak memory (MiB) | memory vs HF+PEFT | memory vs ours LoRA | "
          f"added to the loaded weights (MiB) | added vs HF+PEFT | MFU | step-1 loss |")
    print("|---|---:|---:|" + ("---:|" if cpu else "") + "---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "n/a"  # noqa: E731
    for row, r in results.items():
        if "error" in r:
            print(f"| {names[row]} | {r['error']} |" + " |" * (12 if cpu else 11))
            continue
        flops = train_flops(cfg, B, T, r["lm_heads"], r["expert_blocks"], lora_rank=LORA_RANK)
        print(f"| {names[row]} | {r['ms']:.0f} | {r['ms_min']:.0f}-{r['ms_max']:.0f} | "
              + (f"{r['cpu_ms']:.0f} | " if cpu else "")
              + f"{B * T / r['ms'] * 1e3:,.0f} | {ratio(ref.get('ms'), r['ms'])} | {ratio(r['ms'], ours.get('ms'))} | "
              f"{r['peak_mib']:,.0f} | {ratio(r['peak_mib'], ref.get('peak_mib'))} | "
              f"{ratio(r['peak_mib'], ours.get('peak_mib'))} | {r['added_mib']:,.0f} | "
              f"{ratio(r['added_mib'], ref.get('added_mib'))} | {flops / (r['ms'] / 1e3) / peak_flops:.1%} | "
              f"{r['first_loss']:.4f} |")
    done = [r for r in results.values() if "error" not in r]
    if done:
        print(f"\npeak memory: {done[0]['peak_how']}; MFU: model FLOPs of the step (train_flops) / measured "
              f"matmul rate; speed vs HF+PEFT = its ms / this ms; time and memory vs ours LoRA = this / that")
        if args.rounds > 1:
            print(f"{args.rounds} rounds, round-robin, each row in a fresh process every round: the step times of "
                  f"all rounds pooled, the largest peak of the rounds (all peaks listed below)")
        for r in done:
            extra = f", {r['expert_blocks']:.1f} MoLEx expert blocks ran per step" if r["row"] == "molex" else ""
            peaks = f", peaks {'/'.join(f'{p:,.0f}' for p in r['peaks'])} MiB" if args.rounds > 1 else ""
            print(f"  {r['row']}: warm-up {'/'.join(f'{w:.1f}' for w in r['warmup_s'])} s, load average "
                  f"{r['load_before']:.2f} -> {r['load_after']:.2f}, {r['trainable']:,} trainable parameters, loss "
                  f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}{peaks}{extra}")


def add_commands(sub):
    """This subject's subcommands, on bench.py's parser."""
    p = sub.add_parser("train", help="training step speed and memory: ours (LoRA, MoD, MoLEx) vs transformers+PEFT")
    p.add_argument("--shape", choices=list(SHAPES), default="small",
                   help=f"{SHAPES_HELP}; small and smollm2 run on the CPU")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cpu for small and smollm2, "
                                                                           "else cuda")
    p.add_argument("--dtype", default=None, help="weights' dtype (LoRA and add-ons stay float32); default: "
                                                 "float32 on cpu, bfloat16 on cuda")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; smollm2 on cpu: 4)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256 for small and smollm2 on "
                                                         "cpu, else 512)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (forward + loss; backward via AOT)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--rows", default=",".join(TRAIN_ROWS), help=f"comma-separated subset of {','.join(TRAIN_ROWS)}")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the rows this many times, round-robin, and pool the step times (noisy machines)")
    p.add_argument("--batch-shape", choices=["lm", *BATCH_SHAPES], default="lm",
                   help="lm: --batch rows of --seq tokens, every position a target; arc: 16 rows of 60-120 prompt "
                        "tokens and 2 target tokens; gsm8k: 4 rows of 60-120 prompt and 60-160 target tokens "
                        "(--batch changes the rows; right padding)")
    p.add_argument("--lora-targets", default=",".join(LORA_TARGETS), help="LoRA's projections (all seven: "
                                                                           "q,k,v,o,gate,up,down)")
    p.add_argument("--mod-k", type=int, default=4, help="MoD: the last k layers form the ensemble")
    p.add_argument("--mod-chunk", type=int, default=512, help="MoD: tokens per chunk of the chunked loss")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each row's process (0: torch's default)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=0,
                   help="CPU: run each row with glibc's MALLOC_MMAP_THRESHOLD_ set to this many bytes (e.g. 65536), so "
                        "peak RSS follows the live tensors instead of what the heap keeps after frees (0: glibc's "
                        "default, a threshold that grows up to 32 MiB)")
    p.add_argument("--explain", action="store_true",
                   help="instead of timing: torch._dynamo.explain of each row's forward + loss (graphs, breaks)")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: run one row in this process
    p.set_defaults(func=bench_train)
