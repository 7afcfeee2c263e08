"""Data for tuning and evaluation: the record format, the built-in tasks, the prepared benchmarks.

    from data import load_examples, task_kind
    train = load_examples("arith", "train", n=2000)          # built-in, generated
    test = load_examples("data/gsm8k", "test")                # prepared by python -m data.prepare gsm8k ...
    test = load_examples("some/file.jsonl", "test", n=100)    # any project-format jsonl

Prompts, tokenized examples and answer reading live in data.format.
"""
import random
from pathlib import Path

from .records import CHOICE, GENERATION, check_record, read_jsonl, task_kind, write_jsonl

__all__ = ["load_examples", "task_kind", "check_record", "read_jsonl", "write_jsonl", "BUILTIN_TASKS",
           "GENERATION", "CHOICE"]

BUILTIN_TASKS = ("arith", "choice")  # data.builtin is imported only when used, so `python -m data.builtin` runs cleanly
PREPARED_HOME = Path(__file__).resolve().parent  # where python -m data.prepare writes by default


def resolve_path(name, split):
    """The .jsonl file a name stands for: the file itself, {split}.jsonl inside a folder, or a folder
    of that name under data/ (the default output of data.prepare)."""
    candidates = [Path(name)]
    if not Path(name).is_absolute() and "/" not in str(name) and "\\" not in str(name):
        candidates.append(PREPARED_HOME / name)
    for path in candidates:
        if path.is_dir():
            file = path / f"{split}.jsonl"
            if not file.is_file():
                present = sorted(p.name for p in path.glob("*.jsonl"))
                raise FileNotFoundError(f"{path} has no {split}.jsonl "
                                        f"(it has: {', '.join(present) or 'no .jsonl files'})")
            return file
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{name!r} is neither a built-in task ({', '.join(BUILTIN_TASKS)}) nor an existing .jsonl file or "
        f"prepared folder; prepare a benchmark with e.g. python -m data.prepare gsm8k --src PATH --out data/gsm8k")


def load_examples(name, split, n=None, seed=0, difficulty=None):
    """Records of a built-in task ("arith", "choice") or of a prepared folder / .jsonl file.

    n: how many. For a built-in task they are generated (default sizes: builtin.DEFAULT_SIZES); for a file,
    n < all takes the first n after a shuffle with `seed` (so n=100 is a subset of n=200), and n=None
    keeps the file's order. difficulty: built-in tasks only (default builtin.DEFAULT_DIFFICULTY).
    """
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    if name in BUILTIN_TASKS:
        from . import builtin

        difficulty = builtin.DEFAULT_DIFFICULTY if difficulty is None else difficulty
        if split not in builtin.SPLITS:
            raise ValueError(f"unknown split {split!r} for built-in task {name!r}: "
                             f"choose one of {', '.join(builtin.SPLITS)}")
        return builtin.make_split(name, split, n or builtin.DEFAULT_SIZES[split], seed, difficulty)
    if difficulty is not None:
        raise ValueError(f"difficulty only applies to the built-in tasks ({', '.join(BUILTIN_TASKS)}), not to {name!r}")
    path = resolve_path(name, split)
    if path.suffix != ".jsonl":
        raise ValueError(f"{path} is not a .jsonl file; convert benchmarks with python -m data.prepare")
    records = read_jsonl(path)
    if n is not None and n < len(records):
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        records = [records[i] for i in order[:n]]
    return records
