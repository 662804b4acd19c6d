"""ALBEF's fusion encoder for image pairs (NLVR2 and its text-assignment pre-training).

ALBEF turns its 12-layer BERT into an 18-layer one for NLVR2: the text layers 0-5 are kept, and
every fusion layer ``6 + i`` becomes two layers ``6 + 2i`` and ``7 + 2i``; the first
cross-attends image 0, the second image 1, and the two share their cross-attention key and value
projections (``share_cross_attention`` in ALBEF's ``model_nlvr.py``). Queries, cross-attention
outputs, self-attention and feed-forward blocks stay separate.

:class:`DualImageFusionEncoder` is that fusion part: ``layer[2i]`` and ``layer[2i + 1]`` are
ordinary :class:`~torchmm_ext.modules.text_encoder.FusionLayer` s, so ``layer.{j}`` holds
ALBEF's BERT layer ``6 + j`` (the key order a checkpoint converter maps onto).
"""

from typing import List, Optional, Tuple

from torch import nn, Tensor

from torchmm_ext.modules.text_encoder import FusionLayer, FusionOutput, init_bert_weights, padding_mask


def share_cross_attention_kv(source: FusionLayer, target: FusionLayer) -> None:
    """Makes ``target`` use ``source``'s cross-attention key and value projections (the same
    ``nn.Linear`` modules, hence the same ``Parameter`` objects), as ALBEF's
    ``share_cross_attention`` does for the two layers of an image pair. Queries and the output
    projection stay separate."""
    target.cross_attention.k_proj = source.cross_attention.k_proj
    target.cross_attention.v_proj = source.cross_attention.v_proj


class DualImageFusionEncoder(nn.Module):
    """Fusion encoder over two images: ``2 * num_layer_pairs`` fusion layers, even layers
    attending image 0 and odd layers image 1, with the cross-attention keys/values of each pair
    of layers shared.

    Args:
        width (int): text hidden size.
        image_width (int): image token size.
        num_layer_pairs (int): fusion layers of the single-image model (6 in ALBEF); each one
            becomes a pair, so the encoder has twice as many layers (12 in ALBEF).
        num_heads (int): attention heads.
        ffn_dim (int): feed-forward hidden size.
        dropout (float): hidden dropout.
        layer_norm_eps (float): LayerNorm epsilon.

    Inputs:
        text_embeddings (Tensor): text-encoder states ``[P, L, D]``.
        text_attention_mask (Tensor): ``[P, L]`` 1/0 padding mask.
        image_embeddings (Tuple[Tensor, Tensor]): tokens of image 0 and of image 1, each
            ``[P, N, Dv]``, or ``[U, N, Dv]`` with ``image_index``.
        image_index (Optional[Tuple[Tensor, Tensor]]): ``[P]`` row of each image tensor for every
            pair, so that a batch of images can be paired up without copying its tokens
            (text-assignment pre-training); ``None`` pairs row ``p`` with row ``p``.
        return_hidden_states (bool): also return each layer's output.
        cls_only (bool): the last layer computes only the CLS state (``last_hidden_state`` is then
            ``[P, 1, D]``): all that a classifier on the fused CLS needs.

    Returns:
        FusionOutput (``cross_attention`` is always ``None``).
    """

    def __init__(
        self,
        width: int = 768,
        image_width: int = 768,
        num_layer_pairs: int = 6,
        num_heads: int = 12,
        ffn_dim: int = 3072,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.num_layer_pairs = num_layer_pairs
        self.layer = nn.ModuleList(
            FusionLayer(width, image_width, num_heads, ffn_dim, dropout, layer_norm_eps)
            for _ in range(2 * num_layer_pairs)
        )
        init_bert_weights(self)
        for i in range(num_layer_pairs):
            # ALBEF keeps layer 7+2i's tensors for both layers of the pair; which one survives
            # does not matter: a converted checkpoint gives both the same values.
            share_cross_attention_kv(self.layer[2 * i + 1], self.layer[2 * i])

    def forward(
        self,
        text_embeddings: Tensor,
        text_attention_mask: Tensor,
        image_embeddings: Tuple[Tensor, Tensor],
        image_index: Optional[Tuple[Tensor, Tensor]] = None,
        return_hidden_states: bool = False,
        cls_only: bool = False,
    ) -> FusionOutput:
        if len(image_embeddings) != 2:
            raise ValueError(f"DualImageFusionEncoder takes two image tensors, got {len(image_embeddings)}")
        if image_index is not None and len(image_index) != 2:
            raise ValueError(f"image_index must hold one index tensor per image, got {len(image_index)}")
        text_mask = padding_mask(text_attention_mask)
        x = text_embeddings
        hidden_states: List[Tensor] = []
        for j, layer in enumerate(self.layer):
            side = j % 2  # even layers attend image 0, odd layers image 1
            x, _ = layer(
                x,
                text_mask,
                image_embeddings[side],
                None if image_index is None else image_index[side],
                first_token_only=cls_only and j == len(self.layer) - 1,
            )
            if return_hidden_states:
                hidden_states.append(x)
        return FusionOutput(x, None, hidden_states if return_hidden_states else None)
