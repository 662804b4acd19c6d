"""ALBEF pre-training: ITC + ITM + MLM, each with momentum distillation.

``albef_model_for_pretraining(preset="base")`` gives the paper's pre-training model (ViT-B/16 at
256 px, BERT-base split at layer 6, 65,536-entry queues, EMA 0.995, 15% masking);
``preset="tiny"`` is the CPU debugging size. Its state dict is in the layout every fine-tuning
builder loads (``vision_encoder``, ``text_encoder``, ``fusion_encoder``, projections, ``itm_head``;
the MLM head and momentum copies are extra keys a fine-tuning model reports and skips).
"""

import copy
from typing import NamedTuple, Optional

import torch
from torch import nn, Tensor
from torchmultimodal.modules.encoders.bert_text_encoder import BERTTextEncoder
from torchmultimodal.utils.common import remove_grad

from torchmm_ext.models.albef._common import _albef_encoders, preset_sizes
from torchmm_ext.models.albef.retrieval import ALBEFForRetrieval
from torchmm_ext.modules.mlm import bert_mlm_head, IGNORE_INDEX, mask_tokens, masked_lm_loss
from torchmm_ext.modules.text_encoder import ALBEFFusionEncoder
from torchmm_ext.modules.vision_transformer import VisionTransformer


class ALBEFPretrainingOutput(NamedTuple):
    """Attributes:
    loss (Tensor): ``loss_itc + loss_mlm + loss_itm`` (ALBEF weighs them equally).
    loss_itc (Tensor): image-text contrastive loss (queue, momentum distillation).
    loss_mlm (Tensor): masked language modelling loss (momentum distillation).
    loss_itm (Tensor): image-text matching loss over positives and hard negatives.
    """

    loss: Tensor
    loss_itc: Tensor
    loss_mlm: Tensor
    loss_itm: Tensor


class ALBEFForPretraining(ALBEFForRetrieval):
    """ALBEF pre-training (ALBEF ``model_pretrain.ALBEF``): the retrieval model's ITC and ITM
    (inherited, with identity targets unless image ids are given), plus masked language
    modelling through the whole BERT (text encoder, then fusion encoder attending the image)
    whose soft targets come from the momentum model's MLM logits.

    Momentum copies: ``vision_encoder_m``, ``text_encoder_m``, ``vision_proj_m``, ``text_proj_m``
    (from :class:`ALBEFForRetrieval`), ``fusion_encoder_m`` and ``mlm_head_m``.

    Args:
        vision_encoder, text_encoder, fusion_encoder, embed_dim, queue_size, momentum, temp,
            itc_online_batch: as in :class:`ALBEFForRetrieval`.
        mlm_probability (float): chance that a token is chosen for MLM (0.15).
        mask_token_id (int): tokenizer id of [MASK].
        cls_token_id (int): tokenizer id of [CLS] (never masked).
        pad_token_id (int): tokenizer id of [PAD] (never masked).

    Inputs (forward):
        image (Tensor): ``[B, 3, H, W]``.
        input_ids (Tensor): ``[B, L]`` caption token ids (unmasked; masking happens inside).
        attention_mask (Tensor): ``[B, L]`` 1/0 padding mask.
        alpha (float): distillation weight of the momentum targets, ITC and MLM (0 disables).
        idx (Optional[Tensor]): ``[B]`` image ids; None (ALBEF pre-training) makes each pair
            its own only positive.

    Returns:
        ALBEFPretrainingOutput
    """

    def __init__(
        self,
        vision_encoder: VisionTransformer,
        text_encoder: BERTTextEncoder,
        fusion_encoder: ALBEFFusionEncoder,
        embed_dim: int = 256,
        queue_size: int = 65536,
        momentum: float = 0.995,
        temp: float = 0.07,
        itc_online_batch: bool = False,
        mlm_probability: float = 0.15,
        mask_token_id: int = 103,
        cls_token_id: int = 101,
        pad_token_id: int = 0,
    ) -> None:
        super().__init__(vision_encoder, text_encoder, fusion_encoder, embed_dim=embed_dim,
                         queue_size=queue_size, momentum=momentum, temp=temp,
                         itc_online_batch=itc_online_batch)
        self.mlm_probability = mlm_probability
        self.mask_token_id = mask_token_id
        self.cls_token_id = cls_token_id
        self.pad_token_id = pad_token_id
        word_embeddings = text_encoder.embeddings.word_embeddings
        self.vocab_size = word_embeddings.num_embeddings
        self.mlm_head = bert_mlm_head(word_embeddings)
        self.fusion_encoder_m = copy.deepcopy(fusion_encoder)
        # The momentum head keeps its own copy of the decoder weight, equal to text_encoder_m's
        # embeddings at every step: both follow the same online tensor with the same EMA. Tying
        # them would make the EMA below update that tensor twice per step.
        self.mlm_head_m = copy.deepcopy(self.mlm_head)
        remove_grad(self.fusion_encoder_m)
        remove_grad(self.mlm_head_m)

    def _momentum_pairs(self) -> tuple[list[nn.Module], list[nn.Module]]:
        online, copies = super()._momentum_pairs()
        return online + [self.fusion_encoder, self.mlm_head], copies + [self.fusion_encoder_m, self.mlm_head_m]

    @staticmethod
    def _mlm_hidden(
        text_encoder: nn.Module,
        fusion_encoder: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_embeddings: Tensor,
    ) -> Tensor:
        text = text_encoder(input_ids, attention_mask=attention_mask.bool()).last_hidden_state
        return fusion_encoder(text, attention_mask, image_embeddings).last_hidden_state  # [B, L, D]

    def forward(
        self,
        image: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        alpha: float = 0.0,
        idx: Optional[Tensor] = None,
    ) -> ALBEFPretrainingOutput:
        # One EMA step (itc_itm_losses' own is nested in it) for both momentum forward passes:
        # under autocast the momentum text encoder then runs twice on one set of bf16 shadows.
        with self.momentum_step(forward=self._needs_momentum_features(alpha)):
            itc_itm = self.itc_itm_losses(image, input_ids, attention_mask, idx, alpha)

            masked = mask_tokens(input_ids, self.vocab_size, self.mask_token_id, self.pad_token_id,
                                 self.cls_token_id, self.mlm_probability)
            predicted = masked.labels != IGNORE_INDEX  # [B, L]
            hidden = self._mlm_hidden(self.text_encoder, self.fusion_encoder, masked.input_ids,
                                      attention_mask, itc_itm.image_embeddings)
            # The head (a [D, V] matmul) runs on the ~15% predicted positions only; ALBEF runs it on
            # every token and ignores the rest in the loss: same loss, a fraction of the cost.
            logits = self.mlm_head(hidden[predicted])  # [M, V]
            logits_m = None
            if alpha > 0:  # the soft targets count only then
                with torch.no_grad():
                    hidden_m = self._mlm_hidden(self.text_encoder_m, self.fusion_encoder_m, masked.input_ids,
                                                attention_mask, itc_itm.image_embeddings_m)
                    logits_m = self.mlm_head_m(hidden_m[predicted])
            loss_mlm = masked_lm_loss(logits, masked.labels[predicted], logits_m, alpha)
        loss = itc_itm.loss_itc + loss_mlm + itc_itm.loss_itm
        return ALBEFPretrainingOutput(loss, itc_itm.loss_itc, loss_mlm, itc_itm.loss_itm)


def albef_model_for_pretraining(
    preset: str = "base",
    *,
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
    embed_dim: Optional[int] = None,
    queue_size: Optional[int] = None,
    momentum: float = 0.995,
    temp: float = 0.07,
    mlm_probability: float = 0.15,
    mask_token_id: int = 103,
    cls_token_id: int = 101,
    pad_token_id: int = 0,
    max_position_embeddings: int = 512,
    dropout: float = 0.1,
    drop_path_rate: float = 0.0,
    itc_online_batch: bool = False,
) -> ALBEFForPretraining:
    """Builds ALBEF for pre-training (ITC + ITM + MLM).

    Args:
        preset (str): ``"base"`` (the paper: ViT-B/16, BERT-base split at layer 6, 256-d ITC,
            65,536-entry queues; pass ``image_size=256`` for ALBEF's pre-training resolution) or
            ``"tiny"`` (CPU debugging on the shapes world).
        image_size, patch_size, vision_width, vision_depth, vision_heads, vision_mlp_dim: ViT
            sizes; ``None`` takes the preset's value.
        text_width, text_layers, fusion_layers, text_heads, text_ffn_dim, vocab_size: BERT sizes.
        embed_dim (Optional[int]): ITC feature size.
        queue_size (Optional[int]): feature-queue length (0 disables the queue).
        momentum (float): EMA coefficient of the momentum copies (0.995).
        temp (float): initial ITC temperature (0.07).
        mlm_probability (float): chance that a token is chosen for MLM (0.15).
        mask_token_id, cls_token_id, pad_token_id (int): tokenizer ids of [MASK], [CLS], [PAD]
            (bert-base-uncased's by default; recipes pass their tokenizer's).
        max_position_embeddings (int): text position table size.
        dropout (float): BERT hidden dropout (0.1).
        drop_path_rate (float): ViT stochastic depth (0 in ALBEF).
        itc_online_batch (bool): as in :func:`~torchmm_ext.models.albef.albef_model_for_retrieval`
            (for training from scratch, with ``queue_size=0``).

    Returns:
        ALBEFForPretraining
    """
    given = preset_sizes(locals())
    vision_encoder, text_encoder, fusion_encoder, cfg = _albef_encoders(
        preset,
        given,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        dropout=dropout,
        drop_path_rate=drop_path_rate,
    )
    return ALBEFForPretraining(
        vision_encoder,
        text_encoder,
        fusion_encoder,
        embed_dim=cfg["embed_dim"],
        queue_size=cfg["queue_size"],
        momentum=momentum,
        temp=temp,
        itc_online_batch=itc_online_batch,
        mlm_probability=mlm_probability,
        mask_token_id=mask_token_id,
        cls_token_id=cls_token_id,
        pad_token_id=pad_token_id,
    )
