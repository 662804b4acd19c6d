"""ALBEF for image-text retrieval.

``albef_model_for_retrieval(preset="base")`` gives the paper's model (ViT-B/16, BERT-base split
at layer 6, 256-d ITC projections, 65,536-entry queues, EMA 0.995); ``preset="tiny"`` is a
small model that trains on a laptop CPU in minutes on the built-in shapes world. Every size
can be overridden by keyword.
"""

import copy
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn, Tensor
from torchmultimodal.modules.encoders.bert_text_encoder import BERTTextEncoder
from torchmultimodal.modules.losses.albef import ImageTextContrastiveLoss
from torchmultimodal.utils.common import remove_grad

from torchmm_ext.models.albef._common import ALBEFBlockGroupsMixin, _albef_encoders, ImageEncoding, preset_sizes, TextEncoding
from torchmm_ext.modules.losses import contrastive_targets, itm_labels, sample_hard_negatives
from torchmm_ext.modules.momentum import FeatureQueue, MomentumCopiesMixin
from torchmm_ext.modules.text_encoder import ALBEFFusionEncoder
from torchmm_ext.modules.vision_transformer import VisionTransformer

# Similarity given to empty queue slots: exp() underflows to 0 in fp32 while 0 * log_softmax
# stays finite (-inf would give NaN).
_MASKED = -1e4
# Queue id of a feature that is nobody's positive: ALBEF pre-training's identity targets (and
# ALBEF's imported pre-training queues, which carry no ids).
_NO_IDX = -1


class ALBEFRetrievalOutput(NamedTuple):
    """Attributes:
    loss (Tensor): ``loss_itc + loss_itm``.
    loss_itc (Tensor): image-text contrastive loss (with momentum distillation).
    loss_itm (Tensor): image-text matching loss over positives and hard negatives.
    """

    loss: Tensor
    loss_itc: Tensor
    loss_itm: Tensor


class ITCITMOutput(NamedTuple):
    """What :meth:`ALBEFForRetrieval.itc_itm_losses` returns.

    Attributes:
        loss_itc (Tensor): image-text contrastive loss.
        loss_itm (Tensor): image-text matching loss.
        image_embeddings (Tensor): online image tokens ``[B, N, Dv]`` (with gradient; ``N`` is
            the pruned length under token pruning).
        image_embeddings_m (Optional[Tensor]): momentum image tokens ``[B, N_m, Dv]`` (no
            gradient); None when no momentum feature was needed (no queue, ``alpha`` 0 and
            ``itc_online_batch``), as their forward passes are then skipped.
    """

    loss_itc: Tensor
    loss_itm: Tensor
    image_embeddings: Tensor
    image_embeddings_m: Optional[Tensor]


class ALBEFForRetrieval(ALBEFBlockGroupsMixin, MomentumCopiesMixin, nn.Module):
    """ALBEF for image-text retrieval: ITC with queues and momentum distillation, ITM with hard
    negatives, and the encode / score methods the retrieval evaluation needs.

    We compose the encoders directly instead of wrapping torchmultimodal's ``ALBEFModel`` /
    ``ALBEFModelWithSimilarity``: those also run a momentum *fusion* encoder that retrieval
    never uses, sample negatives with a per-sample Python loop, and mask only the diagonal
    when sampling them (pairs that show the same image can be drawn as "negatives").

    Args:
        vision_encoder (VisionTransformer): image encoder.
        text_encoder (BERTTextEncoder): text encoder (BERT layers before the fusion layer).
        fusion_encoder (ALBEFFusionEncoder): cross-attention fusion layers.
        embed_dim (int): ITC feature size.
        queue_size (int): entries in each feature queue.
        momentum (float): EMA coefficient of the momentum encoders.
        temp (float): initial temperature (learnable, clamped to [0.001, 0.5]).
        itc_online_batch (bool): see :func:`albef_model_for_retrieval`.
        itm_uniform_negatives (float): see :func:`albef_model_for_retrieval`.

    Inputs (forward):
        image (Tensor): ``[B, 3, H, W]``.
        input_ids (Tensor): ``[B, L]`` caption token ids.
        attention_mask (Tensor): ``[B, L]`` 1/0 padding mask.
        idx (Tensor): ``[B]`` image ids (captions of the same image share one).
        alpha (float): distillation weight of the momentum similarities (0 disables it).

    Returns:
        ALBEFRetrievalOutput
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
        itm_uniform_negatives: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= itm_uniform_negatives <= 1.0:
            raise ValueError(f"itm_uniform_negatives must be in [0, 1], got {itm_uniform_negatives}")
        self.itc_online_batch = itc_online_batch
        self.itm_uniform_negatives = itm_uniform_negatives
        vision_width = vision_encoder.width
        text_width = text_encoder.embeddings.word_embeddings.embedding_dim
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        self.fusion_encoder = fusion_encoder
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            nn.init.normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.momentum = momentum

        self.vision_encoder_m = copy.deepcopy(vision_encoder)
        self.text_encoder_m = copy.deepcopy(text_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        # This class's copies only: a subclass's extra momentum modules do not exist yet.
        for module in ALBEFForRetrieval._momentum_pairs(self)[1]:
            remove_grad(module)
        self.queue = FeatureQueue(embed_dim, queue_size)
        self.itc_loss = ImageTextContrastiveLoss()

    # The text CLS guides the ViT (ELIP): apply_token_pruning accepts guidance_weight > 0.
    passes_vision_guidance = True

    def _momentum_pairs(self) -> tuple[list[nn.Module], list[nn.Module]]:
        online = [self.vision_encoder, self.text_encoder, self.vision_proj, self.text_proj]
        copies = [self.vision_encoder_m, self.text_encoder_m, self.vision_proj_m, self.text_proj_m]
        return online, copies


    def _needs_momentum_features(self, alpha: float) -> bool:
        """Whether ITC reads momentum features. Without a queue, distillation or momentum batch
        columns (training from scratch) it does not, and their forward passes are skipped (the
        EMA step still runs)."""
        return self.queue.size > 0 or alpha > 0 or not self.itc_online_batch

    def encode_image(self, image: Tensor, guidance: Optional[Tensor] = None) -> ImageEncoding:
        """Image tokens ``[B, N, Dv]`` and normalised ITC features ``[B, E]``.

        ``guidance`` (the text CLS ``[B, Dv]``) reaches the ViT's token reducers (ELIP's
        text-guided pruning, :func:`~torchmm_ext.modules.token_pruning.apply_token_pruning`);
        without reducers it changes nothing, and with them ``N`` is the pruned length."""
        embeddings = self.vision_encoder(image, guidance=guidance).last_hidden_state
        return ImageEncoding(embeddings, F.normalize(self.vision_proj(embeddings[:, 0]), dim=-1))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextEncoding:
        """Text-mode states ``[B, L, Dt]`` and normalised ITC features ``[B, E]``."""
        embeddings = self.text_encoder(input_ids, attention_mask=attention_mask.bool()).last_hidden_state
        return TextEncoding(embeddings, F.normalize(self.text_proj(embeddings[:, 0]), dim=-1))

    def itm_logits(
        self,
        image_embeddings: Tensor,
        text_embeddings: Tensor,
        text_attention_mask: Tensor,
        image_index: Optional[Tensor] = None,
    ) -> Tensor:
        """ITM logits ``[P, 2]`` for ``P`` (image, text) pairs.

        Args:
            image_embeddings (Tensor): ``[P, N, Dv]``, or ``[U, N, Dv]`` with ``image_index``.
            text_embeddings (Tensor): ``[P, L, Dt]`` text-mode states.
            text_attention_mask (Tensor): ``[P, L]``.
            image_index (Optional[Tensor]): ``[P]`` row of ``image_embeddings`` for each pair;
                each distinct image's keys/values are then projected once per layer.
        """
        fused = self.fusion_encoder(
            text_embeddings, text_attention_mask, image_embeddings, image_index=image_index,
            cls_only=True,
        ).last_hidden_state
        return self.itm_head(fused[:, 0])

    def itm_scores(
        self,
        image_embeddings: Tensor,
        text_embeddings: Tensor,
        text_attention_mask: Tensor,
        image_index: Optional[Tensor] = None,
    ) -> Tensor:
        """Match logit ``[P]`` (ITM class 1) of each pair; arguments as in :meth:`itm_logits`."""
        return self.itm_logits(image_embeddings, text_embeddings, text_attention_mask, image_index)[:, 1]

    def forward(
        self,
        image: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        idx: Tensor,
        alpha: float = 0.0,
    ) -> ALBEFRetrievalOutput:
        out = self.itc_itm_losses(image, input_ids, attention_mask, idx, alpha)
        return ALBEFRetrievalOutput(out.loss_itc + out.loss_itm, out.loss_itc, out.loss_itm)

    def itc_itm_losses(
        self,
        image: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        idx: Optional[Tensor] = None,
        alpha: float = 0.0,
    ) -> ITCITMOutput:
        """One EMA step of the momentum copies, then ITC (queue, momentum distillation) and ITM
        (hard negatives): the training losses retrieval and pre-training share.

        Args:
            image, input_ids, attention_mask, alpha: as in :meth:`forward`.
            idx (Optional[Tensor]): ``[B]`` image ids; ``None`` makes each pair its own only
                positive and its queued features nobody's positive (ALBEF pre-training).

        Returns:
            ITCITMOutput
        """
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        batch_size = image.size(0)
        if idx is None:
            idx = torch.arange(batch_size, device=image.device)
            queued_idx = torch.full_like(idx, _NO_IDX)
        else:
            idx = queued_idx = idx.view(-1)
        # Text first: its CLS guides ELIP's token pruning in the ViT (ignored without pruning).
        text_enc = self.encode_text(input_ids, attention_mask)
        image_enc = self.encode_image(image, guidance=text_enc.embeddings[:, 0])

        # ITC against momentum features of the batch and the queue: [B, B + Q].
        idx_all = torch.cat([idx, self.queue.idx_queue[0]])
        sim_targets = contrastive_targets(idx, idx_all)
        # Never-written queue slots hold random vectors (ALBEF uses them as negatives). We mask
        # them out: harmless from a pre-trained start, and from scratch those random negatives
        # reward collapsing every feature onto one direction.
        empty = (idx_all == self.queue.empty_idx).view(1, -1)
        image_m = sim_i2t_m = sim_t2i_m = None
        # The EMA step; the momentum forward passes run inside it (on low-precision shadows
        # of the momentum weights under autocast).
        with self.momentum_step(forward=self._needs_momentum_features(alpha)):
            if self._needs_momentum_features(alpha):
                with torch.no_grad():
                    text_m = self.text_encoder_m(input_ids, attention_mask=attention_mask.bool()).last_hidden_state
                    text_feat_m = F.normalize(self.text_proj_m(text_m[:, 0]), dim=-1).float()
                    # As ELIP: the momentum text CLS guides the momentum ViT, which keeps every
                    # token unless token pruning was applied with prune_momentum=True.
                    image_m = self.vision_encoder_m(image, guidance=text_m[:, 0]).last_hidden_state
                    image_feat_m = F.normalize(self.vision_proj_m(image_m[:, 0]), dim=-1).float()
                    # torch.cat copies the queues, so the in-place enqueue below cannot alter these.
                    image_feat_all = torch.cat([image_feat_m.T, self.queue.image_queue], dim=1)
                    text_feat_all = torch.cat([text_feat_m.T, self.queue.text_queue], dim=1)
                    with torch.autocast(image.device.type, enabled=False):  # fp32, see below
                        sim_i2t_m = (image_feat_m @ text_feat_all / self.temp).masked_fill(empty, _MASKED)
                        sim_t2i_m = (text_feat_m @ image_feat_all / self.temp).masked_fill(empty, _MASKED)
            else:
                image_feat_all, text_feat_all = self.queue.image_queue, self.queue.text_queue  # [E, 0]
        # Similarities in fp32: a bf16 softmax over 65k queue entries loses the targets. Autocast
        # is off for them (it would run the products in bf16); that is also faster: the
        # [E, B + Q] feature matrices are not re-cast to bf16 at each use (GEMMs of B rows).
        image_feat, text_feat = image_enc.features.float(), text_enc.features.float()
        if self.itc_online_batch:  # the batch's columns carry gradient (CLIP-style)
            first_queued = image_feat_all.size(1) - self.queue.size
            text_feat_all = torch.cat([text_feat.T, text_feat_all[:, first_queued:]], dim=1)
            image_feat_all = torch.cat([image_feat.T, image_feat_all[:, first_queued:]], dim=1)
        with torch.autocast(image.device.type, enabled=False):
            sim_i2t = (image_feat @ text_feat_all / self.temp).masked_fill(empty, _MASKED)
            sim_t2i = (text_feat @ image_feat_all / self.temp).masked_fill(empty, _MASKED)
        loss_itc = self.itc_loss(sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, sim_targets, alpha)
        if image_m is not None:
            self.queue.enqueue(image_feat_m, text_feat_m, queued_idx)

        # ITM on [positives; (text, hard-negative image); (hard-negative text, image)], one
        # fusion pass where each image's keys/values are projected once.
        negatives = sample_hard_negatives(sim_i2t[:, :batch_size], sim_t2i[:, :batch_size], idx,
                                          uniform_mix=self.itm_uniform_negatives)
        batch = torch.arange(batch_size, device=image.device)
        text_index = torch.cat([batch, batch, negatives.text_for_image])
        image_index = torch.cat([batch, negatives.image_for_text, batch])
        logits = self.itm_logits(
            image_enc.embeddings,
            text_enc.embeddings[text_index],
            attention_mask[text_index],
            image_index=image_index,
        )
        loss_itm = F.cross_entropy(logits.float(), itm_labels(batch_size, image.device))
        return ITCITMOutput(loss_itc, loss_itm, image_enc.embeddings, image_m)


def albef_model_for_retrieval(
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
    max_position_embeddings: int = 512,
    pad_token_id: int = 0,
    dropout: float = 0.1,
    drop_path_rate: float = 0.0,
    itc_online_batch: bool = False,
    itm_uniform_negatives: float = 0.0,
) -> ALBEFForRetrieval:
    """Builds ALBEF for image-text retrieval.

    Args:
        preset (str): ``"base"`` (the paper: ViT-B/16 at 384 px, BERT-base split at layer 6,
            256-d ITC, 65,536-entry queues) or ``"tiny"`` (CPU debugging on the shapes world).
        image_size, patch_size, vision_width, vision_depth, vision_heads, vision_mlp_dim: ViT
            sizes; ``None`` takes the preset's value.
        text_width, text_layers, fusion_layers, text_heads, text_ffn_dim, vocab_size: BERT sizes
            (``text_layers`` text-only layers, then ``fusion_layers`` cross-attention layers).
        embed_dim (Optional[int]): ITC feature size.
        queue_size (Optional[int]): feature-queue length.
        momentum (float): EMA coefficient of the momentum encoders (0.995).
        temp (float): initial ITC temperature (0.07).
        max_position_embeddings (int): text position table size.
        pad_token_id (int): tokenizer padding id.
        dropout (float): BERT hidden dropout (0.1); the ViT uses none, as in ALBEF.
        drop_path_rate (float): ViT stochastic depth (0 in ALBEF fine-tuning).
        itc_online_batch (bool): contrast against the batch's online (gradient-carrying)
            features instead of their momentum copies (ALBEF). For training from scratch, where
            momentum copies and queues of a random model pin every feature to one direction;
            pair it with ``queue_size=0``.
        itm_uniform_negatives (float): share of the ITM negatives drawn uniformly from the
            batch instead of by ITC similarity (ALBEF: 0), see
            :func:`~torchmm_ext.modules.losses.sample_hard_negatives`. For training from
            scratch, where ITC sharpens before ITM learns and similarity sampling then shows
            the ITM head only the nearest candidate.

    Returns:
        ALBEFForRetrieval
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
    return ALBEFForRetrieval(
        vision_encoder,
        text_encoder,
        fusion_encoder,
        embed_dim=cfg["embed_dim"],
        queue_size=cfg["queue_size"],
        momentum=momentum,
        temp=temp,
        itc_online_batch=itc_online_batch,
        itm_uniform_negatives=itm_uniform_negatives,
    )
