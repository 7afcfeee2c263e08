"""--device: auto picks cuda, then mps, then cpu; mps is accepted only where torch reports it, with its dtype rules
(no float64 sums, bfloat16 from macOS 14). No machine of the project has an Apple GPU: torch's answers are faked."""
import pytest
import torch

import cli
from cli import UserError, pick_device, sum_dtype, use_bf16


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(cli, "mps_available", lambda: mps)
    assert pick_device("auto").type == expected


def test_mps_only_where_torch_reports_it(monkeypatch):
    monkeypatch.setattr(cli, "mps_available", lambda: False)
    with pytest.raises(UserError, match="--device mps: torch reports no MPS device"):
        pick_device("mps")
    monkeypatch.setattr(cli, "mps_available", lambda: True)
    assert pick_device("mps") == torch.device("mps")
    with pytest.raises(UserError, match="--device must be auto, cpu, cuda, cuda:N or mps, got 'metal'"):
        pick_device("metal")


def test_mps_dtype_rules(monkeypatch):
    mps = torch.device("mps")
    assert sum_dtype(mps) == torch.float32 and sum_dtype(torch.device("cpu")) == torch.float64
    assert not use_bf16("auto", mps)  # float32 unless asked
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False)
    with pytest.raises(UserError, match="needs macOS 14"):
        use_bf16("bfloat16", mps)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)
    assert use_bf16("bfloat16", mps)
