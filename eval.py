"""
Evaluate a base model or a tuned run on a task: accuracy of the model's output and of each late layer read out
alone (logit lens), plus which layers solve which problems.

    python eval.py --ckpt runs/arith-20250101-120000     # a tuned run (its base + its ckpt.pt), on its task
    python eval.py                                       # the untuned built-in base, on the built-in arith task
    python eval.py --init /path/to/llama-2-7b --data data/gsm8k --n 200 --batch-size 16

Scoring (scoring.py; docs/design.md#evaluation):
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
from contextlib import nullcontext
from pathlib import Path

import torch

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
from data.format import IGNORE_INDEX, encode_example, encode_prompt, extract_choice, target_text
from errors import bad_flag
from mod import ensemble_coefficients, routing_stats
from molex import prompt_end_from_targets
from quant import QuantConfig
from report import markdown_report, overlap, write_plots
from scoring import (
    CHOICE_METRICS,
    GENERATION_METRICS,
    answer_scores,
    by_length,
    fit_prompt,
    generate_texts,
    line_accuracy,
    option_logliks,
    readout,
    score_choice_lls,
    score_generation,
)
from threads import Threads

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
# The evaluation: every source (the output, each layer read out, the untuned base) on every record

def generation_length(longest_answer, longest_prompt, context):
    """The default number of new tokens: twice the longest reference answer + 8, at most 512, and never more than
    the context leaves after the longest prompt, unless that is below half the context (then longer prompts are
    cut to fit, with a note)."""
    return max(1, min(2 * longest_answer + 8, 512, max(context - longest_prompt, context // 2)))


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
