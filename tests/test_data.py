"""Tests for the data package: record format, built-in tasks, preparers, prompts and answer reading.

The benchmark files come from ../shared when it is there (a development checkout or CI); those tests
skip with a reason otherwise.
"""
import json
import re
import urllib.error
from pathlib import Path

import pytest

from data import BUILTIN_TASKS, builtin, load_examples, prepare, task_kind
from data.format import (
    IGNORE_INDEX,
    choice_continuations,
    encode_example,
    encode_prompt,
    extract_answer,
    extract_choice,
    gold_answer,
    is_correct,
    prompt_text,
    same_number,
    target_text,
    training_examples,
)
from data.records import check_record, write_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATASETS = SHARED / "datasets"
needs_shared = pytest.mark.skipif(not DATASETS.is_dir(), reason=f"benchmark files not found at {DATASETS}")


# ---------------------------------------------------------------- a stand-in tokenizer

class ByteTokenizer:
    """bytes + 3, bos = 1, eos = 2: the shape of the project's tokenizers, nothing more."""
    bos_id, eos_id, add_bos = 1, 2, True

    def encode(self, text, bos=False, eos=False):
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


class MergingTokenizer(ByteTokenizer):
    """Merges ": " into one token (id 300), so the prompt "...Answer:" and target " 5" merge at the boundary."""

    def encode(self, text, bos=False, eos=False):
        ids = []
        for b in text.encode("utf-8"):
            if ids and ids[-1] == ord(":") + 3 and b == ord(" "):
                ids[-1] = 300
            else:
                ids.append(b + 3)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])


GEN = {"question": "Tom has 3 apples. He buys 4 more. How many apples does Tom have?",
       "answer": "Tom starts with 3 apples.\n3 + 4 = 7\n#### 7", "gold": "7"}
MC = {"question": "Which is largest?", "choices": ["2", "9", "4"], "labels": ["A", "B", "C"], "gold": "B"}


# ---------------------------------------------------------------- answer extraction: GSM8K gold answers

@needs_shared
def test_strict_and_flexible_read_every_gsm8k_test_answer():
    lines = (DATASETS / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1319
    with_commas = 0
    for line in lines:
        raw = json.loads(line)
        written = raw["answer"].split("####")[-1].strip()
        expected = written.replace(",", "")
        with_commas += "," in written
        assert extract_answer(raw["answer"], "strict") == expected, raw["answer"]
        assert extract_answer(raw["answer"], "flexible") == expected, raw["answer"]
        assert same_number(extract_answer(raw["answer"]), written)
    assert with_commas > 0  # the "#### 1,234" case really is exercised


# ---------------------------------------------------------------- answer extraction: hand-written outputs

@pytest.mark.parametrize("text, strict, flexible", [
    ("#### 1,234", "1234", "1234"),
    ("She pays 2 * 9 = 18 dollars.\n#### 18", "18", "18"),
    ("#### $18.00", "18.00", "18.00"),
    ("####42", "42", "42"),
    ("#### -3", "-3", "-3"),
    ("The answer is 5.", "5", "5"),
    ("the answer is: 42", "42", "42"),
    ("The answer is $1,234.50.", "1234.50", "1234.50"),
    ("So 5 apples.\n#### 5\n#### 6", "5", "6"),  # strict takes the first "####", flexible the last number
    ("#### 7 apples, then 9 more", "7", "9"),
    ("#### 7\nThe answer is 8", "7", "8"),  # "####" wins over "The answer is"
    ("I think it is 12.", None, "12"),  # trailing period is not a decimal point
    ("It is -7 degrees today", None, "-7"),
    ("He owes -$5 now", None, "-5"),
    ("It costs $3.75 each", None, "3.75"),
    ("10-5=5", None, "5"),  # a minus between numbers is an operator
    ("Total: 1,234,567 items", None, "1234567"),
    ("1,2,3", None, "3"),  # commas that are not thousands groups separate numbers
    ("no number at all", None, None),
    ("####", None, None),
    ("#### five, or 7", None, "7"),
    ("", None, None),
    ("x2 and mp3 and abc123", None, None),  # digits inside words are not numbers
    ("He came 3rd", None, "3"),  # ...but a unit or suffix after a number is fine
    ("He ran 60km in 2.5 hours", None, "2.5"),
    ("The answer is 0", "0", "0"),
])
def test_extract_answer_tricky_outputs(text, strict, flexible):
    assert extract_answer(text, "strict") == strict
    assert extract_answer(text, "flexible") == flexible


def test_extract_answer_none_and_bad_mode():
    assert extract_answer(None) is None
    with pytest.raises(ValueError, match="mode"):
        extract_answer("#### 5", mode="loose")


@pytest.mark.parametrize("a, b, equal", [
    ("18", "18.0", True), ("18", "18.00", True), ("$18", "18", True), ("1,234", "1234", True),
    ("-5", "-5.0", True), ("0.5", ".5", True), ("18.", "18", True), (18, "18.0", True), (0.1, "0.1", True),
    ("18", "-18", False), ("1.5", "15", False), ("18", "81", False),
    (None, None, False), (None, "0", False), ("abc", "abc", False), ("", "", False), ("nan", "nan", False),
])
def test_same_number(a, b, equal):
    assert same_number(a, b) is equal
    assert same_number(b, a) is equal


def test_gold_answer_reads_gold_field_or_hashes():
    assert gold_answer({"question": "q", "answer": "... #### 1,000", "gold": "1000"}) == "1000"
    assert gold_answer({"question": "q", "answer": "1 + 1 = 2\n#### 1,000"}) == "1000"
    with pytest.raises(ValueError, match="####"):
        gold_answer({"question": "q", "answer": "no marker"})


@pytest.mark.parametrize("text, label", [
    (" B", "B"), ("B", "B"), ("B.", "B"), (" B.\nQuestion: next", "B"), ("(B) 9", "B"), ("B) 9", "B"),
    ("The answer is B", "B"), ("the answer is (C).", "C"), ("Answer: D", "D"),
    ("the correct answer is answer2", "B"), ("answer3", "C"), ("answer9", None),
    ("Rationale: 12 + 6 = 18. The answer is (A).", "A"), ("I pick (C) because it is big", "C"),
    ("A dog runs", None),  # an article, not a label
    ("the answer is a bit unclear", None),  # lower-case "a" is not label A
    ("b", None), (" E", None), ("", None), (None, None),
])
def test_extract_choice(text, label):
    assert extract_choice(text, ["A", "B", "C", "D"]) == label


def test_is_correct_both_kinds():
    assert is_correct(GEN, " Tom starts with 3 apples.\n3 + 4 = 7\n#### 7")
    assert not is_correct(GEN, " 3 + 4 = 7 so 8")
    assert is_correct(GEN, " 3 + 4 = 8 so 7", mode="flexible")
    assert is_correct(MC, " B") and not is_correct(MC, " A") and not is_correct(MC, "???")


# ---------------------------------------------------------------- preparers on the real files

def read_out(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@needs_shared
@pytest.mark.parametrize("name, counts", [
    ("gsm8k", {"train": 7473, "test": 1319}),
    ("arc-challenge", {"train": 1119, "test": 1172}),
    ("arc-easy", {"train": 2251, "test": 2376}),
    ("aqua", {"test": 254}),
])
def test_prepare_reproduces_documented_counts(tmp_path, name, counts):
    assert prepare.prepare(name, DATASETS / name, tmp_path) == counts
    for split, count in counts.items():
        records = read_out(tmp_path / f"{split}.jsonl")
        assert len(records) == count
        for record in records:
            check_record(record)
        # the loader reads what the preparer writes
        assert load_examples(str(tmp_path), split) == records


@needs_shared
def test_prepared_gsm8k_records(tmp_path):
    prepare.prepare("gsm8k", DATASETS / "gsm8k" / "test.jsonl", tmp_path)
    records = read_out(tmp_path / "test.jsonl")
    raw = [json.loads(line) for line in (DATASETS / "gsm8k" / "test.jsonl").read_text().splitlines()]
    for record, original in zip(records, raw):
        assert task_kind(record) == "generation"
        assert record["question"] == original["question"].strip()
        assert record["answer"].splitlines()[-1] == "#### " + original["answer"].split("####")[-1].strip()
        assert record["gold"] == original["answer"].split("####")[-1].strip().replace(",", "")
        assert "<<" not in record["answer"] and ">>" not in record["answer"]
        assert extract_answer(record["answer"]) == record["gold"] == gold_answer(record)
    assert records[0]["answer"].startswith("Janet sells 16 - 3 - 4 = 9 duck eggs a day.")
    prepare.prepare("gsm8k", DATASETS / "gsm8k" / "test.jsonl", tmp_path / "keep", keep_calculator=True)
    assert "<<16-3-4=9>>" in read_out(tmp_path / "keep" / "test.jsonl")[0]["answer"]


@needs_shared
@pytest.mark.parametrize("name", ["arc-challenge", "arc-easy"])
def test_prepared_arc_records(tmp_path, name):
    prepare.prepare(name, DATASETS / name, tmp_path)
    for split in ("train", "test"):
        raw = json.loads((DATASETS / name / f"{split}.json").read_text(encoding="utf-8"))
        records = read_out(tmp_path / f"{split}.jsonl")
        sizes = set()
        for record, original in zip(records, raw):
            assert record["labels"] == list("ABCDE"[:len(record["choices"])])
            assert record["gold"] in record["labels"]
            assert all(c.strip() == c and c for c in record["choices"])
            assert not any(re.search(r"Answer\d:", c) for c in record["choices"])
            assert "Please choose" not in record["question"] and "Answer format" not in record["question"]
            # the gold letter points at the option the raw file calls answerN
            n = int(original["answer"][len("answer"):])
            assert record["labels"].index(record["gold"]) == n - 1
            assert f"Answer{n}: {record['choices'][n - 1]}" in original["instruction"]
            sizes.add(len(record["choices"]))
        assert 4 in sizes and sizes <= {3, 4, 5}
    first = read_out(tmp_path / "train.jsonl")[0]
    if name == "arc-challenge":
        assert first["choices"][0] == "dry palms" and first["gold"] == "A"


@needs_shared
def test_prepared_aqua_uses_answer_field_not_rationale(tmp_path):
    prepare.prepare("aqua", DATASETS / "aqua", tmp_path)
    records = read_out(tmp_path / "test.jsonl")
    raw = json.loads((DATASETS / "aqua" / "test.json").read_text(encoding="utf-8"))
    for record, original in zip(records, raw):
        assert record["labels"] == list("ABCDE") and len(record["choices"]) == 5
        assert record["gold"] == original["answer"]
        assert "Answer Choices" not in record["question"]
    # the first problem's rationale says (D), its answer field says A
    assert "The answer is (D)" in raw[0]["output"] and records[0]["gold"] == "A"
    assert records[0]["choices"] == ["23.65", "1000", "35.62", "2.65", "1023.65"]


def test_aqua_options_with_parentheses_inside():
    raw = {"instruction": "M men buy a gift. Answer Choices: "
                          "(A) D/ (M-3)  (B) MD/3 (C) M/ (D-3)  (D) 3D/ (M2-3M)  (E) None",
           "input": "", "output": "The answer is (A).", "answer": "D"}
    record = prepare.aqua_record(raw)
    assert record["choices"] == ["D/ (M-3)", "MD/3", "M/ (D-3)", "3D/ (M2-3M)", "None"]
    assert record["gold"] == "D" and record["question"] == "M men buy a gift."


def test_arc_record_with_three_options():
    raw = {"instruction": "Please choose the correct answer to the question: Ice is\n\nAnswer1: hot Answer2: cold "
                          "Answer3: loud\n\nAnswer format: answer1/answer2/answer3",
           "input": "", "output": "the correct answer is answer2", "answer": "answer2"}
    assert prepare.arc_record(raw) == {"question": "Ice is", "choices": ["hot", "cold", "loud"],
                                       "labels": ["A", "B", "C"], "gold": "B"}
    with pytest.raises(ValueError, match="answer4"):
        prepare.arc_record(dict(raw, answer="answer4"))


def test_prepare_bad_inputs(tmp_path):
    bad = tmp_path / "test.json"
    bad.write_text(json.dumps([{"instruction": "Q? Answer Choices: (A) 1 (B) 2", "answer": "C"}]))
    with pytest.raises(ValueError, match="record 0"):
        prepare.prepare("aqua", bad, tmp_path / "out")
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        prepare.prepare("aqua", bad, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare.prepare("aqua", tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown data set"):
        prepare.prepare("mmlu", tmp_path, tmp_path / "out")
    odd = tmp_path / "questions.json"
    odd.write_text("[]")
    with pytest.raises(ValueError, match="split"):
        prepare.prepare("aqua", odd, tmp_path / "out")


def test_prepare_offline_says_to_pass_src(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(prepare.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="--src"):
        prepare.prepare("gsm8k", None, tmp_path)
    with pytest.raises(SystemExit, match="--src"):
        prepare.main(["aqua", "--out", str(tmp_path)])


# ---------------------------------------------------------------- built-in tasks

def test_builtin_splits_are_deterministic():
    for task in BUILTIN_TASKS:
        a = builtin.make_split(task, "train", 200, seed=3)
        assert a == builtin.make_split(task, "train", 200, seed=3)
        assert a[:50] == builtin.make_split(task, "train", 50, seed=3)  # the first n do not depend on n
        assert a != builtin.make_split(task, "train", 200, seed=4)
        assert len({r["question"] for r in a}) == 200


def arith_skeleton(record):
    return tuple(line for line in record["answer"].splitlines() if "=" in line)


def test_builtin_train_and_test_are_disjoint():
    for task in BUILTIN_TASKS:
        for difficulty in builtin.LEVELS:
            train = builtin.make_split(task, "train", 600, seed=0, difficulty=difficulty)
            test = builtin.make_split(task, "test", 150, seed=1, difficulty=difficulty)
            assert not {r["question"] for r in train} & {r["question"] for r in test}
            if task == "arith":  # not even the arithmetic is shared, only names and objects
                assert not {arith_skeleton(r) for r in train} & {arith_skeleton(r) for r in test}


# A small interpreter for the built-in questions, written from the texts, not from the generator.
ADD, SUB = r"(?:buys|finds|gets) (\d+)", r"(?:gives|loses|sells) (\d+)"


def solve(question):
    amounts, current = {}, None
    for sentence in re.split(r"(?<=[.?]) ", question):
        if sentence.startswith("How many more"):
            first, second = re.search(r"does (\w+) have than (\w+)\?", sentence).groups()
            return amounts[first] - amounts[second]
        if sentence.startswith("How many"):
            return amounts[re.search(r"does (\w+) have\?", sentence).group(1)]
        match = re.match(r"(\w+) has (\d+) ", sentence)
        if match:
            current = match.group(1)
            amounts[current] = int(match.group(2))
        for add, sub, mul in re.findall(ADD + "|" + SUB + r"|(doubles|triples)", sentence):
            if add:
                amounts[current] += int(add)
            elif sub:
                amounts[current] -= int(sub)
            else:
                amounts[current] *= 2 if mul == "doubles" else 3
    raise AssertionError(f"no question in {question!r}")


@pytest.mark.parametrize("difficulty", sorted(builtin.LEVELS))
def test_arith_answers_are_correct(difficulty):
    level = builtin.LEVELS[difficulty]
    for record in builtin.make_split("arith", "train", 300, seed=0, difficulty=difficulty):
        lines = record["answer"].splitlines()
        start = int(re.match(r"\w+ starts with (\d+) ", lines[0]).group(1))
        assert record["question"].startswith(lines[0].replace(" starts with ", " has "))
        value = start
        for line in lines[1:-1]:
            a, op, b, c = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)", line).groups()
            a, b, c = int(a), int(b), int(c)
            assert a == value  # each step starts from the previous result
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
            assert 0 < c <= level.max_value
            value = c
        assert len(lines) - 2 == level.arith_steps
        assert lines[-1] == f"#### {value}" and record["gold"] == str(value)
        assert solve(record["question"]) == value  # the question says what the solution computes
        assert task_kind(record) == "generation" and extract_answer(record["answer"]) == record["gold"]


@pytest.mark.parametrize("difficulty", sorted(builtin.LEVELS))
def test_choice_records_are_correct(difficulty):
    records = builtin.make_split("choice", "train", 300, seed=0, difficulty=difficulty)
    golds = set()
    for record in records:
        check_record(record)
        assert record["labels"] == ["A", "B", "C", "D"]
        values = [int(c) for c in record["choices"]]
        assert len(set(values)) == 4 and min(values) >= 0
        answer = solve(record["question"])
        assert answer > 0 and values.count(answer) == 1
        assert record["choices"][record["labels"].index(record["gold"])] == str(answer)
        golds.add(record["gold"])
    assert golds == {"A", "B", "C", "D"}


def count_operations(question):
    return len(re.findall(ADD + "|" + SUB + r"|doubles|triples", question))


def test_difficulty_changes_the_number_of_steps():
    steps = {}
    for difficulty, level in builtin.LEVELS.items():
        records = builtin.make_split("arith", "train", 50, difficulty=difficulty)
        assert {len(arith_skeleton(r)) for r in records} == {level.arith_steps}
        assert {count_operations(r["question"]) for r in records} == {level.arith_steps}
        chains = [r for r in builtin.make_split("choice", "train", 100, difficulty=difficulty)
                  if "How many more" not in r["question"]]
        assert chains and {count_operations(r["question"]) for r in chains} == {level.chain_steps}
        steps[difficulty] = level.arith_steps
    assert len(set(steps.values())) == len(steps)  # every level is a different number of steps
    with pytest.raises(ValueError, match="difficulty"):
        builtin.make_split("arith", "train", 5, difficulty=9)


def test_builtin_examples_are_short_at_default_difficulty():
    for task in BUILTIN_TASKS:
        records = builtin.make_split(task, "train", 300)
        sizes = [len((prompt_text(r) + target_text(r)).encode()) for r in records]
        assert sum(sizes) / len(sizes) <= 200 and max(sizes) <= 230


def test_corpus_teaches_the_language_not_the_formats():
    corpus = builtin.make_corpus(20_000, seed=0)
    assert corpus == builtin.make_corpus(20_000, seed=0) != builtin.make_corpus(20_000, seed=1)
    assert len(corpus) >= 20_000
    for marker in ("Question", "Answer", "####", "\nA. ", "How many"):
        assert marker not in corpus
    facts = re.findall(r"^(\d+) ([-+*]) (\d+) = (\d+)$", corpus, re.MULTILINE)
    assert len(facts) > 100
    for a, op, b, c in facts:
        assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    assert "Count from" in corpus and " more." in corpus and any(name in corpus for name in builtin.NAMES)


# ---------------------------------------------------------------- prompts and encode_example

def test_prompt_and_target_texts():
    assert prompt_text(GEN) == f"Question: {GEN['question']}\nAnswer:"
    assert target_text(GEN) == " " + GEN["answer"]
    assert prompt_text(MC) == "Question: Which is largest?\nA. 2\nB. 9\nC. 4\nAnswer:"
    assert prompt_text(MC, with_options=False) == "Question: Which is largest?\nAnswer:"
    assert target_text(MC, "label") == " B"
    assert target_text(MC) == target_text(MC, "text") == " 9"  # the gold option's text, what acc scores
    assert choice_continuations(MC) == [" A", " B", " C"]
    assert choice_continuations(MC, by="text") == [" 2", " 9", " 4"]


@pytest.mark.parametrize("record, choice_target", [(GEN, "text"), (MC, "text"), (MC, "label")])
def test_encode_example_masks_the_prompt(record, choice_target):
    tok = ByteTokenizer()
    ids, labels = encode_example(tok, record, choice_target=choice_target)
    with_options = choice_target == "label"  # the option text follows the prompt the scorer uses (no options)
    prompt = tok.encode(prompt_text(record, with_options))
    target = tok.encode(target_text(record, choice_target))
    assert ids == [tok.bos_id] + prompt + target + [tok.eos_id]
    assert len(labels) == len(ids) and labels[-1] == IGNORE_INDEX
    n_masked = len(prompt)  # positions 0 .. len(prompt) - 1 predict prompt tokens
    assert labels[:n_masked] == [IGNORE_INDEX] * n_masked
    # every other position predicts the next token: the target, then eos
    assert labels[n_masked:-1] == ids[n_masked + 1:]
    assert labels[n_masked:-1] == target + [tok.eos_id]
    assert tok.decode(t for t in labels if t != IGNORE_INDEX) == target_text(record, choice_target)
    assert encode_prompt(tok, record, with_options) == ids[:1 + len(prompt)]
    ids2, labels2 = encode_example(tok, record, prompt_loss=True, choice_target=choice_target)
    assert ids2 == ids and labels2 == ids[1:] + [IGNORE_INDEX]


def test_training_examples_per_choice_target():
    tok = ByteTokenizer()

    def decoded(example):  # the text without bos and eos
        return tok.decode(example[0][1:-1])

    assert [decoded(ex) for ex in training_examples(tok, MC)] == ["Question: Which is largest?\nAnswer: 9"]
    assert [decoded(ex) for ex in training_examples(tok, MC, choice_target="label")] == [
        "Question: Which is largest?\nA. 2\nB. 9\nC. 4\nAnswer: B"]
    both = training_examples(tok, MC, choice_target="both")
    assert [decoded(ex) for ex in both] == ["Question: Which is largest?\nAnswer: 9",
                                            "Question: Which is largest?\nA. 2\nB. 9\nC. 4\nAnswer: B"]
    assert training_examples(tok, GEN, choice_target="both") == [encode_example(tok, GEN)]  # one per generation
    with pytest.raises(ValueError, match="choice_target"):
        training_examples(tok, MC, choice_target="gold")


def test_encode_example_truncates_the_prompt_from_the_left():
    tok = ByteTokenizer()
    full_ids, full_labels = encode_example(tok, GEN)
    target = tok.encode(target_text(GEN)) + [tok.eos_id]
    max_len = len(target) + 11
    ids, labels = encode_example(tok, GEN, max_len=max_len)
    assert len(ids) == len(labels) == max_len
    assert ids[0] == tok.bos_id and ids[-len(target):] == target  # whole target and eos kept
    assert ids[1:-len(target)] == tok.encode(prompt_text(GEN))[-10:]  # the prompt's end is kept
    assert labels[:10] == [IGNORE_INDEX] * 10 and labels[10:-1] == target
    assert encode_example(tok, GEN, max_len=len(full_ids)) == (full_ids, full_labels)  # exact fit: unchanged


def test_encode_example_when_even_the_target_does_not_fit():
    tok = ByteTokenizer()
    ids, labels = encode_example(tok, GEN, max_len=20)
    prompt = tok.encode(prompt_text(GEN))
    assert len(ids) == 20 and ids[0] == tok.bos_id
    assert ids[1:11] == prompt[-10:]  # the prompt keeps its last max_len // 2 tokens
    assert ids[11:] == tok.encode(target_text(GEN))[:9]  # the target is cut from the right, no eos
    assert labels[:10] == [IGNORE_INDEX] * 10 and labels[10:19] == ids[11:] and labels[19] == IGNORE_INDEX
    with pytest.raises(ValueError, match="max_len"):
        encode_example(tok, GEN, max_len=1)


def test_encode_example_when_the_tokenizer_merges_across_the_boundary():
    tok = MergingTokenizer()
    record = {"question": "q", "answer": "#### 5", "gold": "5"}  # prompt ends "Answer:", target " #### 5"
    ids, labels = encode_example(tok, record)
    prompt = tok.encode(prompt_text(record))
    assert ids[1:1 + len(prompt)] == prompt  # the prompt is never split differently from generation
    assert ids[1 + len(prompt):-1] == tok.encode(target_text(record))
    assert labels[len(prompt):-1] == ids[len(prompt) + 1:]


# ---------------------------------------------------------------- load_examples and its errors

def test_load_examples_builtin_and_task_kind():
    assert BUILTIN_TASKS == builtin.TASKS
    arith = load_examples("arith", "train", n=20)
    assert len(arith) == 20 and all(task_kind(r) == "generation" for r in arith)
    choice = load_examples("choice", "test", n=20, seed=1, difficulty=3)
    assert choice == builtin.make_split("choice", "test", 20, seed=1, difficulty=3)
    assert all(task_kind(r) == "choice" for r in choice)
    assert len(load_examples("arith", "test")) == builtin.DEFAULT_SIZES["test"]
    with pytest.raises(ValueError, match="split"):
        load_examples("arith", "validation")
    with pytest.raises(ValueError):
        task_kind({"question": "q"})


def test_load_examples_from_files(tmp_path):
    records = [dict(GEN, gold=str(i)) for i in range(30)]
    write_jsonl(records, tmp_path / "test.jsonl")
    assert load_examples(str(tmp_path), "test") == records  # folder: {split}.jsonl, file order kept
    assert load_examples(tmp_path / "test.jsonl", "train") == records  # a file is read whatever the split
    some = load_examples(str(tmp_path), "test", n=10, seed=5)
    assert len(some) == 10 and some == load_examples(str(tmp_path), "test", n=20, seed=5)[:10]
    assert some != records[:10]
    with pytest.raises(ValueError, match="difficulty"):
        load_examples(str(tmp_path), "test", difficulty=2)


def test_write_jsonl_keeps_one_record_per_line(tmp_path):
    records = [dict(GEN, question="line\u2028separator\x85next\u2029para \u00e9"), MC]
    write_jsonl(records, tmp_path / "x.jsonl")
    text = (tmp_path / "x.jsonl").read_text(encoding="utf-8")
    assert len(text.splitlines()) == 2 and "\u00e9" in text  # readable, yet safe for any line splitter
    assert load_examples(tmp_path / "x.jsonl", "test") == records


def test_load_examples_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="arith.*choice"):
        load_examples("no-such-task", "train")
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_examples(str(tmp_path), "train")  # a folder without the split
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_examples(str(empty), "test")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(GEN) + "\n" + json.dumps(MC) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        load_examples(str(bad_json), "test")
    bad_record = tmp_path / "bad_record.jsonl"
    bad_record.write_text(json.dumps(GEN) + "\n" + json.dumps(dict(MC, gold="Z")) + "\n")
    with pytest.raises(ValueError, match=r"bad_record\.jsonl:2: .*'Z' is not one of the labels"):
        load_examples(str(bad_record), "test")
    for broken, reason in [({"question": "q", "answer": "a"}, "gold"),
                           ({"question": "", "answer": "a", "gold": "1"}, "question"),
                           (dict(MC, labels=["A", "B"]), "labels"), ([1, 2], "object"), ({"question": "q"}, "neither")]:
        path = tmp_path / "broken.jsonl"
        path.write_text(json.dumps(broken) + "\n")
        with pytest.raises(ValueError, match=reason):
            load_examples(str(path), "test")
    text = tmp_path / "train.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a .jsonl"):
        load_examples(str(text), "train")
    with pytest.raises(ValueError, match="n must"):
        load_examples("arith", "train", n=0)


def test_prepare_refuses_a_folder_holding_another_data_set(tmp_path):
    arc_raw = {"instruction": "Please choose the correct answer to the question: Ice is\n\nAnswer1: hot Answer2: cold"
                              "\n\nAnswer format: answer1/answer2", "input": "", "output": "", "answer": "answer2"}
    aqua_raw = {"instruction": "Q? Answer Choices: (A) 1 (B) 2", "input": "", "output": "", "answer": "B"}
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "train.json").write_text(json.dumps([arc_raw] * 3))
    (tmp_path / "arc" / "test.json").write_text(json.dumps([arc_raw] * 2))
    (tmp_path / "aqua").mkdir()
    (tmp_path / "aqua" / "test.json").write_text(json.dumps([aqua_raw]))
    out = tmp_path / "P"
    assert prepare.prepare("arc-easy", tmp_path / "arc", out) == {"train": 3, "test": 2}
    manifest = json.loads((out / "prepared.json").read_text())
    assert manifest["name"] == "arc-easy" and manifest["records"] == {"train": 3, "test": 2}
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"holds the arc-easy data set .*preparing aqua there would mix"):
        prepare.prepare("aqua", tmp_path / "aqua", out)
    with pytest.raises(ValueError, match="arc-easy"):  # arc-challenge is another data set too
        prepare.prepare("arc-challenge", tmp_path / "arc", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced
    assert prepare.prepare("arc-easy", tmp_path / "arc", out) == {"train": 3, "test": 2}  # the same: rewritten
    (out / "prepared.json").unlink()  # jsonl files without a manifest: whose they are is unknown
    with pytest.raises(ValueError, match="no prepared.json"):
        prepare.prepare("arc-easy", tmp_path / "arc", out)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        prepare.prepare("aqua", tmp_path / "aqua", tmp_path / "file")
    prepare.main(["aqua", "--src", str(tmp_path / "aqua"), "--out", str(tmp_path / "Q")])
    with pytest.raises(SystemExit, match="preparing arc-easy there would mix"):  # the command: a message only
        prepare.main(["arc-easy", "--src", str(tmp_path / "arc"), "--out", str(tmp_path / "Q")])
