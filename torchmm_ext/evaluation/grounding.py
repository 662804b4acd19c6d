"""Weakly supervised visual grounding by Grad-CAM (ALBEF ``Grounding.py``, RefCOCO+ protocol).

The model is never trained on boxes. At test time the ITM "match" logit of (image, referring
expression) is back-propagated to the cross-attention probabilities of one fusion layer; the
Grad-CAM map ``attention * clamp(grad, min=0)``, averaged over heads and text tokens, is a heat
map over the image patches. Upsampled to the image, it scores every detected box by
``heat sum / area ** 0.5``; the best box is correct when its IoU with the ground truth is at
least 0.5.

What differs from ALBEF, by design:

* the gradient is taken with ``torch.autograd.grad`` with respect to the attention
  probabilities only (ALBEF calls ``loss.backward()``, which also fills every parameter's
  ``.grad``), and the vision and text encoders run without a graph;
* the text average divides by the number of real tokens (ALBEF divides by the padded length,
  which rescales each sample by a batch-dependent factor; the chosen box is the same);
* the best box is the argmax of the scores (ALBEF keeps the first box whose score beats 0,
  so a map with no positive box reuses the previous expression's prediction);
* IoU is torchvision's continuous-coordinate ``box_iou`` (ALBEF's ``computeIoU`` is the same
  but counts overlaps of at most one pixel as none).
"""

from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.ops import box_convert, box_iou

from torchmm_ext.engine.distributed import all_reduce_sum

__all__ = [
    "GradCAMOutput",
    "GroundingTargets",
    "fusion_layer_index",
    "default_block_num",
    "itm_gradcam",
    "xywh_to_xyxy",
    "box_iou_xywh",
    "upsample_heatmap",
    "score_boxes",
    "grounding_accuracy",
    "evaluate_grounding",
    "load_grounding_targets",
    "refer_ground_truth",
    "word_maps",
]

PathLike = Union[str, Path]


class GradCAMOutput(NamedTuple):
    """Output of :func:`itm_gradcam`.

    Attributes:
        maps (Tensor): ``[B, g, g]`` Grad-CAM averaged over heads and real text tokens.
        token_maps (Tensor): ``[B, L, g, g]`` one map per text token (CLS first, padding zero).
        itm_scores (Tensor): ``[B]`` ITM match logits that were explained.
    """

    maps: Tensor
    token_maps: Tensor
    itm_scores: Tensor


def fusion_layer_index(block_num: int, text_layers: int, fusion_layers: int) -> int:
    """ALBEF's ``block_num`` (a BERT layer, counted from the first text layer) -> the index of
    that layer inside our fusion encoder; ALBEF's 8 with 6 text layers is fusion layer 2.

    Raises:
        ValueError: ``block_num`` is not a fusion (cross-attention) layer.
    """
    index = block_num - text_layers
    if not 0 <= index < fusion_layers:
        raise ValueError(
            f"block_num {block_num} is not a cross-attention layer: with {text_layers} text layers "
            f"and {fusion_layers} fusion layers (ALBEF's BERT-layer count) it must be in "
            f"[{text_layers}, {text_layers + fusion_layers - 1}]"
        )
    return index


def default_block_num(text_layers: int, fusion_layers: int) -> int:
    """ALBEF's choice, the third fusion layer (``block_num=8`` for BERT-base split at 6); in a
    shallower model the deepest layer but the last one where there is a choice: in the last
    layer only the CLS query reaches the ITM logit, so every word's map there is zero."""
    return text_layers + max(0, min(2, fusion_layers - 2))


def itm_gradcam(
    model: Any,
    image: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    layer: int,
) -> GradCAMOutput:
    """Grad-CAM of the ITM match logit on the cross-attention of fusion layer ``layer``.

    One batched forward and one ``torch.autograd.grad`` for the whole batch: each pair's logit
    depends only on its own attention (no batch-level operation in eval mode), so the gradient
    of the summed logits is every pair's own gradient. No parameter's ``.grad`` is touched.
    Call it with the model in eval mode (dropout would make the map random).

    Args:
        model: an ALBEF retrieval-style model with ``vision_encoder``, ``text_encoder``,
            ``fusion_encoder`` and ``itm_head`` (:class:`~torchmm_ext.models.albef.ALBEFForRetrieval`).
        image (Tensor): ``[B, 3, H, W]``.
        input_ids (Tensor): ``[B, L]``.
        attention_mask (Tensor): ``[B, L]`` 1/0 padding mask.
        layer (int): fusion layer (0-based, see :func:`fusion_layer_index`).

    Returns:
        GradCAMOutput: maps on the ``g x g`` patch grid (float32).
    """
    reducers = getattr(model.vision_encoder, "token_reducers", {})
    if any(getattr(r, "eval_pruning", True) for r in reducers.values()):
        raise ValueError(
            "itm_gradcam needs the ViT's full patch grid, but this model prunes vision tokens at "
            "evaluation (token_pruning): run grounding without the token_pruning section (it "
            "holds no weights), or with token_pruning.eval_pruning: false"
        )
    with torch.no_grad():
        image_embeddings = model.vision_encoder(image).last_hidden_state  # [B, 1 + g*g, Dv]
        text_embeddings = model.text_encoder(input_ids, attention_mask=attention_mask.bool()).last_hidden_state
    last = len(model.fusion_encoder.layer) - 1
    with torch.enable_grad():
        fused = model.fusion_encoder(
            text_embeddings, attention_mask, image_embeddings,
            return_cross_attention_layer=layer, cls_only=layer < last,
        )
        scores = model.itm_head(fused.last_hidden_state[:, 0])[:, 1]
        attention = fused.cross_attention  # [B, H, L, 1 + g*g] (all L: a CLS-only layer comes later)
        (grad,) = torch.autograd.grad(scores.sum(), attention)
    cam = attention.detach().float() * grad.float().clamp(min=0)
    cam = cam[..., 1:].mean(dim=1)  # drop the image CLS column, average heads: [B, L, g*g]
    batch, length = input_ids.shape
    grid = int(round(cam.size(-1) ** 0.5))
    mask = attention_mask.to(cam.dtype)
    token_maps = (cam * mask[:, :, None]).view(batch, length, grid, grid)
    maps = token_maps.sum(dim=1) / mask.sum(dim=1).clamp(min=1)[:, None, None]
    return GradCAMOutput(maps, token_maps, scores.detach().float())


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` boxes ``[x, y, w, h]`` (COCO / RefCOCO) -> ``[x0, y0, x1, y1]``."""
    return box_convert(boxes, "xywh", "xyxy")


def box_iou_xywh(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU ``[N, M]`` of ``[N, 4]`` and ``[M, 4]`` boxes in ``[x, y, w, h]``."""
    return box_iou(xywh_to_xyxy(boxes1.float()), xywh_to_xyxy(boxes2.float()))


def upsample_heatmap(heatmap: Tensor, height: int, width: int) -> Tensor:
    """``[g, g]`` map -> ``[height, width]``, bicubic as in ALBEF's ``grounding_eval``."""
    return F.interpolate(heatmap[None, None].float(), size=(height, width), mode="bicubic",
                         align_corners=False)[0, 0]


def score_boxes(heatmap: Tensor, boxes: Tensor, alpha: float = 0.5) -> Tensor:
    """Score ``[K, 4]`` boxes ``[x, y, w, h]`` on an image-sized ``[H, W]`` heat map.

    A box covers rows ``int(y):int(y + h)`` and columns ``int(x):int(x + w)`` (ALBEF's slice);
    its score is the heat summed there divided by ``(w * h) ** alpha``. All boxes are summed
    at once from a summed-area table.

    Returns:
        Tensor: ``[K]`` scores.
    """
    height, width = heatmap.shape
    table = F.pad(heatmap.double().cumsum(0).cumsum(1), (1, 0, 1, 0))  # [H + 1, W + 1]
    boxes = boxes.double()
    x0 = boxes[:, 0].long().clamp(0, width)
    y0 = boxes[:, 1].long().clamp(0, height)
    x1 = (boxes[:, 0] + boxes[:, 2]).long().clamp(0, width)
    y1 = (boxes[:, 1] + boxes[:, 3]).long().clamp(0, height)
    x1, y1 = torch.maximum(x1, x0), torch.maximum(y1, y0)
    total = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    area = (boxes[:, 2] * boxes[:, 3]).clamp(min=1e-12)
    return (total / area**alpha).float()


def grounding_accuracy(
    heatmap: Tensor,
    image_size: Sequence[int],
    detections: Tensor,
    gt_box: Tensor,
    alpha: float = 0.5,
    iou_threshold: float = 0.5,
) -> bool:
    """Whether the best-scored detection of one expression hits the ground truth.

    Args:
        heatmap (Tensor): ``[g, g]`` Grad-CAM map.
        image_size (Sequence[int]): ``(width, height)`` of the original image (the boxes' frame).
        detections (Tensor): ``[K, 4]`` candidate boxes ``[x, y, w, h]``.
        gt_box (Tensor): ``[4]`` ground-truth box ``[x, y, w, h]``.
        alpha (float): area exponent of the box score.
        iou_threshold (float): IoU needed to count as correct.

    Returns:
        bool: ``IoU(best detection, gt) >= iou_threshold``.
    """
    width, height = image_size
    scores = score_boxes(upsample_heatmap(heatmap, height, width), detections, alpha)
    best = detections[scores.argmax()]
    return bool(box_iou_xywh(best[None], gt_box[None])[0, 0] >= iou_threshold)


class GroundingTargets(NamedTuple):
    """Ground truth and detections of one evaluation file, checked against its records.

    Attributes:
        ann_file (Path): the referring-expression file.
        gt_boxes (Dict[int, Tensor]): ref_id -> ``[4]`` box ``[x, y, w, h]``.
        detections (Dict[int, Tensor]): ref_id -> ``[K, 4]`` boxes of its image.
        image_sizes (Dict[int, tuple]): ref_id -> ``(width, height)`` of its image.
        groups (Dict[int, str]): ref_id -> the split it is counted in (the ground truth's
            ``split`` when given, as in RefCOCO+'s combined test file, else the file's name).
        group_names (List[str]): the distinct groups, in order of first appearance.
    """

    ann_file: Path
    gt_boxes: Dict[int, Tensor]
    detections: Dict[int, Tensor]
    image_sizes: Dict[int, tuple]
    groups: Dict[int, str]
    group_names: List[str]


def _read_json(path: PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def _box(value: Any, where: str) -> List[float]:
    if not (isinstance(value, (list, tuple)) and len(value) >= 4 and all(isinstance(v, (int, float)) for v in value[:4])):
        raise ValueError(f"{where}: expected a box [x, y, w, h], got {value!r:.80}")
    return [float(v) for v in value[:4]]


def _check_inside(box: List[float], size: tuple, where: str, tolerance: float = 1.0) -> None:
    x, y, w, h = box
    width, height = size
    if w <= 0 or h <= 0 or x < -tolerance or y < -tolerance or x + w > width + tolerance or y + h > height + tolerance:
        raise ValueError(f"{where}: box [x, y, w, h] = {box} does not lie inside its {width}x{height} image")


def load_grounding_targets(
    ann_file: PathLike,
    records: Sequence[Mapping[str, Any]],
    gt_file: PathLike,
    dets_file: PathLike,
    image_root: PathLike,
    name: str,
) -> GroundingTargets:
    """Join an evaluation file's records with their ground truth and detections, and check them.

    Files: ``gt_file`` maps ``str(ref_id)`` to ``{"image": key, "bbox": [x, y, w, h]}`` (plus an
    optional ``"split"``); ``dets_file`` maps an image key to its detected boxes
    ``[[x, y, w, h, ...], ...]`` (ALBEF's ``dets.json``, keyed there by COCO image id). The
    shapes world writes both (``grounding_gt.json``, ``grounding_dets.json``);
    :func:`refer_ground_truth` builds the ground truth of RefCOCO+.

    Args:
        ann_file (PathLike): the evaluation file (for messages).
        records (Sequence[Mapping[str, Any]]): its records ``{image, text, ref_id}``.
        gt_file, dets_file (PathLike): ground truth and detections.
        image_root (PathLike): where the records' images are (their sizes are read).
        name (str): the split name of the file.

    Raises:
        ValueError: a ref_id without ground truth, an image without detections, a malformed
            box, or a box outside its image; the message names the file and record.
    """
    ann_file, image_root = Path(ann_file), Path(image_root)
    gt, dets = _read_json(gt_file, "grounding ground-truth"), _read_json(dets_file, "grounding detections")
    sizes: Dict[str, tuple] = {}
    out = GroundingTargets(ann_file, {}, {}, {}, {}, [])
    for i, rec in enumerate(records):
        ref_id = rec["ref_id"]
        where = f"{ann_file}: record {i} (ref_id {ref_id})"
        truth = gt.get(str(ref_id))
        if truth is None:
            raise ValueError(f"{where} has no ground truth in {gt_file}")
        if not isinstance(truth, Mapping) or "bbox" not in truth or "image" not in truth:
            raise ValueError(f"{gt_file}: entry {ref_id!r} must be an object with 'image' and 'bbox' keys")
        key = str(truth["image"])
        boxes = dets.get(key)
        if not boxes:
            raise ValueError(f"{where}: image {key!r} has no detections in {dets_file}")
        if rec["image"] not in sizes:
            path = image_root / rec["image"]
            try:
                with Image.open(path) as img:  # reads the header only
                    sizes[rec["image"]] = img.size
            except FileNotFoundError as e:
                raise FileNotFoundError(f"image not found: {path} ({where})") from e
        size = sizes[rec["image"]]
        gt_box = _box(truth["bbox"], f"{gt_file}: ref_id {ref_id} 'bbox'")
        _check_inside(gt_box, size, f"{gt_file}: ref_id {ref_id} (image {rec['image']})")
        det_boxes = [_box(b, f"{dets_file}: image {key!r} box {k}") for k, b in enumerate(boxes)]
        for k, b in enumerate(det_boxes):
            _check_inside(b, size, f"{dets_file}: image {key!r} box {k} (for {where})")
        ref_id = int(ref_id)
        out.gt_boxes[ref_id] = torch.tensor(gt_box)
        out.detections[ref_id] = torch.tensor(det_boxes)
        out.image_sizes[ref_id] = size
        group = str(truth.get("split", name))
        out.groups[ref_id] = group
        if group not in out.group_names:
            out.group_names.append(group)
    return out


def evaluate_grounding(
    model: Any,
    loader: Iterable[Mapping[str, Tensor]],
    targets: GroundingTargets,
    *,
    layer: int,
    device: torch.device,
    alpha: float = 0.5,
    iou_threshold: float = 0.5,
    precision_ctx: Optional[Callable[[], ContextManager]] = None,
) -> Dict[str, Dict[str, float]]:
    """Grad-CAM grounding accuracy of ``model`` over ``loader``, per group, summed over ranks.

    Each rank passes its own disjoint shard of the evaluation file (a single process passes all
    of it); ``batch["idx"]`` holds the ref_ids (``GroundingDataset(split="test")`` with
    ``RetrievalCollator``).

    Returns:
        Dict[str, Dict[str, float]]: group -> ``{"acc": %, "num_refs": n}``.
    """
    precision_ctx = precision_ctx or contextlib.nullcontext
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(targets.group_names), 2, dtype=torch.float64)  # correct, total
    for batch in loader:
        with precision_ctx():
            cams = itm_gradcam(model, batch["image"].to(device), batch["input_ids"].to(device),
                               batch["attention_mask"].to(device), layer).maps.cpu()
        for cam, ref_id in zip(cams, batch["idx"].tolist()):
            hit = grounding_accuracy(cam, targets.image_sizes[ref_id], targets.detections[ref_id],
                                     targets.gt_boxes[ref_id], alpha, iou_threshold)
            row = targets.group_names.index(targets.groups[ref_id])
            counts[row, 0] += hit
            counts[row, 1] += 1
    model.train(was_training)
    counts = all_reduce_sum(counts.to(device)).cpu()
    return {
        group: {"acc": 100.0 * correct / max(total, 1.0), "num_refs": total}
        for group, (correct, total) in zip(targets.group_names, counts.tolist())
    }


def refer_ground_truth(refs_file: PathLike, instances_file: PathLike) -> Dict[str, Dict[str, Any]]:
    """The ground-truth file of RefCOCO / RefCOCO+ from the REFER toolkit's data.

    Args:
        refs_file (PathLike): ``refcoco+/refs(unc).p`` (a pickled list of refs with ``ref_id``,
            ``ann_id``, ``image_id``, ``split``).
        instances_file (PathLike): ``refcoco+/instances.json`` (COCO annotations with ``bbox``).

    Returns:
        Dict[str, Dict[str, Any]]: ``str(ref_id) -> {"image": str(image_id), "bbox", "split"}``
        (``image`` keys ALBEF's ``dets.json``); write it with ``json.dump``.
    """
    with open(refs_file, "rb") as f:
        refs = pickle.load(f)  # the REFER toolkit's own format
    boxes = {ann["id"]: ann["bbox"] for ann in _read_json(instances_file, "COCO instances")["annotations"]}
    return {
        str(ref["ref_id"]): {"image": str(ref["image_id"]), "bbox": boxes[ref["ann_id"]], "split": ref["split"]}
        for ref in refs
    }


def word_maps(token_maps: Tensor, tokenizer: Any, text: str) -> tuple[List[str], Tensor]:
    """Per-word Grad-CAM maps of one expression: each word's WordPiece maps averaged.

    Args:
        token_maps (Tensor): ``[L, g, g]`` maps of one pair (CLS first), from
            :attr:`GradCAMOutput.token_maps` of ``text`` tokenised with ``tokenizer``.
        tokenizer: the tokenizer that produced the ids (``tokenize`` splits one word).
        text (str): the (cleaned) text; words are split on whitespace.

    Returns:
        Tuple of the words (those that fit in ``L - 2`` tokens) and their maps ``[W, g, g]``.
    """
    words, maps, start = [], [], 1  # token 0 is CLS
    for word in text.split():
        pieces = len(tokenizer.tokenize(word))
        if pieces == 0 or start + pieces > token_maps.size(0) - 1:  # nothing left but SEP
            break
        words.append(word)
        maps.append(token_maps[start : start + pieces].mean(dim=0))
        start += pieces
    if not maps:
        raise ValueError(f"no word of {text!r} fits the {token_maps.size(0)} token maps")
    return words, torch.stack(maps)
