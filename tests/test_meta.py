"""The GPU path, checked without a GPU: one training step of LoRA, LoRA + MoD and LoRA + MoLEx, and a cached
generation's forward passes, with the model and the inputs on the `meta` device, the frozen base in bfloat16
and LoRA in float32 as on a GPU. A tensor made on the CPU by mistake meets a meta tensor and raises, so none can
slip into a CUDA run unseen. (Meta tensors have shapes, dtypes and devices but no values: nothing is computed,
and branches on values cannot be taken; see docs/design.md.)"""
import pytest
import torch

from lora import apply_lora
from mod import MoDConfig, attach_mod
from model import KVCache, Llama, LlamaConfig
from molex import MoLExConfig, attach_molex

CFG = LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=112, max_seq_len=64)
ADDONS = {"lora": None, "lora+mod": MoDConfig(k=3), "lora+mod-chunked": MoDConfig(k=3, chunk_size=5),
          "lora+molex": MoLExConfig()}


@pytest.fixture(autouse=True)
def meta_nonzero():
    """Row selections (nonzero) have a data-dependent size: on meta, assume every row is selected."""
    import torch.fx.experimental._config as fx_config
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


def meta_model(addon):
    with torch.device("meta"):
        model = Llama(CFG)
    model = model.to(torch.bfloat16)  # the frozen base in bf16
    model.build_rope(torch.device("meta"))
    apply_lora(model, rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down"), verbose=False)
    cfg = ADDONS[addon]
    if isinstance(cfg, MoDConfig):
        attach_mod(model, cfg, verbose=False)
    elif isinstance(cfg, MoLExConfig):
        attach_molex(model, cfg, verbose=False)
    return model


def test_the_model_is_on_meta_with_the_dtypes_of_a_gpu_run():
    model = meta_model("lora+mod")
    assert all(p.is_meta for p in [*model.parameters(), *model.buffers()])
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name


def fixed_expert_choice(monkeypatch):
    """MoLEx reads the experts chosen at each layer on the host (experts.unique().tolist()), to run each
    chosen block on its rows; a meta tensor has no values to read. The gate still runs on meta; only that read
    is replaced, by a fixed answer: the layer itself and one other (whose rows, by meta's nonzero, are all
    rows)."""
    unique = torch.Tensor.unique

    def fixed(self, *args, **kwargs):
        return torch.tensor([0, 1]) if self.is_meta else unique(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "unique", fixed)


@pytest.mark.parametrize("addon", list(ADDONS))
def test_a_training_step_on_meta(addon, monkeypatch):
    model = meta_model(addon).train()
    if model.molex is not None:
        fixed_expert_choice(monkeypatch)
    idx = torch.randint(0, CFG.vocab_size, (2, 12), device="meta")
    targets = torch.randint(0, CFG.vocab_size, (2, 12), device="meta")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    _, loss = model(idx, targets)
    assert loss.is_meta and loss.dim() == 0
    loss.backward()
    assert all(p.grad is not None and p.grad.is_meta and p.grad.dtype == torch.float32 for p in params)
    optimizer.step()


def test_a_cached_generation_on_meta():
    """generate()'s forward passes: the prefill reading out the last position, then one token at a time."""
    model = meta_model("lora+mod").eval()
    B, T = 3, 7
    cache = KVCache(CFG, CFG.n_layers, B, T + 4, torch.device("meta"), torch.bfloat16)
    last = torch.zeros(B, T, dtype=torch.bool, device="meta")
    with torch.no_grad():
        logits, _ = model(torch.randint(0, CFG.vocab_size, (B, T), device="meta"), cache=cache, where=last)
        for _ in range(3):
            logits, _ = model(torch.randint(0, CFG.vocab_size, (B, 1), device="meta"), cache=cache)
    assert logits.is_meta and logits.shape == (B, 1, CFG.vocab_size)
