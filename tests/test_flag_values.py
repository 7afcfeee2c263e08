"""Every number a flag takes is checked once, where its config is: finite, in range, and the message names the flag
(NaN fails every comparison, so `x <= 0` lets it through: each float flag is tried with nan and inf)."""
import pytest

import train

ADDON = {"mod": ["--mod-k", "2"], "molex": ["--molex"]}
FLOAT_FLAGS = ["--lora-alpha", "--lora-dropout", "--lora-plus", "--mod-router-lr", "--mod-distill-weight",
               "--mod-distill-temp", "--molex-cosine-scale", "--molex-alpha", "--molex-balance-weight",
               "--molex-bias-rate", "--molex-gate-lr", "--molex-gate-weight-decay", "--lr", "--min-lr",
               "--weight-decay", "--beta1", "--beta2", "--grad-clip", "--epochs"]


def test_the_list_covers_every_float_flag():
    floats = {a.option_strings[-1] for a in train.get_parser()._actions if a.type is float}
    assert floats == set(FLOAT_FLAGS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("flag", FLOAT_FLAGS)
def test_float_flags_refuse_nan_and_inf(flag, value, tmp_path, capsys):
    switch = ADDON.get(flag[2:].split("-")[0], [])
    with pytest.raises(SystemExit) as e:
        train.parse_args([*switch, f"{flag}={value}", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "must be" in err and value in err, err


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "0"], "--lr must be"), (["--lora-alpha", "0"], "--lora-alpha"),
    (["--lora-dropout", "1"], "--lora-dropout"), (["--mod-k", "2", "--mod-distill-temp", "0"], "--mod-distill-temp"),
    (["--epochs", "0"], "--epochs must be"), (["--mod-k", "-1"], "--mod-k"),
    (["--mod-k", "0"], "--mod-k must be"), (["--mod-k", "0", "--mod-top-k", "2"], "--mod-k must be"),
])
def test_out_of_range_values_name_the_flag(flags, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args([*flags, "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_molex_on_a_one_layer_model_is_refused(tmp_path):
    from conftest import TINY_BASE

    from model import Llama, LlamaConfig
    from weights import save_hf
    base = tmp_path / "one-layer"
    save_hf(Llama(LlamaConfig(**{**TINY_BASE, "n_layers": 1})).init_weights(seed=0, std=0.05), base,
            extra_config={"tokenizer": "byte"})
    with pytest.raises(SystemExit, match=r"--molex mixes each layer with another layer, and this model has 1"):
        train.main(["--init", str(base), "--molex", "--max-steps", "1", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_threads_and_pretrain_shapes_are_named(tmp_path):
    import eval as ev
    import sample
    for call in (lambda: train.main(["--threads", "-1", "--device", "cpu", "--out", str(tmp_path / "r")]),
                 lambda: ev.main(["--threads", "-1", "--device", "cpu", "--out", str(tmp_path / "e")]),
                 lambda: sample.main(["--threads", "-1", "--device", "cpu", "x"])):
        with pytest.raises(SystemExit, match=r"--threads must be >= 0 \(0: auto\), got -1"):
            call()
    with pytest.raises(SystemExit, match=r"--dim 30 / --n-heads 8 / --n-kv-heads 4: .*dim=30"):
        train.main(["--pretrain", "--dim", "30", "--max-steps", "1", "--out", str(tmp_path / "p")])
