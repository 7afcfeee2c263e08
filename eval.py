"""
Evaluate a base model or a tuned run on a task: accuracy of the model's output and of each late layer read out
alone (logit lens), plus which layers solve which problems.

    python eval.py --ckpt runs/arith-20250101-120000     # a tuned run (its base + its ckpt.pt), on its task
    python eval.py                                       # the untuned built-in base, on the built-in arith task
    python eval.py --init /path/to/llama-2-7b --data data/gsm8k --n 200 --batch-size 16

Scoring (docs/design.md#evaluation):
- generation (GSM8K-like): batched greedy generation (left-padded); "strict" reads "#### N" / "The answer is N",
  "flexible" the last number. The output is cut at the first "Question:" or blank line (the model moving on).
- choice (ARC-like), as lm-eval-harness 0.4.13 scores: acc = the option whose text (" option" after the prompt
  without the option list) has the highest total log-likelihood; acc_norm = the same divided by the length of the
  option's text in characters (without the space before it); every option's log-likelihood is in the JSON
  report. acc_gen (--acc-gen, on by default for a run tuned on labels) = the label the model writes after the
  prompt with the option list.

Per-layer readout: the hidden state after layer i through a norm and the LM head, used as the model's logits
(for generation, every generated token comes from that layer). The norm is MoD's trained norm for the layers of a
MoD ensemble (--mod-k), the model's final norm otherwise (the plain logit lens). With MoD the report also has the
routing weights on the test answers (mean per layer, sparsity, how often each layer weighs most) and a plot; with
MoLEx the (layer x chosen expert) fractions of the test prompts, as numbers and as a heat map. The overlap of the
problems each layer solves is counted by exact subset (like a Venn diagram) for up to 5 layers, and always as a
pairwise matrix with "solved by any / by all / only by this layer".

Writes eval-<data>[-d<difficulty>]-<split>[-n<N>][-layers<L>][-new<M>].json (scores, overlap, every output) and .md
(tables) into the run folder (or --out), and .png plots when matplotlib is installed: the name carries what makes
one evaluation differ from another (the -n, -layers and -new parts only when those flags are given), so a smaller
evaluation never replaces a larger one. A report of the same name made with other settings (--baseline, --init,
--tokenizer, --overlap-metric, --dtype) is not replaced: pick another --out. --out is checked writable first.
"""
import argparse
import json
import os
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import REPO, build_model, checkpoint_path, load_run
from cli import (
    HelpFormatter,
    UserError,
    add_config_flags,
    add_device_flags,
    add_run_flags,
    config_from,
    pick_device,
    run_main,
    use_bf16,
)
from data import BUILTIN_TASKS, load_examples, task_kind
from data.batching import collate
from data.builtin import DEFAULT_DIFFICULTY
from data.format import (
    IGNORE_INDEX,
    bos,
    choice_continuations,
    encode_example,
    encode_prompt,
    extract_answer,
    extract_choice,
    gold_answer,
    prompt_text,
    same_number,
    split_encode,
    target_text,
)
from errors import bad_flag
from mod import ensemble_coefficients, routing_stats
from molex import prompt_end_from_targets
from quant import QuantConfig
from report import markdown_report, overlap, write_plots
from threads import Threads

GENERATION_METRICS = ("strict", "flexible")
CHOICE_METRICS = ("acc", "acc_norm", "acc_gen")
STOPS = {"generation": ("Question:", "\n\n"), "choice": ("\n",)}


def get_parser():
    p = argparse.ArgumentParser(description="Evaluate a base model or a tuned run, per layer.",
                                formatter_class=HelpFormatter)
    add_run_flags(p, "the model to evaluate")
    p.add_argument("--tokenizer", default=None, help="'byte', a tokenizer.model / tokenizer.json / .gguf; default: "
                                                     "the checkpoint's own, as train.py finds it")
    p.add_argument("--data", default=None,
                   help=f"built-in task ({', '.join(BUILTIN_TASKS)}), prepared folder or .jsonl file; default: the "
                        "run's training data, else arith")
    p.add_argument("--difficulty", type=int, default=None,
                   help=f"built-in task difficulty; default: the run's, else {DEFAULT_DIFFICULTY}")
    p.add_argument("--split", default="test", help="which split to score")
    p.add_argument("--n", type=int, default=None, help="score this many problems (default: the whole split)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch / rows per scoring batch")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation length; default: twice the longest reference answer (+8, at most 512 and at "
                        "most what the context leaves after the longest prompt, but never below half the context), "
                        "8 for choice labels")
    p.add_argument("--layers", default="4",
                   help="per-layer table over the last N layers ('all' for every layer, 0 for none)")
    p.add_argument("--overlap-metric", default=None,
                   help="metric whose solved sets the overlap counts; default strict (generation) or acc (choice)")
    p.add_argument("--acc-gen", action=argparse.BooleanOptionalAction, default=None,
                   help="multiple choice: also generate the label after the prompt with the options (acc_gen); "
                        "default: only for a run tuned on labels (train.py --choice-target label or both)")
    p.add_argument("--baseline", action="store_true",
                   help="with --ckpt: also score the untuned base's output (one more row)")
    p.add_argument("--out", default=None,
                   help="folder for the reports; default: the run folder, else runs/eval-<model name>")
    add_config_flags(p, QuantConfig, "base", "a base alone in 4 or 8 bits (quant.py; a run folder records its own)")
    add_device_flags(p)
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


def line_accuracy(output, record):
    """The share of the reference answer's lines (one per worked step, then "#### N") that the output has at the
    same position, whitespace aside: partial credit, so it varies far less between runs than exact match."""
    want = [line.split() for line in record["answer"].strip().splitlines()]
    got = [line.split() for line in output.strip().splitlines()]
    return sum(g == w for g, w in zip(got, want)) / len(want)


def score_choice_lls(option_lls, option_texts, gold_index):
    """{'acc': bool, 'acc_norm': bool} from each option's total log-likelihood and its text (the record's choice,
    without the space scored before it): acc picks the highest total, acc_norm the highest total per character
    of the text, as lm-eval-harness 0.4.13 (api/task.py: ll / len(choice)); the first option on ties."""
    if len(option_lls) != len(option_texts):
        raise ValueError(f"{len(option_lls)} log-likelihoods for {len(option_texts)} options")
    best = max(range(len(option_lls)), key=lambda i: option_lls[i])
    norm = [ll / len(text) for ll, text in zip(option_lls, option_texts)]
    best_norm = max(range(len(norm)), key=lambda i: norm[i])
    return {"acc": best == gold_index, "acc_norm": best_norm == gold_index}


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

    def forward(self, model, hidden, targets=None, cache=None, n_pad=None, where=None):
        h = model.norm(hidden[self.layer] if where is None else hidden[self.layer][where])
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

def generation_length(longest_answer, longest_prompt, context):
    """The default number of new tokens: twice the longest reference answer + 8, at most 512, and never more than
    the context leaves after the longest prompt, unless that is below half the context (then longer prompts are
    cut to fit, with a note)."""
    return max(1, min(2 * longest_answer + 8, 512, max(context - longest_prompt, context // 2)))


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
            new = model.generate([prompts[i] for i in rows], max_new_tokens, eos_id=tokenizer.end_ids)
        for i, ids in zip(rows, new):
            texts[i] = cut_at_stops(tokenizer.decode(ids), stops)
    return texts


def by_length(n, length, batch_size):
    """Batches of indices 0..n-1 in order of length (similar lengths together: little padding)."""
    order = sorted(range(n), key=length)
    return [order[s:s + batch_size] for s in range(0, n, batch_size)]


@torch.no_grad()
def option_logliks(model, tokenizer, records, layers, batch_size, autocast=nullcontext()):
    """Total log-likelihood of each option's text after the prompt without the option list, for the model's
    output and for each readout layer: {source: [[ll of option j] for each record]} (one forward per batch;
    the LM head runs only at the positions that predict an option token)."""
    device = model.embed.weight.device
    rows = []  # (record index, option index, ids, index in ids of the first option token)
    for r, rec in enumerate(records):
        prompt = prompt_text(rec, with_options=False)
        for j, cont in enumerate(choice_continuations(rec, by="text")):
            p_ids, c_ids = split_encode(tokenizer, prompt, cont)
            ids = fit_prompt(bos(tokenizer) + p_ids, model.config.max_seq_len - len(c_ids)) + c_ids
            rows.append((r, j, ids, len(ids) - len(c_ids)))
    sources = ["output"] + [f"layer_{i + 1}" for i in layers]
    lls = {s: [[None] * len(choice_continuations(rec, by="text")) for rec in records] for s in sources}
    batches = by_length(len(rows), lambda i: len(rows[i][2]), batch_size)
    for batch in tqdm([[rows[i] for i in b] for b in batches], desc="option log-likelihoods", leave=False,
                      dynamic_ncols=True):
        T = max(len(ids) for _, _, ids, _ in batch)
        idx = torch.tensor([ids + [0] * (T - len(ids)) for _, _, ids, _ in batch], device=device)
        # MoLEx routes on the prompt
        prompt_end = torch.tensor([first for _, _, _, first in batch], device=device)
        scored = torch.zeros_like(idx, dtype=torch.bool)  # the positions that predict an option token
        for b, (_, _, ids, first) in enumerate(batch):
            scored[b, first - 1:len(ids) - 1] = True
        tgt = idx.roll(-1, 1)[scored]  # the token each scored position predicts
        owner = torch.arange(len(batch), device=device)[:, None].expand_as(idx)[scored]
        with autocast:
            logits, hidden = model.forward_hidden(idx, prompt_end=prompt_end, where=scored)
        for s in sources:
            if s == "output":
                row_logits = logits
            else:
                layer = int(s.split("_")[1]) - 1
                row_logits = layer_head(model, layer, hidden[layer][scored])
            lp = torch.log_softmax(row_logits.float(), -1).gather(-1, tgt[:, None]).squeeze(1)
            per_row = torch.zeros(len(batch), device=device).index_add_(0, owner, lp)
            for (r, j, _, _), ll in zip(batch, per_row.tolist()):
                lls[s][r][j] = ll
    return lls


@torch.no_grad()
def answer_scores(model, tokenizer, records, batch_size, autocast=nullcontext()):
    """Teacher-forced figures of the reference answers given their prompts (eos included): (cross-entropy in nats
    per answer token, % of answer tokens that are the model's top choice). Smooth beside exact match; the CE also
    rewards confidence (a sharper, equally right model scores lower), the token accuracy does not. The LM head
    runs at the answer positions only."""
    device, total, right, count = model.embed.weight.device, 0.0, 0, 0
    examples = [encode_example(tokenizer, r, max_len=model.config.max_seq_len) for r in records]
    for batch in by_length(len(examples), lambda i: len(examples[i][0]), batch_size):
        idx, labels = collate([examples[i] for i in batch], 0, device)
        scored = labels != IGNORE_INDEX
        with autocast:  # MoLEx: route on the prompt
            logits, _ = model(idx, prompt_end=prompt_end_from_targets(labels), where=scored)
        y = labels[scored]
        total += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        right += int((logits.argmax(-1) == y).sum())
        count += len(y)
    return total / max(count, 1), 100.0 * right / max(count, 1)


@torch.no_grad()
def mod_routing(model, tokenizer, records, batch_size, autocast=nullcontext()):
    """MoD's routing weights on the gold answers (teacher forcing: prompt + reference answer, the weights at the
    positions that predict answer tokens): mean weight, sparsity and top-1 share of each late layer."""
    device = model.embed.weight.device
    examples = [encode_example(tokenizer, r, max_len=model.config.max_seq_len) for r in records]
    weights, masks = [], []
    for batch in by_length(len(examples), lambda i: len(examples[i][0]), batch_size):
        idx, labels = collate([examples[i] for i in batch], 0, device)
        nowhere = torch.zeros_like(idx, dtype=torch.bool)  # the weights need the hidden states, no logits
        with autocast:  # right padding: the causal router never sees it at the scored positions
            _, hidden = model.forward_hidden(idx, prompt_end=prompt_end_from_targets(labels), where=nowhere)
        weights.append(ensemble_coefficients(model, hidden).flatten(0, 1).float().cpu())
        masks.append((labels != IGNORE_INDEX).flatten().cpu())
    stats = routing_stats(torch.cat(weights), torch.cat(masks))
    n = model.config.n_layers
    stats["layers"] = list(range(n - model.mod.k + 1, n + 1))  # 1-based, earliest first, like the weights
    return stats


def evaluate(model, tokenizer, records, layers, batch_size=64, max_new_tokens=None, autocast=nullcontext(),
             baseline=None, acc_gen=True):
    """Score `records` with the model's output and with each layer in `layers` (0-based) read out alone.
    Returns {"kind", "metrics": {source: {metric: accuracy %}}, "solved": {source: {metric: [indices]}},
    "outputs": {source: [text]}}, and for choice records "option_logliks": {source: [[ll of each option]]}.
    baseline: an untuned model whose output is scored as source "base". acc_gen=False: choice records are
    scored by log-likelihood only (no generation)."""
    kind = task_kind(records[0])
    if any(task_kind(r) != kind for r in records):
        raise ValueError("mixed generation and choice records in one evaluation")
    model.eval()
    sources = {"output": None, **{f"layer_{i + 1}": i for i in layers}}
    correct = {s: [] for s in list(sources) + (["base"] if baseline is not None else [])}  # per problem dicts
    outputs = {}
    generate = kind == "generation" or acc_gen
    if kind == "generation":
        prompts = [encode_prompt(tokenizer, r) for r in records]
        if max_new_tokens is None:
            longest = max(len(tokenizer.encode(target_text(r))) for r in records)
            max_new_tokens = generation_length(longest, max(map(len, prompts)), model.config.max_seq_len)
    else:
        prompts = [encode_prompt(tokenizer, r, with_options=True) for r in records]
        max_new_tokens = max_new_tokens or 8
    room = model.config.max_seq_len - max_new_tokens
    if room < 2:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                        f"({model.config.max_seq_len})")
    cut = sum(len(p) > room for p in prompts)
    if cut:
        print(f"note: {cut} of {len(prompts)} prompts are longer than the {room} tokens the context leaves beside "
              f"{max_new_tokens} new tokens: they keep their first token and their last {room - 1}")
    prompts = [fit_prompt(p, room) for p in prompts]
    runs = [(s, model, layer) for s, layer in sources.items()]
    if baseline is not None:
        runs.append(("base", baseline, None))
    for s, m, layer in runs if generate else []:
        if m.molex is not None:  # routing is the prompt's whatever the readout: count each prompt once
            m.molex.collect_stats = s == "output"
        with readout(m, layer):
            outputs[s] = generate_texts(m, tokenizer, prompts, max_new_tokens, batch_size, STOPS[kind],
                                        f"generate ({s})", autocast)
        for rec, out in zip(records, outputs[s]):
            if kind == "generation":
                correct[s].append({**score_generation(out, rec), "lines": line_accuracy(out, rec)})
            else:
                correct[s].append({"acc_gen": extract_choice(out, rec["labels"]) == rec["gold"]})
    if model.molex is not None:
        model.molex.collect_stats = not generate  # without generation, the routing stats come from the scoring
    if kind == "choice":
        if not generate:
            correct = {s: [{} for _ in records] for s in correct}
        lls = option_logliks(model, tokenizer, records, layers, batch_size, autocast)
        if model.molex is not None:
            model.molex.collect_stats = False
        if baseline is not None:
            lls["base"] = option_logliks(baseline, tokenizer, records, [], batch_size, autocast)["output"]
        for s, per_record in lls.items():
            for r, (rec, ll) in enumerate(zip(records, per_record)):
                correct[s][r].update(score_choice_lls(ll, rec["choices"], rec["labels"].index(rec["gold"])))
    metric_names = GENERATION_METRICS if kind == "generation" else CHOICE_METRICS[:3 if acc_gen else 2]
    solved = {s: {m: [i for i, c in enumerate(cs) if c[m]] for m in metric_names} for s, cs in correct.items()}
    if kind == "generation":
        metric_names += ("lines",)
    metrics = {s: {m: 100.0 * sum(c[m] for c in cs) / len(cs) for m in metric_names} for s, cs in correct.items()}
    if kind == "generation":  # lower is better (nats per answer token), for the output and the untuned base
        for s, m in [("output", model)] + ([("base", baseline)] if baseline is not None else []):
            metrics[s]["answer_ce"], metrics[s]["answer_acc"] = answer_scores(m, tokenizer, records, batch_size,
                                                                              autocast)
    res = {"kind": kind, "max_new_tokens": max_new_tokens, "metrics": metrics, "solved": solved, "outputs": outputs,
           "mod_k": model.mod.k if model.mod is not None else 0}
    if kind == "choice":
        res["option_logliks"] = lls
    if model.mod is not None:
        res["mod_routing"] = mod_routing(model, tokenizer, records, batch_size, autocast)
    if model.molex is not None:
        res["molex"] = model.molex.stats_report()
    return res


# ----------------------------------------------------------------------------------------------------------
# Where the report goes

def report_name(name, difficulty, args, n, default_layers):
    """eval-<data>[-d<difficulty>]-<split>[-n<N>][-layers<L>][-new<M>][-gen|-nogen]: what tells two evaluations
    apart."""
    parts = [name] + ([f"d{difficulty}"] if difficulty is not None else []) + [args.split]
    if args.n is not None:
        parts.append(f"n{n}")
    if args.layers != default_layers:
        parts.append(f"layers{args.layers}")
    if args.max_new_tokens is not None:
        parts.append(f"new{args.max_new_tokens}")
    if args.acc_gen is not None:  # --acc-gen / --no-acc-gen: another set of metrics
        parts.append("gen" if args.acc_gen else "nogen")
    return "eval-" + "-".join(parts)


def check_writable(out_dir):
    """--out can be written (tried with a temporary file): UserError otherwise."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot write the reports there ({e.strerror or e})") from None


def check_report_folder(stem, settings):
    """An existing report of this name was made with the same settings: else it is another evaluation, and is not
    replaced (UserError before the work)."""
    old = Path(f"{stem}.json")
    if old.is_file():
        try:
            before = json.loads(old.read_text()).get("settings")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            before = None
        if before != settings:
            differ = [f"--{k.replace('_', '-')} {before.get(k)!r} there, {v!r} now" for k, v in settings.items()
                      if before.get(k) != v] if isinstance(before, dict) else ["unknown settings there"]
            raise UserError(f"{old} is another evaluation ({'; '.join(differ)}): it is not replaced; pick another "
                            f"--out or remove it")


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    message = bad_flag([("n", args.n is not None and args.n < 1, ">= 1"), ("batch_size", args.batch_size < 1, ">= 1"),
                        ("max_new_tokens", args.max_new_tokens is not None and args.max_new_tokens < 1, ">= 1"),
                        ("layers", args.layers != "all" and not args.layers.isdigit(),
                         "a number of last layers or 'all'")], args)
    if message:
        parser.error(message)
    if args.ckpt is not None and not checkpoint_path(args.ckpt).is_file():
        parser.error(f"--ckpt {args.ckpt}: no checkpoint there (looked for {checkpoint_path(args.ckpt)})")
    if args.init is not None and not Path(args.init).exists():
        parser.error(f"--init {args.init}: no such checkpoint folder or .gguf file")
    if args.ckpt is not None:
        run_dir = Path(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt).parent
        out_dir = Path(args.out or run_dir)
    else:
        out_dir = Path(args.out or REPO / "runs" / f"eval-{Path(args.init).stem if args.init else 'builtin-base'}")
    check_writable(out_dir)  # before the model is loaded, not after the evaluation
    device = pick_device(args.device)
    bf16 = use_bf16(args.dtype, device)
    if device.type == "cpu":
        Threads(args.threads)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    # the model: a run's base + its trained parameters, or a base alone
    if args.ckpt is not None and args.base_bits is not None:
        parser.error("--base-bits is for a base alone: a run folder (--ckpt) holds its base as it was trained")
    base = config_from(QuantConfig, vars(args), "base") if args.ckpt is None else None  # a base alone's --base-*
    model, tokenizer, saved, ckpt = load_run(args.ckpt, args.init, args.tokenizer, device,
                                             torch.bfloat16 if bf16 else torch.float32, base=base)
    if ckpt is not None:
        title_model = f"{run_dir.name} (step {ckpt['step']})"
    else:
        title_model = "untuned " + (Path(args.init).name if args.init else "built-in base")
    baseline = None
    if args.baseline and ckpt is not None and not saved["pretrain"]:
        baseline = build_model(saved, device, torch.bfloat16 if bf16 else torch.float32, verbose=False,
                               with_addons=False).eval()

    # the problems
    data = args.data or (saved.get("data") if saved.get("data") not in (None, "corpus") else "arith")
    difficulty = None
    if data in BUILTIN_TASKS:
        difficulty = args.difficulty or (saved.get("difficulty") if data == saved.get("data") else None) \
            or DEFAULT_DIFFICULTY
    elif args.difficulty is not None:
        parser.error(f"--difficulty applies to the built-in tasks only, not to --data {data}")
    try:
        records = load_examples(data, args.split, n=args.n, seed=0, difficulty=difficulty)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--data {data} --split {args.split}: {e}") from None
    n_layers = model.config.n_layers
    k = n_layers if args.layers == "all" else min(int(args.layers), n_layers)
    layers = list(range(n_layers - k, n_layers))

    name = Path(data).stem if data not in BUILTIN_TASKS else data
    stem = out_dir / report_name(name, difficulty, args, len(records), parser.get_default("layers"))
    settings = {k: getattr(args, k) for k in ("baseline", "init", "tokenizer", "overlap_metric", "dtype")}
    check_report_folder(stem, settings)  # before the work, not after it
    print(f"evaluating {title_model} on {name} {args.split}: {len(records)} problems, layers "
          f"{[i + 1 for i in layers]} read out alone")
    acc_gen = args.acc_gen
    if acc_gen is None:  # a run saved before --choice-target was trained on labels
        acc_gen = ckpt is not None and saved.get("choice_target", "label") != "text"
    res = evaluate(model, tokenizer, records, layers, args.batch_size, args.max_new_tokens, autocast, baseline,
                   acc_gen)
    metric = args.overlap_metric or ("strict" if res["kind"] == "generation" else "acc")
    if metric not in res["metrics"]["output"]:
        parser.error(f"--overlap-metric {metric!r}: this task has {list(res['metrics']['output'])}")
    layer_sources = [f"layer_{i + 1}" for i in layers]
    res["overlap_metric"] = metric
    res["overlap"] = overlap({s: set(res["solved"][s][metric]) for s in layer_sources}, len(records))

    title = f"{title_model} on {name} {args.split} ({len(records)} problems)"
    report = {"title": title, "ckpt": str(args.ckpt) if args.ckpt else None, "init": str(saved["init"]),
              "data": data, "difficulty": difficulty, "split": args.split, "n": len(records), "settings": settings,
              **res,
              "problems": [{k: r[k] for k in ("question", "choices", "labels", "gold") if k in r} for r in records]}
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown_report(res, title, n_layers, len(records))
    Path(f"{stem}.md").write_text(md)
    plots = write_plots(res, str(stem), n_layers, f"{title_model} on {name} {args.split}, n = {len(records)}")
    print(md)
    print(f"wrote {stem}.json, {stem}.md" + "".join(f", {p}" for p in plots))
    return report


if __name__ == "__main__":
    run_main(main, "eval.py")
