"""Momentum (EMA) encoders and the feature queues of ALBEF's contrastive learning."""

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn, Tensor
from torchmultimodal.utils.distributed import BackpropType, concat_gather_all_gpu


@torch.no_grad()
def momentum_update(
    online: Iterable[nn.Module], momentum_copies: Iterable[nn.Module], momentum: float
) -> None:
    """``p_m <- momentum * p_m + (1 - momentum) * p`` for every parameter pair, in place.

    Same result as torchmultimodal's ``momentum_update``, which allocates a new tensor per
    parameter on every step; one fused ``_foreach_lerp_`` over all parameters is several
    times faster for a base-size ALBEF on the CPU.

    Args:
        online (Iterable[nn.Module]): the trained modules.
        momentum_copies (Iterable[nn.Module]): their EMA copies, in the same order.
        momentum (float): EMA coefficient (0.995 in ALBEF).
    """
    params, params_m = [], []
    for module, module_m in zip(online, momentum_copies):
        for p, p_m in zip(module.parameters(), module_m.parameters()):
            params.append(p.detach())
            params_m.append(p_m)
    if params_m:
        torch._foreach_lerp_(params_m, params, 1.0 - momentum)


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

    A subclass (an ``nn.Module``) defines ``_momentum_pairs() -> (online modules, copies)``;
    the mixin gives it ALBEF's ``copy_params`` as :meth:`copy_params_to_momentum`.
    """

    def _momentum_pairs(self) -> Tuple[List[nn.Module], List[nn.Module]]:
        raise NotImplementedError

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
