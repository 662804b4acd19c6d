"""ALBEF for NLVR2 (is a sentence true of a pair of images?) and its text-assignment
pre-training.

Both models run one ViT over the images and an 18-layer BERT whose fusion layers come in pairs,
the first of a pair attending image 0 and the second image 1
(:class:`~torchmm_ext.modules.dual_image_fusion.DualImageFusionEncoder`). Stable attribute names
(what checkpoints hold): ``vision_encoder``, ``text_encoder`` (BERT layers 0-5),
``fusion_encoder.layer.{0..2F-1}`` (ALBEF's BERT layers ``6..6+2F-1`` in order), and the head:
``cls_head`` (NLVR2, 2-way MLP) or ``ta_head`` (text assignment, 3-way linear, with
``vision_proj``, ``text_proj`` and ``temp`` as in ALBEF's TA model).

ALBEF's procedure: the pre-trained single-image model is converted to the dual layout
(:func:`nlvr_state_dict_from_single_image`), trained for one epoch on text assignment
(:class:`ALBEFForTextAssignment`), then fine-tuned on NLVR2 (:class:`ALBEFForNLVR`; the 3-way head
is dropped and a fresh 2-way one trained).
"""

import re
from typing import Dict, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn, Tensor
from torchmultimodal.modules.encoders.bert_text_encoder import BERTTextEncoder
from torchmultimodal.utils.common import remove_grad

from torchmm_ext.models.albef._common import ALBEFBlockGroupsMixin, _albef_encoders, preset_sizes
from torchmm_ext.models.albef.ve import ALBEFForVE, ALBEFVEOutput
from torchmm_ext.modules.dual_image_fusion import DualImageFusionEncoder
from torchmm_ext.modules.vision_transformer import VisionTransformer

#: NLVR2 outputs: ``loss`` and ``logits`` ``[B, 2]`` (the SNLI-VE output type; the head differs).
ALBEFNLVROutput = ALBEFVEOutput

#: Text-assignment classes: the text describes image 0, image 1, or neither.
TA_IMAGE0, TA_IMAGE1, TA_NEITHER = 0, 1, 2


def _encode_pair(vision_encoder: nn.Module, image: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, 2, 3, H, W]`` image pairs -> tokens of image 0 and image 1 (``[B, N, Dv]`` each),
    from a single ViT call over the ``2B`` images."""
    b = image.size(0)
    embeddings = vision_encoder(image.flatten(0, 1)).last_hidden_state  # [2B, N, Dv], pairs adjacent
    embeddings = embeddings.view(b, 2, *embeddings.shape[1:])
    return embeddings[:, 0], embeddings[:, 1]


class ALBEFForNLVR(ALBEFForVE):
    """ALBEF for NLVR2 (ALBEF ``model_nlvr.ALBEF``): the fused [CLS] of (sentence, image pair) goes
    through an MLP head (``Linear(D, D) -> ReLU -> Linear(D, 2)``; ``False`` 0, ``True`` 1).

    ALBEF's NLVR2 model is its SNLI-VE model with the dual-image fusion encoder, so the head, the
    momentum copies and the loss are :class:`~torchmm_ext.models.albef.ALBEFForVE`'s: with
    ``distill``, ``loss = (1 - alpha) * CE + alpha * soft-CE`` against the momentum model's logits.

    Args:
        vision_encoder (VisionTransformer): image encoder (both images of a pair).
        text_encoder (BERTTextEncoder): BERT layers 0..5.
        fusion_encoder (DualImageFusionEncoder): the paired fusion layers.
        num_classes (int): 2.
        distill (bool): momentum copies and soft targets (ALBEF's NLVR.yaml: true).
        momentum (float): EMA coefficient (0.995).

    Inputs (forward):
        image (Tensor): ``[B, 2, 3, H, W]``: image 0 (left) and image 1 (right) of each sample.
        input_ids (Tensor): ``[B, L]`` sentence token ids.
        attention_mask (Tensor): ``[B, L]`` 1/0 padding mask.
        labels (Tensor): ``[B]`` 1 if the sentence is true of the pair, else 0.
        alpha (float): distillation weight (0 without ``distill``).

    Returns:
        ALBEFNLVROutput (``loss``, ``logits`` ``[B, num_classes]``); ``predict`` gives the logits.
    """

    def __init__(
        self,
        vision_encoder: VisionTransformer,
        text_encoder: BERTTextEncoder,
        fusion_encoder: DualImageFusionEncoder,
        num_classes: int = 2,
        distill: bool = True,
        momentum: float = 0.995,
    ) -> None:
        if not isinstance(fusion_encoder, DualImageFusionEncoder):
            raise TypeError(f"ALBEFForNLVR needs a DualImageFusionEncoder, got {type(fusion_encoder).__name__}")
        super().__init__(vision_encoder, text_encoder, fusion_encoder, num_classes, distill, momentum)

    @staticmethod
    def _logits(
        vision_encoder: nn.Module,
        text_encoder: nn.Module,
        fusion_encoder: nn.Module,
        head: nn.Module,
        image: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
    ) -> Tensor:
        if image.dim() != 5 or image.size(1) != 2:
            raise ValueError(f"NLVR images must be [B, 2, 3, H, W] pairs, got {tuple(image.shape)}")
        image0, image1 = _encode_pair(vision_encoder, image)
        text = text_encoder(input_ids, attention_mask=attention_mask.bool()).last_hidden_state
        fused = fusion_encoder(text, attention_mask, (image0, image1), cls_only=True).last_hidden_state
        return head(fused[:, 0])


class TextAssignment(NamedTuple):
    """Image pairs and labels of a text-assignment batch.

    Attributes:
        image0_index (Tensor): ``[B]`` batch row of image 0 for each text.
        image1_index (Tensor): ``[B]`` batch row of image 1.
        labels (Tensor): ``[B]``: :data:`TA_IMAGE0` (text ``b`` describes image 0, i.e. row ``b``
            is image 0), :data:`TA_IMAGE1`, or :data:`TA_NEITHER` (neither image is row ``b``).
    """

    image0_index: Tensor
    image1_index: Tensor
    labels: Tensor


@torch.no_grad()
def sample_text_assignment(
    image_features: Tensor, temp: float = 0.07, generator: Optional[torch.Generator] = None
) -> TextAssignment:
    """Builds ALBEF's text-assignment pairs (``model_pretrain_nlvr.py``) from a batch of
    (image, text) samples.

    For text ``b``, with probability 2/3 its own image ``b`` is paired with another image drawn
    from ``softmax(sim[b] / temp)`` (``sim`` = cosine similarity of the image features, ``b``
    itself excluded), on the left or the right with equal probability (label 0 or 1); otherwise
    two distinct other images drawn the same way form the pair (label 2). Drawing similar images
    makes the task hard. The same distribution as ALBEF's per-sample loop, drawn for the whole
    batch at once.

    Args:
        image_features (Tensor): ``[B, E]`` L2-normalised image features (``B >= 3``).
        temp (float): softmax temperature of the image-image similarities (ALBEF: 0.07, fixed).
        generator (Optional[torch.Generator]): random source (a fixed one for evaluation).

    Returns:
        TextAssignment
    """
    b = image_features.size(0)
    if b < 3:
        raise ValueError(f"text assignment needs a batch of at least 3 samples (two other images per text), got {b}")
    device = image_features.device
    sim = image_features.float() @ image_features.float().t() / temp
    weights = F.softmax(sim, dim=1)
    weights.fill_diagonal_(0.0)
    # Two distinct partners per row; the first one alone is a draw from `weights`.
    partners = torch.multinomial(weights, 2, replacement=False, generator=generator)  # [B, 2]
    coins = torch.rand(b, 2, device=device, generator=generator)
    own = torch.arange(b, device=device)
    matched = coins[:, 0] > 1.0 / 3.0
    own_left = coins[:, 1] > 0.5
    image0 = torch.where(matched, torch.where(own_left, own, partners[:, 0]), partners[:, 0])
    image1 = torch.where(matched, torch.where(own_left, partners[:, 0], own), partners[:, 1])
    labels = torch.full((b,), TA_NEITHER, dtype=torch.long, device=device)
    labels[matched & own_left] = TA_IMAGE0
    labels[matched & ~own_left] = TA_IMAGE1
    return TextAssignment(image0, image1, labels)


class ALBEFTextAssignmentOutput(NamedTuple):
    """Attributes:
    loss (Tensor): ``loss_ta + itc_weight * loss_itc``.
    logits (Tensor): ``[B, 3]`` text-assignment logits.
    labels (Tensor): ``[B]`` the sampled labels (:class:`TextAssignment`).
    loss_ta (Tensor): cross-entropy of the 3-way text assignment.
    loss_itc (Tensor): in-batch image-text contrastive loss (0 when ``itc_weight`` is 0).
    """

    loss: Tensor
    logits: Tensor
    labels: Tensor
    loss_ta: Tensor
    loss_itc: Tensor


class ALBEFForTextAssignment(ALBEFBlockGroupsMixin, nn.Module):
    """ALBEF's text-assignment (TA) pre-training for NLVR2 (``model_pretrain_nlvr.ALBEF``): for
    a caption and a pair of images, is the caption about image 0, image 1, or neither? The pairs
    are built inside the batch (:func:`sample_text_assignment`) from image-caption data, so any
    pre-training caption file serves.

    ALBEF starts TA from a pre-trained model, whose ``vision_proj`` picks similar (hard) partner
    images, and trains the TA loss alone; ``vision_proj``, ``text_proj`` and ``temp`` are then
    frozen (ALBEF keeps them unused). Unlike ALBEF, ``itc_weight > 0`` adds an in-batch
    image-text contrastive loss on them (trained): from random weights the TA loss alone gives
    no signal to start aligning images with text, and ITC does (the shapes-world config).

    Args:
        vision_encoder (VisionTransformer): image encoder.
        text_encoder (BERTTextEncoder): BERT layers 0..5.
        fusion_encoder (DualImageFusionEncoder): the paired fusion layers.
        embed_dim (int): size of the ``vision_proj`` / ``text_proj`` features (256).
        temp (float): initial ITC temperature (learnable, clamped to [0.001, 0.5]); the partner
            images are always drawn at ALBEF's fixed 0.07.
        itc_weight (float): weight of the in-batch ITC loss (0: ALBEF's TA loss alone).

    Inputs (forward):
        image (Tensor): ``[B, 3, H, W]``, ``B >= 3``.
        input_ids (Tensor): ``[B, L]`` caption token ids (caption ``b`` describes image ``b``).
        attention_mask (Tensor): ``[B, L]`` 1/0 padding mask.
        generator (Optional[torch.Generator]): random source of the pairing.

    Returns:
        ALBEFTextAssignmentOutput
    """

    def __init__(
        self,
        vision_encoder: VisionTransformer,
        text_encoder: BERTTextEncoder,
        fusion_encoder: DualImageFusionEncoder,
        embed_dim: int = 256,
        temp: float = 0.07,
        itc_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(fusion_encoder, DualImageFusionEncoder):
            raise TypeError(f"ALBEFForTextAssignment needs a DualImageFusionEncoder, got {type(fusion_encoder).__name__}")
        text_width = text_encoder.embeddings.word_embeddings.embedding_dim
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        self.fusion_encoder = fusion_encoder
        self.vision_proj = nn.Linear(vision_encoder.width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.ta_head = nn.Linear(text_width, 3)
        for layer in (self.vision_proj, self.text_proj, self.ta_head):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        self.itc_weight = itc_weight
        if itc_weight == 0:
            # Unused by the loss: frozen, so that DDP needs no find_unused_parameters.
            for module in (self.vision_proj, self.text_proj):
                remove_grad(module)
            self.temp.requires_grad_(False)

    def forward(
        self,
        image: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> ALBEFTextAssignmentOutput:
        image_embeddings = self.vision_encoder(image).last_hidden_state  # [B, N, Dv]
        text = self.text_encoder(input_ids, attention_mask=attention_mask.bool()).last_hidden_state
        image_feat = F.normalize(self.vision_proj(image_embeddings[:, 0]).float(), dim=-1)  # [B, E]
        pairs = sample_text_assignment(image_feat.detach(), generator=generator)
        # Each layer projects the batch's image tokens once and gathers them per pair.
        fused = self.fusion_encoder(
            text, attention_mask, (image_embeddings, image_embeddings),
            image_index=(pairs.image0_index, pairs.image1_index), cls_only=True,
        ).last_hidden_state
        logits = self.ta_head(fused[:, 0])
        loss_ta = F.cross_entropy(logits.float(), pairs.labels)
        loss_itc = torch.zeros((), device=image.device)
        if self.itc_weight:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            text_feat = F.normalize(self.text_proj(text[:, 0]).float(), dim=-1)
            sim_i2t = image_feat @ text_feat.t() / self.temp  # [B, B], matches on the diagonal
            targets = torch.arange(image.size(0), device=image.device)
            loss_itc = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_i2t.t(), targets)) / 2
        return ALBEFTextAssignmentOutput(loss_ta + self.itc_weight * loss_itc, logits, pairs.labels, loss_ta, loss_itc)


_FUSION_KEY = re.compile(r"^(fusion_encoder(?:_m)?)\.layer\.(\d+)\.(.+)$")


def nlvr_state_dict_from_single_image(
    state_dict: Mapping[str, Tensor], num_layer_pairs: Optional[int] = None
) -> Dict[str, Tensor]:
    """Single-image ALBEF weights (our layout: pre-training, retrieval, ...) -> the dual-image
    layout of :class:`ALBEFForNLVR` / :class:`ALBEFForTextAssignment`: fusion layer ``i`` becomes
    layers ``2i`` and ``2i + 1`` (ALBEF's ``Pretrain_nlvr.py`` copies BERT layer ``6 + i`` to
    ``6 + 2i`` and ``7 + 2i``). ``fusion_encoder_m`` is converted the same way; every other key is
    kept.

    Args:
        state_dict (Mapping[str, Tensor]): our-layout state dict
            (:func:`~torchmm_ext.checkpoints.convert_to_torchmm_ext` converts other layouts).
        num_layer_pairs (Optional[int]): fusion layers of the target model's single-image
            counterpart. When given, a state dict that already has ``2 * num_layer_pairs``
            fusion layers is returned unchanged (a TA or NLVR2 checkpoint), and one with neither
            count is an error.

    Returns:
        Dict[str, Tensor]: the converted state dict (tensors shared with the input, not copied).

    Raises:
        ValueError: no fusion layers, or (with ``num_layer_pairs``) a layer count that fits
            neither layout.
    """
    counts: Dict[str, int] = {}
    for key in state_dict:
        m = _FUSION_KEY.match(key)
        if m:
            counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
    if "fusion_encoder" not in counts:
        raise ValueError("the state dict has no fusion_encoder.layer.* keys: not an ALBEF model in our layout")
    layers = counts["fusion_encoder"]
    if num_layer_pairs is not None:
        if layers == 2 * num_layer_pairs:
            return dict(state_dict)
        if layers != num_layer_pairs:
            raise ValueError(
                f"the state dict has {layers} fusion layers: neither a single-image model with "
                f"{num_layer_pairs} nor a dual-image model with {2 * num_layer_pairs}"
            )
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = _FUSION_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        prefix, i, rest = m.group(1), int(m.group(2)), m.group(3)
        out[f"{prefix}.layer.{2 * i}.{rest}"] = value
        out[f"{prefix}.layer.{2 * i + 1}.{rest}"] = value
    return out


def _dual_image_encoders(preset: str, sizes: Dict[str, Optional[int]], **kwargs) -> tuple:
    vision_encoder, text_encoder, single, cfg = _albef_encoders(preset, sizes, **kwargs)
    del single  # the preset logic lives in _albef_encoders; its single-image fusion encoder is not used
    fusion_encoder = DualImageFusionEncoder(
        width=cfg["text_width"],
        image_width=cfg["vision_width"],
        num_layer_pairs=cfg["fusion_layers"],
        num_heads=cfg["text_heads"],
        ffn_dim=cfg["text_ffn_dim"],
        dropout=kwargs["dropout"],
    )
    return vision_encoder, text_encoder, fusion_encoder, cfg


def albef_model_for_nlvr(
    preset: str = "base",
    *,
    num_classes: int = 2,
    distill: bool = True,
    momentum: float = 0.995,
    image_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    vision_width: Optional[int] = None,
    vision_depth: Optional[int] = None,
    vision_heads: Optional[int] = None,
    vision_mlp_dim: Optional[int] = None,
    text_width: Optional[int] = None,
    text_layers: Optional[int] = None,
    fusion_layers: Optional[int] = None,
    text_heads: Optional[int] = None,
    text_ffn_dim: Optional[int] = None,
    vocab_size: Optional[int] = None,
    max_position_embeddings: int = 512,
    pad_token_id: int = 0,
    dropout: float = 0.1,
    drop_path_rate: float = 0.0,
) -> ALBEFForNLVR:
    """Builds ALBEF for NLVR2.

    Args:
        preset (str): ``"base"`` (ViT-B/16 at 384 px, BERT-base with fusion layers 6-11 doubled
            into 6-17) or ``"tiny"`` (CPU debugging on the shapes world).
        num_classes (int): classes of the MLP head (2: False, True).
        distill (bool): momentum copies and soft momentum targets (ALBEF).
        momentum (float): EMA coefficient of the momentum copies (0.995).
        image_size, patch_size, vision_width, vision_depth, vision_heads, vision_mlp_dim: ViT
            sizes; ``None`` takes the preset's value.
        text_width, text_layers, text_heads, text_ffn_dim, vocab_size: BERT sizes.
        fusion_layers (Optional[int]): fusion layers of the single-image model; the NLVR2 model
            has twice as many.
        max_position_embeddings (int): text position table size.
        pad_token_id (int): tokenizer padding id.
        dropout (float): BERT hidden dropout (0.1).
        drop_path_rate (float): ViT stochastic depth (0 in ALBEF fine-tuning).

    Returns:
        ALBEFForNLVR
    """
    given = preset_sizes(locals())
    vision_encoder, text_encoder, fusion_encoder, _ = _dual_image_encoders(
        preset, given, max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id,
        dropout=dropout, drop_path_rate=drop_path_rate,
    )
    return ALBEFForNLVR(vision_encoder, text_encoder, fusion_encoder, num_classes=num_classes,
                        distill=distill, momentum=momentum)


def albef_model_for_text_assignment(
    preset: str = "base",
    *,
    embed_dim: Optional[int] = None,
    temp: float = 0.07,
    itc_weight: float = 0.0,
    image_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    vision_width: Optional[int] = None,
    vision_depth: Optional[int] = None,
    vision_heads: Optional[int] = None,
    vision_mlp_dim: Optional[int] = None,
    text_width: Optional[int] = None,
    text_layers: Optional[int] = None,
    fusion_layers: Optional[int] = None,
    text_heads: Optional[int] = None,
    text_ffn_dim: Optional[int] = None,
    vocab_size: Optional[int] = None,
    max_position_embeddings: int = 512,
    pad_token_id: int = 0,
    dropout: float = 0.1,
    drop_path_rate: float = 0.0,
) -> ALBEFForTextAssignment:
    """Builds ALBEF's text-assignment pre-training model for NLVR2 (same encoders as
    :func:`albef_model_for_nlvr`, so its checkpoint initialises the NLVR2 model).

    Args:
        preset (str): ``"base"`` or ``"tiny"`` (ALBEF pre-trains TA at 256 px:
            ``image_size=256``).
        embed_dim (Optional[int]): ``vision_proj`` / ``text_proj`` size (the preset's ITC size,
            256 at base).
        temp (float): initial temperature of the optional ITC loss (0.07).
        itc_weight (float): weight of an in-batch ITC loss added to the TA loss (0 in ALBEF; see
            :class:`ALBEFForTextAssignment`).
        image_size, patch_size, vision_width, vision_depth, vision_heads, vision_mlp_dim,
        text_width, text_layers, fusion_layers, text_heads, text_ffn_dim, vocab_size,
        max_position_embeddings, pad_token_id, dropout, drop_path_rate: as in
            :func:`albef_model_for_nlvr`.

    Returns:
        ALBEFForTextAssignment
    """
    given = preset_sizes(locals())
    vision_encoder, text_encoder, fusion_encoder, cfg = _dual_image_encoders(
        preset, given, max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id,
        dropout=dropout, drop_path_rate=drop_path_rate,
    )
    return ALBEFForTextAssignment(vision_encoder, text_encoder, fusion_encoder,
                                  embed_dim=cfg["embed_dim"], temp=temp, itc_weight=itc_weight)
