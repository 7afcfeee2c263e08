"""Convert benchmark files into the project format (see data/records.py).

    python -m data.prepare gsm8k --src /path/to/gsm8k --out data/gsm8k
    python -m data.prepare arc-challenge --src /path/to/arc-challenge/test.json
    python -m data.prepare aqua                      # no --src: download from the public home

Sources:
- gsm8k: OpenAI's grade-school-math jsonl, fields question, answer (worked solution ending "#### N").
  The calculator annotations "<<48/2=24>>" are removed from the solution unless --keep-calculator:
  they are a tool-use artefact, not text a model should learn to write.
- arc-challenge, arc-easy, aqua: the LLM-Adapters json lists, fields instruction, input, output, answer.
  ARC: instruction = "Please choose the correct answer to the question: Q\\n\\nAnswer1: ... Answer2: ...
  \\n\\nAnswer format: answer1/answer2/...", answer = "answerN" (3 to 5 options).
  AQuA: instruction = "Q Answer Choices: (A) ... (B) ... (E) ...", answer = a letter. The output rationale
  can contradict the answer field: the answer field is the gold.

--src is a file (its split is read from its name: train... or test...) or a folder holding
train.json(l) / test.json(l); what is missing is skipped. Without --src the files are downloaded;
offline that fails with a message saying to pass --src. Output: OUT/{train,test}.jsonl and OUT/prepared.json (which
data set, from where, how many records). A folder holding another data set (or jsonl files with no prepared.json)
is refused, so two data sets are never mixed in one folder; preparing the same one again rewrites it.
AQuA's train.json in LLM-Adapters repeats its test problems, so only AQuA test is downloaded.
"""
import argparse
import json
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .records import check_record, write_jsonl

GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"
LLM_ADAPTERS_URL = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/dataset/{folder}/{split}.json"

# name -> (layout, file extension, {split: download url})
DATASETS = {
    "gsm8k": ("gsm8k", ".jsonl", {s: GSM8K_URL.format(split=s) for s in ("train", "test")}),
    "arc-challenge": ("arc", ".json",
                      {s: LLM_ADAPTERS_URL.format(folder="ARC-Challenge", split=s) for s in ("train", "test")}),
    "arc-easy": ("arc", ".json", {s: LLM_ADAPTERS_URL.format(folder="ARC-Easy", split=s) for s in ("train", "test")}),
    "aqua": ("aqua", ".json", {"test": LLM_ADAPTERS_URL.format(folder="AQuA", split="test")}),
}
SPLITS = ("train", "test")
LETTERS = "ABCDEFGHIJ"


# ---------------------------------------------------------------- one record each

def gsm8k_record(raw, keep_calculator=False):
    question, answer = raw["question"].strip(), raw["answer"].strip()
    if "####" not in answer:
        raise ValueError(f"answer does not end with '#### N': {answer[-60:]!r}")
    if not keep_calculator:
        answer = re.sub(r"<<[^<>]*>>", "", answer)
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return {"question": question, "answer": answer, "gold": gold}


ARC_PREFIX = "Please choose the correct answer to the question:"


def arc_record(raw):
    instruction = raw["instruction"]
    if not instruction.startswith(ARC_PREFIX):
        raise ValueError(f"instruction does not start with {ARC_PREFIX!r}: {instruction[:60]!r}")
    body, _, answer_format = instruction[len(ARC_PREFIX):].rpartition("\n\nAnswer format:")
    n_options = len(answer_format.strip().split("/"))
    question, sep, options = body.partition("\n\nAnswer1:")
    if not sep:
        raise ValueError(f"no 'Answer1:' in instruction: {instruction[:80]!r}")
    # Walk the markers in order ("Answer2:" after "Answer1:" ...) so an option's own text cannot split it.
    choices, rest = [], options
    for k in range(2, n_options + 1):
        text, sep, rest = rest.partition(f" Answer{k}:")
        if not sep:
            raise ValueError(f"missing 'Answer{k}:' though the answer format lists {n_options} options")
        choices.append(text.strip())
    choices.append(rest.strip())
    match = re.fullmatch(r"answer(\d+)", raw["answer"].strip())
    if not match or not 1 <= int(match.group(1)) <= n_options:
        raise ValueError(f"answer {raw['answer']!r} is not one of answer1..answer{n_options}")
    labels = list(LETTERS[:n_options])
    return {"question": question.strip(), "choices": choices, "labels": labels,
            "gold": labels[int(match.group(1)) - 1]}


def aqua_record(raw):
    question, sep, options = raw["instruction"].rpartition("Answer Choices:")
    if not sep:
        raise ValueError(f"no 'Answer Choices:' in instruction: {raw['instruction'][:80]!r}")
    # Options are "(A) ... (B) ... (E) ...": walk the markers in order, as option text may hold parentheses.
    head, sep, rest = options.partition("(A)")
    if not sep or head.strip():
        raise ValueError(f"options do not start with '(A)': {options[:60]!r}")
    choices, labels = [], ["A"]
    for letter in LETTERS[1:]:
        text, sep, after = rest.partition(f"({letter})")
        if not sep:
            break
        choices.append(text.strip())
        labels.append(letter)
        rest = after
    choices.append(rest.strip())
    gold = raw["answer"].strip()
    if gold not in labels:
        raise ValueError(f"answer {raw['answer']!r} is not one of the option letters {labels}")
    return {"question": question.strip(), "choices": choices, "labels": labels, "gold": gold}


def convert(layout, raw_records, keep_calculator=False, origin="input"):
    """Project records from raw ones; a bad raw record fails with its index."""
    records = []
    for i, raw in enumerate(raw_records):
        try:
            if layout == "gsm8k":
                record = gsm8k_record(raw, keep_calculator)
            elif layout == "arc":
                record = arc_record(raw)
            else:
                record = aqua_record(raw)
            check_record(record)
        except (KeyError, ValueError, AttributeError, TypeError) as e:
            raise ValueError(f"{origin}, record {i}: cannot convert ({type(e).__name__}: {e})") from None
        records.append(record)
    return records


# ---------------------------------------------------------------- reading sources

def parse_raw(text, extension, origin):
    """Raw records of a .jsonl (one object per line) or .json (one list) text."""
    try:
        if extension == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{origin}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{origin}: expected a JSON list of records, got {type(data).__name__}")
    return data


def split_of_file(path):
    for split in SPLITS:
        if path.stem.lower().startswith(split):
            return split
    raise ValueError(f"cannot tell the split of {path}: name it train... or test...")


def local_files(src, extension):
    """{split: path} from a file or a folder given by the user."""
    src = Path(src)
    if src.is_file():
        return {split_of_file(src): src}
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} does not exist")
    files = {}
    for split in SPLITS:
        # accept both .json and .jsonl spellings, but parse by the layout's own format
        for candidate in (src / f"{split}{extension}", src / f"{split}.json", src / f"{split}.jsonl"):
            if candidate.is_file():
                files[split] = candidate
                break
    if not files:
        raise FileNotFoundError(f"--src {src} holds neither train{extension} nor test{extension}")
    return files


def download(url):
    """The text at url, None for a 404; other failures (offline) raise with a hint."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise RuntimeError(f"downloading {url} failed (HTTP {e.code}); download it by hand and pass --src") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise RuntimeError(f"cannot download {url} ({e}); are you offline? "
                           "Pass the files with --src FILE_OR_DIR") from None


MANIFEST = "prepared.json"


def check_out_folder(out, name, keep_calculator):
    """Refuse an output folder that holds another data set: its train/test files would be mixed with ours."""
    manifest, held = out / MANIFEST, sorted(p.name for p in out.glob("*.jsonl")) if out.is_dir() else []
    if manifest.is_file():
        try:
            before = json.loads(manifest.read_text())
            before = (before["name"], bool(before.get("keep_calculator")))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ValueError(f"{manifest}: not a readable manifest of data.prepare; remove the folder or pick "
                             f"another --out") from None
        if before != (name, keep_calculator):
            what = before[0] + (" with --keep-calculator" if before[1] else "")
            raise ValueError(f"--out {out} holds the {what} data set ({manifest}): preparing {name}"
                             f"{' with --keep-calculator' if keep_calculator else ''} there would mix the two; pick "
                             f"another --out")
    elif held:
        raise ValueError(f"--out {out} holds {', '.join(held)} but no {MANIFEST}: not a folder data.prepare wrote "
                         f"(or one from before it wrote manifests); pick another --out or remove those files")


def prepare(name, src=None, out=None, keep_calculator=False):
    """Convert one benchmark; returns {split: number of records}. Writes OUT/{split}.jsonl and OUT/prepared.json."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    layout, extension, urls = DATASETS[name]
    out = Path(out) if out is not None else Path(__file__).resolve().parent / name
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    check_out_folder(out, name, keep_calculator)
    texts = {}
    if src is not None:
        for split, path in local_files(src, extension).items():
            texts[split] = (path.read_text(encoding="utf-8"), str(path))
    else:
        for split, url in urls.items():
            text = download(url)
            if text is not None:
                texts[split] = (text, url)
        if not texts:
            raise RuntimeError(f"none of the {name} files could be found at {', '.join(urls.values())}")
    converted = {}  # every split converted before anything is written: a bad record leaves the folder as it was
    for split, (text, origin) in texts.items():
        # the file's own format decides how it is read (a .jsonl GSM8K or a .json list)
        file_extension = ".jsonl" if origin.endswith(".jsonl") else ".json"
        converted[split] = convert(layout, parse_raw(text, file_extension, origin), keep_calculator, origin)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"name": name, "keep_calculator": keep_calculator,
                "sources": {split: origin for split, (_, origin) in texts.items()},
                "records": {split: len(records) for split, records in converted.items()}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # first: a crash leaves the folder marked
    for split, records in converted.items():
        write_jsonl(records, out / f"{split}.jsonl")
    return manifest["records"]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert GSM8K / ARC / AQuA into the project's jsonl format.")
    parser.add_argument("name", choices=sorted(DATASETS))
    parser.add_argument("--src", help="a train/test file or a folder holding them (default: download)")
    parser.add_argument("--out", help="output folder (default: data/NAME)")
    parser.add_argument("--keep-calculator", action="store_true",
                        help="gsm8k: keep the <<a*b=c>> calculator annotations in the solutions")
    args = parser.parse_args(argv)
    try:
        counts = prepare(args.name, args.src, args.out, args.keep_calculator)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    out = args.out or str(Path(__file__).resolve().parent / args.name)
    for split, count in counts.items():
        print(f"{args.name} {split}: {count:,} records -> {Path(out) / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
