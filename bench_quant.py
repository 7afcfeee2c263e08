"""bench.py's benchmark of the frozen base in 4 or 8 bits (--base-bits, quant.py): each format's reconstruction
error and loss on SmolLM2, peak RSS and step time of whole train.py runs, and the bytes of a LLaMA-2-7B-shaped
quantized base (built in its own process, `bench.py quant-7b`).
"""
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchkit import (
    RESULT_TAG,
    SHAPES,
    SHARED,
    SMOLLM2_HELP,
    facts,
    gsm8k_documents,
    reset_peak_rss,
    rss_mib,
    run_child,
    smollm2_file,
    write_random_checkpoint,
)


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
    parts = args.parts.split(",")
    gguf_path = smollm2_file(args.path)
    if "error" in parts:
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
    if "smollm2" in parts:
        base = ["--init", str(gguf_path), "--max-len", "128", "--batch-size", "4", *common]
        quant_runs("SmolLM2-135M (its Q4_1 GGUF), LoRA on q,k,v,o,gate,up,down, batch 4 x <= 128 tokens, CPU",
                   {"float32": base, "--base-bits 4 (Q4_1 kept), float32": [*base, "--base-bits", "4"],
                    "--base-bits 4 --base-format nf4, float32": [*base, "--base-bits", "4", "--base-format", "nf4"]},
                   args.rounds, args.steps)
    if "tinyllama" in parts:
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
    if "7b" in parts:
        r = run_child(["quant-7b", "--layers", "0"])
        print(f"\nLLaMA-2-7B-shaped base quantized as it is built (nf4; embedding and head bfloat16; one block built "
              f"and quantized, the 32 blocks being the same tensors): "
              f"{r['bytes'] / 1e9:.3f} GB ({r['bytes'] / 2 ** 30:.3f} GiB) for {r['params'] / 1e9:.2f} B weights, "
              f"{r['matrix_bytes'] / 1e9:.3f} GB of it the block matrices; the float bfloat16 base: "
              f"{2 * r['params'] / 1e9:.2f} GB; built in {r['seconds']:.0f} s, peak RSS {r['peak_mib']:,.0f} MiB")
    if "7b-count" in parts:
        # Counted for 1 and 2 blocks and extrapolated to 32: every block adds the same tensors (its blocks, what it
        # keeps for the backward pass), and counting all 32 on fake tensors takes CPU minutes this machine's share
        # did not give.
        kinds = ("Parameter", "Buffer", "Activation", "Temp", "Optstate", "Gradient", "Total")
        print("\nLoRA step on the LLaMA-2-7B-shaped nf4 base, counted on fake tensors (MemTracker; batch 1 x 512, "
              "bfloat16 autocast): peak bytes of live tensors, MiB; 32 blocks = 2 blocks + 30 x (2 blocks - 1)\n")
        print("| | blocks | " + " | ".join(kinds) + " | GB |")
        print("|---|---:|" + "---:|" * (len(kinds) + 1))
        for ckpt in (False, True):
            one, two = quant_7b_count(ckpt, 1), quant_7b_count(ckpt, 2)
            whole = {k: two.get(k, 0) + 30 * (two.get(k, 0) - one.get(k, 0)) for k in kinds}
            for n, peak in ((1, one), (2, two), (32, whole)):
                print(f"| {'--grad-checkpointing' if ckpt else 'no checkpointing'} | {n} | "
                      + " | ".join(f"{peak.get(k, 0) / 2 ** 20:,.0f}" for k in kinds)
                      + f" | {peak['Total'] / 1e9:.2f} |", flush=True)
    if "7b-step" in parts:
        ckpt = ["--grad-checkpointing"] if args.grad_checkpointing else []
        r = run_child(["quant-7b", "--step", *ckpt], env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        if "error" in r:
            sys.exit(f"the 7B step {r['error']}")
        print(f"\nLoRA step (r 8 on q,k,v,o,gate,up,down; AdamW) on a LLaMA-2-7B-shaped nf4 base, all 32 blocks, "
              f"batch 1 x 512, bfloat16 autocast{', --grad-checkpointing' if ckpt else ''}, CPU (glibc "
              f"MALLOC_MMAP_THRESHOLD_=65536, so RSS follows the live tensors):\n")
        print("| RSS of the process | MiB |\n|---|---:|")
        print(f"| before the model (interpreter, torch) | {r['runtime_mib']:,.0f} |")
        print(f"| after the base is built (its tensors: {r['base_bytes'] / 2 ** 20:,.0f} MiB) | {r['base_mib']:,.0f} |")
        print(f"| after LoRA is attached | {r['lora_mib']:,.0f} |")
        print(f"| peak during forward + backward + optimizer step | {r['peak_mib']:,.0f} |")
        print(f"| the step's addition (peak - after LoRA) | {r['peak_mib'] - r['lora_mib']:,.0f} |")
        print(f"\nforward {r['forward_s']:.0f} s, backward {r['backward_s']:.0f} s, optimizer {r['opt_s']:.1f} s; "
              f"loss {r['loss']:.4f}; {r['lora_params']:,} LoRA parameters")


def quant_7b_count(grad_checkpointing, n_layers):
    """The LoRA step of the 7B-shaped nf4 base cut to n_layers blocks (batch 1 x 512, bfloat16 autocast, AdamW), run on
    fake tensors (shapes only: no memory, no arithmetic) under torch's MemTracker: the peak of the bytes of live
    tensors, by kind. This is what a GPU's allocator must hold at least (its workspace, fragmentation and the CUDA
    context come on top); the same model, step and operators as --parts 7b-step, in seconds instead of hours."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    import model as model_module
    from lora import apply_lora
    from model import Llama, LlamaConfig
    from quant import QuantizedLinear
    from weights import QUANTIZABLE

    class Tracker(MemTracker):  # MemTracker hooks every parameter's gradient: the frozen base has none
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    def all_rows(targets, *tensors):  # every position has a target here: the rows without a data-dependent nonzero
        y = targets.reshape(-1)
        return [t.reshape(len(y), *t.shape[2:]) for t in tensors], y, None

    cfg = LlamaConfig(**{**SHAPES["7b"], "n_layers": n_layers}, max_seq_len=4096)
    with FakeTensorMode(allow_non_fake_inputs=True), mock.patch.object(model_module, "target_rows", all_rows):
        torch.set_default_dtype(torch.bfloat16)  # the base in bfloat16 (fake tensors cannot be converted in place)
        model = Llama(cfg)
        torch.set_default_dtype(torch.float32)
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and QUANTIZABLE.fullmatch(name + ".weight"):
                out_f, in_f = module.weight.shape
                blocks = torch.empty(out_f, in_f // 64 * 34, dtype=torch.uint8)  # nf4: 34 bytes per 64 weights
                parent, attr = name.rsplit(".", 1)
                setattr(model.get_submodule(parent), attr, QuantizedLinear(blocks, "nf4", in_f, out_f, torch.bfloat16))
        model.build_rope("cpu")
        apply_lora(model, rank=8, alpha=16, targets="q,k,v,o,gate,up,down", verbose=False)
        model.grad_checkpointing = grad_checkpointing
        model.train()
        idx = torch.randint(0, cfg.vocab_size, (1, 512))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        tracker = Tracker()
        tracker.track_external(model, opt)
        with tracker:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = model(idx, torch.roll(idx, -1, 1))
            loss.backward()
            opt.step()
        peak = tracker.get_tracker_snapshot("peak")
        return {getattr(k, "value", k): int(v) for k, v in next(iter(peak.values())).items()}  # "Parameter": bytes


def bench_quant_7b(args):
    """(internal) A LLaMA-2-7B-shaped model whose block matrices are drawn in float32 and quantized to nf4 one at a
    time (never a float copy of the model). --layers 0: the bytes of the whole base, from its embedding, head and one
    block built for real (the 32 blocks hold the same tensors' sizes). --step: all blocks built for real (block 0's
    matrices drawn and quantized, the other blocks holding copies of its blocks: the same bytes, no redrawing),
    then one LoRA step at batch 1 x 512 in bfloat16 autocast, as train.py --dtype bfloat16 takes it; reports the
    process's RSS before the model, after the base, after LoRA and its peak during the step."""
    from tqdm import tqdm

    from lora import apply_lora
    from model import Llama, LlamaConfig
    from quant import QuantizedLinear, nbytes, quantize
    from weights import QUANTIZABLE
    runtime_mib = rss_mib()
    cfg = LlamaConfig(**SHAPES["7b"], max_seq_len=4096)
    n_layers = args.layers or cfg.n_layers
    t0 = time.time()
    dtype = torch.bfloat16
    with torch.device("meta"):
        model = Llama(LlamaConfig(**{**SHAPES["7b"], "n_layers": n_layers if args.step else 1}, max_seq_len=4096))
    model = model.to(dtype)
    g = torch.Generator().manual_seed(0)
    drawn = {}  # block 0's quantized matrices by name within a block: later blocks copy them
    for name, module in tqdm(list(model.named_modules()), desc="building the nf4 base", disable=not args.step):
        if isinstance(module, torch.nn.Linear) and QUANTIZABLE.fullmatch(name + ".weight"):
            out_f, in_f = module.weight.shape
            local = name.split(".", 2)[2]  # e.g. attn.q
            if local not in drawn:
                drawn[local] = quantize(torch.randn(out_f, in_f, generator=g) * 0.02, "nf4")
            q = QuantizedLinear(drawn[local].clone(), "nf4", in_f, out_f, dtype)
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
        total = outside + cfg.n_layers * layer_bytes
        matrices = cfg.n_layers * layer_matrix
        params = (2 * cfg.vocab_size * cfg.dim + cfg.dim + cfg.n_layers * (2 * cfg.dim + 4 * cfg.dim * cfg.dim
                                                                            + 3 * cfg.dim * cfg.hidden_dim))
        print(RESULT_TAG + json.dumps({"bytes": total, "matrix_bytes": matrices, "params": params,
                                       "seconds": time.time() - t0, "peak_mib": rss_mib("VmHWM:")}))
        return
    del drawn
    base_bytes, base_mib = nbytes(model), rss_mib()
    torch.manual_seed(0)
    lora_params = apply_lora(model, rank=8, alpha=16, targets="q,k,v,o,gate,up,down", verbose=False)
    model.grad_checkpointing = args.grad_checkpointing
    model.train()
    idx = torch.randint(0, cfg.vocab_size, (1, 512), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    lora_mib = rss_mib()
    reset_peak_rss()  # the peak from here on: the step's

    def progress(what):
        print(f"  {what}: {time.time() - t:.0f} s, RSS {rss_mib():,.0f} MiB, peak {rss_mib('VmHWM:'):,.0f} MiB",
              file=sys.stderr, flush=True)

    def after_block(i):
        def hook(module, inputs, out):
            if (i, "f") not in seen:  # not again when --grad-checkpointing recomputes the block
                seen.add((i, "f"))
                progress(f"forward block {i + 1}/{n_layers}")
                out.register_hook(lambda grad: progress(f"backward reaches block {i + 1}/{n_layers}"))
        return hook
    seen = set()
    for i, block in enumerate(model.layers):
        block.register_forward_hook(after_block(i))
    t = time.time()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, torch.roll(idx, -1, 1))
    forward_s = time.time() - t
    loss.backward()
    backward_s = time.time() - t - forward_s
    opt.step()
    opt_s = time.time() - t - forward_s - backward_s
    progress("optimizer step done")
    print(RESULT_TAG + json.dumps({"runtime_mib": runtime_mib, "base_mib": base_mib, "base_bytes": base_bytes,
                                   "lora_mib": lora_mib, "peak_mib": rss_mib("VmHWM:"), "forward_s": forward_s,
                                   "backward_s": backward_s, "opt_s": opt_s, "loss": float(loss.detach()),
                                   "lora_params": lora_params, "build_s": t - t0}))


def add_commands(sub):
    """This subject's subcommands, on bench.py's parser."""
    p = sub.add_parser("quant", help="--base-bits: reconstruction error of the 4-bit formats, peak RSS and step "
                                     "time of train.py runs (SmolLM2, TinyLlama shape), the 7B base's bytes")
    p.add_argument("--parts", default="error,smollm2,tinyllama,7b,7b-count",
                   help="comma list of error, smollm2, tinyllama, 7b (the base's bytes), 7b-count (a 7B LoRA step's "
                        "peak tensor bytes, counted on fake tensors), 7b-step (that step for real on the CPU: about 5 "
                        "GiB of RSS with --grad-checkpointing, and hours of a loaded 2-core CPU)")
    p.add_argument("--grad-checkpointing", action="store_true", help="7b-step: recompute each block in backward")
    p.add_argument("--path", default=None, help=SMOLLM2_HELP)
    p.add_argument("--docs", type=int, default=8, help="GSM8K documents for the next-token loss of each format")
    p.add_argument("--rounds", type=int, default=2, help="SmolLM2 runs of each configuration, round-robin")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each SmolLM2 run (after the first)")
    p.add_argument("--threads", type=int, default=1, help="--threads of every train.py run")
    p.add_argument("--tmp", default=None, help="folder for the TinyLlama-shaped checkpoint (about 2.1 GB)")
    p.set_defaults(func=bench_quant)
    p = sub.add_parser("quant-7b")  # internal: the 7B-shaped quantized base, in its own process
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--step", action="store_true")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.set_defaults(func=bench_quant_7b)
