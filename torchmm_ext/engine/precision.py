"""Mixed precision: bf16 autocast where the hardware runs it fast, fp32 elsewhere.

bf16 keeps fp32's exponent range, so no loss scaling (GradScaler) is needed; fp16 is not
offered for that reason.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import ContextManager, Union

import torch

PRECISIONS = ("fp32", "bf16", "auto")


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX or AVX512-BF16).

    ``torch.backends.cpu.get_cpu_capability()`` reports "AVX512" even on AMX machines, so the
    CPU flags are read directly (Linux); elsewhere torch's AMX probe is the fallback.

    Returns:
        bool: True when bf16 autocast is expected to be faster than fp32 on this CPU.
    """
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        try:
            flags = set()
            for line in cpuinfo.read_text().splitlines():
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
            return bool(flags & {"amx_bf16", "avx512_bf16"})
        except OSError:
            pass
    try:
        return bool(torch._C._cpu._init_amx())  # private: returns whether AMX is usable
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(device: Union[torch.device, str], precision: str) -> str:
    """Turn a precision setting into the concrete one used on ``device``.

    Args:
        device (Union[torch.device, str]): the compute device.
        precision (str): "fp32", "bf16" or "auto" (bf16 on CUDA with bf16 support and on
            CPUs with AMX/AVX512-BF16, else fp32).

    Returns:
        str: "fp32" or "bf16".

    Raises:
        ValueError: for an unknown setting, or "bf16" on a CUDA device without bf16.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "fp32":
        return "fp32"
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not supported:
            raise ValueError(f"precision 'bf16' requested but {device} does not support bf16")
        return "bf16" if supported else "fp32"
    if precision == "bf16":
        return "bf16"  # explicit request: honour it on CPU even without AMX (slow but correct)
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def autocast_context(device: Union[torch.device, str], precision: str) -> ContextManager:
    """Context manager running the forward pass in the resolved precision.

    Args:
        device (Union[torch.device, str]): the compute device.
        precision (str): "fp32", "bf16" or "auto" (see :func:`resolve_precision`).

    Returns:
        ContextManager: ``torch.autocast(device.type, dtype=torch.bfloat16)`` or a no-op.
    """
    device = torch.device(device)
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
