"""Momentum (EMA) encoders and the feature queues of ALBEF's contrastive learning."""

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn, Tensor
from torchmultimodal.utils.distributed import BackpropType, concat_gather_all_gpu


# Modules whose parameters autocast casts to its lower precision (linear / conv ops): the ones
# that get low-precision shadows during a momentum step.
_AUTOCAST_CAST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Elements per slice of the CPU EMA + cast pass: the slice EMA-updated is still in cache when
# it is cast (half of a 2 MiB L2 in fp32).
_CPU_SLICE = 1 << 16


@torch.no_grad()
def momentum_update(
    online: Iterable[nn.Module],
    momentum_copies: Iterable[nn.Module],
    momentum: float,
    shadows: Optional[Dict[int, Tensor]] = None,
) -> None:
    """``p_m <- momentum * p_m + (1 - momentum) * p`` for every parameter pair, in place.

    Same result as torchmultimodal's ``momentum_update``, which allocates a new tensor per
    parameter on every step; one fused ``_foreach_lerp_`` over all parameters is several
    times faster for a base-size ALBEF on the CPU.

    Args:
        online (Iterable[nn.Module]): the trained modules.
        momentum_copies (Iterable[nn.Module]): their EMA copies, in the same order.
        momentum (float): EMA coefficient (0.995 in ALBEF).
        shadows (Optional[Dict[int, Tensor]]): ``id(p_m) ->`` a low-precision tensor of the
            same shape, set to the updated ``p_m`` (cast) in the same pass (on the CPU slice
            by slice, while the slice is in cache; on a GPU with one ``_foreach_copy_``). The
            fp32 update itself is the same ``lerp`` either way.
    """
    params, params_m = [], []
    for module, module_m in zip(online, momentum_copies):
        for p, p_m in zip(module.parameters(), module_m.parameters()):
            params.append(p.detach())
            params_m.append(p_m)
    if not params_m:
        return
    weight = 1.0 - momentum
    shadows = shadows or {}
    plain = [i for i, p_m in enumerate(params_m) if id(p_m) not in shadows]
    cast = [i for i, p_m in enumerate(params_m) if id(p_m) in shadows]
    if plain:
        torch._foreach_lerp_([params_m[i] for i in plain], [params[i] for i in plain], weight)
    if not cast:
        return
    if params_m[cast[0]].device.type != "cpu":
        masters = [params_m[i] for i in cast]
        torch._foreach_lerp_(masters, [params[i] for i in cast], weight)
        torch._foreach_copy_([shadows[id(p_m)] for p_m in masters], masters)
        return
    for i in cast:
        p_m, p, low = params_m[i].view(-1), params[i].reshape(-1), shadows[id(params_m[i])].view(-1)
        for s in range(0, p_m.numel(), _CPU_SLICE):
            part = p_m[s : s + _CPU_SLICE]
            part.lerp_(p[s : s + _CPU_SLICE], weight)
            low[s : s + _CPU_SLICE].copy_(part)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast casts linear / conv inputs to on ``device``'s type, or ``None`` when
    autocast is off there."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


class FeatureQueue(nn.Module):
    """ALBEF's queues of momentum image/text features and their image ids.

    Features are stored column-wise (``[embed_dim, size]``) as in ALBEF, so ``feat @ queue``
    gives similarities directly. Unlike ALBEF, the queue size need not be a multiple of the
    global batch size: writes wrap around.

    Args:
        embed_dim (int): feature size.
        size (int): number of queued entries (65,536 in ALBEF); 0 disables the queue.
        empty_idx (int): id stored in never-written slots; matches no real image id.
    """

    def __init__(self, embed_dim: int, size: int, empty_idx: int = -100) -> None:
        super().__init__()
        self.size = size
        self.empty_idx = empty_idx
        self.register_buffer(
            "image_queue", nn.functional.normalize(torch.randn(embed_dim, size), dim=0)
        )
        self.register_buffer(
            "text_queue", nn.functional.normalize(torch.randn(embed_dim, size), dim=0)
        )
        self.register_buffer("idx_queue", torch.full((1, size), empty_idx, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, idx: Tensor) -> None:
        """Write this step's momentum features (gathered over ranks) at the pointer.

        Args:
            image_feat (Tensor): ``[B, E]`` normalised momentum image features.
            text_feat (Tensor): ``[B, E]`` normalised momentum text features.
            idx (Tensor): ``[B]`` image ids.
        """
        if self.size == 0:
            return
        image_feat = concat_gather_all_gpu(image_feat.float().contiguous(), BackpropType.NONE)
        text_feat = concat_gather_all_gpu(text_feat.float().contiguous(), BackpropType.NONE)
        idx = concat_gather_all_gpu(idx.view(-1).long().contiguous(), BackpropType.NONE)
        n = image_feat.size(0)
        if n > self.size:  # keep the newest entries only
            image_feat, text_feat, idx = image_feat[-self.size :], text_feat[-self.size :], idx[-self.size :]
            n = self.size
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.image_queue[:, slots] = image_feat.T.to(self.image_queue.dtype)
        self.text_queue[:, slots] = text_feat.T.to(self.text_queue.dtype)
        self.idx_queue[:, slots] = idx.to(self.idx_queue.device)
        self.ptr[0] = (self.ptr[0] + n) % self.size


class MomentumCopiesMixin:
    """For models holding EMA (momentum) copies of some of their modules, as ALBEF's do.

    A subclass (an ``nn.Module`` with a float ``momentum`` attribute) defines
    ``_momentum_pairs() -> (online modules, copies)``; the mixin gives it ALBEF's
    ``copy_params`` as :meth:`copy_params_to_momentum` and the EMA step every task's training
    forward runs, :meth:`momentum_step`.
    """

    #: Under autocast, run the momentum copies on low-precision shadows of their linear / conv
    #: parameters (see :meth:`momentum_step`). Same outputs either way; False re-casts per use.
    momentum_shadows: bool = True

    def _momentum_pairs(self) -> Tuple[List[nn.Module], List[nn.Module]]:
        raise NotImplementedError

    @contextmanager
    def momentum_step(self, forward: bool = True) -> Iterator[None]:
        """One EMA step of the momentum copies (ALBEF's ``_momentum_update``); their forward
        passes of this training step run inside the block.

        Under autocast (e.g. bf16), the copies' linear / conv weights and biases are replaced,
        for the block only, by low-precision shadows written in the same pass as the EMA.
        Autocast caches the casts of weights that require gradient only, so without shadows it
        re-casts every momentum weight at each use (most of the ~150M momentum parameters of a
        base ALBEF for retrieval, every step).
        A shadow holds exactly the value autocast's cast would give, so outputs are unchanged;
        the fp32 momentum weights (the EMA's state) are unchanged too. Without autocast this is
        the plain EMA step.

        Nested calls (pre-training's forward around retrieval's ``itc_itm_losses``) make one
        EMA step, at the outermost.

        Args:
            forward (bool): the momentum copies run inside the block; False makes no shadows
                (the EMA alone, e.g. when no momentum feature is needed).
        """
        if getattr(self, "_momentum_step_active", False):
            yield
            return
        online, copies = self._momentum_pairs()
        first = next((p for m in copies for p in m.parameters()), None)
        low = None
        if forward and first is not None and self.momentum_shadows:
            low = autocast_dtype(first.device)
        swaps: List[Tuple[nn.Module, str, Tensor]] = []
        shadows: Dict[int, Tensor] = {}
        if low is not None:
            # Shadows for the parameters the EMA writes (every one of a copy whose modules
            # mirror the online ones), so none is left stale.
            paired = {id(p_m) for module, module_m in zip(online, copies)
                      for _, p_m in zip(module.parameters(), module_m.parameters())}
            cache: Dict[int, Tuple[Tensor, Tensor]] = self.__dict__.setdefault("_momentum_shadow_cache", {})
            for module in (m for copy_ in copies for m in copy_.modules()):
                if not isinstance(module, _AUTOCAST_CAST_MODULES):
                    continue
                for name in ("weight", "bias"):
                    p = module._parameters.get(name)
                    if p is None or p.dtype != torch.float32 or id(p) not in paired:
                        continue
                    entry = cache.get(id(p))
                    if (entry is None or entry[0] is not p or entry[1].shape != p.shape
                            or entry[1].dtype != low or entry[1].device != p.device):
                        entry = (p, torch.empty_like(p, dtype=low))
                    shadows[id(p)] = entry[1]
                    swaps.append((module, name, p))
            # Keep the shadows of the current parameters only (a method may restructure modules).
            cache.clear()
            cache.update({id(p): (p, shadows[id(p)]) for _, _, p in swaps})
        with torch.no_grad():
            momentum_update(online, copies, self.momentum, shadows)  # type: ignore[attr-defined]
        self._momentum_step_active = True
        for module, name, p in swaps:
            module._parameters[name] = shadows[id(p)]  # type: ignore[assignment]
        try:
            yield
        finally:
            for module, name, p in swaps:
                module._parameters[name] = p
            self._momentum_step_active = False

    @torch.no_grad()
    def copy_params_to_momentum(self, only: Optional[Sequence[str]] = None) -> List[str]:
        """Momentum copies <- online weights (ALBEF's ``copy_params``). A recipe calls it after
        loading weights into the online modules, e.g. from a checkpoint without momentum weights.

        Args:
            only (Optional[Sequence[str]]): names of the momentum modules to reset (e.g.
                ``["fusion_encoder_m"]``); all of them when None.

        Returns:
            List[str]: the momentum modules reset.
        """
        done = []
        for module, module_m in zip(*self._momentum_pairs()):
            name = next(n for n, m in self.named_children() if m is module_m)  # type: ignore[attr-defined]
            if only is None or name in only:
                module_m.load_state_dict(module.state_dict())
                done.append(name)
        return done
