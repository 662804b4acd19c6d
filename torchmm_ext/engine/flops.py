"""FLOP counting and hardware peaks for benchmarks and reports.

``torch.utils.flop_counter.FlopCounterMode`` has formulas for the CUDA attention kernels but not
for the CPU's fused one (``_scaled_dot_product_flash_attention_for_cpu``), so on the CPU every
SDPA call would count zero. :func:`flop_counter` adds that kernel (forward and backward) with
torch's own SDPA formulas.
"""

from typing import Any, Dict, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["flop_counter", "peak_tflops"]

_aten = torch.ops.aten


def _cpu_flash_forward(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args: Any, out_shape=None,
                        **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_CPU_ATTENTION = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def flop_counter(**kwargs: Any) -> FlopCounterMode:
    """``FlopCounterMode(display=False, **kwargs)`` that also counts the CPU's fused SDPA."""
    kwargs.setdefault("display", False)
    custom = {**_CPU_ATTENTION, **kwargs.pop("custom_mapping", {})}
    return FlopCounterMode(custom_mapping=custom, **kwargs)


# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets, by the
# substring of ``torch.cuda.get_device_name()`` that identifies the part.
_GPU_PEAK_TFLOPS: Dict[str, Dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp32": 67.0, "tf32": 494.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.0, "tf32": 378.0},
    "H100": {"bf16": 989.0, "fp32": 67.0, "tf32": 494.0},  # SXM
    "A100": {"bf16": 312.0, "fp32": 19.5, "tf32": 156.0},
    "L40S": {"bf16": 362.0, "fp32": 91.6, "tf32": 183.0},
    "A10G": {"bf16": 70.0, "fp32": 31.2, "tf32": 35.0},
}


def peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    """The device's dense peak for ``precision`` ("bf16", "fp32", "tf32"), or ``None`` when it
    is not in the table (every CPU: its peak depends on cores, clocks and ISA)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for part, peaks in _GPU_PEAK_TFLOPS.items():  # "H100 PCIe" before the "H100" SXM entry
        if part in name:
            return peaks.get(precision)
    return None
