"""Prompt templates, tokenized training examples and answer reading, all in one place.

Templates are short on purpose: the tiny built-in model has a context of a few hundred bytes.

    generation      "Question: {question}\\nAnswer:"                   target " {worked solution}"
    choice, text    "Question: {question}\\nAnswer:"                   target " {gold option's text}"
    choice, label   "Question: {question}\\nA. ...\\nB. ...\\nAnswer:"   target " B"

A choice record is trained by default on its gold option's text after the prompt without the option list: the
exact continuation acc / acc_norm score by log-likelihood (as lm-eval-harness does), so tuning teaches what is
graded. The label target (choice_target="label") teaches what acc_gen reads; "both" trains one example of each.

Scoring follows docs/design.md#evaluation: GSM8K-style answers are compared as numbers (strict: "#### N" or
"The answer is N"; flexible: the last number), multiple choice by the gold label.
"""
import re
from decimal import Decimal, InvalidOperation

from .records import CHOICE, task_kind

IGNORE_INDEX = -100  # what torch's cross_entropy skips by default


# ---------------------------------------------------------------- templates

def prompt_text(record, with_options=True):
    """The text the model is given. with_options=False drops the option list of a choice record
    (the lm-eval style prompt for scoring each option's text by log-likelihood)."""
    text = f"Question: {record['question']}\n"
    if task_kind(record) == CHOICE and with_options:
        text += "".join(f"{label}. {choice}\n" for label, choice in zip(record["labels"], record["choices"]))
    return text + "Answer:"


CHOICE_TARGETS = ("text", "label", "both")


def target_text(record, choice_target="text"):
    """The text the model should write after the prompt: the worked solution; for a choice record the gold
    label (choice_target="label", after the prompt with the options) or the gold option's text ("text", after
    the prompt without them)."""
    if task_kind(record) == CHOICE:
        if choice_target == "text":
            return " " + record["choices"][record["labels"].index(record["gold"])]
        if choice_target != "label":
            raise ValueError(f"choice_target must be 'text' or 'label', got {choice_target!r}")
        return " " + record["gold"]
    return " " + record["answer"]


def choice_continuations(record, by="label"):
    """One continuation per option, for log-likelihood scoring after prompt_text(record, ...):
    by="label" gives [" A", " B", ...] (matches what tuning teaches), by="text" gives [" <option text>", ...]."""
    if by == "label":
        return [" " + label for label in record["labels"]]
    if by == "text":
        return [" " + choice for choice in record["choices"]]
    raise ValueError(f"by must be 'label' or 'text', got {by!r}")


# ---------------------------------------------------------------- tokenized examples

def bos(tokenizer):
    """[bos] when the tokenizer's own settings prepend it (LLaMA-2 does, SmolLM2 does not), else []."""
    return [tokenizer.bos_id] if tokenizer.add_bos else []


def encode_prompt(tokenizer, record, with_options=True):
    """[bos] + prompt ids: what generation starts from, tokenized exactly as in encode_example."""
    return bos(tokenizer) + tokenizer.encode(prompt_text(record, with_options))


def split_encode(tokenizer, prompt, target):
    """(prompt ids, target ids) such that prompt ids + target ids tokenizes prompt + target.

    The target ids are what the full text has after the prompt's ids, so they match what a model sees
    when it continues the prompt (a SentencePiece tokenizer would otherwise add a second dummy-prefix
    space before the target). If the tokenizer merges across the boundary, the target is encoded alone.
    """
    prompt_ids = tokenizer.encode(prompt)
    full_ids = tokenizer.encode(prompt + target)
    if full_ids[:len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return prompt_ids, full_ids[len(prompt_ids):]
    return prompt_ids, tokenizer.encode(target)


def training_examples(tokenizer, record, prompt_loss=False, max_len=None, choice_target="text"):
    """The (ids, labels) examples a record trains: one, or for a choice record with choice_target="both" two
    (its option text after the option-less prompt, its label after the prompt with the options)."""
    if task_kind(record) == CHOICE and choice_target == "both":
        return [encode_example(tokenizer, record, prompt_loss, max_len, t) for t in ("text", "label")]
    if choice_target not in CHOICE_TARGETS:
        raise ValueError(f"choice_target must be one of {CHOICE_TARGETS}, got {choice_target!r}")
    return [encode_example(tokenizer, record, prompt_loss, max_len, choice_target)]


def encode_example(tokenizer, record, prompt_loss=False, max_len=None, choice_target="text"):
    """(ids, labels) for one training example, both of length len(ids). A choice record's target is its gold
    option's text after the prompt without the options (choice_target="text") or its label ("label").

    ids = [bos] + prompt ids + target ids + [eos] (bos only if the tokenizer adds one);
    labels[i] = ids[i + 1] (the token position i must predict), labels[-1] = -100, and the positions whose next
    token is still prompt are -100 unless prompt_loss=True. So the last prompt position is trained to predict the
    first target token.

    Truncation when len(ids) > max_len: bos always stays; the prompt is cut from the LEFT (its end,
    next to the answer, matters most) so that the whole target and eos fit. If even the target does not
    fit, the prompt keeps its last max_len // 2 tokens (or all of them if fewer) and the target is cut
    from the right, losing eos.
    """
    prompt = prompt_text(record, with_options=choice_target != "text")
    prompt_ids, target_ids = split_encode(tokenizer, prompt, target_text(record, choice_target))
    body = target_ids + [tokenizer.eos_id]
    if max_len is not None:
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 (bos and one token), got {max_len}")
        room = max_len - len(bos(tokenizer))
        if len(prompt_ids) + len(body) > room:
            if len(body) <= room - min(len(prompt_ids), 1):
                prompt_ids = prompt_ids[len(prompt_ids) - (room - len(body)):]
            else:
                keep = min(len(prompt_ids), max_len // 2)
                prompt_ids = prompt_ids[len(prompt_ids) - keep:]
                body = body[:room - len(prompt_ids)]
    ids = bos(tokenizer) + prompt_ids + body
    first_target = len(ids) - len(body)  # index in ids of the first target token
    labels = ids[1:] + [IGNORE_INDEX]
    if not prompt_loss:
        for i in range(first_target - 1):
            labels[i] = IGNORE_INDEX
    return ids, labels


# ---------------------------------------------------------------- reading numbers

# A number: optional minus and "$", digits with optional thousands commas ("1,234" but not "1,2"),
# optional decimals. It may not start right after a letter, digit, "_" or "." so that "x2", "mp3",
# "abc123" and the "5" of "2.5" are not read as numbers; letters may follow ("3rd", "60km" -> 3, 60).
_NUMBER = r"(?<![\w.])(?:-\$?|\$-?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)"
_NUMBER_RE = re.compile(_NUMBER)
_STRICT_RES = (
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"the answer is\s*:?\s*(" + _NUMBER + ")", re.IGNORECASE),
)


def clean_number(text):
    """'$1,234.50' -> '1234.50', '-$5' -> '-5', '7.' -> '7'; None stays None."""
    if text is None:
        return None
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    return text or None


def extract_answer(text, mode="strict"):
    """The number a GSM8K-style output gives as its answer, or None.

    strict: the number right after the first "####", else after the first "The answer is" (any case).
    flexible: the last number anywhere in the text.
    Commas, "$" and a trailing period are removed; the digits are otherwise returned as written.
    """
    if text is None:
        return None
    if mode == "strict":
        for pattern in _STRICT_RES:
            match = pattern.search(text)
            if match:
                return clean_number(match.group(1))
        return None
    if mode == "flexible":
        numbers = _NUMBER_RE.findall(text)
        return clean_number(numbers[-1]) if numbers else None
    raise ValueError(f"mode must be 'strict' or 'flexible', got {mode!r}")


def to_decimal(value):
    """A Decimal for a number given as int, float or text ('1,234', '$5', '18.'), None if not a number."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        value = repr(value)
    text = clean_number(str(value))
    if text is None:
        return None
    try:
        number = Decimal(text)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def same_number(a, b):
    """True when a and b are the same number after dropping commas and "$": '18' == '18.0' == '$18.00',
    '1,234' == '1234', '-5' == '-5.0'. Compared exactly (Decimal), not as floats. None or text that is
    not a number never matches anything, not even itself."""
    x, y = to_decimal(a), to_decimal(b)
    return x is not None and y is not None and x == y


def gold_answer(record):
    """The gold number of a generation record: its 'gold' field, else what follows '####' in 'answer'."""
    if record.get("gold"):
        return clean_number(str(record["gold"]))
    answer = record.get("answer", "")
    if "####" not in answer:
        raise ValueError(f"generation record has no 'gold' and no '####' in its answer: {answer[-80:]!r}")
    return clean_number(answer.rsplit("####", 1)[1])


# ---------------------------------------------------------------- reading choice labels

def extract_choice(text, labels):
    """The option label a generated text picks, or None. Tried in this order (first hit wins):
    1. LLM-Adapters' ARC style "answer2" -> the 2nd label;
    2. "The answer is B" / "Answer: (B)" (any case);
    3. a label at the very start: " B", "B.", "(B)", "B)", "B:" or "B" alone (not "A dog", read as a word);
    4. "(B)" anywhere, as in AQuA rationales.
    """
    if text is None:
        return None
    labels = list(labels)
    match = re.search(r"\banswer\s*(\d+)\b", text, re.IGNORECASE)
    if match:
        index = int(match.group(1)) - 1
        return labels[index] if 0 <= index < len(labels) else None
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    patterns = (
        # "answer" in any case, but the label itself case-sensitive: "the answer is a bit" is not "A"
        rf"(?i:\banswer\s*(?:is|:)?)\s*:?\s*\(?({alternatives})\)?(?!\w)",
        rf"^\s*\(?({alternatives})(?:[).:]|\s*$|\s*\n)",
        rf"\(({alternatives})\)",
    )
    for pattern in patterns:
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


def is_correct(record, output, mode="strict"):
    """Score one generated output: numbers for generation records (mode strict or flexible), labels for choice."""
    if task_kind(record) == CHOICE:
        return extract_choice(output, record["labels"]) == record["gold"]
    return same_number(extract_answer(output, mode), gold_answer(record))
