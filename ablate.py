"""
The ablation: LoRA against LoRA + MoD (k = 2 and 4; Top-K = 1, 2 and k) and LoRA + MoLEx (the paper's routing
rule and per-sequence routing), several seeds each, on a built-in task; one table of mean ± std accuracy.

    python ablate.py                          # every configuration, seeds 0 1 2, on the built-in arith task
    python ablate.py --configs lora,mod4 --seeds 0 1 2 3 4 --steps 300
    python ablate.py -- --lr 1e-3             # anything after "--" goes to every train.py run

Each run is train.py then eval.py, in this process, into <out>/<config>-seed<s>/; a run whose evaluation is
already there is not repeated, so an interrupted ablation continues where it stopped. The table is printed and
written to <out>/ablation.md (and ablation.json with every run's numbers, ablation.png with matplotlib).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import eval as evaluate_run
import train

CONFIGS = {  # name: (label, train.py flags added to the LoRA baseline)
    "lora": ("LoRA", []),
    "mod2-top1": ("LoRA + MoD k=2, Top-1", ["--mod-k", "2", "--mod-top-k", "1"]),
    "mod2": ("LoRA + MoD k=2, Top-2 (all)", ["--mod-k", "2"]),
    "mod4-top1": ("LoRA + MoD k=4, Top-1", ["--mod-k", "4", "--mod-top-k", "1"]),
    "mod4-top2": ("LoRA + MoD k=4, Top-2", ["--mod-k", "4", "--mod-top-k", "2"]),
    "mod4": ("LoRA + MoD k=4, Top-4 (all)", ["--mod-k", "4"]),
    "molex": ("LoRA + MoLEx, paper rule (one expert per batch)", ["--molex"]),
    "molex-seq": ("LoRA + MoLEx, per-sequence rule", ["--molex", "--molex-rule", "sequence"]),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list from {','.join(CONFIGS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed and configuration")
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

    results = {}  # config -> {seed: {metric: accuracy}}
    for name in names:
        label, flags = CONFIGS[name]
        for seed in args.seeds:
            run = out / f"{name}-seed{seed}"
            report_path = run / "ablation-eval.json"
            if not report_path.is_file():  # not done yet (or interrupted): train, then evaluate
                print(f"\n=== {label}, seed {seed} -> {run}")
                train_argv = ["--data", args.data, "--seed", str(seed), "--out", str(run), *flags, *extra]
                if args.steps is not None:
                    train_argv += ["--max-steps", str(args.steps)]
                train.main(train_argv)
                report = evaluate_run.main(["--ckpt", str(run), "--n", str(args.eval_n), "--layers", "1"])
                report_path.write_text(json.dumps({"metrics": report["metrics"]["output"], "kind": report["kind"]}))
            results.setdefault(name, {})[seed] = json.loads(report_path.read_text())["metrics"]

    metrics = list(next(iter(next(iter(results.values())).values())))  # strict, flexible or acc, acc_norm, acc_gen
    summary = {name: {m: mean_std([r[m] for r in by_seed.values()]) for m in metrics}
               for name, by_seed in results.items()}
    main_metric = metrics[0]
    lines = [f"Accuracy (%) on the {args.data} test split ({args.eval_n} problems), mean ± std over seeds "
             f"{' '.join(map(str, args.seeds))}", "",
             "| configuration | " + " | ".join(metrics) + f" | runs ({main_metric}) |", "|---|" + "---:|" * len(metrics) + "---|"]
    for name, by_seed in results.items():
        cells = [f"{summary[name][m][0]:.1f} ± {summary[name][m][1]:.1f}" for m in metrics]
        runs = ", ".join(f"{r[main_metric]:.1f}" for r in by_seed.values())
        lines.append(f"| {CONFIGS[name][0]} | " + " | ".join(cells) + f" | {runs} |")
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(table)
    (out / "ablation.json").write_text(json.dumps({"data": args.data, "seeds": args.seeds, "results": results,
                                                   "mean_std": summary}, indent=1))
    plot(summary, main_metric, out / "ablation.png")
    print("\n" + table)
    return results


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot(summary, metric, path):
    """Mean accuracy with a ±std bar per configuration, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(summary)
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(names), 3.8))
    ax.bar(range(len(names)), [summary[n][metric][0] for n in names], yerr=[summary[n][metric][1] for n in names],
           capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(f"{metric} accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
