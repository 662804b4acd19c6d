"""Word-patch alignment (WPA), ViLT's companion loss to image-text matching (Kim et al. 2021,
after UNITER's WRA): the optimal-transport distance between a pair's contextualised word tokens
and image patches, computed with IPOT (Xie et al. 2018, "A Fast Proximal Point Method for
Computing Exact Wasserstein Distance"), is pulled down for matching pairs and pushed up for
mismatched ones.

The transport plan is found without gradient; the distance ``<C, T>`` is then differentiated
through the cosine costs only, as in ViLT (``beta=0.5``, 50 outer iterations, one inner
Sinkhorn step, loss weight 0.1, in fp32).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cosine_cost", "ipot_plan", "optimal_transport_distance", "word_patch_alignment_loss"]


def cosine_cost(x: Tensor, y: Tensor, eps: float = 1e-5) -> Tensor:
    """``1 - cos(x_i, y_j)`` for every pair: ``[B, M, D] x [B, N, D] -> [B, M, N]``."""
    return 1 - F.normalize(x, dim=-1, eps=eps) @ F.normalize(y, dim=-1, eps=eps).transpose(1, 2)


@torch.no_grad()
def ipot_plan(cost: Tensor, x_valid: Tensor, y_valid: Tensor, beta: float = 0.5, iterations: int = 50,
              inner_steps: int = 1) -> Tensor:
    """IPOT transport plan between uniform distributions over the valid rows and columns.

    Each outer iteration takes a proximal step around the current plan ``T`` (kernel
    ``Q = exp(-C / beta) * T``) and rescales it towards the marginals with ``inner_steps``
    Sinkhorn updates.

    Args:
        cost (Tensor): ``[B, M, N]`` costs.
        x_valid (Tensor): ``[B, M]`` bool, rows that take part.
        y_valid (Tensor): ``[B, N]`` bool, columns that take part.
        beta (float): proximal step size (ViLT: 0.5).
        iterations (int): outer iterations (ViLT: 50).
        inner_steps (int): Sinkhorn steps per iteration (ViLT: 1).

    Returns:
        Tensor: ``[B, M, N]`` plan, zero on invalid rows and columns; rows sum to about
        ``1 / m`` and columns to ``1 / n`` (``m``, ``n``: valid counts).
    """
    joint = x_valid[:, :, None] & y_valid[:, None, :]
    m = x_valid.sum(1, keepdim=True).to(cost.dtype)  # [B, 1]
    n = y_valid.sum(1, keepdim=True).to(cost.dtype)
    kernel = torch.exp(-cost / beta) * joint
    plan = joint.to(cost.dtype)
    a = x_valid.to(cost.dtype) / m  # row scaling, [B, M]
    # invalid entries get a huge denominator, i.e. a scaling of ~0
    x_block, y_block = (~x_valid).to(cost.dtype) * 1e4, (~y_valid).to(cost.dtype) * 1e4
    for _ in range(iterations):
        q = kernel * plan
        for _ in range(inner_steps):
            b = 1 / (n * (q * a[:, :, None]).sum(1) + y_block)  # [B, N]
            a = 1 / (m * (q * b[:, None, :]).sum(2) + x_block)  # [B, M]
        plan = a[:, :, None] * q * b[:, None, :]
    return plan * joint


def optimal_transport_distance(x: Tensor, y: Tensor, x_valid: Tensor, y_valid: Tensor, beta: float = 0.5,
                               iterations: int = 50) -> Tensor:
    """``<C, T>`` with ``C`` the cosine costs of ``x`` and ``y`` and ``T`` their IPOT plan
    (no gradient through ``T``).

    Args:
        x (Tensor): ``[B, M, D]``; y (Tensor): ``[B, N, D]``.
        x_valid (Tensor): ``[B, M]`` bool; y_valid (Tensor): ``[B, N]`` bool.

    Returns:
        Tensor: ``[B]`` distances, in fp32.
    """
    cost = cosine_cost(x.float(), y.float())
    joint = x_valid[:, :, None] & y_valid[:, None, :]
    cost = cost.masked_fill(~joint, 0)
    plan = ipot_plan(cost.detach(), x_valid, y_valid, beta, iterations)
    return (cost * plan).sum(dim=(1, 2))


def word_patch_alignment_loss(
    text_features: Tensor,
    image_features: Tensor,
    text_mask: Tensor,
    image_mask: Tensor,
    itm_labels: Tensor,
) -> Tensor:
    """ViLT's WPA term (before its 0.1 weight): ``(sum of matched distances - sum of mismatched
    distances) / B``, the words being the text tokens between [CLS] and the last real token
    ([SEP]) and the patches the image tokens after the image CLS.

    Args:
        text_features (Tensor): ``[B, L_t, D]`` final text states of the ITM pass.
        image_features (Tensor): ``[B, 1 + N, D]`` final image states (CLS first).
        text_mask (Tensor): ``[B, L_t]`` 1 on real tokens (padding at the end).
        image_mask (Tensor): ``[B, 1 + N]`` 1 on real patches.
        itm_labels (Tensor): ``[B]`` 1 for matching pairs, 0 for mismatched ones.

    Returns:
        Tensor: scalar.
    """
    words = text_mask.bool().clone()
    words[torch.arange(words.shape[0], device=words.device), words.sum(1) - 1] = False  # [SEP]
    words[:, 0] = False  # [CLS]
    patches = image_mask.bool().clone()
    patches[:, 0] = False
    with torch.autocast(text_features.device.type, enabled=False):
        distance = optimal_transport_distance(text_features, image_features, words, patches)
    sign = torch.where(itm_labels.bool(), 1.0, -1.0).to(distance)
    return (sign * distance).sum() / distance.shape[0]
