"""A run folder belongs to one run (issue 19): --resume A --out B, a folder in use, a folder holding another run,
Ctrl-C / SIGTERM, a full disk, a resume with nothing to do, and the messages that name what the user gave."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import base_argv

import eval as ev
import model as model_module
import train
from model import Llama

ROOT = Path(__file__).resolve().parents[1]


def steps(run):
    return [json.loads(ln)["step"] for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(ln)]


def ckpt_step(run):
    return torch.load(Path(run) / "ckpt.pt", weights_only=True)["step"]


def test_resume_into_another_folder_continues_a_copy_and_leaves_the_first_untouched(tiny_base, tmp_path):
    a, b, whole = tmp_path / "A", tmp_path / "B", tmp_path / "whole"
    train.main(base_argv(tiny_base, a, "--max-steps", "2"))
    before = {p.name: p.read_bytes() for p in a.iterdir() if p.name != "lock"}
    res = train.main(["--resume", str(a), "--out", str(b), "--max-steps", "4"])
    assert res["run"] == str(b) and ckpt_step(b) == 4 and steps(b) == [1, 2, 3, 4]
    assert {p.name: p.read_bytes() for p in a.iterdir() if p.name != "lock"} == before  # A as it was
    assert json.loads((b / "args.json").read_text())["out"] == str(b)
    full = train.main(base_argv(tiny_base, whole, "--max-steps", "4"))  # the copy goes on exactly
    assert res["losses"] == full["losses"][2:]
    with pytest.raises(SystemExit, match=r"already holds a run: continue it with --resume .*--overwrite"):
        train.main(["--resume", str(a), "--out", str(b), "--max-steps", "4"])  # B is a run now: not replaced


def test_a_new_run_refuses_a_folder_holding_another_run_unless_overwrite(tiny_base, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_forward, calls = Llama.forward, []

    def forward(self, idx, targets=None, **kw):  # a run stopped before its first checkpoint (step 3)
        if targets is not None and self.training:
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return real_forward(self, idx, targets, **kw)

    monkeypatch.setattr(model_module.Llama, "forward", forward)
    with pytest.raises(KeyboardInterrupt):
        train.main(base_argv(tiny_base, run, "--max-steps", "4", "--save-every", "0", "--seed", "1"))
    monkeypatch.setattr(model_module.Llama, "forward", real_forward)
    assert steps(run) == [1, 2] and not (run / "ckpt.pt").exists()
    with pytest.raises(SystemExit, match=r"stopped before its first checkpoint \(args.json, metrics.jsonl, no ckpt"):
        train.main(base_argv(tiny_base, run, "--max-steps", "4", "--seed", "2"))
    assert steps(run) == [1, 2]  # nothing appended
    train.main(base_argv(tiny_base, run, "--max-steps", "4", "--seed", "2", "--overwrite"))
    assert steps(run) == [1, 2, 3, 4] and json.loads((run / "args.json").read_text())["seed"] == 2
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        train.main(base_argv(tiny_base, tmp_path / "file", "--max-steps", "1"))


HOLD_LOCK = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.truncate(0); f.write(f"{os.getpid()}\\n"); f.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_folder_in_use_is_refused_and_a_crashed_runs_lock_is_not(tiny_base, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / "lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"is in use by process {holder.pid} .*pick another --out"):
            train.main(base_argv(tiny_base, run, "--max-steps", "1"))
        assert sorted(p.name for p in run.iterdir()) == ["lock"]  # nothing written
    finally:
        holder.kill()  # a crash: the lock file stays, its flock goes with the process
        holder.wait()
    assert (run / "lock").read_text().strip() == str(holder.pid)
    train.main(base_argv(tiny_base, run, "--max-steps", "1"))
    assert steps(run) == [1] and not (run / "lock").exists()  # released at the end


def test_ctrl_c_saves_the_last_finished_step_and_says_how_to_resume(tiny_base, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_forward, calls = Llama.forward, []

    def forward(self, idx, targets=None, **kw):
        if targets is not None and self.training:
            calls.append(1)
            if len(calls) == 3:  # Ctrl-C in the middle of step 3: step 3 finishes, then the run stops
                os.kill(os.getpid(), signal.SIGINT)
        return real_forward(self, idx, targets, **kw)

    monkeypatch.setattr(model_module.Llama, "forward", forward)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        train.main(base_argv(tiny_base, run, "--max-steps", "6", "--save-every", "0"))
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert f"stopped (SIGINT) after step 3 of 6: saved {run / 'ckpt.pt'}" in str(e.value)
    assert f"python train.py --resume {run}" in str(e.value)
    assert ckpt_step(run) == 3 and steps(run) == [1, 2, 3]
    monkeypatch.setattr(model_module.Llama, "forward", real_forward)
    assert train.main(["--resume", str(run)])["step"] == 6 and steps(run) == [1, 2, 3, 4, 5, 6]


def test_sigterm_to_a_running_command_saves_and_exits(tiny_base, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *base_argv(tiny_base, run, "--max-steps",
                             "100000", "--save-every", "0", "--threads", "1")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(steps(run)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "train.py: error: stopped (SIGTERM) after step" in err and "Traceback" not in err
    saved = ckpt_step(run)
    assert saved == steps(run)[-1] and f"step {saved} of 100000" in err


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_why(tiny_base, tmp_path):
    run = tmp_path / "run"
    train.main(base_argv(tiny_base, run, "--max-steps", "2"))
    size = (run / "ckpt.pt").stat().st_size

    def small_files():  # files above half a checkpoint cannot grow: the disk is "full" for the next one
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, no signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(run), "--max-steps", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]  # one line, the last
    assert last.startswith("train.py: error: could not write the checkpoint of step 4") and "File too large" in last
    assert "the previous checkpoint (step 2) is kept" in last and "Traceback" not in proc.stderr
    assert ckpt_step(run) == 2 and not list(run.glob("*.tmp"))


def test_resume_with_nothing_left_to_do_says_so(tiny_base, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(base_argv(tiny_base, run, "--max-steps", "3"))
    before = (run / "metrics.jsonl").read_text(), (run / "ckpt.pt").read_bytes()
    for length in ("3", "2"):
        res = train.main(["--resume", str(run), "--max-steps", length])
        assert res["step"] == 3 and res["losses"] == []
        out = capsys.readouterr().out
        assert f"nothing to do: {run / 'ckpt.pt'} is at step 3 and the run ends at step {length}" in out
        assert "nan" not in out and "steps 4-" not in out
    assert ((run / "metrics.jsonl").read_text(), (run / "ckpt.pt").read_bytes()) == before


def test_messages_name_what_the_user_gave(tiny_base, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "tokenizer": str(tmp_path / "gone.json")}))
    with pytest.raises(SystemExit) as e:  # only --init was given: the message does not blame --tokenizer
        train.main(base_argv(base, tmp_path / "r0", "--max-steps", "1"))
    assert f"the tokenizer of --init {base}" in str(e.value) and "--tokenizer" not in str(e.value)
    (base / "config.json").write_text(json.dumps(config))

    moved = tmp_path / "moved"
    train.main(base_argv(base, tmp_path / "run", "--max-steps", "1"))
    base.rename(moved)  # the base moves away after training
    for call in (lambda: ev.main(["--ckpt", str(tmp_path / "run"), "--n", "1"]),
                 lambda: train.main(["--resume", str(tmp_path / "run"), "--max-steps", "2"])):
        with pytest.raises(SystemExit) as e:
            call()
        msg = str(e.value) + capsys.readouterr().err  # train.py's flag errors go through argparse (exit 2)
        assert f"the base of the run {tmp_path / 'run'}, {base} (saved in its settings), is not there" in msg
        assert "--init where it is now" in msg and f"--init {base}" not in msg
    report = ev.main(["--ckpt", str(tmp_path / "run"), "--init", str(moved), "--n", "1", "--layers", "0",
                      "--max-new-tokens", "2"])
    assert report["init"] == str(moved)


def test_a_run_knows_its_base_by_a_fingerprint(tiny_base, tmp_path, capsys):
    from conftest import TINY_BASE

    from weights import save_hf
    other = tmp_path / "other-base"  # the same shape, other weights
    save_hf(Llama(model_module.LlamaConfig(**TINY_BASE)).init_weights(seed=1, std=0.05), other,
            extra_config={"tokenizer": "byte"})
    run = tmp_path / "run"
    train.main(base_argv(tiny_base, run, "--max-steps", "1"))
    saved = json.loads((run / "args.json").read_text())["base_fingerprint"]
    assert len(saved) == 16
    with pytest.raises(SystemExit, match=rf"--init {other} is not the base the run {run} was trained on"):
        ev.main(["--ckpt", str(run), "--init", str(other), "--n", "1"])
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(run), "--init", str(other), "--max-steps", "2"])
    assert "is not the base" in str(e.value) and ckpt_step(run) == 1
    moved = tmp_path / "moved-base"
    shutil.copytree(tiny_base, moved)  # the same base elsewhere (a copy: new file dates) is accepted
    assert train.main(["--resume", str(run), "--init", str(moved), "--max-steps", "2"])["step"] == 2
    assert json.loads((run / "args.json").read_text())["init"] == str(moved)
    report = ev.main(["--ckpt", str(run), "--init", str(tiny_base), "--n", "1", "--layers", "0",
                      "--max-new-tokens", "2", "--dtype", "bfloat16"])  # another dtype: the same fingerprint
    assert report["n"] == 1


def test_hand_edits_to_args_json_are_refused(tiny_base, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(base_argv(tiny_base, run, "--max-steps", "1"))
    good = (run / "args.json").read_text()
    (run / "args.json").write_text(good.replace('"lr": 0.01', '"lr": 0.02'))
    for call in (lambda: train.main(["--resume", str(run), "--max-steps", "2"]),
                 lambda: ev.main(["--ckpt", str(run), "--n", "1"])):
        with pytest.raises(SystemExit) as e:
            call()
        msg = str(e.value) + capsys.readouterr().err
        assert f"{run / 'args.json'} differs from the settings saved in ckpt.pt (lr: 0.01 in ckpt.pt, 0.02" in msg
    (run / "args.json").write_text(good)
    assert train.main(["--resume", str(run), "--max-steps", "2"])["step"] == 2


def test_a_run_folder_with_flat_settings_loads_resumes_and_evaluates_as_saved(tiny_base, tmp_path):
    """Runs saved before the configs were nested have every config field as a flat key in ckpt.pt's args and in
    args.json (as written below, by hand, from such a run): they rebuild the same configs, evaluate and resume as
    the same run saved today, and a hand edit of their args.json is still refused."""
    import checkpoint
    new, old = tmp_path / "new", tmp_path / "old"
    train.main(base_argv(tiny_base, new, "--max-steps", "2", "--mod-k", "2", "--mod-weight-range", "free",
                         "--mod-router", "vector", "--molex",
                         "--molex-gate-mode", "aux_free", "--lora-plus", "2"))
    shutil.copytree(new, old)
    ckpt = torch.load(old / "ckpt.pt", weights_only=True)
    nested = ckpt["args"]
    flat = {"init": nested["init"], "tokenizer": "byte", "data": "arith", "difficulty": 1, "n_train": 24,
            "max_len": 96, "prompt_loss": False, "choice_target": "text", "length_groups": True, "eval_n": 4,
            "base_bits": None, "base_format": None,
            "lora_rank": 4, "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_targets": "q,k,v,o,gate,up,down",
            "lora_layers": "all", "lora_plus": 2.0,
            "mod_k": 2, "mod_start": "final", "mod_weight_range": "free", "mod_router": "vector",
            "mod_router_input": "scaled", "mod_top_k": None, "mod_top_k_weights": "kept", "mod_router_lr": None,
            "mod_distill_weight": 1.0, "mod_distill_temp": 1.0, "mod_distill_direction": "forward",
            "mod_layer_ce": True, "mod_chunk_size": None, "mod": True,
            "molex_layers": "all", "molex_share": "shared", "molex_cosine": False, "molex_cosine_scale": 10.0,
            "molex_rule": "paper", "molex_vote": "prompt", "molex_alpha": 1.0, "molex_learn_alpha": True,
            "molex_gate_mode": "aux_free", "molex_balance_weight": 0.0, "molex_bias_rate": 0.001,
            "molex_gate_lr": None, "molex_gate_weight_decay": 0.1, "molex_gate_init": "normal", "molex_seed": None,
            "molex": True,
            "pretrain": False, "dim": 128, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "context": 512,
            "corpus_chars": 400000, "lr": 0.01, "min_lr": None, "warmup_steps": 2, "weight_decay": 0.0,
            "beta1": 0.9, "beta2": 0.99, "grad_clip": 1.0, "batch_size": 4, "grad_accum": 1, "max_steps": 2,
            "epochs": None, "device": "auto", "dtype": "auto", "threads": 0, "compile": False,
            "grad_checkpointing": False, "seed": 0, "out": str(old), "eval_every": 0, "save_every": 100,
            "vocab_size": 259, "base_fingerprint": nested["base_fingerprint"]}
    ckpt["args"] = flat
    old_names = {v: k for k, v in checkpoint.RENAMED.items()}  # and the parameter names of that time
    ckpt["model"] = {old_names.get(k, k): v for k, v in ckpt["model"].items()}
    assert "mod.share" in ckpt["model"] and "molex.share" in ckpt["model"]
    torch.save(ckpt, old / "ckpt.pt")
    (old / "args.json").write_text(json.dumps(flat, indent=2) + "\n")

    settings = {r: checkpoint.load_run(r)[2] for r in (new, old)}
    for name in checkpoint.CONFIGS:  # the same configs, built from the flat keys
        assert settings[old][name] == settings[new][name] and settings[old][name] is not None
    assert settings[old]["mod"].router == "vector" and settings[old]["lora"].plus == 2.0
    assert {k: v for k, v in settings[old].items() if k != "out"} == {k: v for k, v in settings[new].items()
                                                                         if k != "out"}
    flags = ["--n", "2", "--layers", "0", "--max-new-tokens", "2"]
    assert ev.main(["--ckpt", str(old), *flags])["metrics"] == ev.main(["--ckpt", str(new), *flags])["metrics"]

    edited = {**flat, "lora_rank": 8}
    (old / "args.json").write_text(json.dumps(edited, indent=2) + "\n")
    with pytest.raises(SystemExit, match=r"differs from the settings saved in ckpt.pt \(lora_rank: 4 in ckpt.pt, 8"):
        checkpoint.load_run(old)
    (old / "args.json").write_text((new / "args.json").read_text())  # rewritten by a resume that did not save yet
    checkpoint.load_run(old)
    (old / "args.json").write_text(json.dumps(flat, indent=2) + "\n")

    expected = train.main(["--resume", str(new), "--max-steps", "4"])["losses"]
    assert train.main(["--resume", str(old), "--max-steps", "4"])["losses"] == expected and len(expected) == 2
    saved = json.loads((old / "args.json").read_text())  # saved in today's form from then on
    assert saved["mod"]["router"] == "vector" and "mod_router" not in saved and saved == torch.load(
        old / "ckpt.pt", weights_only=True)["args"]


def test_mods_g_is_bounded_by_default_and_a_run_saved_before_the_choice_keeps_its_free_g():
    import checkpoint
    from mod import MoDConfig

    assert MoDConfig().weight_range == "bounded"
    settings = {"optim": {}, "mod": {"k": 2, "start": "final"}}  # saved before weight_range existed
    assert checkpoint.run_settings(settings)["mod"].weight_range == "free"
    settings["mod"]["weight_range"] = "bounded"
    assert checkpoint.run_settings(settings)["mod"].weight_range == "bounded"
