"""bench.py's loading benchmarks: peak RSS against the file size while loading a random checkpoint in Hugging
Face's and Meta's formats, and SmolLM2's GGUF file loaded by weights.py against transformers. Each load runs in a
fresh process (`bench.py load-child`), so one load's memory never mixes with another's.
"""
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from benchkit import (
    RESULT_TAG,
    SHAPE_NAMES,
    SHAPES,
    SHAPES_HELP,
    SMOLLM2_HELP,
    facts,
    measure_load,
    run_child,
    smollm2_file,
    warm_meta,
    write_random_checkpoint,
)


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


def add_commands(sub):
    """This subject's subcommands, on bench.py's parser."""
    p = sub.add_parser("load", help="peak RSS while loading a TinyLlama-shaped random bf16 checkpoint")
    p.add_argument("--tmp", default=None, help="folder for the temporary checkpoints (about 2.1 GB each for "
                                               "tinyllama; default: the system's temporary folder)")
    p.add_argument("--shape", choices=list(SHAPES), default="tinyllama", help=f"the checkpoint's shape: {SHAPES_HELP}")
    p.set_defaults(func=bench_load)
    p = sub.add_parser("load-child")  # internal (no help: not listed): one load, in the process bench_load starts
    p.add_argument("path", help="the checkpoint folder or .gguf file to load")
    p.add_argument("--how", choices=["ours", "transformers"], default="ours", help="weights.from_pretrained, or "
                   "transformers' LlamaForCausalLM.from_pretrained in float32")
    p.add_argument("--logits", default=None, help="save the logits of a fixed 16-token input to this file")
    p.set_defaults(func=bench_load_child)
    p = sub.add_parser("gguf", help="loading SmolLM2's GGUF: ours vs transformers, time and peak RSS")
    p.add_argument("--path", default=None, help=SMOLLM2_HELP)
    p.add_argument("--rounds", type=int, default=3, help="loads of each, round-robin, each in a fresh process (the "
                                                         "median time and the largest peak are reported)")
    p.set_defaults(func=bench_gguf)
