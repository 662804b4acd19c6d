"""METER (Dou et al., "An Empirical Study of Training End-to-End Vision-and-Language
Transformers"; zdou0830/METER): a CLIP ViT and a RoBERTa encode the image and the text
separately; two Linear maps and a modality embedding bring both to the fusion width; then 6
co-attention layers per side (post-norm BERT layers: self-attention, cross-attention to the
other side's previous-layer output, feed-forward) fuse them; the first token of each side is
pooled (tanh(Linear)) and the two are concatenated (1536 dims at base size).

Built from this library's pieces so the efficiency methods reach every block:

* the image side is :class:`~torchmm_ext.modules.vision_transformer.VisionTransformer` with
  CLIP's options (``ln_pre``, QuickGELU, eps 1e-5, no patch bias) and 11 of CLIP's 12 blocks (METER
  drops the last), its final norm (CLIP's ``ln_post``) on every token, no projection;
* the text side is :func:`~torchmm_ext.modules.text_encoder.albef_text_encoder` with RoBERTa's
  options (one token type, position ids offset past the padding id, eps 1e-5);
* each co-attention layer is a :class:`~torchmm_ext.modules.text_encoder.FusionLayer` (the
  same equations as METER's ``BertCrossLayer``); the image side's cross-attention masks the
  text padding.

``block_groups()`` names ``vision`` (ViT blocks), ``text`` (RoBERTa layers), ``text_fusion`` and
``image_fusion`` (the 6 + 6 co-attention layers DAS searches over). A fusion layer is called as
``layer(x, self_mask, other, image_mask=other_mask)`` and returns ``(states, None)``; a
replacement (a DAS skip adapter) must accept that call.

Task models: :func:`meter_model_for_vqa` (soft-score BCE over an answer vocabulary),
:func:`meter_model_for_nlvr` (two passes with image types 1 and 2, pooled features
concatenated), :func:`meter_model_for_retrieval` (rank head scored against sampled negative
texts, plus ITM) and :func:`meter_model_for_pretraining` (MLM + ITM).

Where we knowingly differ from the original (each says why where it is done):

* an image is encoded once per forward and its states are shared by every pair that uses it
  (METER re-encodes the image for each of the 16 retrieval pairs and for each pre-training
  objective); the result is the same;
* retrieval's ITM pairs come from the rank pass (see :class:`METERForRetrieval`).

The task models meet the contract of :mod:`torchmm_ext.tasks` (the shared recipe bodies):
``forward(images, input_ids, attention_mask, pixel_mask=None, ...)``. ``pixel_mask`` is accepted
for that contract and ignored: METER's images are square crops without padding.
"""

from typing import Any, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn, Tensor
from torchmultimodal.modules.encoders.bert_text_encoder import BERTTextEncoder
from torchmultimodal.modules.losses.flava import MaskedPredictionHead

from torchmm_ext.modules.mlm import masked_lm_loss
from torchmm_ext.modules.text_encoder import albef_text_encoder, FusionLayer, init_bert_weights, padding_mask
from torchmm_ext.modules.vision_transformer import QuickGELU, VisionTransformer

__all__ = [
    "METER_PRESETS",
    "TEXT_KINDS",
    "VISION_KINDS",
    "METERClassifierOutput",
    "METERForNLVR",
    "METERForPretraining",
    "METERForRetrieval",
    "METERForVQA",
    "METERImageEncoding",
    "METERModel",
    "METEROutput",
    "METERPretrainingOutput",
    "METERRetrievalOutput",
    "Pooler",
    "classifier_head",
    "meter_model",
    "meter_model_for_nlvr",
    "meter_model_for_pretraining",
    "meter_model_for_retrieval",
    "meter_model_for_vqa",
    "vqa_soft_bce",
]

METER_PRESETS: Dict[str, Dict[str, Any]] = {
    # The paper's model: CLIP ViT-B/16 (11 blocks) at 288 px + roberta-base, 6 + 6 fusion layers.
    "base": dict(
        image_size=288,
        patch_size=16,
        vision_width=768,
        vision_layers=11,
        vision_heads=12,
        vision_mlp_dim=3072,
        text_width=768,
        text_layers=12,
        text_heads=12,
        text_ffn_dim=3072,
        vocab_size=50265,
        max_position_embeddings=514,
        hidden_size=768,
        fusion_layers=6,
        fusion_heads=12,
        fusion_ffn_dim=3072,
    ),
    # CPU debugging on the shapes world (64 px images, 8 px patches).
    "tiny": dict(
        image_size=64,
        patch_size=8,
        vision_width=192,
        vision_layers=3,
        vision_heads=3,
        vision_mlp_dim=768,
        text_width=192,
        text_layers=2,
        text_heads=3,
        text_ffn_dim=768,
        vocab_size=512,
        max_position_embeddings=128,
        hidden_size=192,
        fusion_layers=2,
        fusion_heads=3,
        fusion_ffn_dim=768,
    ),
}

#: RoBERTa's padding id (``<pad>``), the ``base`` preset's default.
ROBERTA_PAD_TOKEN_ID = 1


class Pooler(nn.Module):
    """``tanh(Linear(x[:, 0]))``: METER's ``heads.Pooler`` (first token, not a mean).

    Args:
        width (int): hidden size.

    Inputs:
        states (Tensor): ``[B, L, D]``.

    Returns:
        Tensor: ``[B, D]``.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, states: Tensor) -> Tensor:
        return torch.tanh(self.dense(states[:, 0]))


def classifier_head(in_dim: int, hidden_dim: int, num_classes: int) -> nn.Sequential:
    """METER's (and ViLT's) task MLP: ``Linear -> LayerNorm -> GELU -> Linear`` (keys
    ``0``, ``1``, ``3`` as in the original), BERT-initialised.

    Args:
        in_dim (int): input features (VQA: 2 x hidden; NLVR2: 4 x hidden).
        hidden_dim (int): hidden features (2 x hidden).
        num_classes (int): outputs.

    Returns:
        nn.Sequential
    """
    head = nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_classes)
    )
    init_bert_weights(head)
    return head


class METEROutput(NamedTuple):
    """Output of :meth:`METERModel.infer`.

    Attributes:
        text_states (Tensor): fused text states ``[B, L, H]``.
        image_states (Tensor): fused image states ``[B, N, H]`` (CLS first).
        pooled (Tensor): ``[B, 2H]``: pooled text first token, then pooled image first token.
    """

    text_states: Tensor
    image_states: Tensor
    pooled: Tensor


class METERModel(nn.Module):
    """METER's backbone (``METERTransformerSS.infer``): unimodal encoders, maps to the fusion
    width, modality embedding, co-attention layers and poolers; no task head.

    Args:
        vision_encoder (VisionTransformer): CLIP-style ViT (every token is used).
        text_encoder (BERTTextEncoder): RoBERTa-style text encoder.
        hidden_size (int): fusion width.
        fusion_layers (int): co-attention layers per side (6).
        fusion_heads (int): attention heads of a fusion layer.
        fusion_ffn_dim (int): feed-forward size of a fusion layer.
        num_image_types (int): image modality ids (1; NLVR2's two images: 2). Text has id 0.
        dropout (float): hidden dropout of the fusion layers.
        layer_norm_eps (float): LayerNorm epsilon of the fusion layers (METER's cross layers
            are built from a ``RobertaConfig`` without ``layer_norm_eps``: BERT's 1e-12).

    Inputs (forward = :meth:`infer`):
        images (Tensor): ``[B, 3, S, S]`` (CLIP-normalised).
        input_ids (Tensor): ``[B, L]`` token ids.
        attention_mask (Tensor): ``[B, L]`` 1/0 padding mask.
        image_token_type (int): modality id of the image tokens (1; NLVR2: 1 or 2).

    Returns:
        METEROutput
    """

    def __init__(
        self,
        vision_encoder: VisionTransformer,
        text_encoder: BERTTextEncoder,
        hidden_size: int = 768,
        fusion_layers: int = 6,
        fusion_heads: int = 12,
        fusion_ffn_dim: int = 3072,
        num_image_types: int = 1,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        text_width = text_encoder.embeddings.word_embeddings.embedding_dim
        self.hidden_size = hidden_size
        self.text_transform = nn.Linear(text_width, hidden_size)
        self.image_transform = nn.Linear(vision_encoder.width, hidden_size)
        self.modality_embeddings = nn.Embedding(1 + num_image_types, hidden_size)
        self.text_fusion = nn.ModuleList(
            FusionLayer(hidden_size, hidden_size, fusion_heads, fusion_ffn_dim, dropout, layer_norm_eps)
            for _ in range(fusion_layers)
        )
        self.image_fusion = nn.ModuleList(
            FusionLayer(hidden_size, hidden_size, fusion_heads, fusion_ffn_dim, dropout, layer_norm_eps)
            for _ in range(fusion_layers)
        )
        self.text_pooler = Pooler(hidden_size)
        self.image_pooler = Pooler(hidden_size)
        for module in (self.text_transform, self.image_transform, self.modality_embeddings,
                       self.text_fusion, self.image_fusion, self.text_pooler, self.image_pooler):
            init_bert_weights(module)
        # METER-DAS's trainable classifier token (``token4classifier``): off until
        # :meth:`add_classifier_token` (``das.classifier_token``) puts it on.
        self.register_parameter("classifier_token", None)

    @property
    def image_size(self) -> int:
        return self.vision_encoder.image_size

    def block_groups(self) -> Dict[str, nn.ModuleList]:
        """The model's transformer blocks by group (the efficiency-method convention).

        Returns:
            Dict[str, nn.ModuleList]: ``vision`` (ViT blocks), ``text`` (RoBERTa layers),
            ``text_fusion`` and ``image_fusion`` (co-attention layers; DAS's candidates).
        """
        return {
            "vision": self.vision_encoder.blocks,
            "text": self.text_encoder.encoder.layer,
            "text_fusion": self.text_fusion,
            "image_fusion": self.image_fusion,
        }

    def add_classifier_token(self, token_id: int) -> None:
        """Add METER-DAS's trainable classifier token (``token4classifier``): a ``[1, 1, D]``
        parameter that replaces the text's first position after the map to the fusion width,
        before the modality embedding, in every pass (:meth:`fuse`).

        It starts, as published, from the text embedding of ``token_id`` alone (word, position
        and token-type embeddings and LayerNorm; METER-DAS: RoBERTa ``<s>``, id 0, at its
        position 2) of the weights loaded now, so call it after loading. Differences: dropout is
        off here (the published module is built in train mode, so its start has embedding dropout
        applied once); when the text width differs from the fusion width (never in METER's
        presets) the embedding goes through ``text_transform`` first.

        Args:
            token_id (int): the token whose embedding is the start (METER's RoBERTa: 0; the
                shapes tokenizer's ``[CLS]``: 2).

        Raises:
            ValueError: ``token_id`` outside the vocabulary.
        """
        embeddings = self.text_encoder.embeddings
        vocab = embeddings.word_embeddings.num_embeddings
        if not 0 <= int(token_id) < vocab:
            raise ValueError(f"classifier token id {token_id} is outside the text vocabulary (0..{vocab - 1})")
        was_training = embeddings.training
        embeddings.eval()
        with torch.no_grad():
            ids = torch.tensor([[int(token_id)]], device=embeddings.word_embeddings.weight.device)
            token = embeddings(ids)
            if token.shape[-1] != self.hidden_size:
                token = self.text_transform(token)
        embeddings.train(was_training)
        self.classifier_token = nn.Parameter(token.detach().clone())

    def encode_text(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """RoBERTa states ``[B, L, Dt]`` (before the map to the fusion width)."""
        return self.text_encoder(text_ids, attention_mask=text_mask.bool()).last_hidden_state

    def encode_image(self, images: Tensor, guidance: Optional[Tensor] = None) -> Tensor:
        """CLIP ViT states ``[B, N, Dv]`` (final norm on every token; ``guidance`` goes to the
        ViT's token reducers, e.g. ELIP's text CLS)."""
        return self.vision_encoder(images, guidance=guidance).last_hidden_state

    def fuse(
        self,
        text_states: Tensor,
        text_mask: Tensor,
        image_states: Tensor,
        image_token_type: int = 1,
    ) -> METEROutput:
        """The co-attention part: maps, modality embedding, fusion layers, poolers.

        Args:
            text_states (Tensor): :meth:`encode_text` output ``[B, L, Dt]``.
            text_mask (Tensor): ``[B, L]`` 1/0 padding mask.
            image_states (Tensor): :meth:`encode_image` output ``[B, N, Dv]``.
            image_token_type (int): modality id of the image tokens.

        Returns:
            METEROutput
        """
        x = self.text_transform(text_states)
        if self.classifier_token is not None:
            x = torch.cat([self.classifier_token.to(x.dtype).expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        y = self.image_transform(image_states)
        x = x + self.modality_embeddings.weight[0]
        y = y + self.modality_embeddings.weight[image_token_type]
        text_keys = padding_mask(text_mask)  # [B, 1, 1, L]; the image has no padding (None)
        for text_layer, image_layer in zip(self.text_fusion, self.image_fusion):
            # Both sides read the other's previous-layer output.
            x_next, _ = text_layer(x, text_keys, y, image_mask=None)
            y_next, _ = image_layer(y, None, x, image_mask=text_keys)
            x, y = x_next, y_next
        pooled = torch.cat([self.text_pooler(x), self.image_pooler(y)], dim=-1)
        return METEROutput(x, y, pooled)

    def infer(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, image_token_type: int = 1
              ) -> METEROutput:
        text_states = self.encode_text(input_ids, attention_mask)
        image_states = self.encode_image(images, guidance=text_states[:, 0])
        return self.fuse(text_states, attention_mask, image_states, image_token_type)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, image_token_type: int = 1
                ) -> METEROutput:
        return self.infer(images, input_ids, attention_mask, image_token_type)


# ---- tasks ------------------------------------------------------------------------------------


class METERClassifierOutput(NamedTuple):
    """Attributes:
    logits (Tensor): ``[B, C]``.
    loss (Optional[Tensor]): the task loss when targets are given.
    """

    logits: Tensor
    loss: Optional[Tensor] = None


def vqa_soft_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """ViLT/METER's VQA loss: mean binary cross-entropy against the soft scores, times the
    number of answers (``BCEWithLogits(logits, targets) * A``), in fp32.

    Args:
        logits (Tensor): ``[B, A]``.
        targets (Tensor): ``[B, A]`` soft scores in ``[0, 1]``.

    Returns:
        Tensor: scalar.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.size(1)


class METERForVQA(METERModel):
    """METER for VQA: ``vqa_head`` (``Linear(2H, 2H) -> LayerNorm -> GELU -> Linear(2H, A)``)
    on the pooled features, trained with :func:`vqa_soft_bce`.

    Args:
        num_answers (int): answer vocabulary size (3129 for VQAv2).
        (others as :class:`METERModel`)

    Inputs (forward):
        images, input_ids, attention_mask: as :class:`METERModel`.
        pixel_mask (Optional[Tensor]): ignored (no padded images).
        targets (Optional[Tensor]): ``[B, A]`` soft scores.

    Returns:
        METERClassifierOutput
    """

    def __init__(self, vision_encoder: VisionTransformer, text_encoder: BERTTextEncoder,
                 num_answers: int = 3129, **kwargs: Any) -> None:
        super().__init__(vision_encoder, text_encoder, **kwargs)
        self.vqa_head = classifier_head(2 * self.hidden_size, 2 * self.hidden_size, num_answers)

    def forward(  # type: ignore[override]
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, pixel_mask: Optional[Tensor] = None,
        targets: Optional[Tensor] = None,
    ) -> METERClassifierOutput:
        logits = self.vqa_head(self.infer(images, input_ids, attention_mask).pooled)
        loss = vqa_soft_bce(logits, targets) if targets is not None else None
        return METERClassifierOutput(logits, loss)


class METERForNLVR(METERModel):
    """METER for NLVR2: the sentence is fused with each image (modality ids 1 and 2), the two
    pooled outputs are concatenated (``[B, 4H]``) into ``nlvr_head``
    (``Linear(4H, 2H) -> LayerNorm -> GELU -> Linear(2H, 2)``); cross-entropy.

    The text and each image are encoded once; the two fusion passes share the text states.

    Inputs (forward):
        images (Tensor): ``[B, 2, 3, S, S]`` the left and right images.
        input_ids, attention_mask: the sentence, as :class:`METERModel`.
        pixel_mask (Optional[Tensor]): ignored (no padded images).
        labels (Optional[Tensor]): ``[B]`` 1 = true, 0 = false.

    Returns:
        METERClassifierOutput
    """

    def __init__(self, vision_encoder: VisionTransformer, text_encoder: BERTTextEncoder, **kwargs: Any) -> None:
        kwargs.setdefault("num_image_types", 2)
        super().__init__(vision_encoder, text_encoder, **kwargs)
        self.nlvr_head = classifier_head(4 * self.hidden_size, 2 * self.hidden_size, 2)

    def forward(  # type: ignore[override]
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, pixel_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
    ) -> METERClassifierOutput:
        if images.dim() != 5 or images.size(1) != 2:
            raise ValueError(f"NLVR2 takes an image pair per sample, images [B, 2, 3, H, W]; got {tuple(images.shape)}")
        b = images.size(0)
        text_states = self.encode_text(input_ids, attention_mask)
        guidance = text_states[:, 0].repeat(2, 1)
        # Both images in one ViT pass: [left images; right images].
        image_states = self.encode_image(images.transpose(0, 1).flatten(0, 1), guidance)
        pooled = [
            self.fuse(text_states, attention_mask, image_states[i * b:(i + 1) * b], image_token_type=i + 1).pooled
            for i in range(2)
        ]
        logits = self.nlvr_head(torch.cat(pooled, dim=-1))
        loss = F.cross_entropy(logits.float(), labels.view(-1)) if labels is not None else None
        return METERClassifierOutput(logits, loss)


class METERImageEncoding(NamedTuple):
    """Attributes:
    states (Tensor): ViT states ``[B, N, Dv]`` (the shared retrieval evaluation expands its rows).
    """

    states: Tensor


class METERRetrievalOutput(NamedTuple):
    """Attributes:
    scores (Tensor): ``[B, G]`` rank scores of each image's texts (column 0: the positive).
    loss (Optional[Tensor]): ``loss_rank + itm_weight * loss_itm`` (training inputs only).
    loss_rank (Optional[Tensor]): cross-entropy of the positive among the ``G`` texts.
    loss_itm (Optional[Tensor]): ITM cross-entropy on (positive, first negative) pairs.
    """

    scores: Tensor
    loss: Optional[Tensor] = None
    loss_rank: Optional[Tensor] = None
    loss_itm: Optional[Tensor] = None


class METERForRetrieval(METERModel):
    """METER for image-text retrieval: ``rank_head`` (``Linear(2H, 1)``, METER's ``rank_output``,
    initialised from the ITM head's "match" row by :meth:`init_rank_head_from_itm`) scores a
    pair; training ranks each image's caption above ``G - 1`` sampled negative texts
    (cross-entropy with target 0, METER's ``compute_irtr``), plus the ITM loss, which METER's
    fine-tuning also computes (its ``itm_score`` frozen; ours too, see ``freeze_itm_head``).

    METER's ITM there swaps half the images for random ones; here the ITM pairs come from the
    same forward: each image with its caption (label 1) and with its first negative (label 0),
    which adds no encoder pass.

    Args:
        itm_weight (float): weight of the ITM term (METER: 1; 0 disables it).
        freeze_itm_head (bool): METER freezes ``itm_score`` when fine-tuning for retrieval.
        (others as :class:`METERModel`)

    Evaluation (the shared recipe's all-pairs scoring): :meth:`embed_images` once per image,
    :meth:`score_pairs` for (image, text) pairs.

    Inputs (forward):
        images (Tensor): ``[B, 3, S, S]``.
        input_ids (Tensor): ``[B, G, L]``: per image, its caption then ``G - 1`` negatives
            (``[B, L]`` is read as ``G = 1``).
        attention_mask (Tensor): ``[B, G, L]`` (or ``[B, L]``) 1/0 padding mask.
        pixel_mask (Optional[Tensor]): ignored (no padded images).

    Returns:
        METERRetrievalOutput (losses only when ``G > 1``)
    """

    def __init__(self, vision_encoder: VisionTransformer, text_encoder: BERTTextEncoder,
                 itm_weight: float = 1.0, freeze_itm_head: bool = True, **kwargs: Any) -> None:
        super().__init__(vision_encoder, text_encoder, **kwargs)
        self.itm_head = nn.Linear(2 * self.hidden_size, 2)
        self.rank_head = nn.Linear(2 * self.hidden_size, 1)
        init_bert_weights(self.itm_head)
        self.init_rank_head_from_itm()
        self.itm_weight = itm_weight
        if freeze_itm_head:
            self.itm_head.requires_grad_(False)

    @torch.no_grad()
    def init_rank_head_from_itm(self) -> None:
        """``rank_head <- itm_head`` row 1 ("match"), as METER does after loading the
        pre-trained weights; call it again after loading a pre-training checkpoint."""
        self.rank_head.weight.copy_(self.itm_head.weight[1:])
        self.rank_head.bias.copy_(self.itm_head.bias[1:])

    def embed_images(self, images: Tensor, pixel_mask: Optional[Tensor] = None) -> "METERImageEncoding":
        """The ViT states of each image, computed once for all the texts it is scored with."""
        return METERImageEncoding(self.encode_image(images))

    def score_pairs(self, image_encoding: "METERImageEncoding", input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Rank scores ``[N]`` of pairs: row ``n`` of ``image_encoding`` (from :meth:`embed_images`)
        with text ``n``."""
        text_states = self.encode_text(input_ids, attention_mask)
        return self.rank_head(self.fuse(text_states, attention_mask, image_encoding.states).pooled)[:, 0]

    def rank_scores(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Rank score ``[B]`` of each (image, text) pair."""
        return self.rank_head(self.infer(images, input_ids, attention_mask).pooled)[:, 0]

    def forward(  # type: ignore[override]
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, pixel_mask: Optional[Tensor] = None
    ) -> METERRetrievalOutput:
        if input_ids.dim() == 2:
            input_ids, attention_mask = input_ids[:, None], attention_mask[:, None]
        b, g, length = input_ids.shape
        text_mask = attention_mask.reshape(b * g, length)
        text_states = self.encode_text(input_ids.reshape(b * g, length), text_mask)
        guidance = text_states.view(b, g, length, -1)[:, 0, 0]  # each image's own caption
        image_states = self.encode_image(images, guidance)
        # Each image is encoded once and shared by its G pairs.
        fused = self.fuse(text_states, text_mask, image_states.repeat_interleave(g, dim=0))
        scores = self.rank_head(fused.pooled).view(b, g)
        if g == 1:
            return METERRetrievalOutput(scores)
        loss_rank = F.cross_entropy(scores.float(), torch.zeros(b, dtype=torch.long, device=scores.device))
        pooled = fused.pooled.view(b, g, -1)[:, :2].reshape(2 * b, -1)  # (positive, first negative)
        itm_labels = torch.tensor([1, 0], device=scores.device).repeat(b)
        loss_itm = F.cross_entropy(self.itm_head(pooled).float(), itm_labels)
        return METERRetrievalOutput(scores, loss_rank + self.itm_weight * loss_itm, loss_rank, loss_itm)


class METERPretrainingOutput(NamedTuple):
    """Attributes:
    loss (Tensor): ``mlm_loss + itm_loss`` (METER weighs them equally).
    mlm_loss (Tensor): masked language modelling cross-entropy.
    itm_loss (Tensor): image-text matching cross-entropy.
    mlm_logits (Tensor): ``[B, L, V]``.
    itm_logits (Tensor): ``[B, 2]``.
    """

    loss: Tensor
    mlm_loss: Tensor
    itm_loss: Tensor
    mlm_logits: Tensor
    itm_logits: Tensor


class METERForPretraining(METERModel):
    """METER pre-training (``task_mlm_itm_clip_bert``): masked language modelling on the fused
    text states (``mlm_head``: dense -> GELU -> LayerNorm -> decoder, NOT tied to the word
    embeddings, as METER's ``MLMHead``) with the caption's own image, and image-text matching
    (``itm_head``, ``Linear(2H, 2)``) on the pooled features of (image, caption) pairs where the
    collator swapped some images (:class:`~torchmm_ext.data.vl_tasks.MLMITMCollator`). Two
    passes, as METER's ``compute_mlm`` and ``compute_itm``.

    Inputs (forward):
        images, input_ids, attention_mask: the caption and its image.
        mlm_input_ids (Tensor): ``[B, L]`` the masked caption.
        mlm_labels (Tensor): ``[B, L]`` original ids at the masked positions, -100 elsewhere.
        itm_images (Tensor): ``[B, 3, S, S]`` the ITM images (own or another).
        itm_labels (Tensor): ``[B]`` 1 = own image.
        pixel_mask, itm_pixel_mask (Optional[Tensor]): ignored (no padded images).

    Returns:
        METERPretrainingOutput
    """

    def __init__(self, vision_encoder: VisionTransformer, text_encoder: BERTTextEncoder, **kwargs: Any) -> None:
        super().__init__(vision_encoder, text_encoder, **kwargs)
        vocab_size = text_encoder.embeddings.word_embeddings.num_embeddings
        self.mlm_head = MaskedPredictionHead(hidden_size=self.hidden_size, vocab_size=vocab_size,
                                             transform_act_fn=F.gelu, layer_norm_eps=1e-12)
        self.itm_head = nn.Linear(2 * self.hidden_size, 2)
        init_bert_weights(self.mlm_head)
        init_bert_weights(self.itm_head)

    def forward(  # type: ignore[override]
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, mlm_input_ids: Tensor, mlm_labels: Tensor,
        itm_images: Tensor, itm_labels: Tensor, pixel_mask: Optional[Tensor] = None,
        itm_pixel_mask: Optional[Tensor] = None,
    ) -> METERPretrainingOutput:
        mlm_states = self.infer(images, mlm_input_ids, attention_mask).text_states
        mlm_logits = self.mlm_head(mlm_states)
        mlm_loss = masked_lm_loss(mlm_logits, mlm_labels)
        itm_logits = self.itm_head(self.infer(itm_images, input_ids, attention_mask).pooled)
        itm_loss = F.cross_entropy(itm_logits.float(), itm_labels.view(-1))
        return METERPretrainingOutput(mlm_loss + itm_loss, mlm_loss, itm_loss, mlm_logits, itm_logits)


# ---- builders ---------------------------------------------------------------------------------


#: Image encoders METER's builders make (``vision_kind``): ``clip`` is the paper's CLIP ViT
#: (``ln_pre``, QuickGELU, eps 1e-5, no patch bias); ``vit`` a timm/DeiT ViT (GELU, eps 1e-6,
#: patch bias, no ``ln_pre``), one of the image encoders METER's study compares, and the one
#: this library's ALBEF has (so an ALBEF checkpoint's vision encoder can start METER's).
VISION_KINDS = {
    "clip": dict(layer_norm_eps=1e-5, activation=QuickGELU, pre_norm=True, patch_bias=False),
    "vit": dict(layer_norm_eps=1e-6, activation=nn.GELU, pre_norm=False, patch_bias=True),
}
#: Text encoders (``text_kind``): ``roberta`` is the paper's (one token type, position ids past
#: the padding id, eps 1e-5); ``bert`` is BERT-base's (two token types, positions from 0, eps
#: 1e-12), METER's other text encoder and ALBEF's.
TEXT_KINDS = {
    "roberta": dict(layer_norm_eps=1e-5, type_vocab_size=1, offset_pos_ids=True),
    "bert": dict(layer_norm_eps=1e-12, type_vocab_size=2, offset_pos_ids=False),
}


def _kind(name: str, value: str, kinds: Dict[str, Any]) -> Dict[str, Any]:
    if value not in kinds:
        raise ValueError(f"unknown METER {name} {value!r}; choose one of {sorted(kinds)}")
    return kinds[value]


def _meter_encoders(preset: str, sizes: Dict[str, Optional[int]], pad_token_id: Optional[int],
                    dropout: float, vision_kind: str = "clip", text_kind: str = "roberta",
                    ) -> tuple[VisionTransformer, BERTTextEncoder, Dict[str, Any]]:
    if preset not in METER_PRESETS:
        raise ValueError(f"unknown METER preset {preset!r}; choose one of {sorted(METER_PRESETS)}")
    vision_options = _kind("vision_kind", vision_kind, VISION_KINDS)
    text_options = _kind("text_kind", text_kind, TEXT_KINDS)
    cfg = {k: (sizes[k] if sizes.get(k) is not None else v) for k, v in METER_PRESETS[preset].items()}
    vision_encoder = VisionTransformer(
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        width=cfg["vision_width"],
        depth=cfg["vision_layers"],
        num_heads=cfg["vision_heads"],
        mlp_dim=cfg["vision_mlp_dim"],
        **vision_options,
    )
    if pad_token_id is None:
        pad_token_id = ROBERTA_PAD_TOKEN_ID if text_kind == "roberta" else 0
    text_encoder = albef_text_encoder(
        vocab_size=cfg["vocab_size"],
        width=cfg["text_width"],
        num_layers=cfg["text_layers"],
        num_heads=cfg["text_heads"],
        ffn_dim=cfg["text_ffn_dim"],
        max_position_embeddings=cfg["max_position_embeddings"],
        pad_token_id=pad_token_id,
        dropout=dropout,
        **text_options,
    )
    fusion = dict(hidden_size=cfg["hidden_size"], fusion_layers=cfg["fusion_layers"],
                  fusion_heads=cfg["fusion_heads"], fusion_ffn_dim=cfg["fusion_ffn_dim"], dropout=dropout)
    return vision_encoder, text_encoder, fusion


_SIZE_DOC = """
    Args:
        preset (str): ``"base"`` (CLIP ViT-B/16 with 11 blocks at 288 px, roberta-base, 6 + 6
            fusion layers of width 768) or ``"tiny"`` (CPU debugging on the shapes world).
        image_size, patch_size, vision_width, vision_layers, vision_heads, vision_mlp_dim: ViT
            sizes; ``None`` takes the preset's value.
        text_width, text_layers, text_heads, text_ffn_dim, vocab_size, max_position_embeddings:
            text-encoder sizes.
        hidden_size, fusion_layers, fusion_heads, fusion_ffn_dim: co-attention sizes.
        pad_token_id (Optional[int]): tokenizer padding id (when ``None``: RoBERTa's 1, or 0 for
            ``text_kind="bert"``).
        dropout (float): hidden dropout of the text encoder and fusion layers (0.1).
        vision_kind (str): ``"clip"`` (the paper's CLIP ViT) or ``"vit"`` (timm/DeiT ViT, as
            ALBEF's), see :data:`VISION_KINDS`.
        text_kind (str): ``"roberta"`` (the paper's) or ``"bert"`` (BERT, as ALBEF's), see
            :data:`TEXT_KINDS`.
"""


def _sizes(arguments: Dict[str, Any]) -> Dict[str, Optional[int]]:
    return {k: arguments.get(k) for k in METER_PRESETS["base"]}


def meter_model(
    preset: str = "base",
    *,
    image_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    vision_width: Optional[int] = None,
    vision_layers: Optional[int] = None,
    vision_heads: Optional[int] = None,
    vision_mlp_dim: Optional[int] = None,
    text_width: Optional[int] = None,
    text_layers: Optional[int] = None,
    text_heads: Optional[int] = None,
    text_ffn_dim: Optional[int] = None,
    vocab_size: Optional[int] = None,
    max_position_embeddings: Optional[int] = None,
    hidden_size: Optional[int] = None,
    fusion_layers: Optional[int] = None,
    fusion_heads: Optional[int] = None,
    fusion_ffn_dim: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    dropout: float = 0.1,
    num_image_types: int = 1,
    vision_kind: str = "clip",
    text_kind: str = "roberta",
) -> METERModel:
    """Builds METER's backbone (no task head): :class:`METERModel`.
    {sizes}
        num_image_types (int): image modality ids (2 for NLVR2).

    Returns:
        METERModel
    """
    vision, text, fusion = _meter_encoders(preset, _sizes(locals()), pad_token_id, dropout, vision_kind, text_kind)
    return METERModel(vision, text, num_image_types=num_image_types, **fusion)


def meter_model_for_vqa(preset: str = "base", *, num_answers: int = 3129, **sizes: Any) -> METERForVQA:
    """Builds METER for VQA (:class:`METERForVQA`); ``num_answers`` answer classes (3129 for
    VQAv2). Size keywords as :func:`meter_model`."""
    pad, dropout, kinds = _encoder_options(sizes)
    vision, text, fusion = _meter_encoders(preset, sizes, pad, dropout, *kinds)
    return METERForVQA(vision, text, num_answers=num_answers, **fusion)


def meter_model_for_nlvr(preset: str = "base", **sizes: Any) -> METERForNLVR:
    """Builds METER for NLVR2 (:class:`METERForNLVR`, 3 modality ids). Size keywords as
    :func:`meter_model`."""
    pad, dropout, kinds = _encoder_options(sizes)
    vision, text, fusion = _meter_encoders(preset, sizes, pad, dropout, *kinds)
    return METERForNLVR(vision, text, **fusion)


def meter_model_for_retrieval(preset: str = "base", *, itm_weight: float = 1.0, freeze_itm_head: bool = True,
                              **sizes: Any) -> METERForRetrieval:
    """Builds METER for image-text retrieval (:class:`METERForRetrieval`). Size keywords as
    :func:`meter_model`."""
    pad, dropout, kinds = _encoder_options(sizes)
    vision, text, fusion = _meter_encoders(preset, sizes, pad, dropout, *kinds)
    return METERForRetrieval(vision, text, itm_weight=itm_weight, freeze_itm_head=freeze_itm_head, **fusion)


def meter_model_for_pretraining(preset: str = "base", **sizes: Any) -> METERForPretraining:
    """Builds METER for pre-training (:class:`METERForPretraining`, MLM + ITM). Size keywords as
    :func:`meter_model`."""
    pad, dropout, kinds = _encoder_options(sizes)
    vision, text, fusion = _meter_encoders(preset, sizes, pad, dropout, *kinds)
    return METERForPretraining(vision, text, **fusion)


def _encoder_options(sizes: Dict[str, Any]) -> tuple[Optional[int], float, tuple[str, str]]:
    """Pops the non-size keywords of a task builder's ``**sizes`` and checks the rest."""
    pad, dropout = sizes.pop("pad_token_id", None), sizes.pop("dropout", 0.1)
    kinds = (sizes.pop("vision_kind", "clip"), sizes.pop("text_kind", "roberta"))
    _check_sizes(sizes)
    return pad, dropout, kinds


def _check_sizes(sizes: Dict[str, Any]) -> None:
    unknown = sorted(set(sizes) - set(METER_PRESETS["base"]))
    if unknown:
        raise TypeError(
            f"unknown METER builder argument(s) {unknown}; the size arguments are "
            f"{sorted(METER_PRESETS['base'])}, plus pad_token_id, dropout, vision_kind and text_kind"
        )


meter_model.__doc__ = (meter_model.__doc__ or "").replace("{sizes}", _SIZE_DOC.strip("\n"))
