"""Attention helpers shared by our encoders.

Every attention in torchmm_ext runs through ``F.scaled_dot_product_attention`` (inside
torchmultimodal's ``MultiHeadSelfAttention`` / ``MultiHeadAttentionWithCache``). The few
places that need the attention *probabilities* (ELIP's CLS-attention scores, Grad-CAM on the
cross-attention) recompute them explicitly for one layer with the helpers below, so the fast
kernel stays on every other layer.
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmultimodal.modules.layers.multi_head_attention import (
    MultiHeadAttentionWithCache,
    MultiHeadSelfAttention,
)


class AttentionWithProbs(NamedTuple):
    """Output of an explicitly computed attention.

    Attributes:
        output (Tensor): attention output after the output projection, ``[B, Lq, D]``.
        probs (Tensor): attention probabilities ``[B, H, Lq, Lk]`` (before dropout).
    """

    output: Tensor
    probs: Tensor


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    # [B, L, D] -> [B, H, L, D/H]
    b, length, d = x.shape
    return x.view(b, length, num_heads, d // num_heads).transpose(1, 2)


def _attend(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    scores = q @ k.transpose(-2, -1) / (q.size(-1) ** 0.5)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attn_mask
    probs = F.softmax(scores, dim=-1)
    out = probs @ v  # [B, H, Lq, D/H]
    return out, probs


def self_attention_with_probs(
    attention: MultiHeadSelfAttention, x: Tensor, attn_mask: Optional[Tensor] = None
) -> AttentionWithProbs:
    """Run a ``MultiHeadSelfAttention`` explicitly and also return its probabilities.

    Args:
        attention (MultiHeadSelfAttention): the module whose weights are used.
        x (Tensor): its input ``[B, L, D]`` (already layer-normed for pre-norm blocks).
        attn_mask (Optional[Tensor]): mask broadcastable to ``[B, H, L, L]``; bool means
            ``True`` = attend, float is added to the scores.

    Returns:
        AttentionWithProbs: same ``output`` as ``attention(x, attn_mask)`` (up to rounding)
        and ``probs [B, H, L, L]``.
    """
    q, k, v = attention.input_proj(x).chunk(3, dim=-1)
    h = attention.num_heads
    out, probs = _attend(_split_heads(q, h), _split_heads(k, h), _split_heads(v, h), attn_mask)
    out = out.transpose(1, 2).reshape(x.shape)
    return AttentionWithProbs(attention.output_proj(out), probs)


def cross_attention_with_probs(
    attention: MultiHeadAttentionWithCache,
    query: Tensor,
    key_value: Tensor,
    attn_mask: Optional[Tensor] = None,
) -> AttentionWithProbs:
    """Run a ``MultiHeadAttentionWithCache`` (cross-attention) explicitly, returning probabilities.

    Args:
        attention (MultiHeadAttentionWithCache): the module whose weights are used.
        query (Tensor): ``[B, Lq, Dq]``.
        key_value (Tensor): ``[B, Lk, Dkv]``.
        attn_mask (Optional[Tensor]): as in :func:`self_attention_with_probs`.

    Returns:
        AttentionWithProbs: ``output [B, Lq, Dq]`` and ``probs [B, H, Lq, Lk]``.
    """
    h = attention.num_heads
    q = _split_heads(attention.q_proj(query), h)
    k = _split_heads(attention.k_proj(key_value), h)
    v = _split_heads(attention.v_proj(key_value), h)
    out, probs = _attend(q, k, v, attn_mask)
    out = out.transpose(1, 2).reshape(query.shape)
    return AttentionWithProbs(attention.output_proj(out), probs)
