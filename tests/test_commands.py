"""The commands a new user meets: sample.py and export.py, --help of every command, and bad input everywhere
named in a message of its own (the file, the flag, the value) with no traceback."""
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import export
import sample
import train
from checkpoint import load_run
from data.format import bos, prompt_text
from weights import from_pretrained

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--data", "arith", "--difficulty", "1", "--n-train", "8", "--max-len", "96", "--batch-size", "4",
         "--eval-every", "0", "--eval-n", "0", "--lr", "5e-2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_base):
    """A LoRA run and a LoRA + MoD + MoLEx run, 3 steps each, on the shared tiny base."""
    folder = tmp_path_factory.mktemp("runs")
    train.main(["--init", str(tiny_base), *SMALL, "--max-steps", "3", "--out", str(folder / "lora")])
    train.main(["--init", str(tiny_base), *SMALL, "--max-steps", "3", "--mod-k", "2", "--molex",
                "--out", str(folder / "addons")])
    with torch.no_grad():  # LoRA B starts at 0 and 3 steps move it little: make the tuning visible in the logits
        ckpt = torch.load(folder / "lora" / "ckpt.pt", weights_only=True)
        for k, v in ckpt["model"].items():
            if k.endswith("lora_B"):
                v.normal_(0, 0.2)
        torch.save(ckpt, folder / "lora" / "ckpt.pt")
    return folder


def command(*argv, timeout=120):
    """Run a command as a user does; (exit status, stdout, stderr)."""
    p = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


# ---------------------------------------------------------------- sample.py

def test_greedy_sample_is_deterministic_and_equals_generate(runs):
    question = "Ann has 3 pens and buys 2 more. How many pens does she have?"
    out1, out2 = io.StringIO(), io.StringIO()
    ids = sample.main(["--ckpt", str(runs / "lora"), "--max-new-tokens", "20", question], out=out1)
    assert sample.main(["--ckpt", str(runs / "lora"), "--max-new-tokens", "20", question], out=out2) == ids
    model, tok, _, _ = load_run(runs / "lora")
    prompt = bos(tok) + tok.encode(prompt_text({"question": question, "answer": ""}))
    assert ids == model.generate([prompt], 20, eos_id=tok.eos_id)[0] and len(ids) > 0
    assert out1.getvalue() == tok.decode(ids) + "\n" == out2.getvalue()  # streamed text = the whole decode


def test_sampling_with_temperature_is_seeded(runs):
    argv = ["--ckpt", str(runs / "addons"), "--temperature", "1.5", "--top-k", "20", "--max-new-tokens", "12", "x"]
    a = sample.main(argv + ["--seed", "1"], out=io.StringIO())
    assert a == sample.main(argv + ["--seed", "1"], out=io.StringIO())
    assert a != sample.main(argv + ["--seed", "2"], out=io.StringIO())


# ---------------------------------------------------------------- export.py

def test_exported_lora_run_gives_the_tuned_logits_in_transformers(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    export.main(["--ckpt", str(runs / "lora"), "--out", str(tmp_path / "hf")])
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tuned, _, _, _ = load_run(runs / "lora")
    base, _, _, _ = load_run(None, json.loads((runs / "lora" / "args.json").read_text())["init"])
    idx = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs, untuned = tuned(idx)[0], hf(idx).logits, base(idx)[0]
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - untuned).abs().max() > 1e-2  # LoRA changed the logits: the comparison can tell
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tokenizer"] == "byte"


def test_export_refuses_mod_and_molex_unless_asked(runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export.main(["--ckpt", str(runs / "addons"), "--out", str(tmp_path / "x")])
    assert "MoD and MoLEx" in str(e.value) and "--drop-addons" in str(e.value)
    assert not (tmp_path / "x" / "model.safetensors").exists()
    export.main(["--ckpt", str(runs / "addons"), "--out", str(tmp_path / "x"), "--drop-addons"])
    assert "without its MoD and MoLEx" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds an export of .*addons, not of .*lora"):  # nothing is overwritten
        export.main(["--ckpt", str(runs / "lora"), "--out", str(tmp_path / "x")])


def test_export_refuses_a_folder_that_is_not_an_earlier_export_of_the_same_run(runs, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # a stale file from something else
    with pytest.raises(SystemExit, match=r"not empty and is not an export .*tokenizer.json"):
        export.main(["--ckpt", str(runs / "lora"), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]  # untouched
    (out / "tokenizer.json").unlink()
    export.main(["--ckpt", str(runs / "lora"), "--out", str(out)])
    manifest = json.loads((out / "exported.json").read_text())
    assert manifest["files"] == ["config.json", "model.safetensors"] and manifest["step"] == 3
    export.main(["--ckpt", str(runs / "lora"), "--out", str(out), "--dtype", "bfloat16"])  # the same run: replaced
    assert from_pretrained(out).embed.weight.dtype == torch.bfloat16
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"files the earlier export did not write \(notes.txt\)"):
        export.main(["--ckpt", str(runs / "lora"), "--out", str(out)])
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        export.main(["--ckpt", str(runs / "lora"), "--out", str(out / "notes.txt")])


# ---------------------------------------------------------------- every command's --help

@pytest.mark.parametrize("script", ["train.py", "eval.py", "sample.py", "export.py", "ablate.py", "bench.py"])
def test_help(script):
    code, out, err = command(script, "--help")
    assert code == 0 and "usage:" in out and not err


# ---------------------------------------------------------------- bad input: named, no traceback

def test_bad_inputs_are_named_without_a_traceback(runs, tiny_base, tmp_path):
    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"hidden_size": 32,')
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "ckpt.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    jsonl = tmp_path / "broken.jsonl"
    jsonl.write_text('{"question": "a", "answer": "1", "gold": "1"}\n{"question": "b" "answer": "2"}\n')
    cases = [  # (argv, what the message must name)
        (["train.py", "--init", bad_config], [str(bad_config / "config.json"), "not valid JSON"]),
        (["eval.py", "--init", bad_config], ["eval.py: error", "config.json", "not valid JSON"]),
        (["eval.py", "--ckpt", corrupt], ["eval.py: error", "ckpt.pt", "not a readable"]),
        (["train.py", "--resume", corrupt], ["ckpt.pt", "not a readable"]),
        (["train.py", "--init", tiny_base, "--data", jsonl], [f"{jsonl}:2", "not valid JSON"]),
        (["train.py", "--molex-layers", "first:99"], ["--molex-layers", "--molex"]),
        (["train.py", "--molex-layers", "bogus"], ["--molex-layers", "--molex"]),
        (["train.py", "--mod-top-k", "9"], ["--mod-top-k", "--mod-k"]),
        (["train.py", "--init", tiny_base, "--mod-k", "99"], ["--mod-k", "99", "3 layers"]),
        (["sample.py", "--ckpt", runs / "lora", "--max-new-tokens", "0", "x"],
         ["sample.py: error", "--max-new-tokens"]),
        (["sample.py", "--temperature", "nan", "x"], ["sample.py: error", "--temperature finite", "nan"]),
        (["sample.py", "--temperature", "inf", "x"], ["sample.py: error", "--temperature finite", "inf"]),
        (["export.py", "--ckpt", runs / "lora", "--out", jsonl], ["export.py: error", "is a file, not a folder"]),
        (["export.py", "--ckpt", corrupt, "--out", tmp_path / "e"], ["export.py: error", "ckpt.pt"]),
    ]
    for argv, needles in cases:
        code, out, err = command(*argv)
        assert code != 0, argv
        assert "Traceback" not in err and "\x1b[" not in err, (argv, err)
        assert "weights_only set to False" not in err  # never the advice to run an untrusted pickle
        for needle in needles:
            assert needle in err, (argv, needle, err)
