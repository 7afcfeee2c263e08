"""
Evaluate a base model or a tuned run on a task: accuracy of the model's output and of each late layer read out
alone (logit lens), plus which layers solve which problems.

    python eval.py --ckpt runs/arith-20250101-120000     # a tuned run (its base + its ckpt.pt), on its task
    python eval.py                                       # the untuned built-in base, on the built-in arith task
    python eval.py --init /path/to/llama-2-7b --data data/gsm8k --n 200 --batch-size 16

Scoring (DESIGN.md section 4):
- generation (GSM8K-like): batched greedy generation (left-padded); "strict" reads "#### N" / "The answer is N",
  "flexible" the last number. The output is cut at the first "Question:" or blank line (the model moving on).
- choice (ARC-like): acc = the option whose text (after the prompt without the option list) has the highest total
  log-likelihood; acc_norm = the same divided by the option's length in characters (of the scored text " option",
  as lm-eval-harness does); acc_gen = the label the model writes after the prompt with the option list.

Per-layer readout: the hidden state after layer i through a norm and the LM head, used as the model's logits
(for generation, every generated token comes from that layer). The norm is MoD's trained norm for the layers of a
MoD ensemble (--mod-k), the model's final norm otherwise (the plain logit lens). With MoD the report also has the
routing weights on the test answers (mean per layer, sparsity, how often each layer weighs most) and a plot; with
MoLEx the (layer x chosen expert) fractions of the test prompts, as numbers and as a heat map. The overlap of the problems each layer
solves is counted by exact subset (like a Venn diagram) for up to 5 layers, and always as a pairwise matrix with
"solved by any / by all / only by this layer".

Writes eval-<data>-<split>.json (scores, overlap, every output) and .md (tables) into the run folder (or --out),
and .png plots when matplotlib is installed.
"""
import argparse
import json
from collections import Counter
from contextlib import contextmanager, nullcontext
from itertools import combinations
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import BUILTIN_TASKS, load_examples, task_kind
from data.format import (IGNORE_INDEX, choice_continuations, encode_example, encode_prompt, extract_answer,
                         extract_choice, gold_answer, prompt_text, same_number, split_encode, target_text)
from mod import routing_stats, routing_weights
from molex import prompt_end_from_targets, save_stats
from tokenizer import load_tokenizer
from train import (BUILTIN_BASE, BUILTIN_DIFFICULTY, REPO, HelpFormatter, build_model, checkpoint_path,
                   choose_threads, collate, load_checkpoint, load_trainable, resolve_tokenizer)

GENERATION_METRICS = ("strict", "flexible")
CHOICE_METRICS = ("acc", "acc_norm", "acc_gen")
EXACT_OVERLAP_MAX = 5  # count every subset of layers (2^k regions) up to this many layers
STOPS = {"generation": ("Question:", "\n\n"), "choice": ("\n",)}


def get_parser():
    p = argparse.ArgumentParser(description="Evaluate a base model or a tuned run, per layer.",
                                formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default=None, help="a run folder of train.py (or its ckpt.pt); default: no tuning")
    p.add_argument("--init", default=None,
                   help="base checkpoint folder: the model to evaluate without --ckpt (default: the built-in base); "
                        "with --ckpt, where its base now is (default: the path saved in the run)")
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.model; default: as train.py finds it")
    p.add_argument("--data", default=None,
                   help=f"built-in task ({', '.join(BUILTIN_TASKS)}), prepared folder or .jsonl file; default: the "
                        "run's training data, else arith")
    p.add_argument("--difficulty", type=int, default=None,
                   help=f"built-in task difficulty; default: the run's, else {BUILTIN_DIFFICULTY}")
    p.add_argument("--split", default="test", help="which split to score")
    p.add_argument("--n", type=int, default=None, help="score this many problems (default: the whole split)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch / rows per scoring batch")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation length; default: twice the longest reference answer (+8), 8 for choice labels")
    p.add_argument("--layers", default="4",
                   help="per-layer table over the last N layers ('all' for every layer, 0 for none)")
    p.add_argument("--overlap-metric", default=None,
                   help="metric whose solved sets the overlap counts; default strict (generation) or acc (choice)")
    p.add_argument("--baseline", action="store_true",
                   help="with --ckpt: also score the untuned base's output (one more row)")
    p.add_argument("--out", default=None,
                   help="folder for the reports; default: the run folder, else runs/eval-<model name>")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto = bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = auto (train.choose_threads)")
    return p


# ----------------------------------------------------------------------------------------------------------
# Scoring: pure functions on outputs and log-likelihoods

def cut_at_stops(text, stops):
    """The text up to the first stop string (the model has moved on to something else)."""
    for s in stops:
        if s in text:
            text = text[:text.index(s)]
    return text


def score_generation(output, record):
    """{'strict': bool, 'flexible': bool} for one generated answer to a GSM8K-like record."""
    gold = gold_answer(record)
    return {mode: same_number(extract_answer(output, mode), gold) for mode in GENERATION_METRICS}


def score_choice_lls(option_lls, option_texts, gold_index):
    """{'acc': bool, 'acc_norm': bool} from each option's total log-likelihood and its scored text:
    acc picks the highest total, acc_norm the highest total per character (first option on ties)."""
    if len(option_lls) != len(option_texts):
        raise ValueError(f"{len(option_lls)} log-likelihoods for {len(option_texts)} options")
    best = max(range(len(option_lls)), key=lambda i: option_lls[i])
    norm = [ll / len(text) for ll, text in zip(option_lls, option_texts)]
    best_norm = max(range(len(norm)), key=lambda i: norm[i])
    return {"acc": best == gold_index, "acc_norm": best_norm == gold_index}


def overlap(solved, n_problems, exact_max=EXACT_OVERLAP_MAX):
    """How the sets of solved problem indices of several sources (e.g. layers) overlap.

    solved: {name: set of indices}. Returns solved counts, "any" / "all" / "none", "only" (solved by this source
    and no other), the pairwise matrix |A & B| (diagonal = |A|) and, for at most exact_max sources, "exact": the
    number of problems solved by exactly each subset of sources (every problem lands in one region)."""
    names = list(solved)
    sets = [set(solved[k]) for k in names]
    union = set().union(*sets) if sets else set()
    inter = set.intersection(*sets) if sets else set()
    out = {"sources": names, "n": n_problems, "solved": {k: len(s) for k, s in zip(names, sets)},
           "any": len(union), "all": len(inter), "none": n_problems - len(union),
           "only": {k: len(s - set().union(*(t for j, t in enumerate(sets) if j != i))) for i, (k, s) in
                    enumerate(zip(names, sets))},
           "pairwise": [[len(a & b) for b in sets] for a in sets]}
    if len(names) <= exact_max:
        region = Counter(frozenset(k for k, s in zip(names, sets) if i in s) for i in range(n_problems))
        out["exact"] = [{"sources": [k for k in names if k in subset], "count": region.get(frozenset(subset), 0)}
                        for r in range(len(names), -1, -1) for subset in combinations(names, r)]
    return out


# ----------------------------------------------------------------------------------------------------------
# Reading logits from one layer (logit lens), without a second generate loop

def mod_index(model, layer):
    """Index of layer `layer` (0-based) in the MoD ensemble of the last k layers, or None (no MoD, or earlier)."""
    if model.mod is None:
        return None
    i = layer - (model.config.n_layers - model.mod.k)
    return i if i >= 0 else None


def layer_head(model, layer, h):
    """Logits of the hidden state after layer `layer`: through MoD's trained norm for that layer if it has one
    (the final layer: the model's own norm), else the plain logit lens (the final norm)."""
    i = mod_index(model, layer)
    if i is not None:
        return model.mod.head(model, i, h)
    return model.lm_head(model.norm(h).to(model.lm_head.weight.dtype)).float()


class LogitLens(nn.Module):
    """Stands in for model.mod while set: the logits come from the hidden state after layer `layer` through the
    model's final norm and LM head (model.forward passes every layer's output to model.mod). Used for the layers
    that have no MoD norm."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, model, hidden, targets=None, cache=None, n_pad=None):
        h = model.norm(hidden[self.layer])
        logits = model.lm_head(h.to(model.lm_head.weight.dtype)).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-100)
        return logits, loss


@contextmanager
def readout(model, layer):
    """Within the block, the model's logits are layer `layer`'s (None: the model's own output). A layer of the
    MoD ensemble is read through the ensemble itself (only_layer), so generation uses its trained norm."""
    if layer is None:
        yield model
        return
    i = mod_index(model, layer)
    saved = model.mod
    if i is not None:
        model.mod.only_layer = i
    else:
        model.mod = LogitLens(layer)
    try:
        yield model
    finally:
        model.mod = saved
        if saved is not None:
            saved.only_layer = None


# ----------------------------------------------------------------------------------------------------------
# Running the model

def fit_prompt(ids, room):
    """Keep bos and the last room - 1 prompt tokens when a prompt is longer than room."""
    return ids if len(ids) <= room else ids[:1] + ids[len(ids) - room + 1:]


def generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, stops, desc, autocast=nullcontext()):
    """Greedy continuations of token-id prompts, in batches of similar length; decoded and cut at the stops."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less left padding per batch
    texts = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, dynamic_ncols=True):
        rows = order[start:start + batch_size]
        with autocast:
            new = model.generate([prompts[i] for i in rows], max_new_tokens, eos_id=tokenizer.eos_id)
        for i, ids in zip(rows, new):
            texts[i] = cut_at_stops(tokenizer.decode(ids), stops)
    return texts


@torch.no_grad()
def option_logliks(model, tokenizer, records, layers, batch_size, autocast=nullcontext()):
    """Total log-likelihood of each option's text after the prompt without the option list, for the model's
    output and for each readout layer: {source: [[ll of option j] for each record]} (one forward per batch)."""
    device = model.embed.weight.device
    rows = []  # (record index, ids, index in ids of the first option token)
    for r, rec in enumerate(records):
        prompt = prompt_text(rec, with_options=False)
        for cont in choice_continuations(rec, by="text"):
            p_ids, c_ids = split_encode(tokenizer, prompt, cont)
            ids = fit_prompt([tokenizer.bos_id] + p_ids, model.config.max_seq_len - len(c_ids)) + c_ids
            rows.append((r, ids, len(ids) - len(c_ids)))
    sources = ["output"] + [f"layer_{i + 1}" for i in layers]
    lls = {s: [[] for _ in records] for s in sources}
    for start in tqdm(range(0, len(rows), batch_size), desc="option log-likelihoods", leave=False, dynamic_ncols=True):
        batch = rows[start:start + batch_size]
        T = max(len(ids) for _, ids, _ in batch)
        idx = torch.tensor([ids + [0] * (T - len(ids)) for _, ids, _ in batch], device=device)
        prompt_end = torch.tensor([first for _, _, first in batch], device=device)  # MoLEx: route on the prompt
        with autocast:
            logits, hidden = model(idx, return_hidden=True, prompt_end=prompt_end)
        for b, (r, ids, first) in enumerate(batch):
            pos = torch.arange(first - 1, len(ids) - 1, device=device)  # positions that predict the option
            tgt = idx[b, first:len(ids)]
            for s in sources:
                if s == "output":
                    row_logits = logits[b, pos]
                else:
                    layer = int(s.split("_")[1]) - 1
                    row_logits = layer_head(model, layer, hidden[layer][b, pos])
                lp = torch.log_softmax(row_logits.float(), -1).gather(-1, tgt[:, None]).sum()
                lls[s][r].append(float(lp))
    return lls


@torch.no_grad()
def mod_routing(model, tokenizer, records, batch_size, autocast=nullcontext()):
    """MoD's routing weights on the gold answers (teacher forcing: prompt + reference answer, the weights at the
    positions that predict answer tokens): mean weight, sparsity and top-1 share of each late layer."""
    device = model.embed.weight.device
    examples = [encode_example(tokenizer, r, max_len=model.config.max_seq_len) for r in records]
    weights, masks = [], []
    for start in range(0, len(examples), batch_size):
        idx, labels = collate(examples[start:start + batch_size], 0, device)
        with autocast:  # right padding: the causal router never sees it at the scored positions
            _, hidden = model(idx, return_hidden=True, prompt_end=prompt_end_from_targets(labels))
        weights.append(routing_weights(model, hidden).flatten(0, 1).float().cpu())
        masks.append((labels != IGNORE_INDEX).flatten().cpu())
    stats = routing_stats(torch.cat(weights), torch.cat(masks))
    n = model.config.n_layers
    stats["layers"] = list(range(n - model.mod.k + 1, n + 1))  # 1-based, earliest first, like the weights
    return stats


def evaluate(model, tokenizer, records, layers, batch_size=64, max_new_tokens=None, autocast=nullcontext(),
             baseline=None):
    """Score `records` with the model's output and with each layer in `layers` (0-based) read out alone.
    Returns {"kind", "metrics": {source: {metric: accuracy %}}, "solved": {source: {metric: [indices]}},
    "outputs": {source: [text]}}. baseline: an untuned model whose output is scored as source "base"."""
    kind = task_kind(records[0])
    if any(task_kind(r) != kind for r in records):
        raise ValueError("mixed generation and choice records in one evaluation")
    model.eval()
    sources = {"output": None, **{f"layer_{i + 1}": i for i in layers}}
    correct = {s: [] for s in list(sources) + (["base"] if baseline is not None else [])}  # per problem dicts
    outputs = {}
    if kind == "generation":
        prompts = [encode_prompt(tokenizer, r) for r in records]
        if max_new_tokens is None:
            longest = max(len(tokenizer.encode(target_text(r))) for r in records)
            max_new_tokens = min(2 * longest + 8, 512)
    else:
        prompts = [encode_prompt(tokenizer, r, with_options=True) for r in records]
        max_new_tokens = max_new_tokens or 8
    room = model.config.max_seq_len - max_new_tokens
    if room < 2:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                         f"({model.config.max_seq_len})")
    prompts = [fit_prompt(p, room) for p in prompts]
    runs = [(s, model, layer) for s, layer in sources.items()]
    if baseline is not None:
        runs.append(("base", baseline, None))
    for s, m, layer in runs:
        if m.molex is not None:  # routing is the prompt's whatever the readout: count each prompt once
            m.molex.collect_stats = s == "output"
        with readout(m, layer):
            outputs[s] = generate_texts(m, tokenizer, prompts, max_new_tokens, batch_size, STOPS[kind],
                                        f"generate ({s})", autocast)
        for rec, out in zip(records, outputs[s]):
            if kind == "generation":
                correct[s].append(score_generation(out, rec))
            else:
                correct[s].append({"acc_gen": extract_choice(out, rec["labels"]) == rec["gold"]})
    if model.molex is not None:
        model.molex.collect_stats = False
    if kind == "choice":
        lls = option_logliks(model, tokenizer, records, layers, batch_size, autocast)
        if baseline is not None:
            lls["base"] = option_logliks(baseline, tokenizer, records, [], batch_size, autocast)["output"]
        for s, per_record in lls.items():
            for r, (rec, ll) in enumerate(zip(records, per_record)):
                texts = choice_continuations(rec, by="text")
                correct[s][r].update(score_choice_lls(ll, texts, rec["labels"].index(rec["gold"])))
    metric_names = GENERATION_METRICS if kind == "generation" else CHOICE_METRICS
    metrics = {s: {m: 100.0 * sum(c[m] for c in cs) / len(cs) for m in metric_names} for s, cs in correct.items()}
    solved = {s: {m: [i for i, c in enumerate(cs) if c[m]] for m in metric_names} for s, cs in correct.items()}
    res = {"kind": kind, "max_new_tokens": max_new_tokens, "metrics": metrics, "solved": solved, "outputs": outputs,
           "mod_k": model.mod.k if model.mod is not None else 0}
    if model.mod is not None:
        res["mod_routing"] = mod_routing(model, tokenizer, records, batch_size, autocast)
    if model.molex is not None:
        res["molex"] = {"rows": "layer t (1-based: row 0 = layer 1)", "columns": "expert layer j",
                        "mixed_layers": [t + 1 for t in model.molex.mixed], "counts": model.molex.stats.tolist(),
                        "fractions": [[round(v, 4) for v in row] for row in model.molex.stat_fractions().tolist()]}
    return res


# ----------------------------------------------------------------------------------------------------------
# Reports

def source_label(s, n_layers, mod_k=0):
    if s == "output":
        return "model output" + (f" (MoD ensemble of {mod_k})" if mod_k else "")
    if s == "base":
        return "untuned base output"
    layer = int(s.split("_")[1])
    how = "MoD norm" if layer > n_layers - mod_k and layer < n_layers else "logit lens"
    return f"layer {layer}/{n_layers}" + ("" if layer == n_layers else f" ({how})")


def markdown_report(res, title, n_layers):
    metric_names = list(next(iter(res["metrics"].values())))
    lines = [f"# {title}", "", "| readout | " + " | ".join(metric_names) + " |",
             "|---|" + "---:|" * len(metric_names)]
    for s, m in res["metrics"].items():
        lines.append(f"| {source_label(s, n_layers, res.get('mod_k', 0))} | " + " | ".join(f"{m[k]:.1f}" for k in metric_names) + " |")
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


def write_plots(res, stem, n_layers):
    """Per-layer accuracy bars and the overlap heat map, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    files = []
    sources = list(res["metrics"])
    metric_names = list(res["metrics"][sources[0]])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(sources) * len(metric_names) / 2, 3.5))
    width = 0.8 / len(metric_names)
    for j, m in enumerate(metric_names):
        ax.bar([i + j * width for i in range(len(sources))], [res["metrics"][s][m] for s in sources], width, label=m)
    ax.set_xticks([i + width * (len(metric_names) - 1) / 2 for i in range(len(sources))])
    ax.set_xticklabels([source_label(s, n_layers, res.get("mod_k", 0)).split(" (")[0] for s in sources], rotation=30,
                       ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{stem}-layers.png", dpi=120)
    files.append(f"{stem}-layers.png")
    plt.close(fig)
    ov = res.get("overlap")
    if ov and len(ov["sources"]) > 1:
        names = [s.replace("layer_", "L") for s in ov["sources"]]
        fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(names), 1.2 + 0.6 * len(names)))
        im = ax.imshow(ov["pairwise"], cmap="viridis")
        for i, row in enumerate(ov["pairwise"]):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", color="w" if v < max(map(max, ov["pairwise"])) / 2
                        else "k", fontsize=8)
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), names)
        ax.set_title(f"problems solved by both ({res['overlap_metric']})")
        fig.colorbar(im)
        fig.tight_layout()
        fig.savefig(f"{stem}-overlap.png", dpi=120)
        files.append(f"{stem}-overlap.png")
        plt.close(fig)
    rt = res.get("mod_routing")
    if rt:
        fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(rt["layers"]), 3.2))
        x = range(len(rt["layers"]))
        ax.bar([i - 0.2 for i in x], rt["mean_weight"], 0.4, label="mean weight")
        ax.bar([i + 0.2 for i in x], rt["sparsity"], 0.4, label="sparsity (share of tokens < 0.001)")
        ax.set_xticks(list(x), [f"L{layer}" for layer in rt["layers"]])
        ax.set_ylim(0, 1)
        ax.set_title("MoD routing weights on the reference answers")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{stem}-routing.png", dpi=120)
        files.append(f"{stem}-routing.png")
        plt.close(fig)
    return files


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.n is not None and args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.layers != "all" and not args.layers.isdigit():
        parser.error(f"--layers must be a number of last layers or 'all', got {args.layers!r}")
    if args.init is not None and not Path(args.init).is_dir():
        parser.error(f"--init {args.init}: no such checkpoint folder")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda"
                                             and torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(choose_threads(args.threads))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    # the model: a run's base + its trained parameters, or a base alone
    if args.ckpt is not None:
        path = checkpoint_path(args.ckpt)
        if not path.is_file():
            parser.error(f"--ckpt {args.ckpt}: no checkpoint there (looked for {path})")
        ckpt = load_checkpoint(path)
        saved = dict(ckpt["args"])
        if args.init is not None:
            saved["init"] = args.init
        title_model = f"{path.parent.name} (step {ckpt['step']})"
        out_dir = Path(args.out or path.parent)
    else:
        ckpt = None
        saved = {"init": args.init or "builtin", "pretrain": False, "lora_rank": None, "seed": 0, "data": None,
                 "difficulty": None, "tokenizer": None}
        title_model = "untuned " + (Path(args.init).name if args.init else "built-in base")
        out_dir = Path(args.out or REPO / "runs" / f"eval-{Path(args.init).name if args.init else 'builtin-base'}")
    if not saved["pretrain"] and saved["init"] in (None, "builtin") and not (BUILTIN_BASE / "config.json").is_file():
        raise SystemExit(f"eval.py: error: the built-in base is not built yet ({BUILTIN_BASE}): run python train.py, "
                         f"which builds it first")
    tok_spec = resolve_tokenizer(args.tokenizer or saved.get("tokenizer"), saved["init"], saved["pretrain"])
    try:
        tokenizer = load_tokenizer(tok_spec)
        model = build_model(saved, saved.get("vocab_size") or tokenizer.vocab_size, device, dtype, verbose=False)
        if ckpt is not None:
            load_trainable(model, ckpt["model"], path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"eval.py: error: {e}") from None
    model.eval()
    baseline = None
    if args.baseline and ckpt is not None and not saved["pretrain"]:
        baseline = build_model({**{k: saved[k] for k in ("init", "seed")}, "pretrain": False, "lora_rank": None},
                               None, device, dtype, verbose=False).eval()

    # the problems
    data = args.data or (saved.get("data") if saved.get("data") not in (None, "corpus") else "arith")
    difficulty = None
    if data in BUILTIN_TASKS:
        difficulty = args.difficulty or (saved.get("difficulty") if data == saved.get("data") else None) \
            or BUILTIN_DIFFICULTY
    elif args.difficulty is not None:
        parser.error(f"--difficulty applies to the built-in tasks only, not to --data {data}")
    try:
        records = load_examples(data, args.split, n=args.n, seed=0, difficulty=difficulty)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"eval.py: error: --data {data} --split {args.split}: {e}") from None
    n_layers = model.config.n_layers
    k = n_layers if args.layers == "all" else min(int(args.layers), n_layers)
    layers = list(range(n_layers - k, n_layers))

    name = Path(data).stem if data not in BUILTIN_TASKS else data
    print(f"evaluating {title_model} on {name} {args.split}: {len(records)} problems, layers "
          f"{[i + 1 for i in layers]} read out alone")
    res = evaluate(model, tokenizer, records, layers, args.batch_size, args.max_new_tokens, autocast, baseline)
    metric = args.overlap_metric or ("strict" if res["kind"] == "generation" else "acc")
    if metric not in res["metrics"]["output"]:
        parser.error(f"--overlap-metric {metric!r}: this task has {list(res['metrics']['output'])}")
    layer_sources = [f"layer_{i + 1}" for i in layers]
    res["overlap_metric"] = metric
    res["overlap"] = overlap({s: set(res["solved"][s][metric]) for s in layer_sources}, len(records))

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"eval-{name}-{args.split}"
    title = f"{title_model} on {name} {args.split} ({len(records)} problems)"
    report = {"title": title, "ckpt": str(args.ckpt) if args.ckpt else None, "init": str(saved["init"]),
              "data": data, "difficulty": difficulty, "split": args.split, "n": len(records), **res,
              "problems": [{"question": r["question"], "gold": r["gold"]} for r in records]}
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown_report(res, title, n_layers)
    Path(f"{stem}.md").write_text(md)
    plots = write_plots(res, str(stem), n_layers)
    if model.molex is not None:  # the heat map (its numbers are in the JSON report too)
        plots += [p for p in save_stats(model.molex, f"{stem}-molex") if p.endswith(".png")]
    print(md)
    print(f"wrote {stem}.json, {stem}.md" + "".join(f", {p}" for p in plots))
    return report


if __name__ == "__main__":
    main()
