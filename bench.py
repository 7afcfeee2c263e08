"""Benchmarks, one subcommand each.

    python bench.py tokenizer [--text-mb 4]   # encode throughput: tokenizer.py vs sentencepiece
    python bench.py load                      # peak RSS while loading a 1.1B-shaped bf16 checkpoint, both formats
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parent.parent / "shared"  # read-only data beside the repo, when present

WORDS = ("the of and to a in is was for that with as on by he she it at from his her they we you this be or an "
         "are were which have has had not but all one two three can will would there their what so if about when "
         "time people year way day man woman child world life hand part place case week company system program "
         "question work government number night point home water room mother area money story fact month lot "
         "right study book eye job word business issue side kind head house service friend father power hour game "
         "line end member law car city community name president team minute idea kid body information back "
         "parent face others level office door health person art war history party result change morning reason "
         "research girl guy moment air teacher force education model layer training tokenizer gradient").split()
SCRIPTS = ["中文文本的一个例子，我们在这里测试分词器的速度。", "日本語の文章です。これはテストです。", "한국어 문장입니다. 테스트입니다.",
           "Это пример текста на русском языке.", "هذا مثال على نص باللغة العربية.", "Ένα παράδειγμα κειμένου.",
           "यह हिंदी में एक उदाहरण है।", "Ça coûte 12,50 € à São Paulo, naïve façade."]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🚀", "✅", "…", "—", "“quoted”"]


def varied_documents(megabytes, seed=0):
    """Deterministic mixed documents, about `megabytes` MB of UTF-8 in all: mostly English-like prose, then code,
    numbers, other scripts, emoji and whitespace runs."""
    r, docs, size = random.Random(seed), [], 0

    def prose():
        words = [r.choice(WORDS) if r.random() < 0.9 else str(r.randrange(10 ** r.randrange(1, 6)))
                 for _ in range(r.randrange(5, 25))]
        return " ".join(words).capitalize() + r.choice([".", ".", ",", "?", "!", ":"])

    def code():
        indent = " " * r.choice([0, 4, 8, 12]) + "\t" * (r.random() < 0.1)
        return indent + r.choice(["def forward(self, x):", "return torch.cat([a, b], dim=-1)", "if x is None:",
                                  "for i, batch in enumerate(loader):", "loss = F.cross_entropy(logits, y)",
                                  "# TODO: handle the  edge case", "}", "print(f\"{step:>6d} {loss:.4f}\")"])

    kinds = [prose] * 12 + [code] * 3 + [
        lambda: " | ".join(f"{r.uniform(-1e4, 1e4):.3f}" for _ in range(8)),
        lambda: r.choice(SCRIPTS) + r.choice(["", " ", "\n"]) + r.choice(SCRIPTS),
        lambda: "".join(r.choice(EMOJI + [" ", "  ", "\n", "\t", " " * 20]) for _ in range(r.randrange(3, 15))),
    ]
    while size < megabytes * 1e6:
        lines = [r.choice(kinds)() for _ in range(r.randrange(5, 60))]
        docs.append("\n".join(lines))
        size += len(docs[-1].encode())
    return docs


def gsm8k_documents(path):
    with open(path, encoding="utf-8") as f:
        return [(row["question"] + "\n" + row["answer"]) for row in map(json.loads, f)]


def timed(fn, repeat):
    """Median wall and CPU seconds (this process, all threads) of `repeat` runs after a warm-up run, and the
    warm-up's result. On a shared machine, CPU time shows a single-threaded cost that wall time overstates."""
    result, wall, cpu = fn(), [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu), result


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


def write_random_checkpoint(folder, fmt, cfg, shards=1):
    """A random bf16 checkpoint in `fmt` ("hf" or "meta"), written one tensor at a time to keep memory low."""
    from model import Llama, save_safetensors, OURS_TO_HF, rename
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Llama(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    rand = lambda shape: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    if fmt == "hf":
        save_safetensors({rename(k, OURS_TO_HF): rand(s) for k, s in shapes.items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({
            "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "vocab_size": cfg.vocab_size, "rms_norm_eps": 1e-5}))
    else:  # Meta's names; q/k layout does not matter for a memory test
        meta = {"embed.weight": "tok_embeddings.weight", "norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
        sub = [("attn.q", "attention.wq"), ("attn.k", "attention.wk"), ("attn.v", "attention.wv"), ("attn.o", "attention.wo"),
               ("mlp.gate", "feed_forward.w1"), ("mlp.up", "feed_forward.w3"), ("mlp.down", "feed_forward.w2"),
               ("attn_norm", "attention_norm"), ("mlp_norm", "ffn_norm")]
        state = {}
        for k, s in shapes.items():
            name = meta.get(k, k)
            for ours, theirs in sub:
                name = name.replace(f".{ours}.", f".{theirs}.")
            state[name] = rand(s)
        torch.save(state, folder / "consolidated.00.pth")
        del state
        (folder / "params.json").write_text(json.dumps({
            "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "multiple_of": 256, "norm_eps": 1e-5, "vocab_size": -1}))
    return sum(f.stat().st_size for f in folder.iterdir())


LOAD_CHILD = r"""
import sys, time, torch
from model import from_pretrained
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = rss("VmRSS:")
t = time.perf_counter()
model = from_pretrained(sys.argv[1])
load_s = time.perf_counter() - t
after_load = rss("VmHWM:") - base
with torch.no_grad():  # touch every weight: the mapped pages become resident
    total = sum(p.sum().item() for p in model.parameters())  # no fp32 copy
after_touch = rss("VmHWM:") - base
print(load_s, after_load, after_touch)
"""


def bench_load(args):
    from model import LlamaConfig
    cfg = LlamaConfig(**TINYLLAMA_SHAPE)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for fmt in ["hf", "meta"]:
            folder = Path(tmp) / fmt
            size = write_random_checkpoint(folder, fmt, cfg)
            out = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(folder)], capture_output=True, text=True,
                                 cwd=Path(__file__).parent, check=True).stdout.split()
            load_s, after_load, after_touch = float(out[0]), int(out[1]), int(out[2])
            rows.append((fmt, size, load_s, after_load, after_touch))
            shutil.rmtree(folder)
    print(f"\nLoading a {cfg.n_layers}-layer dim-{cfg.dim} (TinyLlama-1.1B-shaped) random bf16 checkpoint\n")
    print("| format | file size | load time | peak RSS during load | ratio | peak RSS after touching every weight | ratio |")
    print("|---|---|---|---|---|---|---|")
    gib = 2 ** 30
    for fmt, size, load_s, a, b in rows:
        name = {"hf": "Hugging Face (model.safetensors)", "meta": "Meta (consolidated.00.pth)"}[fmt]
        print(f"| {name} | {size / gib:.2f} GiB | {load_s:.2f} s | {a / gib:.2f} GiB | {a / size:.2f}x "
              f"| {b / gib:.2f} GiB | {b / size:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tokenizer", help="encode throughput of tokenizer.py vs sentencepiece")
    p.add_argument("--text-mb", type=float, default=4.0, help="size of the generated varied text")
    p.add_argument("--model", default=str(SHARED / "llama2" / "tokenizer.model"))
    p.add_argument("--gsm8k", default=str(SHARED / "datasets" / "gsm8k" / "train.jsonl"),
                   help="also time this JSONL file when it exists (read in place, never copied)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="threads for batch encoding (0: all CPUs)")
    p.set_defaults(func=bench_tokenizer)
    p = sub.add_parser("load", help="peak RSS while loading a TinyLlama-shaped random bf16 checkpoint")
    p.add_argument("--tmp", default=None, help="folder for the temporary checkpoints (about 2.1 GB each)")
    p.set_defaults(func=bench_load)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
