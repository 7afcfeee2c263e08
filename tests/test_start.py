"""With default settings, a tuned model starts exactly at its base: LoRA (B = 0), LoRA + MoD (the ensemble's share
g = 0) and LoRA + MoLEx (the expert's share 0) give the base's logits bit for bit at step 0, on the built-in base
(when `python train.py` has built it) and on the tests' tiny base. SmolLM2: tests/test_smollm2.py."""
import pytest
import torch

from checkpoint import BUILTIN_BASE, build_model
from mod import MoDConfig
from molex import MoLExConfig

ADDONS = {"lora": {}, "lora+mod2": {"mod": MoDConfig(k=2)}, "lora+mod4": {"mod": MoDConfig(k=4)},
          "lora+molex": {"molex": MoLExConfig()}, "lora+mod4+molex": {"mod": MoDConfig(k=4), "molex": MoLExConfig()}}


@pytest.fixture(params=["builtin", "tiny"])
def base(request, tiny_base):
    if request.param == "tiny":
        return str(tiny_base)
    if not (BUILTIN_BASE / "config.json").is_file():
        pytest.skip(f"the built-in base is not built ({BUILTIN_BASE}): python train.py builds it")
    return str(BUILTIN_BASE)


@pytest.mark.parametrize("addons", list(ADDONS))
def test_default_start_is_the_base_model(base, addons):
    settings = {"pretrain": False, "init": base, "seed": 3, **ADDONS[addons]}
    plain = build_model(settings, verbose=False, with_addons=False).eval()
    if "mod" in settings and settings["mod"].k > plain.config.n_layers:
        pytest.skip(f"the base has {plain.config.n_layers} layers")
    tuned = build_model(settings, verbose=False).eval()
    idx = torch.randint(3, 259, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(tuned(idx)[0], plain(idx)[0])
    assert sum(p.numel() for p in tuned.parameters() if p.requires_grad) > 0
