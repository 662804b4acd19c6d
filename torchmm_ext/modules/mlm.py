"""Masked language modelling as in BERT and ALBEF pre-training: token masking and the MLM loss
with momentum distillation.

The prediction head itself is torchmultimodal's ``MaskedPredictionHead`` (see
:func:`bert_mlm_head`).
"""

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn, Tensor
from torchmultimodal.modules.losses.flava import MaskedPredictionHead

from torchmm_ext.modules.text_encoder import init_bert_weights

#: Label of the positions that are not predicted (``F.cross_entropy``'s default ``ignore_index``).
IGNORE_INDEX = -100


class MaskedTokens(NamedTuple):
    """Attributes:
    input_ids (Tensor): ``[B, L]`` ids with the chosen positions masked or replaced.
    labels (Tensor): ``[B, L]`` original id at the chosen positions, ``-100`` elsewhere.
    """

    input_ids: Tensor
    labels: Tensor


def _bernoulli(
    shape: torch.Size, p: Union[float, Tensor], device: torch.device, generator: Optional[torch.Generator]
) -> Tensor:
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move;
    # ``p`` is one probability or one per position (on ``device``).
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device).to(device) < p


def mask_tokens(
    input_ids: Tensor,
    vocab_size: int,
    mask_token_id: int,
    pad_token_id: int,
    cls_token_id: int,
    probability: float = 0.15,
    generator: Optional[torch.Generator] = None,
    focus_ids: Optional[Sequence[int]] = None,
    focus_probability: Optional[float] = None,
) -> MaskedTokens:
    """BERT masking, as ALBEF's pre-training ``mask``: each token except [PAD] and [CLS] is chosen
    with ``probability``; a chosen token becomes [MASK] with probability 0.8, a uniformly random
    id with 0.1, and stays unchanged with 0.1. ([SEP] can be chosen, as in ALBEF.)

    Focused masking (off by default): tokens whose id is in ``focus_ids`` are chosen with
    ``focus_probability`` instead of ``probability``. A boost (``focus_probability >
    probability``) makes MLM predict those tokens more often; ``probability=0`` restricts it to
    them. Aimed at the words only the image can tell (in the shapes world its colours, shapes,
    sizes and positions), it is the analogue of ViLT's whole-word masking, which stops MLM from
    completing a word from text alone. The same random draws are used either way, so with the
    same generator the positions differ only where a focus token's probability does.

    Args:
        input_ids (Tensor): ``[B, L]`` token ids (not modified).
        vocab_size (int): random replacements are drawn from ``[0, vocab_size)``.
        mask_token_id (int): id of [MASK].
        pad_token_id (int): id of [PAD] (never chosen).
        cls_token_id (int): id of [CLS] (never chosen).
        probability (float): chance that a token is chosen (0.15).
        generator (Optional[torch.Generator]): random source; the global one when None.
        focus_ids (Optional[Sequence[int]]): ids chosen with ``focus_probability`` instead;
            None or empty: plain BERT masking.
        focus_probability (Optional[float]): chance that a focus token is chosen (needed with
            ``focus_ids``).

    Returns:
        MaskedTokens

    Raises:
        ValueError: a probability outside [0, 1], or ``focus_ids`` without ``focus_probability``.
    """
    shape, device = input_ids.shape, input_ids.device
    rate: Union[float, Tensor] = probability
    if focus_ids is not None and len(focus_ids) > 0:
        if focus_probability is None:
            raise ValueError("mask_tokens: focus_ids given without focus_probability")
        if not 0.0 <= focus_probability <= 1.0:
            raise ValueError(f"mask_tokens: focus_probability must be in [0, 1], got {focus_probability}")
        focus = torch.isin(input_ids, torch.as_tensor(list(focus_ids), dtype=input_ids.dtype, device=device))
        rate = torch.where(focus, focus_probability, probability)
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"mask_tokens: probability must be in [0, 1], got {probability}")
    chosen = _bernoulli(shape, rate, device, generator)
    chosen &= (input_ids != pad_token_id) & (input_ids != cls_token_id)
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    to_mask = chosen & _bernoulli(shape, 0.8, device, generator)
    # Half of the remaining 20%: a random token; the other half keeps its own.
    to_random = chosen & ~to_mask & _bernoulli(shape, 0.5, device, generator)
    draw_device = generator.device if generator is not None else device
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=draw_device).to(device)
    masked = input_ids.masked_fill(to_mask, mask_token_id)
    masked = torch.where(to_random, random_ids.to(input_ids.dtype), masked)
    return MaskedTokens(masked, labels)


def masked_lm_loss(
    logits: Tensor,
    labels: Tensor,
    logits_m: Optional[Tensor] = None,
    alpha: float = 0.0,
) -> Tensor:
    """ALBEF's MLM loss: ``(1 - alpha) * CE(logits, labels) + alpha * soft-CE(logits, softmax(logits_m))``,
    each averaged over the predicted positions (``labels != -100``), in fp32.

    A batch without any predicted position gives 0 (not NaN), with the graph kept.

    Args:
        logits (Tensor): ``[..., V]`` predictions.
        labels (Tensor): ``[...]`` target ids, ``-100`` where nothing is predicted.
        logits_m (Optional[Tensor]): ``[..., V]`` momentum-model predictions (soft targets);
            None or ``alpha == 0`` gives plain CE.
        alpha (float): weight of the soft targets.

    Returns:
        Tensor: scalar loss.
    """
    log_probs = F.log_softmax(logits.float().reshape(-1, logits.size(-1)), dim=-1)
    labels = labels.reshape(-1)
    predicted = labels != IGNORE_INDEX
    count = predicted.sum().clamp(min=1)
    loss = F.nll_loss(log_probs, labels, ignore_index=IGNORE_INDEX, reduction="sum") / count
    if logits_m is not None and alpha > 0:
        soft = F.softmax(logits_m.float().reshape(-1, logits_m.size(-1)), dim=-1)
        soft_ce = -(soft * log_probs).sum(dim=-1)
        loss = (1.0 - alpha) * loss + alpha * (soft_ce * predicted).sum() / count
    return loss


def bert_mlm_head(word_embeddings: nn.Embedding, layer_norm_eps: float = 1e-12) -> MaskedPredictionHead:
    """BERT's MLM head (dense -> GELU -> LayerNorm -> decoder to the vocabulary) as
    torchmultimodal's ``MaskedPredictionHead``, its decoder weight TIED to ``word_embeddings``
    (the same Parameter, as in BERT), BERT-initialised.

    Args:
        word_embeddings (nn.Embedding): the text encoder's token embeddings ``[V, D]``.
        layer_norm_eps (float): LayerNorm epsilon (1e-12 in BERT).

    Returns:
        MaskedPredictionHead: ``[..., D]`` hidden states -> ``[..., V]`` logits.
    """
    vocab_size, width = word_embeddings.weight.shape
    head = MaskedPredictionHead(hidden_size=width, vocab_size=vocab_size, transform_act_fn=F.gelu,
                                layer_norm_eps=layer_norm_eps)
    init_bert_weights(head)
    head.decoder.weight = word_embeddings.weight
    return head
