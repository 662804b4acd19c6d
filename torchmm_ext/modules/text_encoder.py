"""ALBEF's text encoder (BERT layers 0..fusion_layer-1) and fusion encoder (the remaining layers,
each with cross-attention to the image tokens).

The text encoder is torchmultimodal's ``BERTTextEncoder`` (``BERTTextEmbeddings`` + a
transformer encoder). ``bert_text_encoder`` itself builds FLAVA transformer layers whose
attention is an explicit matmul-softmax; we pass ``BERTTextEncoder`` an encoder made of
torchmultimodal's ``TransformerEncoderLayer`` (post-norm, BERT layout) instead, whose
``MultiHeadSelfAttention`` (as :class:`~torchmm_ext.modules.attention.SelfAttention`) calls SDPA
through :func:`~torchmm_ext.modules.attention.scaled_dot_product_attention`.

The fusion layers are assembled from the same primitives (``MultiHeadSelfAttention``,
``MultiHeadAttentionWithCache`` for cross-attention, ``MLP``, ``Fp32LayerNorm``) rather than
``ALBEFMultimodalEncoder``, for two reasons: its attention is not SDPA, and ITM scoring of many
(image, text) pairs that share images is much cheaper when each layer projects an image's
keys/values once and lets the pairs of one image share one attention call against them
(``image_index``), which it cannot do.
"""

from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn, Tensor
from torchmultimodal.modules.encoders.bert_text_encoder import BERTTextEncoder
from torchmultimodal.modules.layers.mlp import MLP
from torchmultimodal.modules.layers.multi_head_attention import (
    MultiHeadAttentionWithCache,
)
from torchmultimodal.modules.layers.normalizations import Fp32LayerNorm
from torchmultimodal.modules.layers.text_embedding import BERTTextEmbeddings
from torchmultimodal.modules.layers.transformer import (
    TransformerEncoder,
    TransformerOutput,
)

from torchmm_ext.modules.attention import (
    cross_attention_with_probs,
    scaled_dot_product_attention,
    SelfAttention,
    use_self_attention,
)


def padding_mask(attention_mask: Tensor) -> Tensor:
    """``[B, L]`` 1/0 padding mask -> boolean ``[B, 1, 1, L]`` SDPA mask (True = attend)."""
    return attention_mask.bool()[:, None, None, :]


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, std) for Linear/Embedding, zero bias, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SDPATransformerEncoder(TransformerEncoder):
    """torchmultimodal ``TransformerEncoder`` with the call signature ``BERTTextEncoder`` uses.

    ``BERTTextEncoder`` passes ``return_attn_weights``; SDPA never materialises the weights, so
    asking for them is an error rather than a silent ``None``.
    """

    def forward(  # type: ignore[override]
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        return_attn_weights: bool = False,
        return_hidden_states: bool = False,
    ) -> TransformerOutput:
        if return_attn_weights:
            raise NotImplementedError("the SDPA text encoder does not return attention weights")
        return super().forward(hidden_states, attention_mask, return_hidden_states)


def albef_text_encoder(
    *,
    vocab_size: int = 30522,
    width: int = 768,
    num_layers: int = 6,
    num_heads: int = 12,
    ffn_dim: int = 3072,
    max_position_embeddings: int = 512,
    pad_token_id: int = 0,
    dropout: float = 0.1,
    layer_norm_eps: float = 1e-12,
    type_vocab_size: int = 2,
    offset_pos_ids: bool = False,
) -> BERTTextEncoder:
    """Builds ALBEF's text encoder: BERT embeddings and the first ``num_layers`` BERT layers.

    With ``type_vocab_size=1``, ``offset_pos_ids=True`` and ``layer_norm_eps=1e-5`` it is a
    RoBERTa encoder (METER's text side): position ids are ``pad_token_id + 1 +`` the count of
    non-padding tokens so far, padding positions get ``pad_token_id``.

    Args:
        vocab_size (int): tokenizer vocabulary size.
        width (int): hidden size.
        num_layers (int): text-only layers (6 in ALBEF: BERT-base split at ``fusion_layer=6``).
        num_heads (int): attention heads.
        ffn_dim (int): feed-forward hidden size.
        max_position_embeddings (int): position table size.
        pad_token_id (int): padding id (its embedding row starts at zero).
        dropout (float): hidden dropout.
        layer_norm_eps (float): LayerNorm epsilon (1e-12 in BERT, 1e-5 in RoBERTa).
        type_vocab_size (int): rows of the token-type table (2 in BERT, 1 in RoBERTa).
        offset_pos_ids (bool): RoBERTa's position ids (see above) instead of ``0..L-1``.

    Returns:
        BERTTextEncoder: call it as ``encoder(input_ids, attention_mask=mask.bool())``; it returns
        a ``TransformerOutput`` whose ``last_hidden_state`` is ``[B, L, width]``.
    """
    embeddings = BERTTextEmbeddings(
        hidden_size=width,
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=type_vocab_size,
        layer_norm_eps=layer_norm_eps,
        dropout=dropout,
        offset_pos_ids=offset_pos_ids,
    )
    encoder = SDPATransformerEncoder(
        n_layer=num_layers,
        d_model=width,
        n_head=num_heads,
        dim_feedforward=ffn_dim,
        dropout=dropout,
        activation=nn.GELU,
        layer_norm_eps=layer_norm_eps,
        norm_first=False,
    )
    for layer in encoder.layer:
        # torchmultimodal's MLP puts a dropout after GELU; BERT has none there.
        layer.feedforward = MLP(width, width, ffn_dim, dropout=0.0, activation=nn.GELU)
        use_self_attention(layer)  # SDPA through torchmm_ext.modules.attention
    text_encoder = BERTTextEncoder(embeddings=embeddings, encoder=encoder)
    init_bert_weights(text_encoder)
    return text_encoder


def _group_by_image(image_index: Tensor, num_images: int) -> tuple[Optional[Tensor], List[int]]:
    """How to put the pairs of each image in one run: ``(order, runs)`` with ``order`` the
    stable ``argsort`` of ``image_index`` (``None`` when the pairs already come in runs, image
    by image) and ``runs[u]`` the pairs of image ``u`` (0 for an unused image)."""
    runs = torch.bincount(image_index, minlength=num_images)
    order = torch.argsort(image_index, stable=True)
    if torch.equal(order, torch.arange(order.numel(), device=order.device)):
        order = None
    return order, runs.tolist()


def _attend_image_runs(q: Tensor, k: Tensor, v: Tensor, rows: Sequence[int], dropout_p: float = 0.0) -> Tensor:
    """Cross-attention of query rows that come in runs per image, one SDPA call per image
    against its keys/values (no per-pair copies of them; image tokens only, so the queries of
    several texts can share a call without a mask).

    Args:
        q (Tensor): ``[T, D]`` projected queries, the ``rows[u]`` rows of image ``u`` together,
            image after image.
        k (Tensor): ``[U, H, N, D/H]`` keys of the ``U`` images.
        v (Tensor): ``[U, H, N, D/H]`` values.
        rows (Sequence[int]): query rows of each image (``U`` ints, 0 for an unused image).
        dropout_p (float): attention-probability dropout.

    Returns:
        Tensor: ``[T, D]`` attention outputs (before the output projection).
    """
    h, d = k.size(1), q.size(-1)
    outs = []
    for u, q_u in enumerate(q.split(list(rows))):
        if q_u.size(0) == 0:
            continue
        q_u = q_u.view(1, -1, h, d // h).transpose(1, 2)  # [1, H, T_u, d/H]
        out = scaled_dot_product_attention(q_u, k[u : u + 1], v[u : u + 1], None, dropout_p)
        outs.append(out.transpose(1, 2).reshape(-1, d))
    return torch.cat(outs)


class TextPacking(NamedTuple):
    """Where the real (non-padding) tokens of ``P`` padded texts ``[P, L]`` sit once packed
    into one ``[T, D]`` sequence, pair after pair (see :meth:`ALBEFFusionEncoder.forward`).

    Attributes:
        index (Tensor): ``[T]`` flat padded position ``p * L + t`` of each packed token.
        first (Tensor): ``[P]`` packed row of each pair's first (CLS) token.
        image_pairs (List[int]): pairs of each image (its run of pairs; ``U`` ints).
        image_rows (List[int]): packed tokens of each image's run of pairs (``U`` ints).
        pairs (int): ``P``.
        length (int): ``L``.
    """

    index: Tensor
    first: Tensor
    image_pairs: List[int]
    image_rows: List[int]
    pairs: int
    length: int


def pack_text(attention_mask: Tensor, image_pairs: Sequence[int]) -> TextPacking:
    """The :class:`TextPacking` of a ``[P, L]`` 1/0 padding mask whose pairs come in runs per
    image, ``image_pairs[u]`` pairs for image ``u``. Every text must keep its first token."""
    mask = attention_mask.bool()
    pairs, length = mask.shape
    counts = mask.sum(dim=1)
    first = torch.cumsum(counts, 0) - counts
    per_image = [int(c.sum()) for c in counts.split(list(image_pairs))]
    return TextPacking(mask.reshape(-1).nonzero().squeeze(1), first, list(image_pairs), per_image,
                       pairs, length)


def _unpack(packed: Tensor, packing: TextPacking) -> Tensor:
    """``[T, C]`` packed rows -> ``[P, L, C]`` padded (zeros at padding positions)."""
    padded = packed.new_zeros(packing.pairs * packing.length, packed.size(-1))
    padded[packing.index] = packed
    return padded.view(packing.pairs, packing.length, -1)


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """``[B, L, D]`` -> ``[B, H, L, D/H]``."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


class FusionOutput(NamedTuple):
    """Output of :class:`ALBEFFusionEncoder`.

    Attributes:
        last_hidden_state (Tensor): fused text states ``[P, L, D]``.
        cross_attention (Optional[Tensor]): cross-attention probabilities ``[P, H, L, N]`` of
            the requested layer (they keep their autograd graph, for Grad-CAM).
        hidden_states (Optional[List[Tensor]]): each layer's output, when requested.
    """

    last_hidden_state: Tensor
    cross_attention: Optional[Tensor] = None
    hidden_states: Optional[List[Tensor]] = None


class FusionLayer(nn.Module):
    """BERT layer with cross-attention (post-norm): self-attention, cross-attention to the image
    tokens, feed-forward, each followed by residual + LayerNorm.

    Args:
        width (int): text hidden size.
        image_width (int): image token size (keys/values of the cross-attention).
        num_heads (int): attention heads.
        ffn_dim (int): feed-forward hidden size.
        dropout (float): hidden dropout.
        layer_norm_eps (float): LayerNorm epsilon.
    """

    def __init__(
        self,
        width: int,
        image_width: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.attention = SelfAttention(width, num_heads)
        self.attention_dropout = nn.Dropout(dropout)
        self.attention_layernorm = Fp32LayerNorm(width, eps=layer_norm_eps)
        self.cross_attention = MultiHeadAttentionWithCache(width, image_width, num_heads)
        self.cross_attention_dropout = nn.Dropout(dropout)
        self.cross_attention_layernorm = Fp32LayerNorm(width, eps=layer_norm_eps)
        # BERT's intermediate block has no dropout after GELU (only after the output dense).
        self.feedforward = MLP(width, width, ffn_dim, dropout=0.0, activation=nn.GELU)
        self.feedforward_dropout = nn.Dropout(dropout)
        self.feedforward_layernorm = Fp32LayerNorm(width, eps=layer_norm_eps)

    def _cross_attend(
        self,
        x: Tensor,
        image_embeddings: Tensor,
        image_index: Optional[Tensor],
        image_mask: Optional[Tensor],
        image_runs: Optional[Sequence[int]],
    ) -> Tensor:
        attn = self.cross_attention
        b, length, d = x.shape
        h = attn.num_heads
        q = attn.q_proj(x)
        # Keys/values are projected once per distinct image.
        k = attn.k_proj(image_embeddings)
        v = attn.v_proj(image_embeddings)
        dropout = attn.dropout if self.training else 0.0
        if image_runs is not None and len(set(image_runs)) == 1:
            # Pairs come in runs of k per image: the queries of a run attend the same keys, so
            # they form one longer query sequence per image, all images in one call.
            u, k_pairs = k.size(0), image_runs[0]
            q = q.view(u, k_pairs * length, h, d // h).transpose(1, 2)  # [U, H, k*L, d/H]
            out = scaled_dot_product_attention(q, _heads(k, h), _heads(v, h), None, dropout)
            out = out.transpose(1, 2).reshape(b, length, d)
        elif image_runs is not None:  # runs of unequal length: one call per image
            out = _attend_image_runs(q.reshape(b * length, d), _heads(k, h), _heads(v, h),
                                     [r * length for r in image_runs], dropout).view(b, length, d)
        else:
            if image_index is not None:
                k, v = k[image_index], v[image_index]
            q = q.view(b, length, h, d // h).transpose(1, 2)  # [P, H, L, d/H]
            out = scaled_dot_product_attention(q, _heads(k, h), _heads(v, h), image_mask, dropout)
            out = out.transpose(1, 2).reshape(b, length, d)
        return attn.output_proj(out)

    def _self_attend_first_token(self, x: Tensor, text_mask: Tensor) -> Tensor:
        # Query from the first (CLS) token only; keys/values from every token.
        attn = self.attention
        b, length, d = x.shape
        h = attn.num_heads
        if isinstance(attn.input_proj, nn.Linear):
            w, bias = attn.input_proj.weight, attn.input_proj.bias
            q = F.linear(x[:, :1], w[:d], bias[:d]).view(b, 1, h, d // h).transpose(1, 2)
            k, v = F.linear(x, w[d:], bias[d:]).chunk(2, dim=-1)
        else:  # a factorised projection (PELA's LowRankLinear): project every token
            q, k, v = attn.input_proj(x).chunk(3, dim=-1)
            q = q[:, :1].reshape(b, 1, h, d // h).transpose(1, 2)
        k = k.reshape(b, length, h, d // h).transpose(1, 2)
        v = v.reshape(b, length, h, d // h).transpose(1, 2)
        text_mask = text_mask[:, :, :1]  # the first query's row (a no-op for a [P, 1, 1, L] mask)
        out = scaled_dot_product_attention(q, k, v, text_mask, attn.dropout if self.training else 0.0)
        return attn.output_proj(out.transpose(1, 2).reshape(b, 1, d))

    def forward_packed(
        self,
        x: Tensor,
        packing: TextPacking,
        text_mask: Tensor,
        image_embeddings: Tensor,
        first_token_only: bool = False,
    ) -> Tensor:
        """Inference forward on packed text tokens (no padding rows), for ITM scoring.

        Token-wise work (projections, feed-forward, LayerNorms) runs on the real tokens only;
        the self-attention scatters its keys/values back to the padded layout for one SDPA
        call; the cross-attention runs one SDPA call per image over the queries of its pairs.
        Same result as :meth:`forward` (with ``image_index`` giving those runs) on the real tokens.

        Inputs:
            x (Tensor): packed text states ``[T, D]`` (:class:`TextPacking` order).
            packing (TextPacking): where the rows sit; pairs in one run per image.
            text_mask (Tensor): boolean SDPA padding mask ``[P, 1, 1, L]``.
            image_embeddings (Tensor): ``[U, N, Dv]``, image ``u`` for the ``u``-th run of pairs.
            first_token_only (bool): compute the first (CLS) token of each pair only.

        Returns:
            Tensor: new packed states ``[T, D]``, or ``[P, D]`` with ``first_token_only``.
        """
        attn = self.attention
        d, h = x.size(-1), attn.num_heads
        if first_token_only:
            if isinstance(attn.input_proj, nn.Linear):
                w, bias = attn.input_proj.weight, attn.input_proj.bias
                q = F.linear(x[packing.first], w[:d], bias[:d])
                kv = F.linear(x, w[d:], bias[d:])
            else:  # a factorised projection (PELA's LowRankLinear): project every token
                q, k_, v_ = attn.input_proj(x).chunk(3, dim=-1)
                q, kv = q[packing.first], torch.cat([k_, v_], dim=-1)
            k, v = (_heads(t, h) for t in _unpack(kv, packing).chunk(2, dim=-1))
            q = _heads(q.unsqueeze(1), h)
            out = scaled_dot_product_attention(q, k, v, text_mask)  # [P, H, 1, d/H]
            attended = attn.output_proj(out.transpose(1, 2).reshape(packing.pairs, d))
            x = x[packing.first]
            rows = packing.image_pairs
        else:
            q, k, v = (_heads(t, h) for t in _unpack(attn.input_proj(x), packing).chunk(3, dim=-1))
            out = scaled_dot_product_attention(q, k, v, text_mask)  # [P, H, L, d/H]
            out = out.transpose(1, 2).reshape(packing.pairs * packing.length, d)[packing.index]
            attended = attn.output_proj(out)
            rows = packing.image_rows
        x = self.attention_layernorm(x + attended)

        cross = self.cross_attention
        q = cross.q_proj(x)
        k = _heads(cross.k_proj(image_embeddings), h)  # [U, H, N, d/H]
        v = _heads(cross.v_proj(image_embeddings), h)
        out = _attend_image_runs(q, k, v, rows)
        x = self.cross_attention_layernorm(x + cross.output_proj(out))
        return self.feedforward_layernorm(x + self.feedforward(x))

    def forward(
        self,
        x: Tensor,
        text_mask: Tensor,
        image_embeddings: Tensor,
        image_index: Optional[Tensor] = None,
        image_mask: Optional[Tensor] = None,
        return_cross_attention: bool = False,
        first_token_only: bool = False,
        image_runs: Optional[Sequence[int]] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """
        Inputs:
            x (Tensor): text states ``[P, L, D]``.
            text_mask (Tensor): boolean SDPA mask ``[P, 1, 1, L]`` (padding), or ``[P, 1, L, L]``
                (padding and causal, for a decoder).
            image_embeddings (Tensor): ``[P, N, Dv]``, or ``[U, N, Dv]`` with ``image_index``.
            image_index (Optional[Tensor]): ``[P]`` row of ``image_embeddings`` for each pair.
            image_mask (Optional[Tensor]): boolean ``[P, 1, 1, N]`` mask of image tokens.
            return_cross_attention (bool): compute the cross-attention explicitly and return
                its probabilities.
            first_token_only (bool): compute the output of the first (CLS) token only
                (``[P, 1, D]``): exact, and much cheaper, when only the CLS state is used.
            image_runs (Optional[Sequence[int]]): set when the pairs come in runs per image
                (``image_index`` non-decreasing; ``image_runs[u]`` pairs of image ``u``, 0
                for an unused one) and there is no image mask: the pairs of an image then
                share one attention call against its keys/values (all images in one call
                when the runs are equal).

        Returns:
            Tuple of the new states ``[P, L, D]`` and the probabilities (or ``None``).
        """
        x, attended = self._self_attention_output(x, text_mask, first_token_only)
        x = self.attention_layernorm(x + attended)
        cross, probs = self._cross_attention_output(
            x, image_embeddings, image_index, image_mask, return_cross_attention, image_runs
        )
        x = self.cross_attention_layernorm(x + cross)
        x = self.feedforward_layernorm(x + self.feedforward_dropout(self.feedforward(x)))
        return x, probs

    def _self_attention_output(
        self, x: Tensor, text_mask: Tensor, first_token_only: bool
    ) -> tuple[Tensor, Tensor]:
        """The residual input (``x``, or its first token) and the self-attention sub-layer's
        output after dropout; the two are added and normalised by :meth:`forward` (subclasses,
        e.g. DAS's parallel adapters, add their own terms in between)."""
        if first_token_only:
            return x[:, :1], self.attention_dropout(self._self_attend_first_token(x, text_mask))
        return x, self.attention_dropout(self.attention(x, text_mask))

    def _cross_attention_output(
        self,
        x: Tensor,
        image_embeddings: Tensor,
        image_index: Optional[Tensor],
        image_mask: Optional[Tensor],
        return_cross_attention: bool,
        image_runs: Optional[Sequence[int]],
    ) -> tuple[Tensor, Optional[Tensor]]:
        """The cross-attention sub-layer's output after dropout, and its probabilities when
        ``return_cross_attention`` (else ``None``)."""
        probs = None
        if return_cross_attention:
            images = image_embeddings if image_index is None else image_embeddings[image_index]
            cross, probs = cross_attention_with_probs(self.cross_attention, x, images, image_mask)
        else:
            cross = self._cross_attend(x, image_embeddings, image_index, image_mask, image_runs)
        return self.cross_attention_dropout(cross), probs


class ALBEFFusionEncoder(nn.Module):
    """ALBEF's fusion encoder: BERT layers ``fusion_layer..11`` with cross-attention.

    With ``causal=True`` the same stack is a BERT decoder (ALBEF's ``BertLMHeadModel`` layers):
    each token's self-attention sees only itself and earlier tokens, and the cross-attention
    reads any memory (``image_embeddings`` may then be, e.g., fused question states, with
    ``image_width`` = their width and ``image_attention_mask`` their padding).

    Args:
        width (int): text hidden size.
        image_width (int): image token size.
        num_layers (int): number of fusion layers (6 in ALBEF).
        num_heads (int): attention heads.
        ffn_dim (int): feed-forward hidden size.
        dropout (float): hidden dropout.
        layer_norm_eps (float): LayerNorm epsilon.
        causal (bool): causal (left-to-right) self-attention. Default: ``False``.

    Inputs:
        text_embeddings (Tensor): text-encoder states ``[P, L, D]``.
        text_attention_mask (Tensor): ``[P, L]`` 1/0 padding mask.
        image_embeddings (Tensor): ``[P, N, Dv]``, or ``[U, N, Dv]`` distinct images with
            ``image_index``.
        image_index (Optional[Tensor]): ``[P]`` index into ``image_embeddings`` per pair.
        image_attention_mask (Optional[Tensor]): ``[P, N]`` 1/0 mask of image tokens.
        return_cross_attention_layer (Optional[int]): fusion layer (0-based, within this
            encoder) whose cross-attention probabilities to return.
        return_hidden_states (bool): also return each layer's output.
        cls_only (bool): the last layer computes only the CLS state (``last_hidden_state``
            is then ``[P, 1, D]``); what ITM scoring needs, at a fraction of the cost. In eval
            mode with the pairs of each image in one run (``image_index`` non-decreasing, every
            image used, e.g. ``arange(U).repeat_interleave(k)``), padded texts are then packed
            (:meth:`FusionLayer.forward_packed`): no work on padding tokens. Otherwise, with
            ``image_index`` and no image mask, the pairs are processed grouped by image (see
            ``group_pairs``) and returned in the given order.

    Returns:
        FusionOutput
    """

    def __init__(
        self,
        width: int = 768,
        image_width: int = 768,
        num_layers: int = 6,
        num_heads: int = 12,
        ffn_dim: int = 3072,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.causal = causal
        #: ITM scoring (``cls_only`` with pairs in runs per image, eval mode) packs the text
        #: tokens when at most this share of them is real (padding >= 10%). A set value, not a
        #: tuned one: with little padding there is little to save, and packing adds a scatter
        #: and a gather around each self-attention. 0 turns packing off.
        self.pack_below = 0.9
        #: With ``image_index`` (and no image mask), reorder the pairs so that those of one
        #: image come together, each image's keys/values then serving its pairs in one
        #: attention call (training ITM: positives and hard negatives); the output is in the
        #: caller's order. False gathers the keys/values per pair (the plain path).
        self.group_pairs = True
        self.layer = nn.ModuleList(
            FusionLayer(width, image_width, num_heads, ffn_dim, dropout, layer_norm_eps)
            for _ in range(num_layers)
        )
        init_bert_weights(self)

    def forward(
        self,
        text_embeddings: Tensor,
        text_attention_mask: Tensor,
        image_embeddings: Tensor,
        image_index: Optional[Tensor] = None,
        image_attention_mask: Optional[Tensor] = None,
        return_cross_attention_layer: Optional[int] = None,
        return_hidden_states: bool = False,
        cls_only: bool = False,
    ) -> FusionOutput:
        text_mask = padding_mask(text_attention_mask)
        if self.causal:
            length = text_attention_mask.size(1)
            causal = torch.ones(length, length, dtype=torch.bool, device=text_mask.device).tril()
            text_mask = text_mask & causal  # [P, 1, L, L]
        image_mask = None
        if image_attention_mask is not None:
            image_mask = padding_mask(image_attention_mask)
            if image_index is not None:
                image_mask = image_mask[image_index]
        x = text_embeddings
        cross_attention = None
        hidden_states: List[Tensor] = []
        order = image_runs = None
        if (image_index is not None and image_mask is None and self.group_pairs
                and return_cross_attention_layer is None and not return_hidden_states
                # compiled layers (train.compile) keep the gathered path: each new pattern of
                # runs would recompile them
                and not torch.compiler.is_compiling()
                and not any(getattr(layer, "_compiled_call_impl", None) is not None for layer in self.layer)):
            order, image_runs = _group_by_image(image_index, image_embeddings.size(0))
        if (
            image_runs is not None and order is None and 0 not in image_runs
            and cls_only and not self.training and not self.causal
            and all(type(layer) is FusionLayer for layer in self.layer)  # no adapters, skips
            and text_attention_mask.sum() <= self.pack_below * text_attention_mask.numel()
        ):
            # ITM scoring of padded texts, pairs in runs per image: the token-wise work on the
            # real tokens only.
            packing = pack_text(text_attention_mask, image_runs)
            x = text_embeddings.reshape(-1, text_embeddings.size(-1))[packing.index]
            for i, layer in enumerate(self.layer):
                x = layer.forward_packed(x, packing, text_mask, image_embeddings,
                                         first_token_only=i == len(self.layer) - 1)
            return FusionOutput(x.unsqueeze(1))
        if order is not None:  # pairs of one image together; the caller's order restored below
            x, text_mask = x[order], text_mask[order]
        for i, layer in enumerate(self.layer):
            x, probs = layer(
                x,
                text_mask,
                image_embeddings,
                image_index,
                image_mask,
                return_cross_attention=(i == return_cross_attention_layer),
                first_token_only=cls_only and i == len(self.layer) - 1,
                image_runs=image_runs,
            )
            if probs is not None:
                cross_attention = probs
            if return_hidden_states:
                hidden_states.append(x)
        if order is not None:
            x = x[torch.argsort(order)]
        return FusionOutput(x, cross_attention, hidden_states if return_hidden_states else None)
