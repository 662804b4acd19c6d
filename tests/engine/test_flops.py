import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.utils.flop_counter import FlopCounterMode

from torchmm_ext.engine.flops import flop_counter, peak_tflops


MATMUL = 2 * (2 * 4 * 24 * 24 * 16)  # one [24 x 16] @ [16 x 24]-sized product per batch and head


def _attention_flops(counter, backend: SDPBackend, backward: bool) -> int:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 16, requires_grad=backward) for _ in range(3))
    with sdpa_kernel(backend), counter:
        out = F.scaled_dot_product_attention(q, k, v)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def test_cpu_fused_attention_is_counted():
    # Forward: the math backend runs SDPA as bmm ops that torch counts itself, an independent
    # count of the same computation: QK^T and PV.
    decomposed = _attention_flops(FlopCounterMode(display=False), SDPBackend.MATH, backward=False)
    assert decomposed == 2 * MATMUL
    assert _attention_flops(flop_counter(), SDPBackend.FLASH_ATTENTION, backward=False) == decomposed
    assert _attention_flops(FlopCounterMode(display=False), SDPBackend.FLASH_ATTENTION, backward=False) == 0
    # Backward as torch counts its CUDA flash kernels: QK^T recomputed, then dV, dP, dQ, dK.
    assert _attention_flops(flop_counter(), SDPBackend.FLASH_ATTENTION, backward=True) == (2 + 5) * MATMUL


def test_linear_flops_unchanged_and_cpu_has_no_peak():
    with flop_counter() as counter:
        torch.nn.Linear(8, 5)(torch.randn(3, 8))
    assert counter.get_total_flops() == 2 * 3 * 8 * 5
    assert peak_tflops(torch.device("cpu"), "bf16") is None
