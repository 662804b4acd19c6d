"""Attention helpers shared by our encoders.

Every attention in torchmm_ext runs through :func:`scaled_dot_product_attention` below (a thin
wrapper of ``F.scaled_dot_product_attention``; :class:`SelfAttention` is torchmultimodal's
``MultiHeadSelfAttention`` calling it). The few places that need the attention
*probabilities* (ELIP's CLS-attention scores, Grad-CAM on the cross-attention) recompute them
explicitly for one layer with the helpers below, so the fast kernel stays on every other layer.

Why a wrapper: on the CPU, SDPA runs every one of our attentions (ViT blocks without a mask,
text self-attention with a boolean padding mask, fusion cross-attention) on its flash kernel
(``_scaled_dot_product_flash_attention_for_cpu``). Its bf16 *backward* is 2-7x slower than
its own fp32 backward at our shapes (1 thread, Sapphire Rapids: ViT-B layer, batch 4, ~78 vs
~38 ms; 30-token text layer, 12 pairs, ~40 vs ~6 ms) and was the largest non-GEMM cost of the
bf16 training step. In bf16 training on the CPU the wrapper keeps the same flash forward (the
same kernel call, so bit-identical outputs) and runs the backward kernel on fp32 copies of its
inputs, casting the gradients back: faster, and the gradients are closer to the fp32 ones.
"""

from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmultimodal.modules.layers.multi_head_attention import (
    MultiHeadAttentionWithCache,
    MultiHeadSelfAttention,
)

_aten = torch.ops.aten
_FP32_BACKWARD = True


@contextmanager
def cpu_attention_backward_in_fp32(enabled: bool) -> Iterator[None]:
    """Turns the fp32 backward of bf16 CPU attention (see the module docstring) on or off for
    the attention calls made in the block (it is on by default); for A/B measurements."""
    global _FP32_BACKWARD
    saved, _FP32_BACKWARD = _FP32_BACKWARD, enabled
    try:
        yield
    finally:
        _FP32_BACKWARD = saved


class _CPUFlashAttentionFp32Backward(torch.autograd.Function):
    """SDPA's CPU flash kernel forward (bf16) whose backward runs the flash backward in fp32."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        out, logsumexp = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=attn_mask)
        ctx.save_for_backward(q, k, v, out, logsumexp, attn_mask)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, k, v, out, logsumexp, attn_mask = ctx.saved_tensors
        grads = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.float(), q.float(), k.float(), v.float(), out.float(), logsumexp, 0.0, False,
            attn_mask=None if attn_mask is None else attn_mask.float(),
        )
        return grads[0].to(q.dtype), grads[1].to(k.dtype), grads[2].to(v.dtype), None


def _takes_fp32_backward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float) -> bool:
    # Only where SDPA itself would run the CPU flash kernel (4-D, same dtype and head size,
    # unit last stride, no dropout) and a backward will follow; compiled code keeps plain SDPA.
    return (
        _FP32_BACKWARD
        and q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and k.dtype == v.dtype == q.dtype
        and dropout_p == 0.0
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and q.dim() == k.dim() == v.dim() == 4
        and q.size(-1) == k.size(-1) == v.size(-1)
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        and (attn_mask is None or attn_mask.dtype in (torch.bool, q.dtype))
        and not torch.compiler.is_compiling()
    )


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0
) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p)``, with the backward of
    bf16 attention on the CPU run in fp32 (module docstring). Same forward output.

    Args:
        q (Tensor): ``[B, H, Lq, d]``.
        k (Tensor): ``[B, H, Lk, d]``.
        v (Tensor): ``[B, H, Lk, d]``.
        attn_mask (Optional[Tensor]): broadcastable to ``[B, H, Lq, Lk]``; bool means
            ``True`` = attend, float is added to the scores.
        dropout_p (float): attention-probability dropout (pass 0 in eval mode).

    Returns:
        Tensor: ``[B, H, Lq, d]``.
    """
    if not _takes_fp32_backward(q, k, v, attn_mask, dropout_p):
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        # What SDPA does with a boolean mask before calling the kernel.
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~attn_mask, float("-inf"))
    return _CPUFlashAttentionFp32Backward.apply(q, k, v, attn_mask)


class SelfAttention(MultiHeadSelfAttention):
    """torchmultimodal's ``MultiHeadSelfAttention`` (same parameters, names and outputs) running
    :func:`scaled_dot_product_attention`.

    Args:
        embed_dim (int): embedding dimension.
        num_heads (int): attention heads.
        dropout (float): attention-probability dropout (in training mode).

    Inputs:
        query (Tensor): ``[B, L, D]``.
        attn_mask (Optional[Tensor]): broadcastable to ``[B, H, L, L]`` (bool: True = attend).
        is_causal (bool): causal masking (then ``attn_mask`` must be ``None``).

    Returns:
        Tensor: ``[B, L, D]``.
    """

    def forward(self, query: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:  # type: ignore[override]
        if is_causal:
            return super().forward(query, attn_mask, is_causal)
        b, length, d = query.shape
        q, k, v = (_split_heads(t, self.num_heads) for t in self.input_proj(query).chunk(3, dim=-1))
        out = scaled_dot_product_attention(q, k, v, attn_mask, self.dropout if self.training else 0.0)
        return self.output_proj(out.transpose(1, 2).reshape(b, length, d))


def use_self_attention(layer: torch.nn.Module) -> None:
    """Makes ``layer.attention`` (a torchmultimodal ``MultiHeadSelfAttention``, e.g. of a
    ``TransformerEncoderLayer``) a :class:`SelfAttention` holding the same projection modules
    (no new initialisation, so seeded model construction draws the same random numbers)."""
    old = layer.attention
    with torch.device("meta"):
        new = SelfAttention(old.output_proj.in_features, old.num_heads, old.dropout)
    for name, child in old.named_children():  # the same projection modules
        setattr(new, name, child)
    layer.attention = new


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
