import pytest
import torch

from torchmm_ext.engine.precision import autocast_context, cpu_has_fast_bf16, resolve_precision


def test_resolve():
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "fp32") == "fp32"
    assert resolve_precision(cpu, "bf16") == "bf16"
    assert resolve_precision(cpu, "auto") == ("bf16" if cpu_has_fast_bf16() else "fp32")
    with pytest.raises(ValueError, match="valid: fp32, bf16, auto"):
        resolve_precision(cpu, "fp16")


def test_autocast_dtype():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast_context("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32
