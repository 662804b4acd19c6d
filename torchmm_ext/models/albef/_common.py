"""Pieces every ALBEF task model shares: the size presets, the encoder builder and the
encoding outputs."""

from typing import Any, Dict, Mapping, NamedTuple, Optional

from torch import nn, Tensor
from torchmultimodal.modules.encoders.bert_text_encoder import BERTTextEncoder

from torchmm_ext.modules.text_encoder import ALBEFFusionEncoder, albef_text_encoder
from torchmm_ext.modules.vision_transformer import VisionTransformer

ALBEF_PRESETS: Dict[str, Dict[str, Any]] = {
    # The paper's sizes (ViT-B/16 + BERT-base); image 384 for fine-tuning.
    "base": dict(
        image_size=384,
        patch_size=16,
        vision_width=768,
        vision_depth=12,
        vision_heads=12,
        vision_mlp_dim=3072,
        text_width=768,
        text_layers=6,
        fusion_layers=6,
        text_heads=12,
        text_ffn_dim=3072,
        vocab_size=30522,
        embed_dim=256,
        queue_size=65536,
    ),
    # CPU debugging on the shapes world (64 px images, 8 px patches).
    "tiny": dict(
        image_size=64,
        patch_size=8,
        vision_width=192,
        vision_depth=4,
        vision_heads=3,
        vision_mlp_dim=768,
        text_width=192,
        text_layers=2,
        fusion_layers=2,
        text_heads=3,
        text_ffn_dim=768,
        vocab_size=512,
        embed_dim=128,
        queue_size=4096,
    ),
}


class ALBEFBlockGroupsMixin:
    """``block_groups()`` for every ALBEF task model: the block lists the efficiency methods
    (PELA, ELIP, DAS) reach by name (the convention of :mod:`torchmm_ext.modules.blocks`)."""

    def block_groups(self) -> Dict[str, nn.ModuleList]:
        """The online model's transformer blocks by group.

        Returns:
            Dict[str, nn.ModuleList]: ``vision`` (ViT blocks), ``text`` (text-only BERT
            layers), ``fusion`` (cross-attention layers; NLVR2's 2 per ALBEF layer) and, for
            VQA, ``decoder`` (the answer decoder's layers). Momentum copies are not listed:
            their paths are the online paths with ``_m`` after the first name
            (:func:`~torchmm_ext.modules.blocks.momentum_twin`).
        """
        groups = {
            "vision": self.vision_encoder.blocks,
            "text": self.text_encoder.encoder.layer,
            "fusion": self.fusion_encoder.layer,
        }
        decoder = getattr(self, "answer_decoder", None)
        if decoder is not None:
            groups["decoder"] = decoder.layers.layer
        return groups


class ImageEncoding(NamedTuple):
    """Attributes:
    embeddings (Tensor): all image tokens ``[B, N, Dv]`` (CLS first).
    features (Tensor): L2-normalised ITC features ``[B, E]``.
    """

    embeddings: Tensor
    features: Tensor


class TextEncoding(NamedTuple):
    """Attributes:
    embeddings (Tensor): text-mode hidden states ``[B, L, Dt]``.
    features (Tensor): L2-normalised ITC features ``[B, E]``.
    """

    embeddings: Tensor
    features: Tensor


def preset_sizes(arguments: Mapping[str, Any]) -> Dict[str, Optional[int]]:
    """The size arguments of a builder call: pass ``locals()`` as the builder's first statement.

    Returns:
        Dict[str, Optional[int]]: those of ``arguments`` that :data:`ALBEF_PRESETS` names
        (``None`` means "the preset's value", resolved by :func:`_albef_encoders`).
    """
    return {k: arguments[k] for k in ALBEF_PRESETS["base"] if k in arguments}


def _albef_encoders(
    preset: str,
    sizes: Dict[str, Optional[int]],
    *,
    max_position_embeddings: int,
    pad_token_id: int,
    dropout: float,
    drop_path_rate: float,
) -> tuple[VisionTransformer, BERTTextEncoder, ALBEFFusionEncoder, Dict[str, int]]:
    """The three ALBEF encoders every task builder shares; ``None`` sizes take the preset's.

    Returns:
        Tuple of the vision, text and fusion encoders and the resolved sizes.
    """
    if preset not in ALBEF_PRESETS:
        raise ValueError(f"unknown ALBEF preset {preset!r}; choose one of {sorted(ALBEF_PRESETS)}")
    cfg = {k: (v if v is not None else ALBEF_PRESETS[preset][k]) for k, v in sizes.items()}
    vision_encoder = VisionTransformer(
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        width=cfg["vision_width"],
        depth=cfg["vision_depth"],
        num_heads=cfg["vision_heads"],
        mlp_dim=cfg["vision_mlp_dim"],
        drop_path_rate=drop_path_rate,
    )
    text_encoder = albef_text_encoder(
        vocab_size=cfg["vocab_size"],
        width=cfg["text_width"],
        num_layers=cfg["text_layers"],
        num_heads=cfg["text_heads"],
        ffn_dim=cfg["text_ffn_dim"],
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        dropout=dropout,
    )
    fusion_encoder = ALBEFFusionEncoder(
        width=cfg["text_width"],
        image_width=cfg["vision_width"],
        num_layers=cfg["fusion_layers"],
        num_heads=cfg["text_heads"],
        ffn_dim=cfg["text_ffn_dim"],
        dropout=dropout,
    )
    return vision_encoder, text_encoder, fusion_encoder, cfg
