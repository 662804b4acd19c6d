"""``load_pretrained``: any supported checkpoint into one of our models, with a report."""

from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

from torch import nn, Tensor

from torchmm_ext.checkpoints.convert import (
    albef_conversion,
    Conversion,
    fill_momentum,
    hf_bert_conversion,
    interpolate_vision_pos_embeds,
    timm_vit_conversion,
    torchmultimodal_conversion,
)
from torchmm_ext.checkpoints.layouts import detect_layout
from torchmm_ext.checkpoints.meter import clip_vision_conversion, meter_conversion, roberta_conversion
from torchmm_ext.checkpoints.vilt import encoders_to_vilt, VILT_LAYOUTS, vilt_conversion
from torchmm_ext.checkpoints.primitives import (
    group_keys,
    interpolate_pos_embed,
    load_state_dict_file,
    PathLike,
    unwrap_state_dict,
)

__all__ = ["CheckpointShapeError", "LoadReport", "convert_to_torchmm_ext", "load_pretrained"]


class CheckpointShapeError(ValueError):
    """A converted checkpoint tensor does not have the model's shape."""


class CheckpointArchitectureError(ValueError):
    """A checkpoint fills too little of the model to be meant for it."""


class LoadReport(NamedTuple):
    """What :func:`load_pretrained` did.

    Attributes:
        layout (str): detected source layout.
        missing (Dict[str, List[str]]): model keys the checkpoint did not fill (they keep their
            initialisation), grouped by module (first two dotted components).
        unexpected (Dict[str, List[str]]): converted keys the model does not have, grouped.
        ignored (List[str]): source keys the converter dropped (MLM head, momentum fusion, ...).
        notes (List[str]): synthesised or changed tensors (momentum copies, interpolation).
        loaded (int): number of model tensors loaded.
    """

    layout: str
    missing: Dict[str, List[str]]
    unexpected: Dict[str, List[str]]
    ignored: List[str]
    notes: List[str]
    loaded: int

    def format(self, max_keys: int = 3) -> str:
        """Human-readable multi-line summary (counts per group and a few example keys)."""
        lines = [f"checkpoint layout: {self.layout}; loaded {self.loaded} tensors"]
        for title, groups in (("missing (kept at initialisation)", self.missing),
                              ("unexpected (not loaded)", self.unexpected)):
            total = sum(len(v) for v in groups.values())
            lines.append(f"{title}: {total}")
            for group, keys in groups.items():
                more = f", ... (+{len(keys) - max_keys})" if len(keys) > max_keys else ""
                lines.append(f"  {group}: {len(keys)} [{', '.join(keys[:max_keys])}{more}]")
        if self.ignored:
            ignored = group_keys(self.ignored)
            lines.append(f"ignored from the checkpoint: {len(self.ignored)}")
            lines.extend(f"  {g}: {len(k)}" for g, k in ignored.items())
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def convert_to_torchmm_ext(
    state_dict: Mapping[str, Tensor],
    *,
    layout: Optional[str] = None,
    image_size: Optional[int] = None,
    fusion_layer: int = 6,
) -> Conversion:
    """Converts a state dict in any known layout to ours.

    Args:
        state_dict (Mapping[str, Tensor]): unwrapped checkpoint tensors.
        layout (Optional[str]): source layout; detected when ``None``.
        image_size (Optional[int]): target image size (position embeddings interpolated).
        fusion_layer (int): for ``hf_bert``: first BERT layer of the fusion encoder.

    Returns:
        Conversion: our keys, ignored source keys and notes.
    """
    layout = layout or detect_layout(state_dict)
    if layout == "torchmm_ext":
        out, notes = dict(state_dict), []  # type: StateDict, List[str]
        interpolate_vision_pos_embeds(out, image_size, notes)
        return Conversion(out, [], notes)
    if layout == "pela":
        from torchmm_ext.checkpoints.pela import pela_conversion

        return pela_conversion(state_dict, image_size=image_size)
    if layout == "albef":
        return albef_conversion(state_dict, image_size=image_size)
    if layout == "torchmultimodal":
        return torchmultimodal_conversion(state_dict, image_size=image_size)
    if layout == "hf_bert":
        return hf_bert_conversion(state_dict, fusion_layer)
    if layout == "timm_vit":
        return timm_vit_conversion(state_dict, image_size=image_size)
    if layout == "meter":
        return meter_conversion(state_dict, image_size=image_size)
    if layout == "clip":
        return clip_vision_conversion(state_dict, image_size=image_size)
    if layout == "roberta":
        return roberta_conversion(state_dict)
    if layout in VILT_LAYOUTS:
        return vilt_conversion(state_dict, layout=layout)
    raise ValueError(f"unknown layout {layout!r}")


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


#: Top-level modules only one model family has: a checkpoint and a model that disagree on the
#: family are different architectures, whatever the tensors' shapes.
_FAMILY_MARKERS = {"ALBEF": ("fusion_encoder.",), "METER": ("text_fusion.", "image_fusion."), "ViLT": ("vilt.",)}


def _family(keys: List[str]) -> Optional[str]:
    for family, markers in _FAMILY_MARKERS.items():
        if any(k.startswith(markers) for k in keys):
            return family
    return None


def _check_family(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], layout: str,
                  origin: object, model: nn.Module) -> None:
    ours, theirs = _family(list(expected)), _family(list(state))
    if ours and theirs and ours != theirs:
        origin = origin if isinstance(origin, (str, Path)) else "the given state dict"
        raise CheckpointArchitectureError(
            f"{origin} ({layout} layout) is a checkpoint of {theirs}, another architecture than "
            f"{type(model).__name__} ({ours}): load a checkpoint of the same architecture"
        )


def _dropped_momentum_notes(unexpected: List[str], expected: Mapping[str, Tensor], layout: str,
                            model_name: str) -> List[str]:
    """Explains each momentum module of the checkpoint that the model has no place for although
    it has the online twin (ALBEF's retrieval, VE and NLVR2 files carry momentum fusion layers,
    ``text_encoder_m`` layers from ``fusion_layer`` on, that our retrieval model never runs)."""
    notes = []
    for module, keys in group_keys(unexpected, depth=1).items():
        online = module[:-2]
        if not module.endswith("_m") or any(k.startswith(module + ".") for k in expected) \
                or not any(k.startswith(online + ".") for k in expected):
            continue
        source = " (ALBEF: text_encoder_m's fusion layers)" if layout == "albef" and module == "fusion_encoder_m" else ""
        export = (f"; an export to the ALBEF layout writes copies of the online {online} in their place"
                  if module == "fusion_encoder_m" else "")
        notes.append(f"{module}{source}: {len(keys)} tensors dropped: {model_name} keeps no momentum copy "
                     f"of {online} (its training never runs one){export}")
    return notes


#: ``part`` of :func:`load_pretrained`: the encoder it takes from a whole-model checkpoint.
PARTS = {"vision": "vision_encoder.", "text": "text_encoder."}
#: Layouts of whole vision-language models (a ``part`` load keeps one encoder of them).
_WHOLE_MODEL_LAYOUTS = ("torchmm_ext", "albef", "pela", "torchmultimodal", "meter")


def _vilt_prefix(expected: Mapping[str, Tensor]) -> Optional[str]:
    """``"vilt."`` (task models) or ``""`` (a bare ``ViltModel``) when the model is ViLT."""
    if any(k.startswith("vilt.blocks.") for k in expected):
        return "vilt."
    if any(k.startswith("image_embeddings.patch_embeddings.") for k in expected):
        return ""
    return None


def _take_part(state: Dict[str, Tensor], ignored: List[str], notes: List[str], part: str,
               expected: Mapping[str, Tensor], layout: str, origin: object
               ) -> Tuple[Dict[str, Tensor], Optional[Tuple[str, ...]]]:
    """One encoder of a converted checkpoint, in the target model's keys.

    Returns the state to load and the model-key prefixes the part fills (``None``: the whole
    model, for an encoder-only file into a model named like ours, e.g. BERT into ALBEF's text
    and fusion layers)."""
    if part not in PARTS:
        raise ValueError(f"part={part!r}: choose one of {sorted(PARTS)} (or None for the whole model)")
    source = PARTS[part]
    if layout in VILT_LAYOUTS:
        raise CheckpointArchitectureError(
            f"{origin} ({layout} layout) is a ViLT checkpoint: it has no separate {part} encoder to take "
            f"(load it whole, as --checkpoint / init.checkpoint)")
    targets: Optional[Tuple[str, ...]] = None
    if layout in _WHOLE_MODEL_LAYOUTS:
        dropped = [k for k in state if not k.startswith(source)]
        if dropped:
            notes.append(f"{part} encoder taken ({source}*); {len(dropped)} other tensors of the checkpoint not used")
            ignored.extend(dropped)
        state = {k: v for k, v in state.items() if k.startswith(source)}
        targets = (source,)
    prefix = _vilt_prefix(expected)
    if prefix is not None:
        conversion = encoders_to_vilt(state, prefix)
        state = dict(conversion.state_dict)
        ignored.extend(conversion.ignored)
        notes.extend(conversion.notes)
        targets = tuple(prefix + t for t in (("image_embeddings.", "blocks.", "norm.") if part == "vision"
                                             else ("text_embeddings.",)))
    for key, value in list(state.items()):
        # a BERT position table (512) into a shorter one (ViLT: 40): its first rows
        if key.endswith("embeddings.position_embeddings.weight") and key in expected and value.dim() == 2 \
                and value.shape[0] > expected[key].shape[0] and value.shape[1] == expected[key].shape[1]:
            state[key] = value[: expected[key].shape[0]]
            notes.append(f"{key}: first {expected[key].shape[0]} of its {value.shape[0]} positions kept")
    return state, targets


def load_pretrained(
    model: nn.Module,
    path_or_state_dict: Union[PathLike, Mapping[str, Tensor]],
    *,
    image_size: Optional[int] = None,
    layout: Optional[str] = None,
    fusion_layer: int = 6,
    weights_only: bool = True,
    part: Optional[str] = None,
) -> LoadReport:
    """Loads a checkpoint in any known layout (:data:`KNOWN_LAYOUTS`) into ``model``.

    The layout is detected, the tensors converted, momentum modules the checkpoint lacks are
    copied from the online weights, and ViT position embeddings are interpolated to the model's
    patch grid (to ``image_size`` first when given). Every tensor must then have the model's
    shape; missing and unexpected keys are allowed and reported. This is what a recipe's
    ``--checkpoint`` calls.

    Args:
        model (nn.Module): e.g. ``albef_model_for_retrieval(...)`` (DDP wrappers unwrapped).
        path_or_state_dict (Union[PathLike, Mapping[str, Tensor]]): a checkpoint file
            (``.pth``/``.pt``/``.bin``/``.safetensors``, wrapped or bare) or a loaded dict.
        image_size (Optional[int]): interpolate position embeddings for this size; by default
            the model's own grid is used.
        layout (Optional[str]): force a layout instead of detecting it.
        fusion_layer (int): for ``hf_bert`` checkpoints: first BERT layer of the fusion encoder.
        weights_only (bool): ``torch.load`` safe mode.
        part (Optional[str]): ``"vision"`` or ``"text"``: load one encoder (``init.vision`` /
            ``init.text``). Of a whole-model checkpoint (ALBEF, METER) only that encoder is
            taken; an encoder-only file (timm ViT, CLIP, BERT, RoBERTa) loads as it converts.
            Into ViLT the encoders are mapped by
            :func:`~torchmm_ext.checkpoints.vilt.encoders_to_vilt` (a ViT's embeddings, blocks
            and norm; a BERT's embeddings), and a longer text position table keeps its first
            rows. The report's missing keys are those of the part.

    Returns:
        LoadReport

    Raises:
        ValueError: unknown layout (the message lists the known ones) or ``part``.
        CheckpointShapeError: lists every ``key: checkpoint (a, b) vs model (c, d)``.
    """
    model = getattr(model, "module", model)
    if isinstance(path_or_state_dict, (str, Path)):
        source = load_state_dict_file(path_or_state_dict, weights_only=weights_only)
    else:
        source = unwrap_state_dict(path_or_state_dict)
    layout = layout or detect_layout(source)
    if layout == "hf_bert" and any(k.startswith("text_fusion.") for k in model.state_dict()):
        layout = "roberta"  # a bare RoBERTa into METER: every layer is a text-encoder layer
    conversion = convert_to_torchmm_ext(source, layout=layout, image_size=image_size,
                                        fusion_layer=fusion_layer)
    state, notes = dict(conversion.state_dict), list(conversion.notes)
    ignored = list(conversion.ignored)
    expected = model.state_dict()
    targets: Optional[Tuple[str, ...]] = None
    if part is not None:
        state, targets = _take_part(state, ignored, notes, part, expected, layout, path_or_state_dict)
    else:
        _check_family(state, expected, layout, path_or_state_dict, model)
    fill_momentum(state, notes, wanted=set(expected))

    # Position embeddings follow the model's patch grid, as ALBEF's loading does.
    for key, target in expected.items():
        if key.endswith("embeddings.position_embeddings") and target.dim() == 3 and key in state:
            if state[key].shape != target.shape and state[key].shape[-1] == target.shape[-1]:
                grid = int(round((target.shape[1] - 1) ** 0.5))
                before = _shape(state[key])
                state[key] = interpolate_pos_embed(state[key], grid)
                notes.append(f"{key}: interpolated {before} -> {_shape(state[key])} to the model's grid")

    from torchmm_ext.checkpoints.pela import check_low_rank_fit

    origin = str(path_or_state_dict) if isinstance(path_or_state_dict, (str, Path)) else "the checkpoint"
    low_rank_problems = check_low_rank_fit(state, expected, origin)
    if low_rank_problems:
        raise CheckpointShapeError(
            f"{len(low_rank_problems)} layer(s) of the {layout} checkpoint have another low-rank structure than "
            f"{type(model).__name__}:\n  " + "\n  ".join(low_rank_problems[:5])
            + (f"\n  ... (+{len(low_rank_problems) - 5})" if len(low_rank_problems) > 5 else ""))
    mismatches = [
        f"{k}: checkpoint {_shape(state[k])} vs model {_shape(v)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if mismatches:
        raise CheckpointShapeError(
            f"{len(mismatches)} tensor(s) of the {layout} checkpoint do not fit "
            f"{type(model).__name__}:\n  " + "\n  ".join(mismatches)
        )
    missing = [k for k in expected if k not in state and (targets is None or k.startswith(targets))]
    unexpected = [k for k in state if k not in expected]
    notes.extend(_dropped_momentum_notes(unexpected, expected, layout, type(model).__name__))
    # A whole-model layout that fills under half of the model is another architecture (or
    # preset); loading it silently would train from scratch. Encoder-only layouts (hf_bert,
    # timm_vit) fill one part by design, but must fill something.
    whole_model = layout in ("torchmm_ext", "albef", "pela", "torchmultimodal", "meter", *VILT_LAYOUTS)
    loaded = len([k for k in state if k in expected])
    if loaded == 0 or (whole_model and part is None and loaded < 0.5 * len(expected)):
        origin = path_or_state_dict if isinstance(path_or_state_dict, (str, Path)) else "the given state dict"
        raise CheckpointArchitectureError(
            f"{origin} ({layout} layout) fills only {loaded} of the {len(expected)} tensors of "
            f"{type(model).__name__}: is it a checkpoint of another architecture or preset?\n"
            "  missing: " + ", ".join(f"{g} ({len(k)})" for g, k in group_keys(missing).items())
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return LoadReport(
        layout=layout,
        missing=group_keys(missing),
        unexpected=group_keys(unexpected),
        ignored=ignored,
        notes=notes,
        loaded=loaded,
    )
