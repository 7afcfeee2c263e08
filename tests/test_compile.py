"""torch.compile of the training forward (forward + loss): one graph, no graph break, for the plain model, LoRA
and LoRA + MoD (naive and chunked loss, with and without gradient checkpointing), and the plain loss in
several chunks (head_loss.head_loss); and the compiled loss and gradients equal eager ones. Tiny fp32 models on the
CPU; dynamo only traces (explain, aot_eager: no C++ build), except one real `train.py --compile` run
(inductor)."""
import pytest
import torch

import head_loss as head_loss_module
from lora import apply_lora
from mod import MoDConfig, attach_mod

pytestmark = pytest.mark.slow  # dynamo traces: seconds per test

CONFIGS = ["plain", "lora", "mod", "mod-chunked", "lora-ckpt", "mod-chunked-ckpt", "lora-head-chunked"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # each test traces its own models: no cache or recompile limit carried over
    yield
    torch._dynamo.reset()


def head_chunks(monkeypatch, config):
    if config == "lora-head-chunked":  # the plain loss in chunks of 5 rows (21 targets: 5 chunks)
        monkeypatch.setattr(head_loss_module, "HEAD_CHUNK_ELEMENTS", 5 * 96)


def build(make_model, config):
    model = make_model(seed=0, n_layers=4).train()
    if not config.startswith("plain"):
        apply_lora(model, rank=4, alpha=8, targets=("q", "k", "v", "o"), verbose=False)
        with torch.no_grad():  # B = 0 at init would make the LoRA path's gradients trivial
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.1)
    if config.startswith("mod"):
        attach_mod(model, MoDConfig(k=3, chunk_size=7 if "chunked" in config else None), verbose=False)
        with torch.no_grad():  # the ensemble weight g = 0 at init would leave the router without a gradient
            model.mod.ensemble_weight.fill_(0.3)
    model.grad_checkpointing = config.endswith("ckpt")
    return model


def batch(vocab, B=2, T=12):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    targets[0, :3] = -100
    return idx, targets


@pytest.mark.parametrize("config", CONFIGS)
def test_training_forward_is_one_graph(make_model, monkeypatch, config):
    head_chunks(monkeypatch, config)
    model = build(make_model, config)
    idx, targets = batch(model.config.vocab_size)
    e = torch._dynamo.explain(model)(idx, targets)
    reasons = [r.reason.splitlines()[0] for r in e.break_reasons]
    assert (e.graph_count, e.graph_break_count) == (1, 0), f"{config}: {e.graph_count} graphs, breaks: {reasons}"


@pytest.mark.parametrize("config", ["lora", "mod-chunked", "lora-head-chunked"])
def test_compiled_loss_and_gradients_equal_eager(make_model, monkeypatch, config):
    head_chunks(monkeypatch, config)
    eager, compiled = build(make_model, config), build(make_model, config)
    compiled.load_state_dict(eager.state_dict())  # the same LoRA factors (their init draws from the global RNG)
    idx, targets = batch(eager.config.vocab_size)
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)  # fullgraph: any graph break raises
    losses = []
    for model, run in [(eager, eager), (compiled, fn)]:
        _, loss = run(idx, targets)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for n, p in compiled.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=f"{config}: gradient of {n}")


def test_train_compile_runs_with_inductor(tiny_base, tmp_path):
    """A real `train.py --compile` run on the CPU with torch's default backend (inductor: C++ is generated and
    built), LoRA + MoD: it trains, and its losses equal an eager run's to float rounding."""
    from test_train import base_argv, metrics

    import train
    argv = ["--max-steps", "2", "--mod-k", "2", "--save-every", "0", "--threads", "1"]
    train.main(base_argv(tiny_base, tmp_path / "eager", *argv))
    compiled = train.main(base_argv(tiny_base, tmp_path / "compiled", "--compile", *argv))
    assert compiled["step"] == 2
    eager = [r["loss"] for r in metrics(tmp_path / "eager")]
    assert [r["loss"] for r in metrics(tmp_path / "compiled")] == pytest.approx(eager, rel=1e-4)
