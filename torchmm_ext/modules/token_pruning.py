"""ELIP: text-guided pruning and merging of vision tokens inside a ViT.

ELIP (Guo et al., arXiv 2309.16738; code guoyang9/ELIP ``ALBEF/models/vit.py``) shortens the
ViT's token sequence at a few prune points. Before block ``b`` (a *begin layer*) it

1. scores the patch tokens without gradient: a copy of the tokens, whose CLS is replaced by
   ``guidance_weight * text CLS + (1 - guidance_weight) * image CLS``, runs through the blocks
   of the coming stage (``b`` up to the next prune point); the last of them gives its
   head-averaged attention row of the CLS query over the other tokens (the *look-ahead*);
2. keeps the ``keep_ratio * original patch count`` best tokens in their original order after
   the CLS;
3. merges the others into one token, their score-weighted average with the scores renormalised
   over the dropped tokens (``w / (sum w + 1e-6)``, as published): gradient reaches the
   features, never the scores; it is appended last and is an ordinary candidate at later
   prune points.

The blocks then continue on the shorter sequence. Nothing here has parameters, so a model with
pruning has the same state dict as without.

On :class:`~torchmm_ext.modules.vision_transformer.VisionTransformer` a prune point before
block ``b`` is a token reducer after block ``b - 1`` (its ``set_token_reducer`` seam), so the
first block cannot be preceded by one (``begin_layers`` start at 1; ELIP's start at 2).

What differs from the published code, by design:

* ``lookahead=False`` is a cheaper variant (not in the paper): the scores come from the
  attention of the block that just ran (recomputed on its input with the guided CLS), so no
  extra block runs;
* a prune point that would drop nothing (``keep_ratio`` 1.0 at the first point) leaves the
  sequence as it is; the published code appends an all-zero "merged" token there;
* keep counts are ``floor(num_patches * keep_ratio)`` with a 1e-6 tolerance, so 0.29 of 100
  patches keeps 29 (``int()`` of the float product keeps 28); the published schedule's counts
  are unchanged (230, 166, 102 of 256);
* ties between scores are broken by position (a stable sort), the published sort by chance;
* without guidance (evaluation: an image is encoded once for every text) the scores use the
  image CLS alone; in training a missing guidance is an error when ``guidance_weight > 0``;
* ``keep_warmup=(start, end)`` (not in ELIP, which starts from a pre-trained DeiT whose CLS
  attention already means something) keeps every token until epoch ``start`` and lowers the
  keep ratios to the schedule's along a cosine until epoch ``end``, EViT's keep-rate warm-up
  (Liang et al., ICLR 2022). From random weights the CLS attention is noise, and pruning by it
  from the first step delays learning (measured on the shapes world: README, ELIP).
"""

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn, Tensor

from torchmm_ext.modules.efficiency import GroupSpec, module_path, momentum_twin, record_method, resolve_block_groups
from torchmm_ext.modules.vision_transformer import TokenReductionContext, VisionTransformer

__all__ = [
    "TextGuidedTokenMerger",
    "TokenPruningReport",
    "TokenSelection",
    "apply_token_pruning",
    "cls_attention_scores",
    "keep_count",
    "keep_ratio_at",
    "merge_tokens",
    "pruned_sequence_lengths",
    "select_tokens",
]

# Added to the sum of the dropped tokens' scores before renormalising them (as published).
_MERGE_EPS = 1e-6
_KEY = "token_pruning"  # the config section the messages name


def keep_count(num_patches: int, keep_ratio: float) -> int:
    """Patches kept at a prune point: ``floor(num_patches * keep_ratio)`` (1e-6 tolerance)."""
    return int(math.floor(num_patches * keep_ratio + 1e-6))


class TokenSelection(NamedTuple):
    """Which tokens a prune point keeps and merges (indices among the non-CLS tokens).

    Attributes:
        keep_index (Tensor): ``[B, K]`` kept tokens, ascending (original order).
        merge_index (Tensor): ``[B, M]`` dropped tokens, by decreasing score.
        merge_weights (Tensor): ``[B, M]`` their scores renormalised to sum to ~1.
    """

    keep_index: Tensor
    merge_index: Tensor
    merge_weights: Tensor


def select_tokens(scores: Tensor, num_keep: int) -> TokenSelection:
    """Top-``num_keep`` tokens by score, in their original order, and the merge weights of the rest.

    Args:
        scores (Tensor): ``[B, N]`` importance of the non-CLS tokens (no gradient is taken).
        num_keep (int): tokens kept, ``1 <= num_keep < N``.

    Returns:
        TokenSelection
    """
    scores = scores.detach().float()
    order = scores.argsort(dim=-1, descending=True, stable=True)
    keep_index = order[:, :num_keep].sort(dim=-1).values
    merge_index = order[:, num_keep:]
    weights = scores.gather(1, merge_index)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + _MERGE_EPS)
    return TokenSelection(keep_index, merge_index, weights)


def merge_tokens(tokens: Tensor, selection: TokenSelection) -> Tensor:
    """``[CLS, kept tokens in order, merged token]`` from ``tokens [B, 1 + N, D]``.

    The merged token is the ``merge_weights``-weighted sum of the dropped tokens; the weights
    carry no gradient, the features do.

    Returns:
        Tensor: ``[B, 2 + K, D]``.
    """
    width = tokens.size(-1)
    patches = tokens[:, 1:]
    kept = patches.gather(1, selection.keep_index[..., None].expand(-1, -1, width))
    dropped = patches.gather(1, selection.merge_index[..., None].expand(-1, -1, width))
    weights = selection.merge_weights.detach().to(tokens.dtype)[..., None]
    merged = (dropped * weights).sum(dim=1, keepdim=True)  # [B, 1, D]
    return torch.cat([tokens[:, :1], kept, merged], dim=1)


def _guided(tokens: Tensor, guidance: Optional[Tensor], guidance_weight: float) -> Tensor:
    """A detached copy of ``tokens`` whose CLS is ``w * guidance + (1 - w) * CLS``."""
    x = tokens.detach().clone()
    if guidance is not None and guidance_weight > 0:
        if guidance.shape != x[:, 0].shape:
            raise ValueError(
                f"token pruning guidance has shape {tuple(guidance.shape)} but the ViT's CLS is "
                f"{tuple(x[:, 0].shape)}: the text CLS must have the vision width"
            )
        x[:, 0] = guidance_weight * guidance.detach().to(x.dtype) + (1 - guidance_weight) * x[:, 0]
    return x


@torch.no_grad()
def cls_attention_scores(
    encoder: VisionTransformer,
    tokens: Tensor,
    first_block: int,
    score_block: int,
    guidance: Optional[Tensor] = None,
    guidance_weight: float = 0.2,
) -> Tensor:
    """ELIP's token scores: the guided tokens run through blocks ``first_block .. score_block-1``,
    then block ``score_block``'s attention, averaged over heads, gives the CLS row.

    Args:
        encoder (VisionTransformer): any encoder with ``blocks`` and ``block_attention``.
        tokens (Tensor): ``[B, 1 + N, D]``, the input of block ``first_block``.
        first_block (int): first block of the look-ahead.
        score_block (int): block whose attention scores (``>= first_block``).
        guidance (Optional[Tensor]): ``[B, D]`` text CLS; ``None`` scores with the image CLS.
        guidance_weight (float): weight of the guidance in the CLS.

    Returns:
        Tensor: ``[B, N]`` scores of the non-CLS tokens (no gradient).
    """
    x = _guided(tokens, guidance, guidance_weight)
    for j in range(first_block, score_block):
        x = encoder.blocks[j](x)
    probs = encoder.block_attention(score_block, x)  # [B, H, L, L]
    return probs.mean(dim=1)[:, 0, 1:].float()


def keep_ratio_at(keep_ratio: float, epoch: float, keep_warmup: Optional[Sequence[float]]) -> float:
    """The keep ratio in force at (fractional) training ``epoch`` under ``keep_warmup``:
    1.0 before ``start``, ``keep_ratio`` from ``end`` on, and in between EViT's cosine
    ``keep_ratio + (1 - keep_ratio) * (1 + cos(pi * (epoch - start) / (end - start))) / 2``."""
    if keep_warmup is None:
        return keep_ratio
    start, end = keep_warmup
    if epoch < start:
        return 1.0
    if epoch >= end:
        return keep_ratio
    return keep_ratio + (1.0 - keep_ratio) * 0.5 * (1.0 + math.cos(math.pi * (epoch - start) / (end - start)))


class TextGuidedTokenMerger(nn.Module):
    """ELIP's prune point, a token reducer for ``VisionTransformer.set_token_reducer``.

    Installed after block ``layer_idx`` (the prune point before block ``layer_idx + 1``).

    Args:
        num_keep (int): non-CLS tokens kept (the merged token comes on top).
        stage_end (int): the block before which the next prune point (or the end) lies; the
            look-ahead runs blocks ``layer_idx + 1 .. stage_end - 1``.
        guidance_weight (float): weight of the text CLS in the scoring CLS (0.2).
        lookahead (bool): score with the coming stage (ELIP); ``False`` scores with the
            attention of the block that just ran (cheaper, not in the paper).
        eval_pruning (bool): also prune in eval mode (``False``: all tokens at evaluation, as
            the published code evaluates).
        keep_warmup (Optional[Tuple[float, float]]): ``(start, end)`` epochs of the keep-ratio
            warm-up (:func:`keep_ratio_at`); the training loop calls :meth:`before_train_step`
            before every step, which sets ``num_keep`` for that step (and for evaluations
            between steps). Outside training ``num_keep`` is the schedule's.
        num_patches (Optional[int]): the ViT's patch count, needed with ``keep_warmup``.
        keep_ratio (Optional[float]): this point's ratio of ``num_patches``, with ``keep_warmup``.

    Inputs:
        tokens (Tensor): ``[B, 1 + N, D]`` output of block ``layer_idx``.
        context (TokenReductionContext): ``guidance`` is the text CLS ``[B, D]`` (or ``None``).

    Returns:
        Tensor: ``[B, 2 + num_keep, D]``, or ``tokens`` unchanged when nothing would be dropped.
    """

    def __init__(
        self,
        num_keep: int,
        stage_end: int,
        guidance_weight: float = 0.2,
        lookahead: bool = True,
        eval_pruning: bool = True,
        keep_warmup: Optional[Tuple[float, float]] = None,
        num_patches: Optional[int] = None,
        keep_ratio: Optional[float] = None,
    ) -> None:
        super().__init__()
        if keep_warmup is not None and (num_patches is None or keep_ratio is None):
            raise ValueError("keep_warmup needs num_patches and keep_ratio")
        self.num_keep = num_keep
        self.keep_warmup = keep_warmup
        self.num_patches = num_patches
        self.keep_ratio = keep_ratio
        self.stage_end = stage_end
        self.guidance_weight = guidance_weight
        self.lookahead = lookahead
        self.eval_pruning = eval_pruning

    def extra_repr(self) -> str:
        return (f"num_keep={self.num_keep}, stage_end={self.stage_end}, guidance_weight="
                f"{self.guidance_weight}, lookahead={self.lookahead}, eval_pruning={self.eval_pruning}"
                + (f", keep_warmup={self.keep_warmup}" if self.keep_warmup else ""))

    def before_train_step(self, ctx: Any) -> None:
        """Set this step's keep count from the warm-up (the training loop calls this with its
        ``StepContext`` before every step, so a resumed run continues the same schedule)."""
        if self.keep_warmup is None:
            return
        epoch = ctx.epoch + ctx.step_in_epoch / max(ctx.steps_per_epoch, 1)
        self.num_keep = keep_count(self.num_patches, keep_ratio_at(self.keep_ratio, epoch, self.keep_warmup))

    def scores(self, tokens: Tensor, context: TokenReductionContext) -> Tensor:
        """``[B, N]`` importance of the non-CLS tokens of ``tokens`` (no gradient)."""
        if self.lookahead:
            return cls_attention_scores(context.encoder, tokens, context.layer_idx + 1, self.stage_end - 1,
                                        context.guidance, self.guidance_weight)
        if context.block_input is None:
            raise ValueError("lookahead=False needs the block's input in the TokenReductionContext")
        return cls_attention_scores(context.encoder, context.block_input, context.layer_idx,
                                    context.layer_idx, context.guidance, self.guidance_weight)

    def forward(self, tokens: Tensor, context: TokenReductionContext) -> Tensor:
        if not self.training and not self.eval_pruning:
            return tokens
        if tokens.size(1) - 1 <= self.num_keep:
            return tokens
        if context.guidance is None and self.training and self.guidance_weight > 0:
            raise ValueError(
                f"{_KEY}.guidance_weight={self.guidance_weight} but the ViT was called in training "
                "without guidance (the text CLS): encode the text first and pass "
                "guidance=text_cls, or set guidance_weight: 0 to score with the image CLS alone"
            )
        return merge_tokens(tokens, select_tokens(self.scores(tokens, context), self.num_keep))


def pruned_sequence_lengths(num_patches: int, depth: int, begin_layers: Sequence[int],
                            keep_counts: Sequence[int]) -> List[int]:
    """Sequence length entering each of ``depth`` blocks (CLS and merged token included).

    At 256 px (256 patches), 12 blocks and ELIP's schedule (``[2, 4, 10]``, 230/166/102 kept):
    257 for blocks 0-1, 232 for 2-3, 168 for 4-9, 104 for 10-11.
    """
    lengths, length = [], 1 + num_patches
    points = dict(zip(begin_layers, keep_counts))
    for i in range(depth):
        if i in points and points[i] < length - 1:
            length = points[i] + 2
        lengths.append(length)
    return lengths


class TokenPruningReport(NamedTuple):
    """What :func:`apply_token_pruning` did.

    Attributes:
        encoders (List[str]): module paths of the pruned ViTs (``""``: the model itself).
        begin_layers (List[int]): blocks before which tokens are pruned.
        keep_counts (List[int]): non-CLS tokens kept at each prune point.
        tokens_per_layer (List[int]): sequence length entering each block.
        lookahead (bool): scores from the coming stage (``False``: from the block that ran).
        guidance_weight (float): weight of the text CLS in the scoring CLS.
        keep_warmup (Optional[List[float]]): ``[start, end]`` epochs of the keep-ratio warm-up.
    """

    encoders: List[str]
    begin_layers: List[int]
    keep_counts: List[int]
    tokens_per_layer: List[int]
    lookahead: bool
    guidance_weight: float
    keep_warmup: Optional[List[float]] = None

    @property
    def token_fraction(self) -> float:
        """Mean tokens per block relative to the unpruned sequence."""
        return sum(self.tokens_per_layer) / (len(self.tokens_per_layer) * self.tokens_per_layer[0])

    def format(self) -> str:
        names = ", ".join(e or "<model>" for e in self.encoders)
        return (f"token pruning (ELIP) on {names}: before blocks {self.begin_layers} keep "
                f"{self.keep_counts} patches (+ CLS + merged); tokens per layer "
                f"{self.tokens_per_layer} ({100 * self.token_fraction:.1f}% of unpruned on average); "
                f"lookahead={self.lookahead}, guidance_weight={self.guidance_weight}"
                + (f"; every token kept until epoch {self.keep_warmup[0]:g}, the schedule reached at "
                   f"epoch {self.keep_warmup[1]:g} (keep-ratio warm-up)" if self.keep_warmup else ""))


def _is_prunable(module: Any) -> bool:
    return all(hasattr(module, a) for a in ("set_token_reducer", "block_attention", "blocks", "num_patches"))


def _vision_encoder(model: nn.Module, groups: GroupSpec) -> Tuple[str, nn.Module]:
    """The ViT to prune: the model itself, the owner of the resolved block list, or (for a
    model without ``block_groups()``) its only non-momentum ViT."""
    if _is_prunable(model):
        return "", model
    if groups == "vision" and not hasattr(model, "block_groups"):
        found = [name for name, m in model.named_modules()
                 if _is_prunable(m) and not name.split(".")[0].endswith("_m")]
        if len(found) != 1:
            raise ValueError(
                f"{type(model).__name__} has no block_groups() and {len(found)} ViTs ({found}): "
                f"pass {_KEY}.groups={{'vision': '<path>.blocks'}}"
            )
        return found[0], model.get_submodule(found[0])
    resolved = resolve_block_groups(model, groups)
    if len(resolved) != 1:
        raise ValueError(f"{_KEY}.groups={groups!r} names {len(resolved)} block lists; give the one ViT's")
    (name, blocks), = resolved.items()
    path = module_path(model, blocks) or ""
    parent = path.rpartition(".")[0]
    encoder = model.get_submodule(parent) if path else None
    if encoder is None or not _is_prunable(encoder) or encoder.blocks is not blocks:
        raise ValueError(
            f"{_KEY}.groups={groups!r}: block group {name!r} ({path}) does not belong to a ViT with "
            "a token-reducer seam (VisionTransformer.set_token_reducer)"
        )
    return parent, encoder


def _check_schedule(begin_layers: Sequence[int], keep_ratios: Sequence[float], depth: int,
                    num_patches: int, guidance_weight: float) -> List[int]:
    begin_layers, keep_ratios = list(begin_layers), list(keep_ratios)
    if not begin_layers or len(begin_layers) != len(keep_ratios):
        raise ValueError(
            f"{_KEY}.begin_layers={begin_layers} and {_KEY}.keep_ratios={keep_ratios} must be "
            "non-empty lists of the same length (one keep ratio per prune point)"
        )
    for b in begin_layers:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b < depth:
            raise ValueError(
                f"{_KEY}.begin_layers={begin_layers}: prune point {b!r} is outside the ViT's {depth} "
                f"blocks (a prune point is the block it precedes: an int in 1..{depth - 1})"
            )
    if any(b >= c for b, c in zip(begin_layers, begin_layers[1:])):
        raise ValueError(f"{_KEY}.begin_layers={begin_layers} must be strictly increasing")
    for r in keep_ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise ValueError(f"{_KEY}.keep_ratios={keep_ratios}: {r!r} is outside (0, 1]")
    if any(r < s for r, s in zip(keep_ratios, keep_ratios[1:])):
        raise ValueError(
            f"{_KEY}.keep_ratios={keep_ratios} must not increase (each is a fraction of the "
            "original patch count, and a later stage cannot keep more than an earlier one)"
        )
    counts = [keep_count(num_patches, r) for r in keep_ratios]
    for r, k in zip(keep_ratios, counts):
        if k == 0:
            raise ValueError(
                f"{_KEY}.keep_ratios={keep_ratios}: {r} of the ViT's {num_patches} patches keeps 0 "
                "tokens at this image size; raise the ratio or the image size"
            )
    if isinstance(guidance_weight, bool) or not isinstance(guidance_weight, (int, float)) \
            or not 0 <= guidance_weight <= 1:
        raise ValueError(f"{_KEY}.guidance_weight={guidance_weight!r} must be a number in [0, 1]")
    return counts


def apply_token_pruning(
    model: nn.Module,
    begin_layers: Sequence[int] = (2, 4, 10),
    keep_ratios: Sequence[float] = (0.9, 0.65, 0.4),
    guidance_weight: float = 0.2,
    lookahead: bool = True,
    prune_momentum: bool = False,
    eval_pruning: bool = True,
    keep_warmup: Optional[Sequence[float]] = None,
    groups: GroupSpec = "vision",
) -> TokenPruningReport:
    """Install ELIP's text-guided token pruning and merging on a model's ViT.

    Args:
        model (nn.Module): a :class:`VisionTransformer` (or any ViT with the token-reducer
            seam), or a model holding one (ALBEF: ``vision_encoder``). Changed in place.
        begin_layers (Sequence[int]): blocks before which tokens are pruned, strictly
            increasing in ``1 .. depth - 1`` (ELIP on ViT-B: ``[2, 4, 10]``).
        keep_ratios (Sequence[float]): at each prune point, the kept fraction of the
            *original* patch count, in (0, 1] and non-increasing (ELIP: ``[0.9, 0.65, 0.4]``).
        guidance_weight (float): weight of the text CLS in the scoring CLS (ELIP: 0.2). Models
            that do not pass their text CLS to the ViT need 0 (score by the image CLS alone);
            a bare ViT's caller passes ``guidance=`` to its forward.
        lookahead (bool): score with the coming stage's blocks (ELIP); ``False``: with the
            attention of the block that just ran.
        prune_momentum (bool): also prune the momentum ViT (``<path>_m``), guided by the
            momentum text CLS. The published code keeps all its tokens (default).
        eval_pruning (bool): prune in eval mode too, scored by the image CLS (default; an image
            is encoded once for every text). ``False`` evaluates with all tokens.
        keep_warmup (Optional[Sequence[float]]): ``[start, end]`` epochs: every token is kept
            before ``start``, the keep ratios fall to ``keep_ratios`` along a cosine until
            ``end`` (EViT's keep-rate warm-up; not in ELIP, which starts from a pre-trained
            ViT). Driven by the training loop; ``None`` prunes from the first step.
        groups (GroupSpec): the ViT's block list (:func:`resolve_block_groups`; default the
            model's ``vision`` group, or its only ViT when it has no ``block_groups()``).

    Returns:
        TokenPruningReport

    Raises:
        ValueError: a bad schedule, a ViT that cannot be found, ``guidance_weight > 0`` on a
            model that does not pass text guidance, ``prune_momentum`` without a momentum ViT,
            each naming the key and value.
    """
    path, encoder = _vision_encoder(model, groups)
    depth = len(encoder.blocks)
    counts = _check_schedule(begin_layers, keep_ratios, depth, encoder.num_patches, guidance_weight)
    begin_layers = [int(b) for b in begin_layers]
    if keep_warmup is not None:
        warmup = list(keep_warmup) if isinstance(keep_warmup, (list, tuple)) else None
        if warmup is None or len(warmup) != 2 or any(
                isinstance(e, bool) or not isinstance(e, (int, float)) for e in warmup) \
                or not 0 <= warmup[0] <= warmup[1]:
            raise ValueError(f"{_KEY}.keep_warmup={keep_warmup!r} must be [start, end] epochs with "
                             "0 <= start <= end")
        keep_warmup = (float(warmup[0]), float(warmup[1]))
    if guidance_weight > 0 and encoder is not model and not getattr(model, "passes_vision_guidance", False):
        raise ValueError(
            f"{_KEY}.guidance_weight={guidance_weight}: {type(model).__name__} does not pass text "
            "guidance (its text CLS) to its ViT; set guidance_weight: 0 to prune by the image CLS alone"
        )
    if guidance_weight > 0 and encoder is not model and hasattr(model, "text_encoder"):
        text_width = model.text_encoder.embeddings.word_embeddings.embedding_dim
        if text_width != encoder.width:
            raise ValueError(
                f"{_KEY}.guidance_weight={guidance_weight}: the text CLS ({text_width}-d) cannot "
                f"replace the ViT's CLS ({encoder.width}-d); set guidance_weight: 0"
            )
    targets = [(path, encoder)]
    if prune_momentum:
        twin = momentum_twin(model, path) if path else None
        if twin is None:
            raise ValueError(
                f"{_KEY}.prune_momentum=True but {type(model).__name__} has no momentum copy of "
                f"its ViT ({path or '<model>'}_m)"
            )
        head, _, rest = path.partition(".")
        targets.append((f"{head}_m" + (f".{rest}" if rest else ""), twin))
    for vit_path, vit in targets:
        if len(vit.token_reducers):
            raise ValueError(f"{vit_path or type(vit).__name__} already has token reducers after blocks "
                             f"{sorted(int(k) for k in vit.token_reducers)}")
    for _, vit in targets:
        ends = begin_layers[1:] + [depth]
        for begin, end, num_keep, ratio in zip(begin_layers, ends, counts, keep_ratios):
            vit.set_token_reducer(begin - 1, TextGuidedTokenMerger(
                num_keep, end, float(guidance_weight), bool(lookahead), bool(eval_pruning),
                keep_warmup, vit.num_patches, float(ratio)))
    settings: Dict[str, Any] = dict(
        begin_layers=begin_layers, keep_ratios=[float(r) for r in keep_ratios],
        guidance_weight=float(guidance_weight), lookahead=bool(lookahead),
        prune_momentum=bool(prune_momentum), eval_pruning=bool(eval_pruning),
    )
    if keep_warmup is not None:
        settings["keep_warmup"] = list(keep_warmup)
    if groups != "vision":
        settings["groups"] = groups if isinstance(groups, str) else (dict(groups) if hasattr(groups, "items") else list(groups))
    record_method(model, _KEY, settings)
    return TokenPruningReport(
        encoders=[p for p, _ in targets],
        begin_layers=begin_layers,
        keep_counts=counts,
        tokens_per_layer=pruned_sequence_lengths(encoder.num_patches, depth, begin_layers, counts),
        lookahead=bool(lookahead),
        guidance_weight=float(guidance_weight),
        keep_warmup=None if keep_warmup is None else list(keep_warmup),
    )
