# Copyright (c) torchmm_ext contributors.
# Licensed under the BSD 3-Clause license.
"""Image-text retrieval evaluation (ALBEF / LAVIS protocol), batched and sharded.

The protocol (ALBEF ``Retrieval.py``: ``evaluation`` / ``itm_eval``; LAVIS
``compute_sim_matrix``):

1. encode every image (all tokens) and every text (text mode) once;
2. ``sims = image_features @ text_features.T`` (ITC similarities);
3. for each image the ``k_test`` most similar texts are re-scored by the fusion encoder's ITM
   "match" logit (LAVIS adds the ITC similarity, ``add_itc=True``); every other entry is -100;
   symmetric for text -> image;
4. recall@1/5/10 in both directions from the two score matrices.

What differs from the reference code, by design:

* the ITM re-rank is flattened into (row, candidate) pairs and run ``itm_batch_size`` pairs per
  fusion forward (ALBEF runs one row of ``k_test`` pairs at a time), with each chunk's text
  trimmed to its longest attention mask;
* texts are tokenized with ``padding="longest"`` per batch instead of ``max_length``; with an
  attention mask the fused outputs are the same, only cheaper;
* across ranks only the top-k values and indices are exchanged (``all_gather``), and the dense
  matrices are rebuilt identically on every rank, so the result does not depend on the world
  size (ALBEF all-reduces two dense ``-100``-filled matrices, which turns untouched entries
  into ``-100 * world_size``);
* recall is computed without a Python loop over rows (see :func:`recall_metrics` for ties).
"""

from __future__ import annotations

import contextlib
import math
from typing import (
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterable,
    List,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

try:  # tqdm is a declared dependency; fall back to silence if it is missing.
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover
    _tqdm = None


__all__ = [
    "RetrievalModel",
    "RetrievalScores",
    "evaluate_retrieval",
    "recall_metrics",
]

ArrayLike = Union[np.ndarray, Tensor]

# Score given to every (row, candidate) entry that is not re-ranked, as in ALBEF.
NOT_RERANKED_SCORE = -100.0


# ---------------------------------------------------------------------------------------------
# Interfaces
# ---------------------------------------------------------------------------------------------


class _Encoding(Protocol):
    """What ``encode_image`` / ``encode_text`` return (``ImageEncoding`` / ``TextEncoding``)."""

    @property
    def embeddings(self) -> Tensor:  # [B, S, D] all token states
        ...

    @property
    def features(self) -> Tensor:  # [B, E] L2-normalised ITC features
        ...


class RetrievalModel(Protocol):
    """The part of a retrieval model that :func:`evaluate_retrieval` uses.

    Any ``nn.Module`` with these three methods qualifies (e.g. the ALBEF retrieval model).

    ``encode_image(images [B, 3, H, W])`` returns ``embeddings [B, N, Dv]`` (all tokens, CLS
    first) and ``features [B, E]``; ``encode_text(input_ids [B, L], attention_mask [B, L])``
    returns text-mode ``embeddings [B, L, Dt]`` and ``features [B, E]``;
    ``itm_scores(image_embeddings [U, N, Dv], text_embeddings [P, L, Dt],
    text_attention_mask [P, L], image_index [P])`` returns the ITM "match" logit of each of the
    ``P`` pairs, ``[P]``; pair ``p`` shows image ``image_embeddings[image_index[p]]``, so a model
    can project each distinct image once per layer.
    """

    training: bool

    def encode_image(self, images: Tensor) -> _Encoding: ...

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> _Encoding: ...

    def itm_scores(
        self,
        image_embeddings: Tensor,
        text_embeddings: Tensor,
        text_attention_mask: Tensor,
        image_index: Optional[Tensor] = None,
    ) -> Tensor: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


class RetrievalScores(NamedTuple):
    """Output of :func:`evaluate_retrieval`; all tensors float32 on CPU.

    Attributes:
        scores_i2t (Tensor): ``[N_img, N_txt]``; re-ranked entries hold the ITM logit (plus the
            ITC similarity when ``add_itc``), all others ``-100``.
        scores_t2i (Tensor): ``[N_txt, N_img]``, the same for text -> image.
        sims (Tensor): ``[N_img, N_txt]`` ITC similarities ``image_features @ text_features.T``.
    """

    scores_i2t: Tensor
    scores_t2i: Tensor
    sims: Tensor


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def _as_2d_tensor(scores: ArrayLike, name: str) -> Tensor:
    t = torch.as_tensor(scores)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.double()
    return t


def _count_at_least(scores: Tensor, threshold: Tensor, chunk_size: int) -> Tensor:
    """``(scores >= threshold[:, None]).sum(1)`` computed ``chunk_size`` rows at a time."""
    counts = torch.empty(scores.size(0), dtype=torch.long, device=scores.device)
    for start in range(0, scores.size(0), chunk_size):
        end = start + chunk_size
        counts[start:end] = (scores[start:end] >= threshold[start:end, None]).sum(dim=1)
    return counts


def _recall_at(ranks: Tensor, ks: Sequence[int] = (1, 5, 10)) -> List[float]:
    n = ranks.numel()
    # Same arithmetic as ALBEF: 100.0 * hits / n, as a Python (double) float.
    return [100.0 * int((ranks < k).sum()) / n for k in ks]


def recall_metrics(
    scores_i2t: ArrayLike,
    scores_t2i: ArrayLike,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    *,
    chunk_size: int = 1024,
) -> Dict[str, float]:
    """Retrieval recall@1/5/10 in both directions, as ALBEF's ``itm_eval``.

    The rank of a ground truth is its 0-based position when the row is sorted by decreasing
    score; text retrieval (image -> text) takes, for each image, the best rank among its
    captions; recall@k is the percentage of rows whose rank is ``< k``. Vectorised: the rank is
    obtained by counting, per row, the candidates scoring at least as high as the (best) ground
    truth, ``chunk_size`` rows at a time, so memory stays at ``chunk_size x N`` booleans.

    Ties: ALBEF ranks with ``np.argsort(score)[::-1]`` (an unstable sort), which breaks ties
    arbitrarily. Here a ground truth tied with non-ground-truth candidates is ranked *after*
    them (pessimistic), i.e. ``rank = #{score > best} + #{non-ground-truth with score == best}``;
    ground-truth captions tied with each other do not push each other down. For tie-free rows
    the result is identical to ALBEF's. A degenerate model with constant scores therefore scores
    no hits instead of perfect recall. In practice ties only occur among the ``-100`` entries
    outside the top ``k_test``, which can matter only when ``k_test < 10``.

    Args:
        scores_i2t (np.ndarray | Tensor): ``[N_img, N_txt]`` image -> text scores.
        scores_t2i (np.ndarray | Tensor): ``[N_txt, N_img]`` text -> image scores.
        img2txt (Sequence[Sequence[int]]): for each image, the indices of its captions.
        txt2img (Sequence[int]): for each text, the index of its image.
        chunk_size (int): rows compared at once. Default 1024.

    Returns:
        Dict[str, float]: ``txt_r1, txt_r5, txt_r10, txt_r_mean, img_r1, img_r5, img_r10,
        img_r_mean, r_mean`` in percent; ``r_mean = (txt_r_mean + img_r_mean) / 2``. An image
        without captions counts as a miss.
    """
    s_i2t = _as_2d_tensor(scores_i2t, "scores_i2t")
    s_t2i = _as_2d_tensor(scores_t2i, "scores_t2i")
    n_img, n_txt = s_i2t.shape
    if tuple(s_t2i.shape) != (n_txt, n_img):
        raise ValueError(
            f"scores_t2i must have shape {(n_txt, n_img)} (transpose of scores_i2t), "
            f"got {tuple(s_t2i.shape)}"
        )
    if len(img2txt) != n_img:
        raise ValueError(f"img2txt has {len(img2txt)} entries, scores_i2t has {n_img} rows")
    if len(txt2img) != n_txt:
        raise ValueError(f"txt2img has {len(txt2img)} entries, scores_t2i has {n_txt} rows")
    if n_img == 0 or n_txt == 0:
        raise ValueError("recall_metrics needs at least one image and one text")

    # ---- image -> text: best (highest-scoring) caption of each image.
    device = s_i2t.device
    counts = torch.tensor([len(c) for c in img2txt], dtype=torch.long, device=device)
    gt_img = torch.repeat_interleave(torch.arange(n_img, device=device), counts)  # [C]
    gt_txt = torch.tensor(
        [t for caps in img2txt for t in caps], dtype=torch.long, device=device
    )  # [C]
    gt_scores = s_i2t[gt_img, gt_txt]  # [C]
    best = torch.full((n_img,), -math.inf, dtype=s_i2t.dtype, device=device)
    best = best.scatter_reduce(0, gt_img, gt_scores, reduce="amax", include_self=True)
    n_gt_at_best = torch.zeros(n_img, dtype=torch.long, device=device)
    n_gt_at_best.index_add_(0, gt_img, (gt_scores == best[gt_img]).long())
    txt_ranks = (_count_at_least(s_i2t, best, chunk_size) - n_gt_at_best).double()
    txt_ranks[counts == 0] = math.inf

    # ---- text -> image: the one image of each text.
    t2i_gt = torch.as_tensor(list(txt2img), dtype=torch.long, device=s_t2i.device)
    gt = s_t2i[torch.arange(n_txt, device=s_t2i.device), t2i_gt]  # [N_txt]
    img_ranks = (_count_at_least(s_t2i, gt, chunk_size) - 1).double()

    tr1, tr5, tr10 = _recall_at(txt_ranks)
    ir1, ir5, ir10 = _recall_at(img_ranks)
    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    return {
        "txt_r1": tr1,
        "txt_r5": tr5,
        "txt_r10": tr10,
        "txt_r_mean": tr_mean,
        "img_r1": ir1,
        "img_r5": ir5,
        "img_r10": ir10,
        "img_r_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2,
    }


# ---------------------------------------------------------------------------------------------
# Score matrices
# ---------------------------------------------------------------------------------------------


def _dist_info() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _progress(iterable: Iterable, enabled: bool, **kwargs: Any) -> Iterable:
    if not enabled or _tqdm is None:
        return iterable
    return _tqdm(iterable, **kwargs)


def _row_slice(n_rows: int, rank: int, world_size: int) -> Tuple[int, int, int]:
    """Contiguous shard ``[start, end)`` of ``n_rows`` for ``rank``; ``step`` rows per rank."""
    step = math.ceil(n_rows / world_size)
    start = min(rank * step, n_rows)
    end = min(start + step, n_rows)
    return start, end, step


def _encode_texts(
    model: RetrievalModel,
    texts: Sequence[str],
    tokenizer: Callable[..., Any],
    device: torch.device,
    text_batch_size: int,
    max_length: int,
    precision_ctx: Callable[[], ContextManager],
    show: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns text embeddings ``[N_txt, L, Dt]``, masks ``[N_txt, L]``, features ``[N_txt, E]``
    where ``L`` is the longest tokenized text; shorter batches are padded with zeros."""
    embeds: List[Tensor] = []
    masks: List[Tensor] = []
    feats: List[Tensor] = []
    starts = range(0, len(texts), text_batch_size)
    for start in _progress(starts, show, desc="encode texts", leave=False):
        batch = list(texts[start : start + text_batch_size])
        tokens = tokenizer(
            batch,
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        input_ids = tokens["input_ids"].to(device)
        attention_mask = tokens["attention_mask"].to(device)
        with precision_ctx():
            out = model.encode_text(input_ids, attention_mask)
        embeds.append(out.embeddings)  # [b, L_b, Dt]
        masks.append(attention_mask)  # [b, L_b]
        feats.append(out.features.float())  # [b, E]
    max_len = max(e.size(1) for e in embeds)
    text_embeds = torch.cat([F.pad(e, (0, 0, 0, max_len - e.size(1))) for e in embeds])
    text_masks = torch.cat([F.pad(m, (0, max_len - m.size(1))) for m in masks])
    return text_embeds, text_masks, torch.cat(feats)


def _encode_images(
    model: RetrievalModel,
    loader: Iterable,
    n_img: int,
    device: torch.device,
    precision_ctx: Callable[[], ContextManager],
    show: bool,
) -> Tuple[Tensor, Tensor]:
    """Returns image embeddings ``[N_img, N, Dv]`` and features ``[N_img, E]``, each row placed
    at the index the loader gives for it."""
    image_embeds: Optional[Tensor] = None
    image_feats: Optional[Tensor] = None
    seen = torch.zeros(n_img, dtype=torch.bool)
    for batch in _progress(loader, show, desc="encode images", leave=False):
        images, indices = batch[0], batch[1]
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_img):
            raise ValueError(
                f"loader yielded image index outside [0, {n_img}) "
                f"(dataset.img2txt has {n_img} images)"
            )
        if bool(seen[indices].any()) or indices.unique().numel() != indices.numel():
            raise ValueError("loader yielded an image index twice; use a non-shuffling, "
                             "non-distributed sampler for evaluation")
        seen[indices] = True
        with precision_ctx():
            out = model.encode_image(images.to(device, non_blocking=True))
        if image_embeds is None or image_feats is None:
            image_embeds = out.embeddings.new_zeros((n_img,) + tuple(out.embeddings.shape[1:]))
            image_feats = torch.zeros(
                n_img, out.features.size(-1), dtype=torch.float32, device=out.features.device
            )
        dev_indices = indices.to(image_embeds.device)
        image_embeds[dev_indices] = out.embeddings.to(image_embeds.dtype)
        image_feats[dev_indices] = out.features.float()
    if image_embeds is None or image_feats is None or not bool(seen.all()):
        missing = (~seen).nonzero().flatten()[:10].tolist()
        raise ValueError(
            f"loader did not yield every image: {int((~seen).sum())} of {n_img} missing "
            f"(first: {missing}); evaluation needs the full set on every rank "
            "(do not use a DistributedSampler)"
        )
    return image_embeds, image_feats


def _rerank(
    model: RetrievalModel,
    sims_rows: Tensor,
    row_offset: int,
    k: int,
    rows_are_images: bool,
    image_embeds: Tensor,
    text_embeds: Tensor,
    text_masks: Tensor,
    text_lengths: Tensor,
    itm_batch_size: int,
    add_itc: bool,
    precision_ctx: Callable[[], ContextManager],
    show: bool,
    desc: str,
) -> Tuple[Tensor, Tensor]:
    """ITM scores of the top-``k`` candidates of each row of ``sims_rows`` ``[R, M]``.

    Returns ``(scores [R, k] float32, candidate indices [R, k])``.
    """
    n_rows = sims_rows.size(0)
    topk_sim, topk_idx = sims_rows.topk(k, dim=1)  # [R, k]
    device = topk_idx.device
    # Flatten (row, candidate) pairs row-major, so a chunk touches few distinct rows.
    rows = torch.arange(row_offset, row_offset + n_rows, device=device).repeat_interleave(k)
    cands = topk_idx.reshape(-1)
    img_idx, txt_idx = (rows, cands) if rows_are_images else (cands, rows)
    n_pairs = rows.numel()
    scores = torch.empty(n_pairs, dtype=torch.float32, device=device)
    if n_pairs:
        # Effective text length per chunk, computed with a single host sync.
        pair_len = text_lengths[txt_idx]
        n_chunks = math.ceil(n_pairs / itm_batch_size)
        chunk_len = F.pad(pair_len, (0, n_chunks * itm_batch_size - n_pairs))
        chunk_len = chunk_len.view(n_chunks, itm_batch_size).amax(dim=1).clamp(min=1).tolist()
        for c in _progress(range(n_chunks), show, desc=desc, leave=False):
            s, e = c * itm_batch_size, min((c + 1) * itm_batch_size, n_pairs)
            length = chunk_len[c]
            tt = txt_idx[s:e]
            # Distinct images of the chunk once, plus each pair's index into them.
            unique_images, image_index = torch.unique(img_idx[s:e], return_inverse=True)
            with precision_ctx():
                logits = model.itm_scores(
                    image_embeds[unique_images],  # [U, N, Dv]
                    text_embeds[tt, :length],  # [P, l, Dt]
                    text_masks[tt, :length],  # [P, l]
                    image_index=image_index,  # [P]
                )
            scores[s:e] = logits.reshape(-1).float()
    scores = scores.view(n_rows, k)
    if add_itc:
        scores = scores + topk_sim.float()
    return scores, topk_idx


def _gather_topk(
    values: Tensor, indices: Tensor, n_rows: int, step: int, world_size: int
) -> Tuple[Tensor, Tensor]:
    """All-gather each rank's ``[rows_r, k]`` shard into the full ``[n_rows, k]`` (CPU)."""
    if world_size > 1:
        pad = step - values.size(0)
        values = F.pad(values, (0, 0, 0, pad)).contiguous()
        indices = F.pad(indices, (0, 0, 0, pad)).contiguous()
        all_values = [torch.empty_like(values) for _ in range(world_size)]
        all_indices = [torch.empty_like(indices) for _ in range(world_size)]
        dist.all_gather(all_values, values)
        dist.all_gather(all_indices, indices)
        values = torch.cat(all_values)[:n_rows]
        indices = torch.cat(all_indices)[:n_rows]
    return values.cpu(), indices.cpu()


def _dense(values: Tensor, indices: Tensor, n_cols: int) -> Tensor:
    out = torch.full((values.size(0), n_cols), NOT_RERANKED_SCORE, dtype=torch.float32)
    return out.scatter_(1, indices, values)


def evaluate_retrieval(
    model: RetrievalModel,
    loader: Iterable[Sequence[Any]],
    dataset: Any,
    tokenizer: Callable[..., Any],
    *,
    device: Union[str, torch.device],
    k_test: int = 256,
    text_batch_size: int = 256,
    itm_batch_size: int = 256,
    max_length: int = 30,
    add_itc: bool = False,
    precision_ctx: Callable[[], ContextManager] = contextlib.nullcontext,
    show_progress: bool = True,
) -> RetrievalScores:
    """Retrieval score matrices: ITC top-``k_test`` candidates re-ranked by ITM.

    Every image and every text is encoded exactly once (on every rank). The ITM re-rank of the
    ``N_img x k`` image -> text and ``N_txt x k`` text -> image pairs runs ``itm_batch_size``
    pairs per fusion forward and, under ``torch.distributed``, is split into contiguous row
    shards, one per rank; the top-k scores are all-gathered so that every rank returns the
    same full matrices, identical to a single-process run. Feed the result to
    :func:`recall_metrics`.

    Args:
        model (RetrievalModel): model with ``encode_image``, ``encode_text``, ``itm_scores``;
            put in eval mode for the call, its training flag is restored afterwards.
        loader (Iterable): yields ``(images [B, 3, H, W], image_indices [B])`` covering every
            image of ``dataset`` exactly once (no ``DistributedSampler``).
        dataset: has ``text: list[str]`` (cleaned captions), ``txt2img: list[int]`` and
            ``img2txt: list[list[int]]``.
        tokenizer (Callable): Hugging Face style tokenizer returning ``input_ids`` and
            ``attention_mask``.
        device (str | torch.device): where the model lives; inputs are moved there.
        k_test (int): candidates re-ranked per row, clamped to the number of candidates.
            Default 256 (COCO; 128 for Flickr30K).
        text_batch_size (int): texts per ``encode_text`` call. Default 256.
        itm_batch_size (int): (image, text) pairs per ``itm_scores`` call. Default 256.
        max_length (int): tokenizer truncation length. Default 30.
        add_itc (bool): add the ITC similarity to the ITM logit (LAVIS); ``False`` ranks by
            the ITM logit alone (ALBEF). Default False.
        precision_ctx (Callable[[], ContextManager]): factory of the context every model call
            runs in, e.g. ``lambda: torch.autocast("cuda", dtype=torch.bfloat16)``.
        show_progress (bool): tqdm bars on rank 0. Default True.

    Returns:
        RetrievalScores: ``scores_i2t [N_img, N_txt]``, ``scores_t2i [N_txt, N_img]`` (re-ranked
        entries hold the score, all others ``-100``) and ``sims [N_img, N_txt]``; float32, CPU.
    """
    if k_test < 1:
        raise ValueError(f"k_test must be >= 1, got {k_test}")
    if text_batch_size < 1 or itm_batch_size < 1:
        raise ValueError(
            f"text_batch_size and itm_batch_size must be >= 1, got "
            f"{text_batch_size} and {itm_batch_size}"
        )
    device = torch.device(device)
    texts: Sequence[str] = dataset.text
    n_txt, n_img = len(texts), len(dataset.img2txt)
    if n_txt == 0 or n_img == 0:
        raise ValueError(f"need at least one image and one text, got {n_img} and {n_txt}")
    if len(dataset.txt2img) != n_txt:
        raise ValueError(
            f"dataset.txt2img has {len(dataset.txt2img)} entries but dataset.text has {n_txt}"
        )
    rank, world_size = _dist_info()
    show = show_progress and rank == 0

    was_training = model.training
    model.eval()
    try:
        # One outer precision context for the whole evaluation: autocast then casts each
        # weight once and reuses it (inner contexts would re-cast per call).
        with torch.no_grad(), precision_ctx():
            text_embeds, text_masks, text_feats = _encode_texts(
                model, texts, tokenizer, device, text_batch_size, max_length, precision_ctx, show
            )
            image_embeds, image_feats = _encode_images(
                model, loader, n_img, device, precision_ctx, show
            )
            # Position of the last attended token + 1 (works for left or right padding).
            positions = torch.arange(1, text_masks.size(1) + 1, device=text_masks.device)
            text_lengths = ((text_masks != 0).long() * positions).amax(dim=1)  # [N_txt]

            with torch.autocast(image_feats.device.type, enabled=False):
                sims = image_feats @ text_feats.to(image_feats.device).t()  # [N_img, N_txt] fp32

            common = dict(
                model=model,
                image_embeds=image_embeds,
                text_embeds=text_embeds,
                text_masks=text_masks,
                text_lengths=text_lengths,
                itm_batch_size=itm_batch_size,
                add_itc=add_itc,
                precision_ctx=precision_ctx,
                show=show,
            )
            # image -> text: this rank's rows of sims.
            start, end, step_i = _row_slice(n_img, rank, world_size)
            i2t_val, i2t_idx = _rerank(
                sims_rows=sims[start:end],
                row_offset=start,
                k=min(k_test, n_txt),
                rows_are_images=True,
                desc="rerank i2t",
                **common,
            )
            # text -> image: this rank's rows of sims.T.
            start, end, step_t = _row_slice(n_txt, rank, world_size)
            t2i_val, t2i_idx = _rerank(
                sims_rows=sims.t()[start:end],
                row_offset=start,
                k=min(k_test, n_img),
                rows_are_images=False,
                desc="rerank t2i",
                **common,
            )
            i2t_val, i2t_idx = _gather_topk(i2t_val, i2t_idx, n_img, step_i, world_size)
            t2i_val, t2i_idx = _gather_topk(t2i_val, t2i_idx, n_txt, step_t, world_size)
    finally:
        model.train(was_training)

    return RetrievalScores(
        scores_i2t=_dense(i2t_val, i2t_idx, n_txt),
        scores_t2i=_dense(t2i_val, t2i_idx, n_img),
        sims=sims.float().cpu(),
    )
