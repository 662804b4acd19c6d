"""ALBEF for visual question answering (VQA v2): an answer decoder on top of the fused question.

What differs from ALBEF's ``model_vqa.py``, on purpose: the fused question states are computed
once per question; each candidate answer reads them through ``question_index`` (the
cross-attention projects each question's keys/values once and gathers them per answer) instead
of stacking one copy per answer (``tile``).

The loss is that of the current ALBEF ``model_vqa.py``: ``(1 - alpha) * NLL + alpha * soft``
per answer, the soft term against the momentum decoder's token distributions. (The first
release did not pass ``alpha`` to its decoder, which dropped the soft term; upstream fixed
that in July 2022, commit fb38420.)
"""

import copy
from typing import List, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn, Tensor
from torchmultimodal.modules.encoders.bert_text_encoder import BERTTextEncoder
from torchmultimodal.modules.layers.text_embedding import BERTTextEmbeddings
from torchmultimodal.modules.losses.flava import MaskedPredictionHead
from torchmultimodal.utils.common import remove_grad

from torchmm_ext.models.albef._common import ALBEFBlockGroupsMixin, _albef_encoders, preset_sizes
from torchmm_ext.modules.momentum import MomentumCopiesMixin
from torchmm_ext.modules.text_encoder import ALBEFFusionEncoder, init_bert_weights
from torchmm_ext.modules.vision_transformer import VisionTransformer

# Label of the tokens the answer loss ignores (padding), as in PyTorch's cross-entropy.
IGNORE_INDEX = -100


class ALBEFAnswerDecoder(nn.Module):
    """ALBEF's answer decoder (a BERT ``BertLMHeadModel``): word embeddings, layers with causal
    self-attention and cross-attention to the fused question states, and an LM head whose
    output weight is tied to the word embeddings (as in BERT).

    Args:
        vocab_size (int): tokenizer vocabulary size.
        width (int): hidden size (that of the fused question states too).
        num_layers (int): decoder layers (6 in ALBEF).
        num_heads (int): attention heads.
        ffn_dim (int): feed-forward hidden size.
        max_position_embeddings (int): position table size.
        pad_token_id (int): padding id.
        dropout (float): hidden dropout.
        layer_norm_eps (float): LayerNorm epsilon (1e-12 in BERT).

    Inputs:
        input_ids (Tensor): ``[P, La]`` answer tokens (``[CLS] answer [SEP] ...``).
        attention_mask (Tensor): ``[P, La]`` 1/0 padding mask.
        question_states (Tensor): ``[Q, Lq, D]`` fused question states.
        question_mask (Tensor): ``[Q, Lq]`` 1/0 question padding mask.
        question_index (Optional[Tensor]): ``[P]`` question of each answer; ``None`` when
            ``P == Q`` and answer ``i`` belongs to question ``i``.

    Returns:
        Tensor: next-token logits ``[P, La, vocab_size]`` (position ``t`` predicts token ``t + 1``).
    """

    def __init__(
        self,
        vocab_size: int,
        width: int = 768,
        num_layers: int = 6,
        num_heads: int = 12,
        ffn_dim: int = 3072,
        max_position_embeddings: int = 512,
        pad_token_id: int = 0,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.embeddings = BERTTextEmbeddings(
            hidden_size=width,
            vocab_size=vocab_size,
            pad_token_id=pad_token_id,
            max_position_embeddings=max_position_embeddings,
            layer_norm_eps=layer_norm_eps,
            dropout=dropout,
        )
        self.layers = ALBEFFusionEncoder(
            width=width,
            image_width=width,
            num_layers=num_layers,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            dropout=dropout,
            layer_norm_eps=layer_norm_eps,
            causal=True,
        )
        self.lm_head = MaskedPredictionHead(hidden_size=width, vocab_size=vocab_size, layer_norm_eps=layer_norm_eps)
        init_bert_weights(self.embeddings)
        init_bert_weights(self.lm_head)
        self.lm_head.decoder.weight = self.embeddings.word_embeddings.weight  # tied, as in BERT

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        question_states: Tensor,
        question_mask: Tensor,
        question_index: Optional[Tensor] = None,
    ) -> Tensor:
        x = self.embeddings(input_ids)
        x = self.layers(x, attention_mask, question_states, image_index=question_index,
                        image_attention_mask=question_mask).last_hidden_state
        return self.lm_head(x)


def answer_sequence_nll(logits: Tensor, answer_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Negative log-likelihood of each answer sequence: the sum over tokens ``1..`` of
    ``-log p(token_t | tokens_<t)`` (the first token, ``[CLS]``, is never predicted; padding is
    ignored), as ALBEF's ``BertLMHeadModel`` loss with ``reduction='none'``.

    Args:
        logits (Tensor): decoder logits ``[P, La, V]``.
        answer_ids (Tensor): ``[P, La]`` answer tokens.
        answer_mask (Tensor): ``[P, La]`` 1/0 padding mask.

    Returns:
        Tensor: ``[P]`` float32 NLL per answer.
    """
    labels = answer_ids[:, 1:].masked_fill(answer_mask[:, 1:] == 0, IGNORE_INDEX)
    shifted = logits[:, :-1].float()
    nll = F.cross_entropy(shifted.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(labels.shape).sum(dim=1)


@torch.no_grad()
def _init_decoder_from_encoder(
    decoder: ALBEFAnswerDecoder,
    text_encoder: nn.Module,
    fusion_encoder: nn.Module,
    mlm_head_state: Optional[Mapping[str, Tensor]],
) -> List[str]:
    """One decoder <- one encoder (see :meth:`ALBEFForVQA.init_answer_decoder_from_encoder`)."""
    done = []
    decoder.embeddings.load_state_dict(text_encoder.embeddings.state_dict())
    done.append("embeddings")
    for i, (target, source) in enumerate(zip(decoder.layers.layer, fusion_encoder.layer)):
        state = source.state_dict()
        wanted = target.state_dict()
        fresh = sorted(k for k in state if state[k].shape != wanted[k].shape)
        target.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
        done.append(f"layers.layer.{i}" + (f" (fresh {', '.join(fresh)})" if fresh else ""))
    if mlm_head_state is not None:
        head = {k: v for k, v in mlm_head_state.items() if k != "decoder.weight"}
        for a, b in (("bias", "decoder.bias"), ("decoder.bias", "bias")):  # one tied tensor
            if a in head and b not in head:
                head[b] = head[a]
        missing, unexpected = decoder.lm_head.load_state_dict(head, strict=False)
        if unexpected or set(missing) - {"decoder.weight"}:
            raise ValueError(f"mlm_head_state does not fit the LM head: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        done.append("lm_head")
    return done


class ALBEFVQAOutput(NamedTuple):
    """Attributes:
    loss (Tensor): ``sum_i weight_i * loss_i / batch_size`` over the batch's answers ``i``, with
        ``loss_i = (1 - alpha) * NLL_i + alpha * soft_i`` (``soft_i`` against the momentum
        decoder's token distributions; ``loss_i = NLL_i`` without distillation).
    answer_nll (Tensor): ``[K]`` sequence NLL of each answer (online model).
    logits (Tensor): ``[K, La, V]`` answer decoder logits.
    """

    loss: Tensor
    answer_nll: Tensor
    logits: Tensor


class ALBEFForVQA(ALBEFBlockGroupsMixin, MomentumCopiesMixin, nn.Module):
    """ALBEF for VQA (ALBEF ``model_vqa.ALBEF``): the question is fused with the image by the
    ALBEF encoders; an answer decoder generates the answer while cross-attending to the fused
    question states. Training maximises the weighted likelihood of each question's answers;
    inference ranks a fixed answer list (:meth:`rank_answers`).

    With ``distill``, momentum (EMA) copies of every module give soft token targets.

    Args:
        vision_encoder (VisionTransformer): image encoder.
        text_encoder (BERTTextEncoder): text encoder (BERT layers before the fusion layer).
        fusion_encoder (ALBEFFusionEncoder): cross-attention fusion layers.
        answer_decoder (ALBEFAnswerDecoder): the answer decoder.
        distill (bool): keep momentum copies and use their token distributions as soft targets.
        momentum (float): EMA coefficient of the momentum copies (0.995).

    Inputs (forward):
        image (Tensor): ``[B, 3, H, W]``.
        question_ids (Tensor): ``[B, Lq]`` question tokens.
        question_mask (Tensor): ``[B, Lq]`` 1/0 padding mask.
        answer_ids (Tensor): ``[K, La]`` tokens of every question's answers (``[CLS] answer
            [SEP] ...``), question by question.
        answer_mask (Tensor): ``[K, La]`` 1/0 padding mask.
        weights (Tensor): ``[K]`` weight of each answer (its share of the annotators).
        question_index (Tensor): ``[K]`` question (row of the batch) of each answer.
        alpha (float): distillation weight (ignored, i.e. 0, without ``distill``).

    Returns:
        ALBEFVQAOutput
    """

    def __init__(
        self,
        vision_encoder: VisionTransformer,
        text_encoder: BERTTextEncoder,
        fusion_encoder: ALBEFFusionEncoder,
        answer_decoder: ALBEFAnswerDecoder,
        distill: bool = True,
        momentum: float = 0.995,
    ) -> None:
        super().__init__()
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        self.fusion_encoder = fusion_encoder
        self.answer_decoder = answer_decoder
        self.distill = distill
        self.momentum = momentum
        if distill:
            self.vision_encoder_m = copy.deepcopy(vision_encoder)
            self.text_encoder_m = copy.deepcopy(text_encoder)
            self.fusion_encoder_m = copy.deepcopy(fusion_encoder)
            self.answer_decoder_m = copy.deepcopy(answer_decoder)
            for module in self._momentum_pairs()[1]:
                remove_grad(module)

    def _momentum_pairs(self) -> Tuple[List[nn.Module], List[nn.Module]]:
        if not self.distill:
            return [], []
        online = [self.vision_encoder, self.text_encoder, self.fusion_encoder, self.answer_decoder]
        copies = [self.vision_encoder_m, self.text_encoder_m, self.fusion_encoder_m, self.answer_decoder_m]
        return online, copies


    @torch.no_grad()
    def init_answer_decoder_from_encoder(
        self,
        mlm_head_state: Optional[Mapping[str, Tensor]] = None,
        mlm_head_m_state: Optional[Mapping[str, Tensor]] = None,
    ) -> List[str]:
        """ALBEF's decoder initialisation for fine-tuning from a pre-trained checkpoint
        (``VQA.py``): decoder embeddings <- text-encoder embeddings, decoder layer ``i`` <- fusion
        layer ``i`` (BERT layers 6-11 -> decoder layers 0-5), LM head <- the pre-training MLM head
        when given. With ``distill``, the momentum decoder is built the same way from the
        *momentum* encoder (``text_encoder_m`` embeddings, ``fusion_encoder_m`` layers, the
        momentum MLM head), as ALBEF's ``VQA.py`` maps ``text_encoder_m.*`` to
        ``text_decoder_m.*``; a checkpoint without momentum weights has left the momentum encoder
        equal to the online one, which then gives the same decoder twice. The recipe calls it
        after loading a checkpoint that has no answer-decoder weights.

        A fusion layer's cross-attention keys/values read image tokens; they are copied only
        when the image width equals the text width (as in ALBEF, 768 both), and stay fresh
        otherwise.

        Args:
            mlm_head_state (Optional[Mapping[str, Tensor]]): state dict of a
                ``MaskedPredictionHead`` (the pre-training model's ``mlm_head``: ``dense.*``,
                ``layer_norm.*``, ``bias``, ``decoder.weight``...); its ``decoder.weight`` is
                the tied word-embedding matrix and is not read (the embeddings are copied).
            mlm_head_m_state (Optional[Mapping[str, Tensor]]): the momentum MLM head
                (``mlm_head_m``) for the momentum decoder; ``mlm_head_state`` when None.

        Returns:
            List[str]: the decoder modules initialised, e.g. ``["embeddings", "layers.layer.0",
            ..., "lm_head"]`` (a cross-attention left fresh is named with a ``(fresh ...)`` note),
            then the momentum decoder's with an ``answer_decoder_m.`` prefix.
        """
        done = _init_decoder_from_encoder(self.answer_decoder, self.text_encoder, self.fusion_encoder,
                                          mlm_head_state)
        if self.distill:
            head_m = mlm_head_m_state if mlm_head_m_state is not None else mlm_head_state
            done_m = _init_decoder_from_encoder(self.answer_decoder_m, self.text_encoder_m,
                                                self.fusion_encoder_m, head_m)
            done += [f"answer_decoder_m.{name}" for name in done_m]
        return done

    @staticmethod
    def _question_states(
        vision_encoder: nn.Module,
        text_encoder: nn.Module,
        fusion_encoder: nn.Module,
        image: Tensor,
        question_ids: Tensor,
        question_mask: Tensor,
    ) -> Tensor:
        image_embeddings = vision_encoder(image).last_hidden_state
        text = text_encoder(question_ids, attention_mask=question_mask.bool()).last_hidden_state
        return fusion_encoder(text, question_mask, image_embeddings).last_hidden_state  # [B, Lq, D]

    def encode_question(self, image: Tensor, question_ids: Tensor, question_mask: Tensor) -> Tensor:
        """Fused question states ``[B, Lq, D]`` of the online model."""
        return self._question_states(self.vision_encoder, self.text_encoder, self.fusion_encoder,
                                     image, question_ids, question_mask)

    def forward(
        self,
        image: Tensor,
        question_ids: Tensor,
        question_mask: Tensor,
        answer_ids: Tensor,
        answer_mask: Tensor,
        weights: Tensor,
        question_index: Tensor,
        alpha: float = 0.0,
    ) -> ALBEFVQAOutput:
        states = self.encode_question(image, question_ids, question_mask)
        logits = self.answer_decoder(answer_ids, answer_mask, states, question_mask, question_index)
        nll = answer_sequence_nll(logits, answer_ids, answer_mask)  # [K]
        loss_per_answer = nll
        if self.distill and self.training:
            with torch.no_grad(), self.momentum_step():
                states_m = self._question_states(self.vision_encoder_m, self.text_encoder_m,
                                                 self.fusion_encoder_m, image, question_ids, question_mask)
                logits_m = self.answer_decoder_m(answer_ids, answer_mask, states_m, question_mask, question_index)
            soft_targets = F.softmax(logits_m[:, :-1].float(), dim=-1)
            soft = -(soft_targets * F.log_softmax(logits[:, :-1].float(), dim=-1)).sum(dim=-1)  # [K, La-1]
            soft = (soft * answer_mask[:, 1:]).sum(dim=1)
            loss_per_answer = (1.0 - alpha) * nll + alpha * soft
        loss = (weights * loss_per_answer).sum() / image.size(0)
        return ALBEFVQAOutput(loss, nll, logits)

    @torch.no_grad()
    def rank_answers(
        self,
        image: Tensor,
        question_ids: Tensor,
        question_mask: Tensor,
        answer_ids: Tensor,
        answer_mask: Tensor,
        k: int,
    ) -> Tuple[Tensor, Tensor]:
        """Rank a fixed answer list for each question (ALBEF ``rank_answer``).

        The probability of each answer's first token (after ``[CLS]``) picks the top ``k``
        answers; each is re-scored by ``log p(first token) + sum_t log p(token_t | tokens_<t)``
        over its tokens ``1..`` (ALBEF's sum, which counts the first token twice), and the
        ``k`` are sorted by that score. ``softmax(scores, dim=1)`` gives ALBEF's returned
        probabilities. The fused question states are computed once and shared by the ``k``
        candidates.

        Args:
            image (Tensor): ``[B, 3, H, W]``.
            question_ids (Tensor): ``[B, Lq]``.
            question_mask (Tensor): ``[B, Lq]``.
            answer_ids (Tensor): ``[A, La]`` tokenized answer list (``[CLS] answer [SEP] ...``).
            answer_mask (Tensor): ``[A, La]``.
            k (int): candidates re-scored per question (``k_test``; clipped to ``A``).

        Returns:
            Tuple[Tensor, Tensor]: answer indices ``[B, k]``, best first, and their scores
            ``[B, k]`` (float32 log-likelihoods).
        """
        states = self.encode_question(image, question_ids, question_mask)
        b, k = states.size(0), min(k, answer_ids.size(0))
        start = answer_ids[:1, :1].expand(b, 1)  # [B, 1] the [CLS] start token
        first_logits = self.answer_decoder(start, torch.ones_like(start), states, question_mask)[:, 0]
        first_probs = F.softmax(first_logits.float(), dim=-1).index_select(1, answer_ids[:, 1])  # [B, A]
        top_probs, top_ids = first_probs.topk(k, dim=1)  # [B, k]
        flat = top_ids.flatten()
        ids, mask = answer_ids[flat], answer_mask[flat]  # [B*k, La]
        question_index = torch.arange(b, device=states.device).repeat_interleave(k)
        logits = self.answer_decoder(ids, mask, states, question_mask, question_index)
        nll = answer_sequence_nll(logits, ids, mask).view(b, k)
        scores = top_probs.log() - nll
        scores, order = scores.sort(dim=1, descending=True)
        return top_ids.gather(1, order), scores


def albef_model_for_vqa(
    preset: str = "base",
    *,
    decoder_layers: Optional[int] = None,
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
) -> ALBEFForVQA:
    """Builds ALBEF for VQA.

    Args:
        preset (str): ``"base"`` (the paper: ViT-B/16 at 384 px, BERT-base split at layer 6,
            6-layer decoder) or ``"tiny"`` (CPU debugging on the shapes world).
        decoder_layers (Optional[int]): answer-decoder layers; ``None`` = ``fusion_layers``
            (ALBEF initialises them from the fusion layers).
        distill (bool): momentum copies of every module and soft momentum targets (ALBEF).
        momentum (float): EMA coefficient of the momentum copies (0.995).
        image_size, patch_size, vision_width, vision_depth, vision_heads, vision_mlp_dim: ViT
            sizes; ``None`` takes the preset's value.
        text_width, text_layers, fusion_layers, text_heads, text_ffn_dim, vocab_size: BERT sizes
            (the decoder has the text sizes).
        max_position_embeddings (int): text position table size.
        pad_token_id (int): tokenizer padding id.
        dropout (float): BERT hidden dropout (0.1).
        drop_path_rate (float): ViT stochastic depth (0 in ALBEF fine-tuning).

    Returns:
        ALBEFForVQA
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
    answer_decoder = ALBEFAnswerDecoder(
        vocab_size=cfg["vocab_size"],
        width=cfg["text_width"],
        num_layers=decoder_layers if decoder_layers is not None else cfg["fusion_layers"],
        num_heads=cfg["text_heads"],
        ffn_dim=cfg["text_ffn_dim"],
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        dropout=dropout,
    )
    return ALBEFForVQA(vision_encoder, text_encoder, fusion_encoder, answer_decoder,
                       distill=distill, momentum=momentum)
