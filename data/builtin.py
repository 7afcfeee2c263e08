"""Built-in task suite: small arithmetic word problems, generated from a seed (no download).

For a tiny byte-level base model pretrained for minutes on a CPU:
- make_corpus: pretraining text in the language of the tasks (numbers, facts like "7 + 5 = 12", one-step
  stories about people and objects, counting, comparisons) but never in the tuning formats (no "Question:",
  no option lists, no "####", no chains of several steps), so tuning has something left to teach.
- arith (GSM8K-like): a story of `steps` operations; the answer is worked out one line per step and ends
  with "#### N".
- choice (ARC-like): a question with options A-D; the answer needs a chain of operations or the difference
  of two people's amounts, and the distractors are typical slips (off by one, one step left out or reversed).

The difficulty knob (LEVELS) sets the number of steps and the range of the numbers. Every record is built
with a seeded random.Random, never the global one.

Train and test are disjoint by construction: each problem goes to a split by a hash of its arithmetic
skeleton (the numbers and operations, not the names or objects), so no test problem shares its arithmetic
with a training problem, whatever the seeds. Within a split, questions are unique.

CLI: python -m data.builtin --task arith --out data/arith   (writes train.jsonl and test.jsonl)
     python -m data.builtin --task corpus --out data/corpus (writes corpus.txt)
"""
import argparse
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test")
# two operations, amounts up to 10: what 500 LoRA steps of the main command learn (BENCHMARKS.md)
DEFAULT_DIFFICULTY = 1
DEFAULT_SIZES = {"train": 4000, "test": 200}
TEST_PER_MILLE = 200  # share of arithmetic skeletons that belong to the test split


@dataclass(frozen=True)
class Level:
    arith_steps: int  # operations in an arith problem (= equation lines in its solution)
    chain_steps: int  # operations in a choice "chain" question
    compare_steps: int  # operations per person in a choice "compare" question (then one subtraction)
    max_operand: int  # largest start amount and largest number added or taken away
    max_value: int  # no amount ever goes above this
    multiply: bool  # whether "doubles" / "triples" can occur


LEVELS = {
    1: Level(arith_steps=2, chain_steps=1, compare_steps=0, max_operand=5, max_value=10, multiply=False),
    2: Level(arith_steps=3, chain_steps=2, compare_steps=1, max_operand=9, max_value=20, multiply=False),
    3: Level(arith_steps=4, chain_steps=3, compare_steps=1, max_operand=9, max_value=30, multiply=True),
    4: Level(arith_steps=5, chain_steps=4, compare_steps=2, max_operand=20, max_value=99, multiply=True),
}

PRONOUNS = {
    "Tom": "He", "Ann": "She", "Ben": "He", "Mia": "She", "Sam": "He", "Lily": "She",
    "Max": "He", "Zoe": "She", "Leo": "He", "Eva": "She", "Jack": "He", "Emma": "She",
}
NAMES = tuple(PRONOUNS)
OBJECTS = ("apples", "pens", "books", "cards", "eggs", "coins", "shells", "stickers", "marbles", "cups",
           "toys", "balls")
# Verb phrases for one operation; {k} is the amount, {other} another person.
PHRASES = {
    "+": ("buys {k} more", "finds {k} more", "gets {k} from {other}"),
    "-": ("gives {k} to {other}", "loses {k}", "sells {k}"),
}
MULTIPLY_PHRASES = {2: "doubles them", 3: "triples them"}


def apply_op(value, op, k):
    return {"+": value + k, "-": value - k, "*": value * k}[op]


def random_ops(rng, level, start, steps):
    """`steps` random operations from `start`, keeping every amount in 1..max_value."""
    ops, value = [], start
    for _ in range(steps):
        choices = []
        if value < level.max_value:
            choices.append("+")
        if value > 1:
            choices.append("-")
        if level.multiply and value * 2 <= level.max_value:
            choices.append("*")
        op = rng.choice(choices)
        if op == "+":
            k = rng.randint(1, min(level.max_operand, level.max_value - value))
        elif op == "-":
            k = rng.randint(1, min(level.max_operand, value - 1))
        else:
            k = rng.choice([m for m in (2, 3) if value * m <= level.max_value])
        ops.append((op, k))
        value = apply_op(value, op, k)
    return tuple(ops)


def run_ops(start, ops):
    """All amounts along the way: [start, after op 1, ..., final]."""
    values = [start]
    for op, k in ops:
        values.append(apply_op(values[-1], op, k))
    return values


def phrase(rng, op, k, others):
    if op == "*":
        return MULTIPLY_PHRASES[k]
    return rng.choice(PHRASES[op]).format(k=k, other=rng.choice(others))


def pick_people(rng, n):
    return rng.sample(NAMES, n)


def split_of(skeleton):
    """'train' or 'test' from a hash of the problem's arithmetic (stable across runs and machines)."""
    digest = hashlib.sha256(repr(skeleton).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 1000 < TEST_PER_MILLE else "train"


# ---------------------------------------------------------------- arith

def chain_story(rng, level, steps):
    """A person's amount through `steps` operations: (person, things, start, ops, values, the story's sentences
    ending in the question)."""
    person, *others = pick_people(rng, 4)
    pronoun, things = PRONOUNS[person], rng.choice(OBJECTS)
    start = rng.randint(2, level.max_operand)
    ops = random_ops(rng, level, start, steps)
    values = run_ops(start, ops)
    sentences = [f"{person} has {start} {things}."]
    sentences += [f"{pronoun} {phrase(rng, op, k, others)}." for op, k in ops]
    sentences.append(f"How many {things} does {person} have?")
    return person, things, start, ops, values, sentences


def make_arith(rng, level):
    """One GSM8K-like record and its arithmetic skeleton."""
    person, things, start, ops, values, sentences = chain_story(rng, level, level.arith_steps)
    lines = [f"{person} starts with {start} {things}."]
    lines += [f"{before} {op} {k} = {after}" for (op, k), before, after in zip(ops, values, values[1:])]
    lines.append(f"#### {values[-1]}")
    record = {"question": " ".join(sentences), "answer": "\n".join(lines), "gold": str(values[-1])}
    return record, ("arith", start, ops)


# ---------------------------------------------------------------- choice

def slips(rng, answer, candidates):
    """Three distinct wrong options, never negative. The answer's rank among the four options is drawn
    uniformly (as far as small answers allow), so "pick the middle value" is no shortcut. Plausible slips
    (candidates, off by one) are used where they fall on the drawn side, nearby numbers fill the rest."""
    n_below = min(rng.randint(0, 3), answer)
    n_above = 3 - n_below
    off_by_one = answer + rng.choice((-1, 1))  # one side only: both neighbours would single out the answer
    pool = [c for c in dict.fromkeys(candidates + [off_by_one]) if c >= 0 and c != answer]
    rng.shuffle(pool)
    below = [c for c in pool if c < answer][:n_below]
    above = [c for c in pool if c > answer][:n_above]
    while len(below) < n_below:
        value = rng.randint(max(0, answer - 6), answer - 1)
        if value not in below:
            below.append(value)
    while len(above) < n_above:
        value = rng.randint(answer + 1, answer + 6)
        if value not in above:
            above.append(value)
    return below + above


def make_chain_question(rng, level):
    """"Ann has 5 pens. She buys 3 more. She gives 2 to Ben. How many pens does Ann have now?" """
    person, things, start, ops, values, sentences = chain_story(rng, level, level.chain_steps)
    answer, before = values[-1], values[-2]
    last_op, last_k = ops[-1]
    reversed_op = {"+": "-", "-": "+", "*": "+"}[last_op]
    candidates = [before, apply_op(before, reversed_op, last_k)]  # last step left out, or done the wrong way
    return " ".join(sentences), answer, candidates, ("chain", start, ops)


def make_compare_question(rng, level):
    """"Ann has 5 pens and buys 3 more. Ben has 9 pens and loses 2. How many more pens does Ann have than Ben?" """
    first, second, *others = pick_people(rng, 4)
    things = rng.choice(OBJECTS)
    starts = [rng.randint(2, level.max_operand) for _ in range(2)]
    all_ops = [random_ops(rng, level, start, level.compare_steps) for start in starts]
    finals = [run_ops(start, ops)[-1] for start, ops in zip(starts, all_ops)]
    sentences = []
    for person, start, ops in zip((first, second), starts, all_ops):
        actions = ", then ".join(phrase(rng, op, k, others) for op, k in ops)
        sentences.append(f"{person} has {start} {things}" + (f" and {actions}." if actions else "."))
    more, less = (0, 1) if finals[0] > finals[1] else (1, 0)
    names = (first, second)
    sentences.append(f"How many more {things} does {names[more]} have than {names[less]}?")
    answer = finals[more] - finals[less]
    # slips: the difference of the starting amounts, one person's operations left out, the sum
    candidates = [abs(starts[0] - starts[1]), abs(finals[more] - starts[less]), abs(starts[more] - finals[less]),
                  finals[more] + finals[less]]
    skeleton = ("compare", starts[0], all_ops[0], starts[1], all_ops[1])
    return " ".join(sentences), answer if finals[0] != finals[1] else None, candidates, skeleton


def make_choice(rng, level):
    """One ARC-like record (4 options, gold label uniformly placed) and its arithmetic skeleton."""
    while True:
        maker = make_chain_question if rng.random() < 0.5 else make_compare_question
        question, answer, candidates, skeleton = maker(rng, level)
        if answer is not None:  # a compare question with equal amounts has no "how many more"
            break
    options = [answer] + slips(rng, answer, candidates)
    rng.shuffle(options)
    labels = ["A", "B", "C", "D"]
    record = {"question": question, "choices": [str(x) for x in options], "labels": labels,
              "gold": labels[options.index(answer)]}
    return record, skeleton


MAKERS = {"arith": make_arith, "choice": make_choice}
TASKS = tuple(MAKERS)


# ---------------------------------------------------------------- splits

def make_split(task, split, n, seed=0, difficulty=DEFAULT_DIFFICULTY):
    """n records of a built-in task. Deterministic for (task, split, seed, difficulty), and the first n
    records do not depend on n. Train and test never share a question or an arithmetic skeleton."""
    if task not in MAKERS:
        raise ValueError(f"unknown built-in task {task!r}: choose one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for built-in task {task!r}: choose one of {', '.join(SPLITS)}")
    if difficulty not in LEVELS:
        raise ValueError(f"difficulty must be one of {sorted(LEVELS)}, got {difficulty!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    make, level = MAKERS[task], LEVELS[difficulty]
    rng = random.Random(f"{task}/{split}/{difficulty}/{seed}")  # str seeds hash the same on every run
    records, seen = [], set()
    for _ in range(200 * n + 10_000):
        record, skeleton = make(rng, level)
        if split_of(skeleton) == split and record["question"] not in seen:
            seen.add(record["question"])
            records.append(record)
            if len(records) == n:
                return records
    raise ValueError(f"could only make {len(records)} distinct {task} {split} problems at difficulty "
                     f"{difficulty}; ask for fewer or raise the difficulty")


# ---------------------------------------------------------------- pretraining corpus

def small_number(rng, top=20):
    """Mostly small numbers, sometimes up to 50: the tasks live below 20 at the default difficulty."""
    return rng.randint(0, top) if rng.random() < 0.8 else rng.randint(0, 50)


def facts_doc(rng):
    lines = []
    for _ in range(rng.randint(4, 8)):
        a, b = small_number(rng), small_number(rng)
        kind = rng.random()
        if kind < 0.45:
            lines.append(f"{a} + {b} = {a + b}")
        elif kind < 0.9:
            a, b = max(a, b), min(a, b)
            lines.append(f"{a} - {b} = {a - b}")
        else:
            a, b = rng.randint(0, 10), rng.randint(2, 3)
            lines.append(f"{a} * {b} = {a * b}")
    return "\n".join(lines)


def counting_doc(rng):
    start = small_number(rng, 15)
    length = rng.randint(4, 9)
    kind = rng.random()
    if kind < 0.4:
        return f"Count from {start} to {start + length}: " + ", ".join(map(str, range(start, start + length + 1))) + "."
    if kind < 0.6:
        top = start + length
        return f"Count down from {top} to {start}: " + ", ".join(map(str, range(top, start - 1, -1))) + "."
    if kind < 0.8:
        return " ".join(f"After {x} comes {x + 1}." for x in range(start, start + rng.randint(2, 4)))
    person, things = rng.choice(NAMES), rng.choice(OBJECTS)
    n = rng.randint(2, 9)
    return f"{person} counts the {things}: " + ", ".join(map(str, range(1, n + 1))) + f". {person} has {n} {things}."


def story_doc(rng):
    """One operation and its outcome, told in words: the single step the tasks chain together."""
    person, *others = pick_people(rng, 3)
    pronoun, things = PRONOUNS[person], rng.choice(OBJECTS)
    start = rng.randint(2, 15)
    op = rng.choice("++--*") if start <= 10 else rng.choice("+-")
    k = rng.randint(1, 9) if op == "+" else rng.randint(1, start - 1) if op == "-" else rng.choice((2, 3))
    after = apply_op(start, op, k)
    ending = rng.choice((f"Now {pronoun.lower()} has {after} {things}.", f"{person} has {after} {things} now.",
                         f"That makes {after} {things}."))
    return f"{person} has {start} {things}. {pronoun} {phrase(rng, op, k, others)}. {ending}"


def compare_doc(rng):
    first, second = pick_people(rng, 2)
    things = rng.choice(OBJECTS)
    a, b = rng.randint(1, 15), rng.randint(1, 15)
    if a == b:
        return f"{first} has {a} {things}. {second} has {b} {things}. They have the same number of {things}."
    more, less = (first, second) if a > b else (second, first)
    big, small = max(a, b), min(a, b)
    return rng.choice((
        f"{first} has {a} {things}. {second} has {b} {things}. {more} has {big - small} more {things} than {less}.",
        f"{first} has {a} {things} and {second} has {b}. {more} has more {things}.",
        f"{big} is more than {small}. {small} is less than {big}.",
    ))


def world_doc(rng):
    first, second = pick_people(rng, 2)
    things = rng.choice(OBJECTS)
    place = rng.choice(("the park", "school", "the shop", "home", "the beach", "the market"))
    box = rng.choice(("a box", "a bag", "a jar", "a basket"))
    return rng.choice((
        f"{first} likes {things}. {PRONOUNS[first]} keeps them in {box}.",
        f"{first} and {second} go to {place}. They look for {things}.",
        f"{first} gives {things} to friends at {place}.",
        f"{second} sells {things} at {place}. {first} buys some.",
        f"The {things} are in {box}. {first} takes the {things} home.",
    ))


CORPUS_DOCS = ((facts_doc, 0.3), (story_doc, 0.3), (compare_doc, 0.15), (counting_doc, 0.1), (world_doc, 0.15))


def make_corpus(n_chars=500_000, seed=0):
    """Pretraining text of about n_chars characters (whole documents, separated by blank lines)."""
    if n_chars < 1:
        raise ValueError(f"n_chars must be positive, got {n_chars}")
    rng = random.Random(f"corpus/{seed}")
    makers, weights = zip(*CORPUS_DOCS)
    docs, total = [], 0
    while total < n_chars:
        doc = rng.choices(makers, weights)[0](rng)
        docs.append(doc)
        total += len(doc) + 2
    return "\n\n".join(docs) + "\n"


# ---------------------------------------------------------------- CLI

def main(argv=None):
    from .records import write_jsonl

    parser = argparse.ArgumentParser(description="Write a built-in task's train/test jsonl, or the pretraining corpus.")
    parser.add_argument("--task", required=True, choices=TASKS + ("corpus",))
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", type=int, default=DEFAULT_DIFFICULTY, choices=sorted(LEVELS))
    parser.add_argument("--n-train", type=int, default=DEFAULT_SIZES["train"])
    parser.add_argument("--n-test", type=int, default=DEFAULT_SIZES["test"])
    parser.add_argument("--n-chars", type=int, default=500_000, help="corpus size (--task corpus)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.task == "corpus":
        out.mkdir(parents=True, exist_ok=True)
        text = make_corpus(args.n_chars, args.seed)
        (out / "corpus.txt").write_text(text, encoding="utf-8")
        print(f"{out / 'corpus.txt'}: {len(text):,} characters")
        return
    for split, n in (("train", args.n_train), ("test", args.n_test)):
        records = make_split(args.task, split, n, args.seed, args.difficulty)
        write_jsonl(records, out / f"{split}.jsonl")
        print(f"{out / f'{split}.jsonl'}: {len(records):,} records")


if __name__ == "__main__":
    main()
