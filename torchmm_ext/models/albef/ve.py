"""ALBEF for visual entailment (SNLI-VE)."""

import copy
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn, Tensor
from torchmultimodal.modules.encoders.bert_text_encoder import BERTTextEncoder
from torchmultimodal.utils.common import remove_grad

from torchmm_ext.models.albef._common import ALBEFBlockGroupsMixin, _albef_encoders, preset_sizes
from torchmm_ext.modules.momentum import MomentumCopiesMixin
from torchmm_ext.modules.text_encoder import ALBEFFusionEncoder
from torchmm_ext.modules.vision_transformer import VisionTransformer

class ALBEFVEOutput(NamedTuple):
    """Attributes:
    loss (Tensor): ``(1 - alpha) * CE(logits, labels) + alpha * soft-CE(logits, softmax(logits_m))``.
    logits (Tensor): ``[B, num_classes]`` class logits of the online model.
    """

    loss: Tensor
    logits: Tensor


class ALBEFForVE(ALBEFBlockGroupsMixin, MomentumCopiesMixin, nn.Module):
    """ALBEF for visual entailment (SNLI-VE; ALBEF ``model_ve.ALBEF``): the fused [CLS] state of
    (image, hypothesis) goes through an MLP head to 3 classes (contradiction 0, neutral 1,
    entailment 2: :data:`torchmm_ext.data.datasets.VE_LABELS`).

    With ``distill``, momentum (EMA) copies of the encoders and the head give soft targets:
    ``loss = (1 - alpha) * CE(logits, labels) - alpha * sum(softmax(logits_m) * log_softmax(logits))``
    (mean over the batch), as in ALBEF.

    Args:
        vision_encoder (VisionTransformer): image encoder.
        text_encoder (BERTTextEncoder): text encoder (BERT layers before the fusion layer).
        fusion_encoder (ALBEFFusionEncoder): cross-attention fusion layers.
        num_classes (int): output classes (3).
        distill (bool): keep momentum copies and use their logits as soft targets.
        momentum (float): EMA coefficient of the momentum copies (0.995).

    Inputs (forward):
        image (Tensor): ``[B, 3, H, W]``.
        input_ids (Tensor): ``[B, L]`` hypothesis token ids.
        attention_mask (Tensor): ``[B, L]`` 1/0 padding mask.
        labels (Tensor): ``[B]`` class ids.
        alpha (float): distillation weight (ignored, i.e. 0, without ``distill``).

    Returns:
        ALBEFVEOutput
    """

    def __init__(
        self,
        vision_encoder: VisionTransformer,
        text_encoder: BERTTextEncoder,
        fusion_encoder: ALBEFFusionEncoder,
        num_classes: int = 3,
        distill: bool = True,
        momentum: float = 0.995,
    ) -> None:
        super().__init__()
        text_width = text_encoder.embeddings.word_embeddings.embedding_dim
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        self.fusion_encoder = fusion_encoder
        self.cls_head = nn.Sequential(
            nn.Linear(text_width, text_width), nn.ReLU(), nn.Linear(text_width, num_classes)
        )
        for layer in (self.cls_head[0], self.cls_head[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        self.num_classes = num_classes
        self.distill = distill
        self.momentum = momentum
        if distill:
            self.vision_encoder_m = copy.deepcopy(vision_encoder)
            self.text_encoder_m = copy.deepcopy(text_encoder)
            self.fusion_encoder_m = copy.deepcopy(fusion_encoder)
            self.cls_head_m = copy.deepcopy(self.cls_head)
            for module in self._momentum_pairs()[1]:
                remove_grad(module)

    def _momentum_pairs(self) -> tuple[list[nn.Module], list[nn.Module]]:
        if not self.distill:
            return [], []
        online = [self.vision_encoder, self.text_encoder, self.fusion_encoder, self.cls_head]
        copies = [self.vision_encoder_m, self.text_encoder_m, self.fusion_encoder_m, self.cls_head_m]
        return online, copies


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
        image_embeddings = vision_encoder(image).last_hidden_state
        text_embeddings = text_encoder(input_ids, attention_mask=attention_mask.bool()).last_hidden_state
        fused = fusion_encoder(text_embeddings, attention_mask, image_embeddings, cls_only=True).last_hidden_state
        return head(fused[:, 0])

    def predict(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Class logits ``[B, num_classes]`` of the online model (no momentum pass)."""
        return self._logits(self.vision_encoder, self.text_encoder, self.fusion_encoder, self.cls_head,
                            image, input_ids, attention_mask)

    def forward(
        self,
        image: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        alpha: float = 0.0,
    ) -> ALBEFVEOutput:
        logits = self.predict(image, input_ids, attention_mask)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        loss = F.nll_loss(log_probs, labels.view(-1))
        if self.distill and self.training:
            with torch.no_grad(), self.momentum_step():
                logits_m = self._logits(self.vision_encoder_m, self.text_encoder_m, self.fusion_encoder_m,
                                        self.cls_head_m, image, input_ids, attention_mask)
            soft = -(F.softmax(logits_m.float(), dim=-1) * log_probs).sum(dim=-1).mean()
            loss = (1.0 - alpha) * loss + alpha * soft
        return ALBEFVEOutput(loss, logits)


def albef_model_for_ve(
    preset: str = "base",
    *,
    num_classes: int = 3,
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
) -> ALBEFForVE:
    """Builds ALBEF for visual entailment (SNLI-VE).

    Args:
        preset (str): ``"base"`` (the paper: ViT-B/16 at 384 px, BERT-base split at layer 6) or
            ``"tiny"`` (CPU debugging on the shapes world).
        num_classes (int): classes of the MLP head (3: contradiction, neutral, entailment).
        distill (bool): momentum copies of every module and soft momentum targets (ALBEF).
        momentum (float): EMA coefficient of the momentum copies (0.995).
        image_size, patch_size, vision_width, vision_depth, vision_heads, vision_mlp_dim: ViT
            sizes; ``None`` takes the preset's value.
        text_width, text_layers, fusion_layers, text_heads, text_ffn_dim, vocab_size: BERT sizes.
        max_position_embeddings (int): text position table size.
        pad_token_id (int): tokenizer padding id.
        dropout (float): BERT hidden dropout (0.1).
        drop_path_rate (float): ViT stochastic depth (0 in ALBEF fine-tuning).

    Returns:
        ALBEFForVE
    """
    given = preset_sizes(locals())
    vision_encoder, text_encoder, fusion_encoder, _ = _albef_encoders(
        preset,
        given,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        dropout=dropout,
        drop_path_rate=drop_path_rate,
    )
    return ALBEFForVE(vision_encoder, text_encoder, fusion_encoder, num_classes=num_classes,
                      distill=distill, momentum=momentum)
