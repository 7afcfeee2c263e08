"""Benchmarks, one subcommand each (the measurement helpers are in benchkit.py).

    python bench.py tokenizer [--text-mb 4]   # encode throughput: tokenizer.py vs sentencepiece
    python bench.py load                      # peak RSS while loading a 1.1B-shaped bf16 checkpoint, both formats
    python bench.py train [--shape small]     # training step time, memory, MFU: ours (LoRA, MoD, MoLEx) vs HF+PEFT
    python bench.py train --explain           # torch.compile graphs and graph breaks of each configuration
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchkit import (StepTimer, gsm8k_documents, matmul_rate, random_model, reset_peak_rss, rss_mib, timed,
                      train_flops, varied_documents)

SHARED = Path(__file__).resolve().parent.parent / "shared"  # read-only data beside the repo, when present
RESULT_TAG = "BENCH_RESULT "  # the line a child process prints its JSON result on


def run_child(cmd, env=None):
    """Run `python bench.py cmd...` in a fresh process (so peaks never mix), pass its other output through, and
    return its JSON result, or {"error": ...}."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *cmd], stdout=subprocess.PIPE, text=True,
                          cwd=Path(__file__).parent, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
        print(line)
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
    return {"error": f"failed: {why}, see its output above"}


def bench_tokenizer(args):
    import sentencepiece as spm

    from tokenizer import load_tokenizer

    model = Path(args.model)
    if not model.is_file():
        sys.exit(f"no tokenizer.model at {model} (give --model)")
    ours, sp = load_tokenizer(model), spm.SentencePieceProcessor(model_file=str(model))
    corpora = {f"varied ({args.text_mb:g} MB target)": varied_documents(args.text_mb)}
    if Path(args.gsm8k).is_file():
        corpora["GSM8K train (question + answer)"] = gsm8k_documents(args.gsm8k)
    threads = args.threads or os.cpu_count()

    print(f"repeat={args.repeat} (median after 1 warm-up), batch threads={threads}, cpus={os.cpu_count()}, "
          f"load average before: {os.getloadavg()[0]:.2f}\n")
    print("| text | MB | mode | tokenizer | wall s | CPU s | MB/s | tokens/s | MB/s by CPU time | speed-up | ids equal |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, docs in corpora.items():
        whole = "\n".join(docs)
        mb = len(whole.encode()) / 1e6
        modes = {
            "encode, one call per doc": (lambda: [ours.encode(d) for d in docs], lambda: [sp.encode(d) for d in docs]),
            "encode, whole text as one string": (lambda: ours.encode(whole), lambda: sp.encode(whole)),
            "batch": (lambda: ours.encode_batch(docs, num_threads=threads),
                      lambda: sp.encode(docs, num_threads=threads)),
        }
        for mode, (ours_fn, sp_fn) in modes.items():
            sp_wall, sp_cpu, sp_ids = timed(sp_fn, args.repeat)
            our_wall, our_cpu, our_ids = timed(ours_fn, args.repeat)
            equal = our_ids == sp_ids
            n_tokens = len(sp_ids) if isinstance(sp_ids[0], int) else sum(map(len, sp_ids))
            for impl, wall, cpu in (("tokenizer.py", our_wall, our_cpu), ("sentencepiece", sp_wall, sp_cpu)):
                print(f"| {name}, {len(docs)} docs | {mb:.2f} | {mode} | {impl} | {wall:.3f} | {cpu:.3f} "
                      f"| {mb / wall:.2f} | {n_tokens / wall / 1e6:.2f}M | {mb / cpu:.2f} | {sp_wall / wall:.2f}x "
                      f"| {'yes' if equal else 'NO'} |")
            if not equal:
                sys.exit(f"ids differ between tokenizer.py and sentencepiece on {name}, {mode}")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


# ---- loading: peak RSS against the file size --------------------------------------------------------------

TINYLLAMA_SHAPE = dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, vocab_size=32000)
SHAPES = {  # FFN width by LLaMA's rule where not given: 1536 for dim 512, 11008 for dim 4096
    "small": dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000),
    "tinyllama": TINYLLAMA_SHAPE,
    "7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
}
SHAPE_NAMES = {"small": "small", "tinyllama": "TinyLlama-1.1B-shaped", "7b": "LLaMA-2-7B-shaped"}


def write_random_checkpoint(folder, fmt, cfg):
    """A random bf16 checkpoint of `cfg` in `fmt` ("hf" or "meta"); the bytes written on disk. The model is drawn
    in bf16 in place (no float32 copy); Meta's q/k row layout is not applied (it does not matter for memory)."""
    from weights import rename, save_hf
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = random_model(cfg, "cpu", torch.bfloat16)
    if fmt == "hf":
        save_hf(model, folder)
    else:
        state = {rename(k, "ours", "meta"): v for k, v in model.state_dict().items()}
        torch.save(state, folder / "consolidated.00.pth")
        (folder / "params.json").write_text(json.dumps({  # Meta's release: the vocabulary is the tokenizer's (-1)
            "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "multiple_of": cfg.multiple_of, "ffn_dim_multiplier": cfg.ffn_dim_multiplier, "norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "vocab_size": -1}))
    return sum(f.stat().st_size for f in folder.iterdir())


def bench_load_child(args):
    """`bench.py load-child PATH` (internal), in a fresh process: load PATH, then touch every weight; print the
    load seconds and the peak RSS (MiB) above the RSS after the imports, after each."""
    from weights import from_pretrained
    base = rss_mib()
    t = time.perf_counter()
    model = from_pretrained(args.path)
    load_s = time.perf_counter() - t
    after_load = rss_mib("VmHWM:") - base
    with torch.no_grad():  # touch every weight: the mapped pages become resident
        sum(p.sum().item() for p in model.parameters())  # no fp32 copy
    after_touch = rss_mib("VmHWM:") - base
    print(RESULT_TAG + json.dumps({"load_s": load_s, "after_load": after_load, "after_touch": after_touch}))


def bench_load(args):
    from model import LlamaConfig
    cfg = LlamaConfig(**SHAPES[args.shape])
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for fmt in ["hf", "meta"]:
            folder = Path(tmp) / fmt
            size = write_random_checkpoint(folder, fmt, cfg)
            r = run_child(["load-child", str(folder)])
            if "error" in r:
                sys.exit(f"load-child {fmt}: {r['error']}")
            rows.append((fmt, size, r["load_s"], r["after_load"] * 2 ** 20, r["after_touch"] * 2 ** 20))
            shutil.rmtree(folder)
    print(f"\nLoading a {cfg.n_layers}-layer dim-{cfg.dim} ({SHAPE_NAMES[args.shape]}) random bf16 checkpoint\n")
    print("| format | file size | load time | peak RSS during load | ratio | peak RSS after touching every weight | ratio |")
    print("|---|---|---|---|---|---|---|")
    gib = 2 ** 30
    for fmt, size, load_s, a, b in rows:
        name = {"hf": "Hugging Face (model.safetensors)", "meta": "Meta (consolidated.00.pth)"}[fmt]
        print(f"| {name} | {size / gib:.2f} GiB | {load_s:.2f} s | {a / gib:.2f} GiB | {a / size:.2f}x "
              f"| {b / gib:.2f} GiB | {b / size:.2f}x |")


# ---- training step: ours (LoRA, MoD, MoLEx) against transformers + PEFT ------------------------------------

TRAIN_ROWS = {"hf": "transformers + PEFT, LoRA", "lora": "ours, LoRA", "mod": "ours, LoRA + MoD k={k}, naive loss",
              "mod-chunked": "ours, LoRA + MoD k={k}, chunked loss ({chunk} tokens)",
              "molex": "ours, LoRA + MoLEx, all layers"}
LORA_RANK, LORA_ALPHA, LORA_TARGETS = 8, 16, ("q", "k", "v", "o")


def hf_from_ours(ours):
    """transformers' LlamaForCausalLM holding our weights (the same tensors, assigned: no copy), with SDPA."""
    import transformers
    from weights import rename
    c = ours.config
    hf_cfg = transformers.LlamaConfig(
        hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, vocab_size=c.vocab_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings, attn_implementation="sdpa",
        use_cache=False)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict({rename(k, "ours", "hf"): v for k, v in ours.state_dict().items()}, strict=True, assign=True)
    device = ours.embed.weight.device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg).to(device)  # its inv_freq is not in the state dict
    meta = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"transformers' model kept tensors on the meta device: {meta[:3]}")
    return hf


def build_row(row, args, cfg, device, dtype):
    """(module, loss_fn(module, idx, targets)) for one row; the module is in training mode with LoRA applied."""
    from model import apply_lora
    model = random_model(cfg, device, dtype)
    if row == "hf":
        import peft
        hf = hf_from_ours(model)
        del model
        if args.grad_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        names = [f"{t}_proj" for t in LORA_TARGETS]
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                     target_modules=names, bias="none"))
        # HF shifts the labels itself: labels = the input ids gives the same loss as our shifted targets
        return hf.train(), lambda m, idx, targets: m(input_ids=idx, labels=idx, use_cache=False).loss
    apply_lora(model, LORA_RANK, LORA_ALPHA, 0.0, targets=LORA_TARGETS, verbose=False)
    model.grad_checkpointing = args.grad_checkpointing
    if row in ("mod", "mod-chunked"):
        from mod import MoDConfig, attach_mod
        attach_mod(model, MoDConfig(k=args.mod_k, chunk_size=args.mod_chunk if row == "mod-chunked" else None),
                   verbose=False)
    elif row == "molex":
        from molex import MoLExConfig, attach_molex
        attach_molex(model, MoLExConfig(layers="all"), verbose=False)
        # count the expert blocks that actually ran (an expert j = t runs none); not when explaining: training
        # does not collect statistics, and a future `record` may skip its bincount (a graph break) without them
        model.molex.collect_stats = not args.explain
    return model.train(), lambda m, idx, targets: m(idx, targets)[1]


def run_row(args):
    """One row in this (sub)process: build, warm up, time `steps` training steps; print the JSON result."""
    import importlib
    import importlib.util
    from model import Llama, LlamaConfig
    device, dtype, row = torch.device(args.device), getattr(torch, args.dtype), args.row
    # Everything a row's process loads once, whatever the row, happens before the memory baseline: the imports
    # (transformers and peft in every row: importing them alone adds about 25 MiB) and the first use of the meta
    # device (it loads torch's Python meta kernels: about 70 MiB of RSS measured here, not model memory).
    for name in ("transformers", "peft", "mod", "molex"):
        if importlib.util.find_spec(name):
            importlib.import_module(name)
    with torch.device("meta"):
        Llama(LlamaConfig(dim=64, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=64))
    cfg = LlamaConfig(**SHAPES[args.shape], max_seq_len=max(args.seq, 4096))
    cuda = device.type == "cuda"
    base_rss = rss_mib()
    torch.manual_seed(0)  # LoRA's A factors (ours and PEFT's) draw from the global RNG: the same run every time
    model, loss_fn = build_row(row, args, cfg, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
    targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], 1)  # next token; the last has none
    fn = torch.compile(model) if args.compile else model

    if args.explain:
        torch._dynamo.reset()
        e = torch._dynamo.explain(model)(**({"input_ids": idx, "labels": idx, "use_cache": False} if row == "hf"
                                              else {"idx": idx, "targets": targets}))
        reasons = {}
        for r in e.break_reasons:
            where = r.user_stack[-1] if r.user_stack else None
            key = f"{r.reason.splitlines()[0][:120]} at {Path(where.filename).name}:{where.lineno}" if where else \
                r.reason.splitlines()[0][:120]
            reasons[key] = reasons.get(key, 0) + 1
        print(RESULT_TAG + json.dumps({"row": row, "graphs": e.graph_count, "breaks": e.graph_break_count,
                                       "ops": e.op_count, "reasons": reasons}), flush=True)
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
        result.update(peak_mib=torch.cuda.max_memory_allocated() / 2 ** 20, peak_how="CUDA max allocated")
    else:
        result.update(peak_mib=rss_mib("VmHWM:") - base_rss, base_rss_mib=base_rss,
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
           "--mod-k", str(args.mod_k), "--mod-chunk", str(args.mod_chunk), "--threads", str(args.threads)]
    cmd += ["--compile"] * args.compile + ["--grad-checkpointing"] * args.grad_checkpointing
    cmd += ["--explain"] * args.explain
    env = dict(os.environ)
    if args.malloc_mmap_threshold:  # glibc: fixed threshold, so every freed tensor above it goes back to the OS
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    return {"row": row, **run_child(cmd, env)}


def pool_rounds(rounds):
    """One row's results over its rounds: step times pooled (median, min, max over all timed steps), the largest
    peak memory, the first round's losses. An error in any round is the row's result."""
    failed = [r for r in rounds if "error" in r]
    if failed or "graphs" in rounds[0]:  # an error, or --explain's result (one round is enough)
        return (failed or rounds)[0]
    wall = [t for r in rounds for t in r["wall"]]
    cpu = [t for r in rounds for t in r["cpu"]]
    out = dict(rounds[0], rounds=len(rounds), ms=1e3 * statistics.median(wall), ms_min=1e3 * min(wall),
               ms_max=1e3 * max(wall), cpu_ms=1e3 * statistics.median(cpu) if cpu else None,
               peak_mib=max(r["peak_mib"] for r in rounds), peaks=[r["peak_mib"] for r in rounds],
               warmup_s=[r["warmup_s"] for r in rounds], load_after=rounds[-1]["load_after"],
               expert_blocks=statistics.mean(r["expert_blocks"] for r in rounds))
    return out


def train_defaults(args):
    """Fill in what depends on the shape and device; check the flags."""
    gpu_shape = args.shape != "small"
    args.device = args.device or ("cuda" if gpu_shape else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.seq = args.seq or (512 if gpu_shape else 256)
    args.batch = args.batch or 8
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
    what = (f"{args.shape}: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads ({cfg.n_kv_heads} KV), FFN "
            f"{cfg.hidden_dim}, vocab {cfg.vocab_size}; batch {B} x seq {T} = {B * T} tokens/step; {args.dtype} "
            f"on {args.device}{', compiled' if args.compile else ', eager'}"
            f"{', gradient checkpointing' if args.grad_checkpointing else ''}; LoRA r={LORA_RANK} alpha={LORA_ALPHA} "
            f"on {','.join(LORA_TARGETS)}")
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
        print("\n| configuration | graphs | graph breaks | break reasons (count) |\n|---|---:|---:|---|")
        for row, r in results.items():
            if "error" in r:
                print(f"| {names[row]} | | | {r['error']} |")
                continue
            why = "; ".join(f"{k} (x{n})" for k, n in r["reasons"].items())
            if r["breaks"] > sum(r["reasons"].values()):  # explain does not record a reason for every break
                why += f"{'; ' if why else ''}{r['breaks'] - sum(r['reasons'].values())} without a recorded reason"
            why = why or "none"
            print(f"| {names[row]} | {r['graphs']} | {r['breaks']} | {why} |")
        return

    peak_flops = matmul_rate(device, dtype)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}; measured {args.dtype} matmul rate "
          f"{peak_flops / 1e9:,.0f} GFLOP/s ({'8192' if device.type == 'cuda' else '2048'}^3)\n")
    ref, ours = results.get("hf", {}), results.get("lora", {})
    cpu = device.type == "cpu"
    print(f"| configuration | ms/step (median) | min-max ms | {'CPU ms/step | ' if cpu else ''}tokens/s | "
          f"speed vs HF+PEFT | time vs ours LoRA | peak memory (MiB) | memory vs HF+PEFT | memory vs ours LoRA | "
          f"MFU | step-1 loss |")
    print("|---|---:|---:|" + ("---:|" if cpu else "") + "---:|---:|---:|---:|---:|---:|---:|---:|")
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "n/a"  # noqa: E731
    for row, r in results.items():
        if "error" in r:
            print(f"| {names[row]} | {r['error']} |" + " |" * (10 if cpu else 9))
            continue
        flops = train_flops(cfg, B, T, r["lm_heads"], r["expert_blocks"], lora_rank=LORA_RANK)
        print(f"| {names[row]} | {r['ms']:.0f} | {r['ms_min']:.0f}-{r['ms_max']:.0f} | "
              + (f"{r['cpu_ms']:.0f} | " if cpu else "")
              + f"{B * T / r['ms'] * 1e3:,.0f} | {ratio(ref.get('ms'), r['ms'])} | {ratio(r['ms'], ours.get('ms'))} | "
              f"{r['peak_mib']:,.0f} | {ratio(r['peak_mib'], ref.get('peak_mib'))} | "
              f"{ratio(r['peak_mib'], ours.get('peak_mib'))} | {flops / (r['ms'] / 1e3) / peak_flops:.1%} | "
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{tokenizer,load,train}")
    shapes = "small: 8 layers, dim 512; tinyllama: TinyLlama-1.1B; 7b: LLaMA-2-7B (random weights)"
    p = sub.add_parser("tokenizer", help="encode throughput of tokenizer.py vs sentencepiece")
    p.add_argument("--text-mb", type=float, default=4.0, help="size of the generated varied text (MB)")
    p.add_argument("--model", default=str(SHARED / "llama2" / "tokenizer.model"),
                   help="the LLaMA-2 SentencePiece tokenizer.model both tokenizers load (default: %(default)s)")
    p.add_argument("--gsm8k", default=str(SHARED / "datasets" / "gsm8k" / "train.jsonl"),
                   help="also time this JSONL file when it exists (read in place, never copied)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each mode after one warm-up (the median is "
                                                         "reported)")
    p.add_argument("--threads", type=int, default=0, help="threads for batch encoding (0: all CPUs)")
    p.set_defaults(func=bench_tokenizer)
    p = sub.add_parser("load", help="peak RSS while loading a TinyLlama-shaped random bf16 checkpoint")
    p.add_argument("--tmp", default=None, help="folder for the temporary checkpoints (about 2.1 GB each for "
                                               "tinyllama; default: the system's temporary folder)")
    p.add_argument("--shape", choices=list(SHAPES), default="tinyllama", help=f"the checkpoint's shape: {shapes}")
    p.set_defaults(func=bench_load)
    p = sub.add_parser("load-child")  # internal (no help: not listed): one load, in the process bench_load starts
    p.add_argument("path", help="the checkpoint folder to load")
    p.set_defaults(func=bench_load_child)
    p = sub.add_parser("train", help="training step speed and memory: ours (LoRA, MoD, MoLEx) vs transformers+PEFT")
    p.add_argument("--shape", choices=list(SHAPES), default="small", help=f"{shapes}; small runs on the CPU")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cpu for small, else cuda")
    p.add_argument("--dtype", default=None, help="weights' dtype (LoRA and add-ons stay float32); default: "
                                                 "float32 on cpu, bfloat16 on cuda")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256 small, 512 otherwise)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (forward + loss; backward via AOT)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--rows", default=",".join(TRAIN_ROWS), help=f"comma-separated subset of {','.join(TRAIN_ROWS)}")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the rows this many times, round-robin, and pool the step times (noisy machines)")
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
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
