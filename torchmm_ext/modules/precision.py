"""Low-precision copies of a model's trained weights for its autocast forward.

Under autocast (e.g. bf16 on an AMX CPU) every fp32 linear / conv weight is cast to the
autocast dtype at its first use in each forward, into a freshly allocated tensor. On the CPU
that allocation, not the cast, is most of the cost: large blocks come back from the C allocator
as new pages, so the cast pays a page fault per 4 KiB (a ViT-B feed-forward weight, 2.4M
elements: ~15 ms in the training step under load against ~1.5 ms for the same cast into memory
that is already mapped). :func:`autocast_weight_copies` casts them instead into buffers kept
from step to step, once per forward, and hands the forward those copies; the gradient flows
back to the fp32 weights as through autocast's cast (the same ``grad.to(fp32)``).
"""

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Tuple

import torch
from torch import nn, Tensor

from torchmm_ext.modules.momentum import _AUTOCAST_CAST_MODULES, autocast_dtype


class _CastCopy(torch.autograd.Function):
    """``weight.to(low.dtype)`` whose value is already in ``low``; the backward is the cast's."""

    @staticmethod
    def forward(ctx, weight: Tensor, low: Tensor) -> Tensor:  # type: ignore[override]
        ctx.dtype = weight.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad.to(ctx.dtype), None


@contextmanager
def autocast_weight_copies(owner: nn.Module, modules: Iterable[nn.Module]) -> Iterator[None]:
    """Under autocast, the fp32 linear / conv weights and biases of ``modules`` are replaced, for
    the block, by their casts to the autocast dtype, written into buffers ``owner`` keeps from
    call to call (module docstring). Outputs and gradients are those of autocast's own casts
    (bit for bit: the same cast, the same backward); the fp32 parameters stay the leaves that
    receive the gradients. Without autocast, or without gradient, or nested, it does nothing.

    The copies are written on entry: a second forward whose graph is still waiting for its
    backward when the block is entered again would find them changed (autograd then raises its
    error for a tensor modified in place rather than computing a wrong gradient).

    Args:
        owner (nn.Module): keeps the buffers (in ``owner.__dict__``, not its state dict).
        modules (Iterable[nn.Module]): the modules whose weights the forward in the block uses.
    """
    modules = list(modules)
    first = next((p for m in modules for p in m.parameters()), None)
    low = None if first is None else autocast_dtype(first.device)
    if low is None or not torch.is_grad_enabled() or owner.__dict__.get("_autocast_copies_active"):
        yield
        return
    cache: Dict[int, Tuple[Tensor, Tensor]] = owner.__dict__.setdefault("_autocast_weight_copies", {})
    swaps: List[Tuple[nn.Module, str, Tensor]] = []
    copies: Dict[int, Tensor] = {}
    for module in (m for root in modules for m in root.modules()):
        if not isinstance(module, _AUTOCAST_CAST_MODULES):
            continue
        for name in ("weight", "bias"):
            p = module._parameters.get(name)
            if p is None or p.dtype != torch.float32:
                continue
            if id(p) not in copies:
                entry = cache.get(id(p))
                if (entry is None or entry[0] is not p or entry[1].shape != p.shape
                        or entry[1].dtype != low or entry[1].device != p.device):
                    entry = (p, torch.empty_like(p, dtype=low))
                copies[id(p)] = entry[1]
            swaps.append((module, name, p))
    params = {id(p): p for _, _, p in swaps}
    cache.clear()  # the current parameters only (a method may restructure modules)
    cache.update({i: (p, copies[i]) for i, p in params.items()})
    if params:
        with torch.no_grad():
            torch._foreach_copy_([copies[i] for i in params], list(params.values()))
    used = {i: _CastCopy.apply(p, copies[i]) if p.requires_grad else copies[i] for i, p in params.items()}
    owner._autocast_copies_active = True
    for module, name, p in swaps:
        module._parameters[name] = used[id(p)]  # type: ignore[assignment]
    try:
        yield
    finally:
        for module, name, p in swaps:
            module._parameters[name] = p
        owner._autocast_copies_active = False
