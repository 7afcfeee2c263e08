"""
Reports of an evaluation and of an ablation: which layers solve which problems, markdown tables and plots.
Layers are numbered from 1 (the first block) to n_layers (the last) in every table and plot.
"""
import math
import statistics
from collections import Counter
from itertools import combinations

EXACT_OVERLAP_MAX = 5  # count every subset of layers (2^k regions) up to this many layers
EXACT_REGIONS_MAX = 15  # beyond that, the regions holding the most problems


def overlap(solved, n_problems, exact_max=EXACT_OVERLAP_MAX):
    """How the sets of solved problem indices of several sources (e.g. layers) overlap.

    solved: {name: set of indices}. Returns solved counts, "any" / "all" / "none", "only" (solved by this source
    and no other), the pairwise matrix |A & B| (diagonal = |A|) and "exact": the number of problems solved by
    exactly each subset of sources (every problem lands in one region). With at most exact_max sources it lists
    every subset; with more (2^k subsets) only the EXACT_REGIONS_MAX regions holding the most problems, largest
    first, and "exact_rest" counts the problems of the regions left out."""
    names = list(solved)
    sets = [set(solved[k]) for k in names]
    union = set().union(*sets) if sets else set()
    inter = set.intersection(*sets) if sets else set()
    out = {"sources": names, "n": n_problems, "solved": {k: len(s) for k, s in zip(names, sets)},
           "any": len(union), "all": len(inter), "none": n_problems - len(union),
           "only": {k: len(s - set().union(*(t for j, t in enumerate(sets) if j != i))) for i, (k, s) in
                    enumerate(zip(names, sets))},
           "pairwise": [[len(a & b) for b in sets] for a in sets]}
    region = Counter(frozenset(k for k, s in zip(names, sets) if i in s) for i in range(n_problems))
    if len(names) <= exact_max:
        subsets = [subset for r in range(len(names), -1, -1) for subset in combinations(names, r)]
    else:
        subsets = [subset for subset, _ in region.most_common(EXACT_REGIONS_MAX)]
        out["exact_rest"] = n_problems - sum(region[subset] for subset in subsets)
    out["exact"] = [{"sources": [k for k in names if k in subset], "count": region.get(frozenset(subset), 0)}
                    for subset in subsets]
    return out


# ----------------------------------------------------------------------------------------------------------
# Paired differences

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


def question_paired_difference(solved, reference, seeds, n):
    """The difference to the reference paired by seed and by question: d_q = mean over `seeds` of (solved q) -
    (reference solved q), in %; returns (mean of d_q, half-width of its 95% interval over the n questions).
    The interval holds these seeds fixed: it measures which questions move, not how another seed would train."""
    d = [0.0] * n
    for s in seeds:
        for q in solved[s]:
            d[q] += 1.0 / len(seeds)
        for q in reference[s]:
            d[q] -= 1.0 / len(seeds)
    mean, std = mean_std(d)
    return 100.0 * mean, 100.0 * 1.96 * std / math.sqrt(n)


def paired_to_base(res, n):
    """Rows comparing the tuned output with the untuned base (source \"base\", eval.py --baseline) question by
    question: (metric, output %, base %, difference with its 95% interval over the n questions, fixed, broken)."""
    rows = []
    for m in res["solved"]["base"]:
        tuned, base = set(res["solved"]["output"][m]), set(res["solved"]["base"][m])
        d, half = question_paired_difference({0: tuned}, {0: base}, [0], n)
        rows.append((m, res["metrics"]["output"][m], res["metrics"]["base"][m], d, half, len(tuned - base),
                     len(base - tuned)))
    return rows


def source_label(s, n_layers, mod_k=0):
    if s == "output":
        return "model output" + (f" (MoD ensemble of {mod_k})" if mod_k else "")
    if s == "base":
        return "untuned base output"
    layer = int(s.split("_")[1])
    how = "MoD norm" if layer > n_layers - mod_k and layer < n_layers else "logit lens"
    return f"layer {layer}/{n_layers}" + ("" if layer == n_layers else f" ({how})")


DECIMALS = {"answer_ce": 3, "answer_acc": 2}  # in tables and plots; every other metric (%) gets one


def metric_cell(metrics, name):
    """A table cell: the metric with its decimals (DECIMALS); blank if absent."""
    return f"{metrics[name]:.{DECIMALS.get(name, 1)}f}" if name in metrics else ""


def markdown_report(res, title, n_layers, n):
    metric_names = list(next(iter(res["metrics"].values())))
    lines = [f"# {title}", "", "| readout | " + " | ".join(metric_names) + " |",
             "|---|" + "---:|" * len(metric_names)]
    for s, m in res["metrics"].items():
        lines.append(f"| {source_label(s, n_layers, res.get('mod_k', 0))} | "
                     + " | ".join(metric_cell(m, k) for k in metric_names) + " |")
    if "base" in res["solved"] and n > 1:
        lines += ["", f"## Tuned against the untuned base, paired by question ({n} problems)", "",
                  "| metric | tuned | base | difference (95% interval) | fixed | broken |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {m} | {t:.1f} | {b:.1f} | {d:+.1f} ± {half:.1f} | {fixed} | {broken} |"
                  for m, t, b, d, half, fixed, broken in paired_to_base(res, n)]
    ov = res.get("overlap")
    if ov and ov["sources"]:
        names = [s.replace("layer_", "L") for s in ov["sources"]]
        lines += ["", f"## Which layers solve which problems ({res['overlap_metric']}, {ov['n']} problems)", "",
                  f"solved by any layer: {ov['any']}, by all: {ov['all']}, by none: {ov['none']}", "",
                  "| layer | solved | only this layer |", "|---|---:|---:|"]
        lines += [f"| {n} | {ov['solved'][s]} | {ov['only'][s]} |" for n, s in zip(names, ov["sources"])]
        lines += ["", "Pairwise overlap (problems solved by both):", "", "| | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        lines += [f"| {n} | " + " | ".join(map(str, row)) + " |" for n, row in zip(names, ov["pairwise"])]
        if "exact" in ov:
            lines += ["", "Solved by exactly these layers (Venn regions):", "", "| layers | problems |", "|---|---:|"]
            lines += [f"| {', '.join(s.replace('layer_', 'L') for s in e['sources']) or 'none'} | {e['count']} |"
                      for e in ov["exact"]]
    rt = res.get("mod_routing")
    if rt:
        lines += ["", f"## MoD routing weights ({rt['tokens']} answer tokens of the reference answers)", "",
                  "| layer | mean weight | sparsity (weight < 0.001) | weighs most |", "|---|---:|---:|---:|"]
        lines += [f"| {layer} | {w:.3f} | {100 * s:.1f}% | {100 * t:.1f}% |" for layer, w, s, t in
                  zip(rt["layers"], rt["mean_weight"], rt["sparsity"], rt["top1"])]
    mx = res.get("molex")
    if mx:
        lines += ["", "## MoLEx: the expert each mixed layer picks (fraction of test prompts)", "",
                  "| layer | most picked expert | its share | experts used |", "|---|---:|---:|---:|"]
        for t in mx["mixed_layers"]:
            row = mx["fractions"][t - 1]
            j = max(range(len(row)), key=row.__getitem__)
            lines.append(f"| {t} | {j + 1} | {100 * row[j]:.0f}% | {sum(v > 0 for v in row)} |")
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot without a display, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    return plt


def save(fig, path, files):
    fig.savefig(path, dpi=120, bbox_inches="tight")  # bbox: long titles and labels are never cut off
    fig.clf()
    files.append(str(path))


def write_plots(res, stem, n_layers, subtitle):
    """Per-layer accuracy bars, the overlap heat map, MoD's routing weights and MoLEx's expert choices, each
    titled with `subtitle` (run, data, n). Returns the files written."""
    plt = pyplot()
    if plt is None:
        return []
    files = []
    sources = list(res["metrics"])
    metric_names = [m for m in res["metrics"][sources[0]] if not m.startswith("answer_")]  # generated answers
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * len(sources) * len(metric_names), 4))
    width = 0.8 / len(metric_names)
    for j, m in enumerate(metric_names):
        bars = ax.bar([i + j * width for i in range(len(sources))], [res["metrics"][s][m] for s in sources], width,
                      label=m)
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    ax.set_xticks([i + width * (len(metric_names) - 1) / 2 for i in range(len(sources))])
    ax.set_xticklabels([source_label(s, n_layers, res.get("mod_k", 0)).split(" (")[0] for s in sources], rotation=30,
                       ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"accuracy of the output and of each layer read out alone\n{subtitle}", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the axes: covers no bar
    save(fig, f"{stem}-layers.png", files)
    ov = res.get("overlap")
    if ov and len(ov["sources"]) > 1:
        names = [s.replace("layer_", "L") for s in ov["sources"]]
        fig, ax = plt.subplots(figsize=(max(5.5, 2.5 + 0.6 * len(names)), 2 + 0.6 * len(names)))
        im = ax.imshow(ov["pairwise"], cmap="viridis")
        top = max(map(max, ov["pairwise"]))
        for i, row in enumerate(ov["pairwise"]):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", color="w" if v < top / 2 else "k", fontsize=8)
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), names)
        ax.set_title(f"problems solved by both layers ({res['overlap_metric']})\n{subtitle}", fontsize=9)
        fig.colorbar(im, ax=ax, pad=0.08)
        save(fig, f"{stem}-overlap.png", files)
    rt = res.get("mod_routing")
    if rt:
        fig, ax = plt.subplots(figsize=(3.5 + 0.8 * len(rt["layers"]), 3.6))
        x = range(len(rt["layers"]))
        ax.bar([i - 0.2 for i in x], rt["mean_weight"], 0.4, label="mean coefficient c_i (z = sum c_i l_i)")
        ax.bar([i + 0.2 for i in x], rt["sparsity"], 0.4, label="share of tokens with |c_i| < 0.001")
        ax.set_xticks(list(x), [f"L{layer}" for layer in rt["layers"]])
        ax.set_ylim(min(0.0, *rt["mean_weight"]) - 0.05, max(1.0, *rt["mean_weight"]) + 0.05)  # c_i may leave [0, 1]
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(f"MoD's ensemble coefficients on the reference answers ({rt['tokens']} tokens)\n{subtitle}",
                     fontsize=9)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        save(fig, f"{stem}-routing.png", files)
    mx = res.get("molex")
    if mx:
        frac = mx["fractions"]
        L = len(frac)
        fig, ax = plt.subplots(figsize=(6, 5))
        im = ax.imshow(frac, cmap="viridis", vmin=0, vmax=1)
        ticks = list(range(0, L, max(1, L // 16)))
        ax.set_xticks(ticks, [t + 1 for t in ticks])  # layers from 1, as in the tables
        ax.set_yticks(ticks, [t + 1 for t in ticks])
        ax.set_xlabel("expert layer j"), ax.set_ylabel("mixed layer t")
        ax.set_title(f"MoLEx: share of test prompts for which layer t uses expert j\n{subtitle}", fontsize=9)
        fig.colorbar(im, ax=ax)
        save(fig, f"{stem}-molex.png", files)
    plt.close("all")
    return files


def ablation_plot(results, labels, metrics, path, title):
    """One panel per metric: the mean with a ±std bar per configuration, named as in the table, and a dot per
    seed (so a spread from one outlier shows). results: {config: {seed: {metric: value}}}. False without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    names = list(results)
    fig, axes = plt.subplots(1, len(metrics), figsize=((3 + 0.9 * len(names)) * len(metrics), 4.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        runs = [[r[metric] for r in results[n].values()] for n in names]
        means = [sum(v) / len(v) for v in runs]
        stds = [(sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5 for v, m in zip(runs, means)]
        bars = ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.6)
        ax.bar_label(bars, fmt=f"%.{DECIMALS.get(metric, 1)}f", fontsize=7, label_type="center")
        for i, v in enumerate(runs):
            ax.plot([i] * len(v), v, "o", color="black", markersize=3)
        if metric == "answer_acc":  # all near 100: show the range the runs span
            ax.set_ylim(min(min(v) for v in runs) - 1, 100)
        ax.set_xticks(range(len(names)), [labels[n] for n in names], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("answer CE (nats per token, lower is better)" if metric == "answer_ce"
                      else f"{metric} (%), mean ± std, dots = seeds")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def solved_overlap_plot(ov, labels, path, title):
    """The overlap of the problems each configuration solves (as the MoD paper's Figure 2 does for layers): the
    pairwise matrix |A & B| (diagonal = |A|) and the number of problems solved by exactly each subset of
    configurations. ov: overlap()'s result; labels: {config: short name}. False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    names = [labels[s] for s in ov["sources"]]
    regions = [r for r in ov.get("exact", []) if r["sources"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(6 + 1.2 * len(names), 1.5 + 0.9 * max(len(names), 3)),
                                      gridspec_kw={"width_ratios": [1, 1.3]}, layout="constrained")
    left.imshow(ov["pairwise"], cmap="viridis")
    top = max(map(max, ov["pairwise"]))
    for i, row in enumerate(ov["pairwise"]):
        for j, v in enumerate(row):
            left.text(j, i, str(v), ha="center", va="center", color="w" if v < top / 2 else "k", fontsize=8)
    left.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    left.set_yticks(range(len(names)), names, fontsize=8)
    left.set_title("solved by both (diagonal: solved)", fontsize=9)
    bars = [(" + ".join(labels[s] for s in r["sources"]) + (" only" if len(r["sources"]) == 1 else ""), r["count"])
            for r in regions]
    if ov.get("exact_rest"):
        bars.append(("any other combination", ov["exact_rest"]))
    y = range(len(bars))
    right.barh(list(y), [count for _, count in bars], color="tab:blue", alpha=0.7)
    for i, (_, count) in enumerate(bars):
        right.text(count, i, f" {count}", va="center", fontsize=7)
    right.set_yticks(list(y), [name for name, _ in bars], fontsize=7)
    right.invert_yaxis()
    right.set_xlabel(f"problems (of {ov['n']}; solved by none: {ov['none']})")
    right.set_title("solved by exactly these", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True
