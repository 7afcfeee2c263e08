"""
How eval.py scores a model on records (docs/design.md#evaluation): the answer checks, the model runs they read, and
the per-layer readout.

- generation: batched greedy generation (left-padded, cut at the stop strings); "strict" / "flexible" answer
  reading, and the share of the reference's lines the output has ("lines").
- choice: each option's total log-likelihood after the prompt; acc / acc_norm as lm-eval-harness 0.4.13 picks.
- answer_scores: teacher-forced cross-entropy and token accuracy of the reference answers.
- readout: the logits of one layer (MoD's trained norm for a layer of the ensemble, else the logit lens), for
  the forward pass and generation alike.
"""
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data.batching import collate
from data.format import (
    IGNORE_INDEX,
    bos,
    choice_continuations,
    encode_example,
    extract_answer,
    gold_answer,
    prompt_text,
    same_number,
    split_encode,
)
from molex import prompt_end_from_targets

GENERATION_METRICS = ("strict", "flexible")
CHOICE_METRICS = ("acc", "acc_norm", "acc_gen")


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
