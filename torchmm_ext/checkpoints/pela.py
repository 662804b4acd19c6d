"""PELA's low-rank checkpoints: ALBEF key names where each factorised Linear ``L`` has
``L.0.weight`` ``[r, in]`` (first factor), ``L.1.weight`` ``[out, r]`` and ``L.1.bias``
(guoyang9/PELA's ``low_rank.pth`` and its fine-tuned files, wrapped in ``{"model": ...}`` or bare).

Conversion reuses the full-rank ALBEF converters twice: once with every factor pair replaced by
its second factor (and bias), once by its first factor. The converters only rename tensors or
concatenate/split them along the output dimension (BERT's query/key/value <-> our packed
``input_proj``), which is exactly what the factors need: the packed layer's first factors stack
into ``0.weight`` ``[3r, in]`` and its second factors into ``1.weight`` ``[3*out, r]``, the
layout of :class:`~torchmm_ext.modules.low_rank.LowRankLinear` with ``chunks=3``.

Also here: the ratio a low-rank file was made with (:func:`infer_low_rank_ratio`), the method
record inferred for a file that carries none (:func:`infer_methods`), and the clear errors when
a low-rank file meets a model of another structure (:func:`check_low_rank_fit`).
"""

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from torchmm_ext.checkpoints.convert import albef_conversion, Conversion, torchmm_ext_to_albef_conversion
from torchmm_ext.checkpoints.primitives import PathLike, StateDict, unwrap_state_dict

__all__ = [
    "check_low_rank_fit",
    "describe_low_rank",
    "factor_pairs",
    "infer_low_rank_ratio",
    "infer_methods",
    "pela_conversion",
    "torchmm_ext_to_pela_conversion",
]


def factor_pairs(state_dict: Mapping[str, Tensor]) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Factorised layers of a state dict: ``{prefix: (first [c*r, in], second [out, r])}`` for
    every ``prefix.0.weight`` with a ``prefix.1.weight`` and no ``prefix.0.bias`` (so the
    ``Sequential(Linear, ReLU, Linear)`` task heads, ``cls_head.0``/``cls_head.2``, are not
    pairs)."""
    pairs = {}
    for key, first in state_dict.items():
        if key.endswith(".0.weight") and first.dim() == 2:
            prefix = key[: -len(".0.weight")]
            second = state_dict.get(f"{prefix}.1.weight")
            if second is not None and second.dim() == 2 and f"{prefix}.0.bias" not in state_dict \
                    and first.shape[0] % second.shape[1] == 0:
                pairs[prefix] = (first, second)
    return pairs


def _split_passes(state_dict: Mapping[str, Tensor]) -> Tuple[StateDict, StateDict]:
    """Two full-rank-looking copies: each pair replaced by its second factor / first factor."""
    pairs = factor_pairs(state_dict)
    second_pass: StateDict = {}
    first_pass: StateDict = {}
    factor_keys = {f"{p}.{s}" for p in pairs for s in ("0.weight", "1.weight", "1.bias")}
    for key, value in state_dict.items():
        if key not in factor_keys:
            second_pass[key] = first_pass[key] = value
    for prefix, (first, second) in pairs.items():
        second_pass[f"{prefix}.weight"], first_pass[f"{prefix}.weight"] = second, first
        bias = state_dict.get(f"{prefix}.1.bias")
        if bias is not None:
            second_pass[f"{prefix}.bias"] = first_pass[f"{prefix}.bias"] = bias
    return second_pass, first_pass


def _join_passes(second: Conversion, first: Conversion) -> Conversion:
    """Pairs back from the two converted passes: a weight whose shape differs between them is a
    factor pair (a rank below ``min(in, out)`` makes the two factors' shapes differ)."""
    a, b = first.state_dict, second.state_dict
    factored = {key[: -len(".weight")] for key, value in b.items()
                if key.endswith(".weight") and key in a and a[key].shape != value.shape}
    out: StateDict = {}
    for key, value in b.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in factored:
            out[key] = value
        elif leaf == "weight":
            out[f"{prefix}.0.weight"], out[f"{prefix}.1.weight"] = a[key], value
        else:  # bias
            out[f"{prefix}.1.bias"] = value
    return Conversion(out, second.ignored, second.notes)


def pela_conversion(state_dict: Mapping[str, Tensor], *, image_size: Optional[int] = None) -> Conversion:
    """PELA (ALBEF names, ``.0``/``.1`` factors) -> our layout with factor pairs.

    Args:
        state_dict (Mapping[str, Tensor]): unwrapped PELA state dict.
        image_size (Optional[int]): target image size (position embeddings interpolated).

    Returns:
        Conversion: our keys (``<layer>.0.weight``, ``<layer>.1.weight``, ``<layer>.1.bias``).
    """
    second, first = _split_passes(state_dict)
    return _join_passes(albef_conversion(second, image_size=image_size),
                        albef_conversion(first, image_size=image_size))


def torchmm_ext_to_pela_conversion(state_dict: Mapping[str, Tensor]) -> Conversion:
    """Our low-rank state dict -> PELA's layout (ALBEF names with factor pairs)."""
    second, first = _split_passes(state_dict)
    return _join_passes(torchmm_ext_to_albef_conversion(second), torchmm_ext_to_albef_conversion(first))


def _ratio_interval(first: Tensor, second: Tensor) -> Tuple[float, float]:
    """Ratios ``k`` with ``floor(in*out_c / (k*(in+out_c))) == r``: the interval ``(lo, hi]``."""
    rank, in_features = second.shape[1], first.shape[1]
    chunks = first.shape[0] // rank
    out_c = second.shape[0] // chunks
    x = in_features * out_c / (in_features + out_c)
    return x / (rank + 1), x / rank


def infer_low_rank_ratio(state_dict: Mapping[str, Tensor]) -> Optional[float]:
    """The ratio of PELA's rank rule that gives every factor pair of ``state_dict`` its rank:
    the simplest number (integers, then halves, then one and two decimals) in the intersection
    of the pairs' intervals; ``None`` without pairs or when no single ratio fits (a fixed
    ``rank``, for example)."""
    pairs = factor_pairs(state_dict)
    if not pairs:
        return None
    lo, hi = 1.0, math.inf
    for first, second in pairs.values():
        a, b = _ratio_interval(first, second)
        lo, hi = max(lo, a), min(hi, b)
    if not lo < hi:
        return None
    for step in (1.0, 0.5, 0.1, 0.01):
        candidate = math.floor(lo / step + 1) * step
        if lo < candidate <= hi:
            return round(candidate, 2)
    return round((lo + hi) / 2, 4)


def describe_low_rank(state_dict: Mapping[str, Tensor]) -> Optional[str]:
    """One line for ``inspect``: factor pairs, ranks and the inferred ratio (``None`` if none)."""
    pairs = factor_pairs(state_dict)
    if not pairs:
        return None
    ranks = sorted({second.shape[1] for _, second in pairs.values()})
    ratio = infer_low_rank_ratio(state_dict)
    ratio_text = f"ratio {ratio:g}" if ratio is not None else "no single ratio (fixed ranks?)"
    return f"low-rank (PELA): {len(pairs)} factorised layers, ranks {ranks[0]}..{ranks[-1]}, {ratio_text}"


def infer_methods(path_or_state_dict: Union[PathLike, Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The method record of a checkpoint that has factor pairs but no ``"methods"`` entry (a
    published PELA file): ``{"low_rank": {"ratio": r, "init": "none"}}`` (the defaults of
    :func:`~torchmm_ext.modules.low_rank.apply_low_rank` otherwise); ``{}`` without pairs.
    Only the tensor shapes are read (memory-mapped)."""
    if isinstance(path_or_state_dict, (str, Path)):
        path = Path(path_or_state_dict)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:  # shapes only
                state = {k: f.get_slice(k) for k in f.keys()}
                shapes = {k: torch.empty(s.get_shape(), device="meta") for k, s in state.items()}
            state_dict = shapes
        else:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            state_dict = unwrap_state_dict(loaded)
    else:
        state_dict = unwrap_state_dict(path_or_state_dict)
    if not factor_pairs(state_dict):
        return {}
    ratio = infer_low_rank_ratio(state_dict)
    if ratio is None:
        raise ValueError(
            f"{path_or_state_dict if isinstance(path_or_state_dict, (str, Path)) else 'the checkpoint'} "
            "is low-rank but no single ratio gives its ranks and it has no 'methods' record: "
            "save it with the record (checkpoints written by this library have one)"
        )
    return {"low_rank": {"ratio": ratio, "init": "none"}}


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_low_rank_fit(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], origin: str) -> List[str]:
    """Problems of a (converted) state dict whose low-rank structure differs from the model's,
    each naming the key, both shapes and the setting to change; ``[]`` when they agree.

    Args:
        state (Mapping[str, Tensor]): the checkpoint in our layout.
        expected (Mapping[str, Tensor]): the model's ``state_dict()``.
        origin (str): the file (for the messages).
    """
    problems: List[str] = []
    theirs, ours = factor_pairs(state), factor_pairs(expected)
    file_ratio, model_ratio = infer_low_rank_ratio(state), infer_low_rank_ratio(expected)
    for prefix, (first, second) in theirs.items():
        if prefix in ours:
            if ours[prefix][0].shape != first.shape or ours[prefix][1].shape != second.shape:
                problems.append(
                    f"{prefix}.0.weight: checkpoint {_shape(first)} vs model {_shape(ours[prefix][0])} "
                    f"(rank {second.shape[1]} vs {ours[prefix][1].shape[1]}): {origin} is low-rank at ratio "
                    f"{file_ratio}, the model at {model_ratio}; set low_rank.ratio={file_ratio}")
        elif f"{prefix}.weight" in expected:
            full = expected[f"{prefix}.weight"]
            problems.append(
                f"{prefix}: checkpoint factors {_shape(first)} x {_shape(second)} vs the model's full-rank "
                f"weight {_shape(full)}: {origin} is low-rank (ratio {file_ratio}); restructure the model "
                f"first: apply_low_rank(model, ratio={file_ratio}, init='none'), or in a recipe set "
                f"low_rank: {{ratio: {file_ratio}}} (prepare_model reads the file's record)")
    for prefix, (first, _) in ours.items():
        if prefix not in theirs and f"{prefix}.weight" in state:
            problems.append(
                f"{prefix}.weight: checkpoint full-rank {_shape(state[prefix + '.weight'])} vs the model's "
                f"factors {_shape(first)}: load a full-rank checkpoint before apply_low_rank (a recipe "
                "applies its low_rank section after loading a file without a low_rank record)")
    return problems
