"""train.py: exact resume, DDP = one process, atomic checkpoints, NaN stop, bad input, the built-in base build.

Every run uses a tiny base (dim 32, 2 layers) saved in a temporary folder and a few steps on the built-in arith
task, so the whole file runs in well under a minute on 2 cores.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import base_argv

import checkpoint
import model as model_module
import optim
import train
from data.batching import DataOrder
from mod import MoDConfig
from model import Llama
from threads import Threads
from weights import from_pretrained

ROOT = Path(__file__).resolve().parents[1]


def metrics(run):
    lines = [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r]


def ckpt_params(run):
    return torch.load(Path(run) / "ckpt.pt", weights_only=True)["model"]


# ---------------------------------------------------------------- schedule, data order

def test_lr_schedule_warmup_then_cosine():
    args = train.parse_args(["--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "10"])
    f = [optim.lr_factor(s, args.optim, 110) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup, step 0 already > 0
    for s in (10, 35, 60, 85, 110):  # naive cosine from 1 to 0.1 over steps 10..110
        assert f[s] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 100)))


def test_data_order_is_a_seeded_permutation_per_epoch_and_resumes():
    order = DataOrder(5, seed=3)
    first = order.take(7) + order.take(6)  # crosses into epoch 1 and 2
    perms = [torch.randperm(5, generator=torch.Generator().manual_seed(3 * 1_000_003 + e)).tolist() for e in range(3)]
    assert first == (perms[0] + perms[1] + perms[2])[:13]
    again = DataOrder(5, seed=3)
    again.take(7)
    resumed = DataOrder(5, seed=3, **again.state())
    assert resumed.take(6) == first[7:]


# ---------------------------------------------------------------- exact resume

def run_until_crash(monkeypatch, step, argv):
    """Run train.main(argv), interrupted (KeyboardInterrupt) while it computes step `step` + 1."""
    real_lr_factor = train.lr_factor

    def crash(s, *a):
        if s == step:
            raise KeyboardInterrupt
        return real_lr_factor(s, *a)

    monkeypatch.setattr(train, "lr_factor", crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    monkeypatch.setattr(train, "lr_factor", real_lr_factor)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tiny_base, tmp_path, monkeypatch):
    extra = ["--max-steps", "7", "--save-every", "3", "--grad-accum", "2", "--lora-dropout", "0.2"]
    full = train.main(base_argv(tiny_base, tmp_path / "full", *extra))
    assert len(full["losses"]) == 7

    # crash while computing step 5: steps 1-4 are logged, the last checkpoint is step 3
    run_until_crash(monkeypatch, 4, base_argv(tiny_base, tmp_path / "cut", *extra))
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"] == 3
    assert [r["step"] for r in metrics(tmp_path / "cut")] == [1, 2, 3, 4]

    resumed = train.main(["--resume", str(tmp_path / "cut")])
    assert len(resumed["losses"]) == 4  # steps 4..7
    assert [r["step"] for r in metrics(tmp_path / "cut")] == list(range(1, 8))  # step 4's old line dropped
    assert [r["loss"] for r in metrics(tmp_path / "cut")] == [r["loss"] for r in metrics(tmp_path / "full")]
    assert resumed["losses"] == full["losses"][3:]
    a, b = ckpt_params(tmp_path / "full"), ckpt_params(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_training_flags(tiny_base, tmp_path, capsys):
    train.main(base_argv(tiny_base, tmp_path / "r", "--max-steps", "1"))
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(tmp_path / "r"), "--lr", "5e-2"])
    assert e.value.code == 2 and "--lr" in capsys.readouterr().err


# ---------------------------------------------------------------- loss normalization and DDP

def test_grad_accum_equals_one_big_batch(tiny_base, tmp_path):
    """Loss normalized by the step's target tokens: 2 micro-batches of 2 = 1 batch of 4 (examples differ in length)."""
    one = train.main(base_argv(tiny_base, tmp_path / "one", "--max-steps", "2", "--batch-size", "4"))
    two = train.main(base_argv(tiny_base, tmp_path / "two", "--max-steps", "2", "--batch-size", "2",
                               "--grad-accum", "2"))
    # the same 4 examples per step? order.take(2) twice == order.take(4): yes, the data stream is the same
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5)
    # float noise only (Adam turns a 1e-9 gradient difference into up to 1e-6 here); a step moves them ~lr = 1e-2
    a, b = ckpt_params(tmp_path / "one"), ckpt_params(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tiny_base, tmp_path):
    """torchrun, gloo, 2 ranks; batch 3 splits 2 + 1 examples, so only global token normalization matches."""
    extra = ["--max-steps", "3", "--batch-size", "3", "--grad-accum", "2", "--save-every", "0"]
    single = train.main(base_argv(tiny_base, tmp_path / "single", *extra))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *base_argv(tiny_base, tmp_path / "ddp", *extra)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = metrics(tmp_path / "ddp")
    assert [r["step"] for r in ddp] == [1, 2, 3]  # one writer: no line twice
    assert [r["loss"] for r in ddp] == pytest.approx(single["losses"], rel=1e-5)
    a, b = ckpt_params(tmp_path / "single"), ckpt_params(tmp_path / "ddp")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# ---------------------------------------------------------------- checkpoints survive crashes

def test_checkpoint_write_killed_midway_keeps_the_previous_one(tiny_base, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = torch.save
    calls = []

    def torn_save(obj, f, *a, **kw):
        calls.append(obj["step"])
        if len(calls) == 2:  # the second checkpoint: write half of it, then "crash"
            import io
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            raise OSError("simulated crash in the middle of a checkpoint write")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(train.torch, "save", torn_save)
    with pytest.raises(SystemExit) as e:  # one line: what failed, why, what is kept
        train.main(base_argv(tiny_base, run, "--max-steps", "4", "--save-every", "2"))
    monkeypatch.setattr(train.torch, "save", real_save)
    assert calls == [2, 4]
    assert "checkpoint of step 4" in str(e.value) and "simulated crash" in str(e.value)
    assert "previous checkpoint (step 2) is kept" in str(e.value) and "\n" not in str(e.value)
    assert not list(run.glob("*.tmp"))  # the torn temporary file is removed
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2
    (run / "ckpt.pt.4242.tmp").write_bytes(b"PK half")  # what a killed writer (kill -9) leaves
    resumed = train.main(["--resume", str(run)])  # and the run carries on from it
    assert resumed["step"] == 4 and not list(run.glob("*.tmp"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_base, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_forward = Llama.forward
    calls = []

    def forward(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls.append(1)
            if len(calls) == 5:  # step 5 goes wrong
                return out[0], out[1] * float("nan")
        return out

    monkeypatch.setattr(model_module.Llama, "forward", forward)
    good = {}
    real_save = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint",
                        lambda state, path, **kw: (good.update(state["model"]), real_save(state, path, **kw)))
    with pytest.raises(SystemExit) as e:
        train.main(base_argv(tiny_base, run, "--max-steps", "8", "--save-every", "2"))
    msg = str(e.value.code)
    assert "nan" in msg and "step 5" in msg and "step 4" in msg and "ckpt.pt" in msg
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4
    assert all(torch.equal(ckpt["model"][k], good[k]) and torch.isfinite(good[k]).all() for k in good)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]  # the NaN step is not logged as a step


# ---------------------------------------------------------------- bad input: clear message, nonzero exit

def test_mod_switch():
    # --mod switches MoD on with the default k; --mod-k N alone switches it on too; neither: off
    assert train.parse_args(["--mod"]).mod.k == MoDConfig.k == 4
    assert train.parse_args(["--mod-k", "2"]).mod.k == 2 and train.parse_args(["--mod-k", "2"]).mod
    assert train.parse_args(["--mod", "--mod-k", "3"]).mod.k == 3
    args = train.parse_args([])
    assert args.mod is None


@pytest.mark.parametrize("flags, needle", [
    (["--lora-rank", "0"], "--lora-rank"),
    (["--data", "no-such-task"], "--data"),
    (["--init", "/no/such/folder"], "--init"),
    (["--lora-targets", "q,x"], "--lora-targets"),
    (["--max-steps", "3", "--epochs", "1"], "--max-steps or --epochs"),
])
def test_bad_flags_are_named(tiny_base, tmp_path, capsys, flags, needle):
    argv = base_argv(tiny_base, tmp_path / "run") + flags
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_empty_data_file_is_an_error(tiny_base, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    argv = base_argv(tiny_base, tmp_path / "run")
    argv = [a for a in argv if a not in ("--difficulty", "1")]
    argv[argv.index("arith")] = str(empty)
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert "empty" in str(e.value.code) and str(empty) in str(e.value.code)


def test_command_line_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--lora-rank", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--lora-rank must be >= 1" in proc.stderr


def test_existing_run_folder_is_not_overwritten(tiny_base, tmp_path):
    train.main(base_argv(tiny_base, tmp_path / "run", "--max-steps", "1"))
    with pytest.raises(SystemExit) as e:
        train.main(base_argv(tiny_base, tmp_path / "run", "--max-steps", "1"))
    assert "--resume" in str(e.value.code)


# ---------------------------------------------------------------- what a checkpoint holds

def test_checkpoint_holds_only_trainable_parameters_and_loads_weights_only(tiny_base, tmp_path):
    train.main(base_argv(tiny_base, tmp_path / "run", "--max-steps", "2", "--lora-targets", "q,v",
                         "--lora-layers", "1"))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert sorted(ckpt["model"]) == ["layers.2.attn.q.lora_A", "layers.2.attn.q.lora_B",  # the last of 3 layers
                                     "layers.2.attn.v.lora_A", "layers.2.attn.v.lora_B"]
    assert ckpt["step"] == 2 and set(ckpt["data"]) == {"epoch", "pos"} and len(ckpt["rng"]) == 1
    assert ckpt["args"]["lora"]["rank"] == 4 and ckpt["args"]["init"] == str(tiny_base.resolve())
    assert ckpt["optimizer"]["state"]  # Adam moments are there
    # rebuilt from its own args, the model matches
    model = checkpoint.build_model(checkpoint.run_settings(ckpt["args"]), verbose=False)
    checkpoint.load_trainable(model, ckpt["model"], "ckpt")


# ---------------------------------------------------------------- pretraining and the built-in base

TINY_PRETRAIN = ["--pretrain", "--dim", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
                 "--context", "128", "--corpus-chars", "20000", "--max-len", "64", "--batch-size", "4",
                 "--max-steps", "3", "--eval-every", "0"]


def test_pretrain_exports_a_loadable_base(tmp_path):
    train.main(TINY_PRETRAIN + ["--out", str(tmp_path / "base")])
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["tokenizer"] == "byte" and config["num_key_value_heads"] == 2
    loaded = from_pretrained(tmp_path / "base")
    trained = ckpt_params(tmp_path / "base")
    state = loaded.state_dict()
    assert set(trained) == set(state)  # every parameter was trainable, and is exported
    assert all(torch.equal(trained[k], state[k]) for k in trained)


def test_no_init_builds_the_builtin_base_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "BUILTIN_BASE", tmp_path / "builtin-base")
    monkeypatch.setattr(checkpoint, "BUILTIN_BASE", tmp_path / "builtin-base")
    monkeypatch.setattr(train, "BUILTIN_BASE_ARGV", TINY_PRETRAIN)
    argv = base_argv("x", tmp_path / "run", "--max-steps", "1")
    argv = argv[2:]  # no --init
    result = train.main(argv)
    assert "building it now" in capsys.readouterr().out
    assert (tmp_path / "builtin-base" / "model.safetensors").is_file() and result["step"] == 1
    assert json.loads((tmp_path / "run" / "args.json").read_text())["tokenizer"] == "byte"


# ---------------------------------------------------------------- the add-ons: MoD and MoLEx flags

def test_mod_and_molex_run_resumes_exactly_and_saves_their_parameters(tiny_base, tmp_path, capsys, monkeypatch):
    extra = ["--max-steps", "4", "--save-every", "2", "--mod-k", "2", "--mod-top-k", "1", "--molex",
             "--molex-gate-mode", "aux_free", "--molex-bias-rate", "0.01", "--molex-gate-lr", "0.05"]
    full = train.main(base_argv(tiny_base, tmp_path / "full", *extra))
    out = capsys.readouterr().out
    assert "MoD over the last 2 of 3 layers" in out and "MoLEx on layers all of 3" in out and "trainable" in out
    logged = metrics(tmp_path / "full")  # what the add-ons compute reaches metrics.jsonl (model.addons)
    assert all({"mod_ce", "mod_distill", "mod_layer_ce", "mod_g", "molex_balance_loss"} <= r.keys() for r in logged)
    assert all(r["mod_ce"] > 0 and r["mod_layer_ce"] > 0 and math.isfinite(r["mod_g"]) for r in logged)
    run_until_crash(monkeypatch, 2, base_argv(tiny_base, tmp_path / "cut", *extra))  # last checkpoint: step 2
    resumed = train.main(["--resume", str(tmp_path / "cut")])
    assert resumed["losses"] == full["losses"][2:]
    a, b = ckpt_params(tmp_path / "full"), ckpt_params(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("mod.norms.") for k in a) and "mod.router.weight" in a
    assert "molex.select_bias" in a and a["molex.select_bias"].abs().sum() > 0  # aux_free moved the bias
    # the gate has its own optimizer group with its own lr
    ckpt = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    model = checkpoint.build_model(checkpoint.run_settings(ckpt["args"]), verbose=False)
    args = train.parse_args(base_argv(tiny_base, tmp_path / "x", *extra))  # --lr 1e-2, weight decay 0.0
    groups = {g["name"]: g for g in optim.param_groups(model, args)}
    gate_ids = {id(p) for p in model.molex.gate_parameters()}
    assert groups["molex_gate"]["peak_lr"] == 0.05 and {id(p) for p in groups["molex_gate"]["params"]} == gate_ids
    assert all(id(p) not in gate_ids for n, g in groups.items() if n != "molex_gate" for p in g["params"])


def test_mod_router_lr_gives_the_router_its_own_group(tiny_base, tmp_path):
    argv = base_argv(tiny_base, tmp_path / "x", "--mod-k", "2", "--mod-router-lr", "1e-4")
    args = train.parse_args(argv)  # --lr 1e-2, weight decay 0.0
    model = checkpoint.build_model(vars(args), verbose=False)
    groups = {g["name"]: g for g in optim.param_groups(model, args)}
    router = {id(p) for p in model.mod.router.parameters()}
    assert groups["mod_router"]["peak_lr"] == 1e-4 and {id(p) for p in groups["mod_router"]["params"]} == router
    assert all(id(p) not in router for n, g in groups.items() if n != "mod_router" for p in g["params"])
    norms = {id(p) for p in model.mod.norms.parameters()}
    assert norms <= {id(p) for p in groups["no_decay"]["params"]}  # the norms keep the main lr
    model.mod.cfg.router_lr = None  # without the flag: no group of its own (older runs resume unchanged)
    assert "mod_router" not in {g["name"] for g in optim.param_groups(model, args)}


@pytest.mark.parametrize("flags, needle", [
    (["--mod-router-lr", "1e-4"], "--mod-router-lr"),
    (["--molex", "--molex-layers", "first:x"], "molex"),
    (["--molex", "--molex-alpha", "1.5"], "--molex-alpha"),
    (["--molex", "--prompt-loss"], "--molex-vote"),
    (["--mod-k", "9"], "--mod-k"),
    (["--mod-k", "2", "--mod-top-k", "3"], "--mod-top-k"),
    (["--mod-k", "0"], "--mod-k must be >= 1"),
    (["--mod-k", "0", "--mod-top-k", "1"], "--mod-k must be >= 1"),
    (["--mod-top-k", "1"], "given without --mod"),
])
def test_bad_addon_flags_are_named(tiny_base, tmp_path, capsys, flags, needle):
    with pytest.raises(SystemExit) as e:
        train.main(base_argv(tiny_base, tmp_path / "run") + flags)
    assert needle in (capsys.readouterr().err + str(e.value.code))


def test_auto_threads_make_room_for_a_load_that_starts_later():
    threads = Threads(0)  # decided now; re-checked by update() as the run goes
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time
        time.sleep(0.6)
        # the spinner counts as another program's busy core; our own threads' time does not
        assert threads.update(force=True) <= max(1, (os.cpu_count() or 1) - 1)
    finally:
        spinner.kill()
    assert Threads(3).update(force=True) == 3  # an explicit --threads wins
    torch.set_num_threads(1)  # as conftest set it


def test_a_run_folder_without_newer_settings_takes_their_defaults(tiny_base, tmp_path, capsys):
    """Settings added after a run was made are missing from its args: they take their dataclass defaults, both
    when the run's model is rebuilt and when it resumes."""
    run = tmp_path / "run"
    train.main(base_argv(tiny_base, run, "--max-steps", "2", "--mod-k", "2", "--mod-router", "vector", "--molex"))
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    for key in ("mod.top_k", "mod.router_lr", "mod.layer_ce", "molex.vote", "molex.seed", "lora.plus", "optim.beta2"):
        del ckpt["args"][key.split(".")[0]][key.split(".")[1]]
    torch.save(ckpt, run / "ckpt.pt")
    model = checkpoint.build_model(checkpoint.run_settings(ckpt["args"]), verbose=False)
    assert model.mod.cfg == MoDConfig(k=2, router="vector")
    assert model.molex.cfg.vote == "prompt" and model.molex.cfg.seed == 0
    capsys.readouterr()
    resumed = train.main(["--resume", str(run), "--max-steps", "3"])
    assert resumed["step"] == 3 and resumed["losses"]
    out = capsys.readouterr().out  # what it resumes, and the steps of this process and in all
    assert f"resuming {run} at step 2 of 3" in out and "done: 1 step in this run (steps 3-3; 3 in all)" in out
    assert json.loads((run / "args.json").read_text())["optim"]["beta2"] == 0.99  # saved complete again


def test_a_run_folder_from_before_the_base_start_keeps_its_settings(tiny_base, tmp_path):
    """A run saved before MoD / MoLEx started at the base has no mod_start, mod_router_input, mod_top_k_weights or
    molex_gate_init in its args: it is rebuilt, evaluated and resumed with what it was trained with."""
    run = tmp_path / "run"
    old = {"mod_start": "uniform", "mod_router_input": "normed", "mod_top_k_weights": "renormalized",
           "molex_gate_init": "uniform"}
    flags = [x for k, v in old.items() for x in (f"--{k.replace('_', '-')}", v)]
    train.main(base_argv(tiny_base, run, "--max-steps", "2", "--mod-k", "2", "--molex", *flags))
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert "mod.ensemble_weight" not in ckpt["model"]
    for key in old:  # mod_start: the field start of the run's "mod" settings
        del ckpt["args"][key.split("_", 1)[0]][key.split("_", 1)[1]]
    torch.save(ckpt, run / "ckpt.pt")
    model, _, settings, _ = checkpoint.load_run(run)
    assert {k: getattr(settings[k.split("_", 1)[0]], k.split("_", 1)[1]) for k in old} == old
    assert model.mod.cfg.start == "uniform"
    assert train.main(["--resume", str(run), "--max-steps", "3"])["step"] == 3


def test_a_run_folder_with_the_old_parameter_names_loads_and_resumes(tiny_base, tmp_path):
    """MoD's g and MoLEx's m_t were saved as mod.share and molex.share: such a run loads them under their names now
    (checkpoint.RENAMED), for evaluation and for --resume, which continues as the run with the new names does."""
    run, old = tmp_path / "run", tmp_path / "old"
    train.main(base_argv(tiny_base, run, "--max-steps", "2", "--mod-k", "2", "--molex"))
    shutil.copytree(run, old)
    ckpt = torch.load(old / "ckpt.pt", weights_only=True)
    saved = {k: ckpt["model"][k] for k in ("mod.ensemble_weight", "molex.mix_weight")}
    ckpt["model"] = {{"mod.ensemble_weight": "mod.share", "molex.mix_weight": "molex.share"}.get(k, k): v
                     for k, v in ckpt["model"].items()}
    torch.save(ckpt, old / "ckpt.pt")
    model, _, _, _ = checkpoint.load_run(old)
    assert torch.equal(model.mod.ensemble_weight.detach(), saved["mod.ensemble_weight"])
    assert torch.equal(model.molex.mix_weight.detach(), saved["molex.mix_weight"])
    expected = train.main(["--resume", str(run), "--max-steps", "4"])["losses"]
    assert train.main(["--resume", str(old), "--max-steps", "4"])["losses"] == expected and len(expected) == 2


def test_length_groups_are_seeded_resumable_and_pad_less():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (203,), generator=g).tolist()  # 203: epochs end inside a batch of 8
    bs = 8

    def batches(order, n):
        return [order.take(bs) for _ in range(n)]

    grouped = batches(DataOrder(203, 3, lengths, bs), 80)  # 640 examples: over three epochs
    assert grouped == batches(DataOrder(203, 3, lengths, bs), 80)  # seeded
    for stop in (1, 25, 26, 51):  # resume anywhere, also at and across an epoch's end
        first = DataOrder(203, 3, lengths, bs)
        head = batches(first, stop)
        resumed = DataOrder(203, 3, lengths, bs, **first.state())
        assert head + batches(resumed, 80 - stop) == grouped
    for e in range(3):  # every epoch is a permutation: each example once
        epoch = [i for b in grouped for i in b][e * 203:(e + 1) * 203]
        assert sorted(epoch) == list(range(203))
    plain = batches(DataOrder(203, 3), 80)

    def padded(bs_list):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs_list)

    assert padded(grouped) < 0.2 * padded(plain)
    assert grouped[:3] != plain[:3]
    assert grouped != batches(DataOrder(203, 4, lengths, bs), 80)  # the seed counts
    # equal lengths (pretraining windows): the same order as without grouping
    assert batches(DataOrder(203, 3, [7] * 203, bs), 80) == plain


def test_bounded_mod_weight_stays_in_0_1_through_training(tiny_base, tmp_path):
    weights = {}
    for weight_range in ("free", "bounded"):  # a large lr: a few AdamW steps move g by about lr each
        train.main(base_argv(tiny_base, tmp_path / weight_range, "--max-steps", "4", "--mod-k", "2",
                             "--mod-weight-range", weight_range, "--lr", "0.5", "--warmup-steps", "1", "--eval-n", "0"))
        weights[weight_range] = float(ckpt_params(tmp_path / weight_range)["mod.ensemble_weight"])
    assert not 0 <= weights["free"] <= 1  # a free g leaves [0, 1] here ...
    assert 0 <= weights["bounded"] <= 1  # ... the bounded one is projected back after every step
