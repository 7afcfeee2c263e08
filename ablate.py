"""
The ablation: LoRA against LoRA + MoD (k = 2 and 4, LoRA on the last k layers only, Top-1, the paper's settings)
and LoRA + MoLEx (the paper's routing rule, per-sequence routing, the authors' decoder recipe), several seeds
each, on a built-in task; one table of mean ± std and the paired difference to LoRA (same seeds) with its 95%
interval, for the exact-match accuracy and for the teacher-forced answer CE (which varies far less).

    python ablate.py                          # the default configurations, seeds 0-4, on the built-in arith task
    python ablate.py --configs lora,mod4 --seeds 0 1 2 --steps 300
    python ablate.py -- --lr 1e-3             # anything after "--" goes to every train.py run

Each run is `python train.py` then `python eval.py` (separate processes) into <out>/<config>-seed<s>/; a run
whose evaluation is already there is not repeated, so an interrupted ablation continues where it stopped. The
table is printed and written to <out>/ablation.md (and ablation.json with every run's numbers, ablation.png).
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from report import DECIMALS, ablation_plot

REPO = Path(__file__).resolve().parent
CONFIGS = {  # name: (label, train.py flags added to the LoRA baseline)
    "lora": ("LoRA", []),
    "mod2": ("LoRA + MoD k=2", ["--mod-k", "2"]),
    "mod4": ("LoRA + MoD k=4", ["--mod-k", "4"]),
    "mod4-last": ("LoRA on the last 4 layers + MoD k=4", ["--mod-k", "4", "--lora-layers", "4"]),
    "molex": ("LoRA + MoLEx, paper rule (one expert per batch)", ["--molex"]),
    "molex-seq": ("LoRA + MoLEx, per-sequence rule", ["--molex", "--molex-rule", "sequence"]),
    "molex-decoder": ("LoRA + MoLEx, decoder recipe (alpha 0.95 fixed, first half)",
                      ["--molex", "--molex-alpha", "0.95", "--no-molex-learn-alpha", "--molex-layers", "first:4"]),
    # not run by default
    "mod4-top1": ("LoRA + MoD k=4, Top-1", ["--mod-k", "4", "--mod-top-k", "1"]),
    "mod4-paper": ("LoRA + MoD k=4, the paper's settings (uniform start, no layer CE, normed router input)",
                   ["--mod-k", "4", "--mod-start", "uniform", "--no-mod-layer-ce", "--mod-router-input", "normed"]),
    "molex-paper-alpha": ("LoRA + MoLEx, alpha 0.5 fixed (the paper's encoder setting)",
                          ["--molex", "--molex-alpha", "0.5", "--no-molex-learn-alpha"]),
    "molex-uniform-gate": ("LoRA + MoLEx, nn.Linear's uniform gate init", ["--molex", "--molex-gate-init", "uniform"]),
}
DEFAULT_CONFIGS = ["lora", "mod2", "mod4", "mod4-last", "molex", "molex-seq", "molex-decoder"]
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # Student t, 97.5%, df 1..10


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_difference(values, reference):
    """Mean of values[s] - reference[s] over the seeds both have, and the half-width of its 95% t interval
    (None with fewer than 2 pairs)."""
    diffs = [values[s] - reference[s] for s in values if s in reference]
    if not diffs:
        return None, None, 0
    mean, std = mean_std(diffs)
    n = len(diffs)
    half = T_975[min(n - 1, len(T_975)) - 1] * std / math.sqrt(n) if n > 1 else None
    return mean, half, n


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
                      ["--data", args.data, "--seed", str(seed), "--out", str(run), "--no-length-groups",
                       *flags, *extra])
        if args.steps is not None:
            train_argv += ["--max-steps", str(args.steps)]
        subprocess.run([sys.executable, str(REPO / "train.py"), *train_argv], check=True)
        eval_argv = ["--ckpt", str(run), "--n", str(args.eval_n), "--layers", "0"]
        subprocess.run([sys.executable, str(REPO / "eval.py"), *eval_argv], check=True)
        data = json.loads((run / "args.json").read_text())["data"]
        report = json.loads((run / f"eval-{Path(data).stem}-test.json").read_text())
        report_path.write_text(json.dumps({"metrics": report["metrics"]["output"], "kind": report["kind"]}))
    return json.loads(report_path.read_text())["metrics"]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma list from {','.join(CONFIGS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one run per seed and configuration")
    p.add_argument("--data", default="arith", help="built-in task (or prepared data) to tune and evaluate on")
    p.add_argument("--steps", type=int, default=None, help="train.py --max-steps (default: train.py's)")
    p.add_argument("--eval-n", type=int, default=200, help="test problems per evaluation")
    p.add_argument("--out", default="runs/ablation", help="folder for the runs and the table")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        p.error(f"--configs: unknown {unknown or 'empty list'}; choose from {','.join(CONFIGS)}")
    out = Path(args.out)

    try:
        results = {name: {seed: run_one(name, seed, args, extra, out / f"{name}-seed{seed}") for seed in args.seeds}
                   for name in names}  # config -> {seed: {metric: accuracy}}
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"ablate.py: error: a run failed (exit status {e.returncode}): {' '.join(e.cmd)}") from None

    # strict, flexible, lines, answer_ce (generation) or acc, acc_norm, acc_gen (choice)
    metrics = list(next(iter(next(iter(results.values())).values())))
    summary = {name: {m: mean_std([r[m] for r in by_seed.values()]) for m in metrics}
               for name, by_seed in results.items()}
    main_metric = metrics[0]
    compared = [main_metric] + [m for m in ("answer_acc", "answer_ce") if m in metrics]  # paired differences
    digits = lambda m: DECIMALS.get(m, 1)  # noqa: E731
    steps = f"{args.steps} steps" if args.steps else "train.py's default steps"
    lines = [f"The {args.data} test split ({args.eval_n} problems): accuracies in %; answer_acc (% of answer tokens "
             f"that are the top choice) and answer_ce (nats per answer token, lower is better) teacher-forced; "
             f"mean ± std over seeds {' '.join(map(str, args.seeds))}, "
             f"{steps}. Δ = paired difference to LoRA on the same seeds, ± its 95% t interval", "",
             "| configuration | " + " | ".join(metrics) + "".join(f" | Δ {m} vs LoRA" for m in compared)
             + f" | runs ({main_metric}) |", "|---|" + "---:|" * (len(metrics) + len(compared)) + "---|"]
    paired = {}
    for name, by_seed in results.items():
        cells = [f"{summary[name][m][0]:.{digits(m)}f} ± {summary[name][m][1]:.{digits(m)}f}" for m in metrics]
        for m in compared:
            lora = {s: r[m] for s, r in results.get("lora", {}).items()}
            d, half, n = paired_difference({s: r[m] for s, r in by_seed.items()}, lora)
            paired.setdefault(name, {})[m] = {"mean": d, "ci95": half, "pairs": n}
            cells.append("" if name == "lora" or d is None else f"{d:+.{digits(m)}f}"
                         + (f" ± {half:.{digits(m)}f}" if half is not None else ""))
        runs = ", ".join(f"{r[main_metric]:.1f}" for r in by_seed.values())
        lines.append(f"| {CONFIGS[name][0]} | " + " | ".join(cells) + f" | {runs} |")
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(table)
    (out / "ablation.json").write_text(json.dumps({"data": args.data, "seeds": args.seeds, "steps": args.steps,
                                                   "results": results, "mean_std": summary,
                                                   "paired_vs_lora": paired}, indent=1))
    ablation_plot(results, {n: CONFIGS[n][0] for n in results}, compared, out / "ablation.png",
                  f"{args.data} test, {args.eval_n} problems; seeds {' '.join(map(str, args.seeds))}; {steps}")
    print("\n" + table)
    return results


if __name__ == "__main__":
    main()
