"""bench.py's evaluation-side benchmarks: ARC option scoring (scoring.option_logliks) with LoRA + MoD against
LoRA, greedy generation against transformers' generate, and the share of padded positions in training's and
evaluation's batches, random / file order against length-grouped.
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchkit import (
    RESULT_TAG,
    SMOLLM2_HELP,
    facts,
    rss_mib,
    run_child,
    smollm2_file,
)


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
    from lora import LoRAConfig
    from mod import MoDConfig
    from scoring import option_logliks
    from tokenizer import load_tokenizer
    torch.set_num_threads(args.threads)
    gguf = smollm2_file(args.path)
    settings = {"pretrain": False, "init": str(gguf), "seed": 0, "lora": LoRAConfig(targets="q,k,v,o,gate,up,down"),
                "mod": MoDConfig(k=args.mod_k) if args.row == "mod" else None}
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


def add_commands(sub):
    """This subject's subcommands, on bench.py's parser."""
    p = sub.add_parser("padding", help="share of padded positions: random vs length-grouped batches")
    p.add_argument("--data", nargs="+", required=True, help="prepared folders (train.jsonl, test.jsonl)")
    p.add_argument("--path", default=None, help=f"{SMOLLM2_HELP}: its tokenizer")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size")
    p.add_argument("--eval-batch-size", type=int, default=64, help="evaluation batch size (eval.py's default)")
    p.set_defaults(func=bench_padding)
    p = sub.add_parser("score", help="ARC option scoring with SmolLM2: LoRA + MoD vs LoRA, time and peak RSS")
    p.add_argument("--data", required=True, help="a prepared ARC-like folder (test.jsonl)")
    p.add_argument("--path", default=None, help=SMOLLM2_HELP)
    p.add_argument("--n", type=int, default=100, help="questions")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward (eval.py's default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--mod-k", type=int, default=4, help="MoD's k")
    p.add_argument("--rounds", type=int, default=1, help="runs of each row, round-robin")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: run one row in this process
    p.set_defaults(func=bench_score)
    p = sub.add_parser("generate", help="greedy generation with SmolLM2: ours vs transformers' generate")
    p.add_argument("--path", default=None, help=SMOLLM2_HELP)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (random ids, all the same length)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    p.add_argument("--rounds", type=int, default=3, help="runs of each, alternating (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.set_defaults(func=bench_generate)
