"""Benchmarks, one subcommand each.

    python bench.py tokenizer [--text-mb 4]   # encode throughput: tokenizer.py vs sentencepiece
"""
import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

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
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
