"""The project's record format: one JSON object per line (.jsonl), two kinds.

generation (GSM8K-like):
    {"question": str, "answer": str, "gold": str}
    answer is the worked solution whose last line is "#### N"; gold is N as written, commas removed.
choice (ARC/AQuA-like):
    {"question": str, "choices": [str, ...], "labels": ["A", "B", ...], "gold": "B"}

Extra keys are allowed and kept; every reader checks the keys above so a bad file fails at load time,
with its line number, rather than deep inside training.
"""
import json
from pathlib import Path

GENERATION = "generation"
CHOICE = "choice"


def task_kind(record):
    """'generation' or 'choice', from the keys a record has."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if "choices" in record:
        return CHOICE
    if "answer" in record:
        return GENERATION
    raise ValueError(f"record has neither 'answer' (generation) nor 'choices' (choice): keys {sorted(record)}")


def _require_text(record, key):
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' must be a non-empty string, got {value!r}")


def check_record(record):
    """Raise ValueError saying what is wrong with a record; return its kind when it is well formed."""
    kind = task_kind(record)
    _require_text(record, "question")
    _require_text(record, "gold")
    if kind == GENERATION:
        _require_text(record, "answer")
        return kind
    choices, labels = record["choices"], record.get("labels")
    if not isinstance(choices, list) or len(choices) < 2:
        raise ValueError(f"'choices' must be a list of at least 2 strings, got {choices!r}")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError(f"every choice must be a non-empty string, got {choices!r}")
    if not isinstance(labels, list) or len(labels) != len(choices):
        raise ValueError(f"'labels' must be a list as long as 'choices' ({len(choices)}), got {labels!r}")
    if len(set(labels)) != len(labels) or not all(isinstance(x, str) and x for x in labels):
        raise ValueError(f"'labels' must be distinct non-empty strings, got {labels!r}")
    if record["gold"] not in labels:
        raise ValueError(f"gold {record['gold']!r} is not one of the labels {labels}")
    return kind


def read_jsonl(path):
    """Read and check every record of a .jsonl file; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            near = line[max(0, e.pos - 20):e.pos + 20].strip()
            raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at character {e.pos + 1} of the line, "
                             f"near {near!r})") from None
        try:
            check_record(record)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: malformed record: {e}") from None
        records.append(record)
    if not records:
        raise ValueError(f"{path} is empty: it holds no records")
    return records


# Characters that str.splitlines() treats as line breaks but json.dumps(ensure_ascii=False) leaves raw.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def write_jsonl(records, path):
    """Write records one per line, UTF-8 and not ASCII-escaped so the file reads like the text it holds;
    only the Unicode line separators are escaped, so that any line splitter sees one record per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            line = json.dumps(record, ensure_ascii=False)
            for char, escape in _LINE_BREAKS.items():
                line = line.replace(char, escape)
            f.write(line + "\n")
