"""ALBEF losses torchmultimodal lacks or implements differently: contrastive targets that
spread over every entry with the same image id, and ITM with hard negatives that never share
the positive's image id.

The contrastive loss itself is torchmultimodal's ``ImageTextContrastiveLoss``.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_targets(idx: Tensor, idx_all: Tensor) -> Tensor:
    """Ground-truth ITC targets: uniform over every column with the sample's image id.

    Args:
        idx (Tensor): ``[B]`` image ids of the batch.
        idx_all (Tensor): ``[K]`` ids of the similarity columns (batch then queue).

    Returns:
        Tensor: ``[B, K]`` rows summing to one.
    """
    positives = (idx.view(-1, 1) == idx_all.view(1, -1)).float()
    return positives / positives.sum(dim=1, keepdim=True)


class HardNegatives(NamedTuple):
    """Indices into the batch of the sampled hard negatives.

    Attributes:
        image_for_text (Tensor): ``[B]`` for each text, the negative image.
        text_for_image (Tensor): ``[B]`` for each image, the negative text.
    """

    image_for_text: Tensor
    text_for_image: Tensor


def _sample_rows(sim: Tensor, same_idx: Tensor, uniform_mix: float) -> Tensor:
    weights = F.softmax(sim.float(), dim=1).masked_fill(same_idx, 0.0)
    if uniform_mix > 0:
        allowed = (~same_idx).float()
        weights = ((1.0 - uniform_mix) * weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-30)
                   + uniform_mix * allowed / allowed.sum(dim=1, keepdim=True).clamp_min(1.0))
    # A row can only be empty when every sample in the batch shows the same image; then no
    # true negative exists and we fall back to any other sample (ALBEF would crash here).
    empty = weights.sum(dim=1) <= 0
    if empty.any():
        fallback = (~torch.eye(sim.size(0), dtype=torch.bool, device=sim.device)).float()
        weights[empty] = fallback[empty]
    return torch.multinomial(weights, 1).squeeze(1)


@torch.no_grad()
def sample_hard_negatives(sim_i2t: Tensor, sim_t2i: Tensor, idx: Tensor, uniform_mix: float = 0.0) -> HardNegatives:
    """Draw one hard negative per image and per text, as ALBEF does.

    Each row's candidates are weighted by ``softmax`` of the in-batch similarities; every pair
    with the same image id (not only the diagonal, as in torchmultimodal) gets weight zero.

    Args:
        sim_i2t (Tensor): ``[B, B]`` image-to-text similarities of the batch.
        sim_t2i (Tensor): ``[B, B]`` text-to-image similarities.
        idx (Tensor): ``[B]`` image ids.
        uniform_mix (float): probability that a negative is drawn uniformly among the allowed
            candidates instead of by similarity: the sampling weights are
            ``(1 - uniform_mix) * softmax + uniform_mix * uniform`` (both over the candidates
            with another image id). ALBEF: 0. From scratch, once ITC is sharp, similarity
            sampling draws only the nearest candidate and the ITM head never sees the
            mid-ranked ones it must reject at re-rank time.

    Returns:
        HardNegatives
    """
    if sim_i2t.size(0) < 2:
        raise ValueError("ITM hard negatives need a batch of at least 2 samples")
    if not 0.0 <= uniform_mix <= 1.0:
        raise ValueError(f"uniform_mix must be in [0, 1], got {uniform_mix}")
    same_idx = idx.view(-1, 1) == idx.view(1, -1)
    return HardNegatives(
        image_for_text=_sample_rows(sim_t2i, same_idx, uniform_mix),
        text_for_image=_sample_rows(sim_i2t, same_idx, uniform_mix),
    )


def itm_labels(batch_size: int, device: torch.device) -> Tensor:
    """ITM labels for ``[positives; negatives]``: ``batch_size`` ones then ``2 * batch_size`` zeros."""
    labels = torch.zeros(3 * batch_size, dtype=torch.long, device=device)
    labels[:batch_size] = 1
    return labels
