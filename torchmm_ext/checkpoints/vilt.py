"""ViLT checkpoints: the original layout (dandelin/ViLT Lightning ``.ckpt``, ``state_dict``), the
Hugging Face layout (``dandelin/vilt-*``: ``ViltModel`` / ``ViltFor*``) and ours
(:mod:`torchmm_ext.models.vilt`), converted both ways by pure functions of a state dict.

Our keys (task models; a bare ``ViltModel`` has them without ``vilt.``)::

    vilt.text_embeddings.{word,position,token_type}_embeddings.weight, .layer_norm.*
    vilt.image_embeddings.patch_embeddings.{cls_token, position_embeddings, conv_projection.*}
    vilt.modality_embeddings.weight
    vilt.blocks.N.{attention.input_proj (packed qkv), attention.output_proj, attention_layernorm,
        feedforward.model.{0,3}, feedforward_layernorm}
    vilt.norm.*, vilt.pooler.dense.*
    itm_head.*, mlm_head.{dense, layer_norm, decoder.weight, decoder.bias, bias},
    classifier.{0,1,3}.* (VQA and NLVR2), rank_output.*

:func:`load_pretrained` detects the three layouts (``vilt``, ``hf_vilt``, ``torchmm_ext_vilt``).
Task starting points as ViLT builds them: :func:`vilt_nlvr_checkpoint` (a third modality row
copied from the image row) and :func:`vilt_retrieval_checkpoint` (``rank_output`` from the ITM
"match" row); both also read a Hugging Face model directory.

:func:`encoders_to_vilt` maps unimodal encoders in our layout (a ViT's ``vision_encoder.*``, a
BERT's ``text_encoder.embeddings.*``) onto ViLT, the way ViLT starts from an ImageNet ViT;
``load_pretrained(..., part="vision" | "text")`` uses it.
"""

import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Set, Tuple, Union

import torch
from torch import nn, Tensor

from torchmm_ext.checkpoints.convert import Conversion
from torchmm_ext.checkpoints.primitives import load_state_dict_file, merge_qkv, split_qkv, StateDict

__all__ = [
    "VILT_LAYOUTS",
    "encoders_to_vilt",
    "hf_vilt_to_torchmm_ext",
    "load_vilt_state_dict",
    "torchmm_ext_to_hf_vilt",
    "torchmm_ext_to_vilt",
    "vilt_checkpoint",
    "vilt_conversion",
    "vilt_nlvr_checkpoint",
    "vilt_retrieval_checkpoint",
    "vilt_to_torchmm_ext",
]

#: Layouts this module converts, with a one-line description each (see ``KNOWN_LAYOUTS``).
VILT_LAYOUTS: Mapping[str, str] = {
    "vilt": "dandelin/ViLT (text_embeddings.*, token_type_embeddings, transformer.blocks.N.attn.qkv, heads)",
    "hf_vilt": "Hugging Face ViLT ([vilt.]embeddings.text_embeddings.*, encoder.layer.N.attention.attention.query)",
    "torchmm_ext_vilt": "this library's ViLT (vilt.image_embeddings.*, vilt.blocks.N.attention.input_proj)",
}

_OUR_QKV = "attention.input_proj"


def _wb(renames: Mapping[str, str]) -> Dict[str, str]:
    return {f"{s}.{p}": f"{d}.{p}" for s, d in renames.items() for p in ("weight", "bias")}


_IMG = "vilt.image_embeddings.patch_embeddings."
# original key -> our key (layers and qkv are handled apart)
_ORIGINAL_TOP: Dict[str, str] = {
    "text_embeddings.word_embeddings.weight": "vilt.text_embeddings.word_embeddings.weight",
    "text_embeddings.position_embeddings.weight": "vilt.text_embeddings.position_embeddings.weight",
    "text_embeddings.token_type_embeddings.weight": "vilt.text_embeddings.token_type_embeddings.weight",
    "token_type_embeddings.weight": "vilt.modality_embeddings.weight",
    "transformer.cls_token": _IMG + "cls_token",
    "transformer.pos_embed": _IMG + "position_embeddings",
    **_wb({
        "text_embeddings.LayerNorm": "vilt.text_embeddings.layer_norm",
        "transformer.patch_embed.proj": _IMG + "conv_projection",
        "transformer.norm": "vilt.norm",
        "pooler.dense": "vilt.pooler.dense",
        "itm_score.fc": "itm_head",
        "rank_output": "rank_output",
        "mlm_score.transform.dense": "mlm_head.dense",
        "mlm_score.transform.LayerNorm": "mlm_head.layer_norm",
    }),
    "mlm_score.decoder.weight": "mlm_head.decoder.weight",
    "mlm_score.bias": "mlm_head.bias",
}
_ORIGINAL_BLOCK = _wb({
    "norm1": "attention_layernorm",
    "attn.qkv": _OUR_QKV,
    "attn.proj": "attention.output_proj",
    "norm2": "feedforward_layernorm",
    "mlp.fc1": "feedforward.model.0",
    "mlp.fc2": "feedforward.model.3",
})
_HF_TOP: Dict[str, str] = {
    "vilt.embeddings.text_embeddings.word_embeddings.weight": "vilt.text_embeddings.word_embeddings.weight",
    "vilt.embeddings.text_embeddings.position_embeddings.weight": "vilt.text_embeddings.position_embeddings.weight",
    "vilt.embeddings.text_embeddings.token_type_embeddings.weight": "vilt.text_embeddings.token_type_embeddings.weight",
    "vilt.embeddings.token_type_embeddings.weight": "vilt.modality_embeddings.weight",
    "vilt.embeddings.cls_token": _IMG + "cls_token",
    "vilt.embeddings.position_embeddings": _IMG + "position_embeddings",
    **_wb({
        "vilt.embeddings.text_embeddings.LayerNorm": "vilt.text_embeddings.layer_norm",
        "vilt.embeddings.patch_embeddings.projection": _IMG + "conv_projection",
        "vilt.layernorm": "vilt.norm",
        "vilt.pooler.dense": "vilt.pooler.dense",
        "rank_output": "rank_output",
        "mlm_score.transform.dense": "mlm_head.dense",
        "mlm_score.transform.LayerNorm": "mlm_head.layer_norm",
    }),
    "mlm_score.decoder.weight": "mlm_head.decoder.weight",
    "mlm_score.decoder.bias": "mlm_head.bias",
}
_HF_BLOCK = _wb({
    "layernorm_before": "attention_layernorm",
    "attention.output.dense": "attention.output_proj",
    "layernorm_after": "feedforward_layernorm",
    "intermediate.dense": "feedforward.model.0",
    "output.dense": "feedforward.model.3",
})
_HF_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_CLASSIFIER = {f"{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}


def _layers(src: Mapping[str, Tensor], prefix: str) -> List[int]:
    return sorted({int(m.group(1)) for k in src for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m})


def _convert(
    src: Mapping[str, Tensor],
    top: Mapping[str, str],
    block_prefix: str,
    block: Mapping[str, str],
    qkv: Optional[Tuple[str, str, str]],
    classifiers: Mapping[str, str],
) -> Tuple[StateDict, Set[str]]:
    """Renames ``src`` into our layout; returns the converted dict and the source keys used."""
    out: StateDict = {}
    used: Set[str] = set()
    for theirs, ours in top.items():
        if theirs in src:
            out[ours] = src[theirs]
            used.add(theirs)
    for n in _layers(src, block_prefix):
        base, dst = f"{block_prefix}{n}.", f"vilt.blocks.{n}."
        for sub, ours in block.items():
            if base + sub in src:
                out[dst + ours] = src[base + sub]
                used.add(base + sub)
        for p in ("weight", "bias") if qkv else ():
            parts = [f"{base}{name}.{p}" for name in qkv]
            if all(k in src for k in parts):
                out[f"{dst}{_OUR_QKV}.{p}"] = merge_qkv(*(src[k] for k in parts))
                used.update(parts)
    for theirs, ours in classifiers.items():
        for sub in _CLASSIFIER:
            if f"{theirs}.{sub}" in src:
                out[f"{ours}.{sub}"] = src[f"{theirs}.{sub}"]
                used.add(f"{theirs}.{sub}")
    if "mlm_head.bias" in out:  # our MaskedPredictionHead stores the bias twice (decoder.bias is the same tensor)
        out["mlm_head.decoder.bias"] = out["mlm_head.bias"]
    return out, used


def vilt_conversion(state_dict: Mapping[str, Tensor], *, layout: str = "vilt") -> Conversion:
    """An original-ViLT (``layout="vilt"``), Hugging Face (``"hf_vilt"``) or our
    (``"torchmm_ext_vilt"``) ViLT state dict -> our layout, with the ignored keys and notes.

    The original ``vqa_classifier`` and ``nlvr2_classifier`` (HF: ``classifier``) both become
    ``classifier``; ``text_embeddings.position_ids`` buffers and heads we do not have (``mpp_score``,
    ``transformer.head``) are ignored. An NLVR2 file's 3-row modality embedding is kept as is.
    """
    if layout == "torchmm_ext_vilt":
        return Conversion(dict(state_dict), [], [])
    if layout == "vilt":
        out, used = _convert(state_dict, _ORIGINAL_TOP, "transformer.blocks.", _ORIGINAL_BLOCK, None,
                             {"vqa_classifier": "classifier", "nlvr2_classifier": "classifier"})
    elif layout == "hf_vilt":
        # a bare ViltModel has no "vilt." prefix
        src = {(k if k.startswith(("vilt.", "classifier.", "rank_output.", "mlm_score.")) else "vilt." + k): v
               for k, v in state_dict.items()}
        back = {(k if k.startswith(("vilt.", "classifier.", "rank_output.", "mlm_score.")) else "vilt." + k): k
                for k in state_dict}
        out, used = _convert(src, _HF_TOP, "vilt.encoder.layer.", _HF_BLOCK, _HF_QKV, {"classifier": "classifier"})
        used = {back[k] for k in used}
    else:
        raise ValueError(f"not a ViLT layout: {layout!r}; known: {', '.join(VILT_LAYOUTS)}")
    notes = []
    if "mlm_head.bias" in out:
        notes.append("mlm_head: the decoder bias is the checkpoint's MLM bias (one tensor, as in ViLT)")
    return Conversion(out, sorted(set(state_dict) - used), notes)


def vilt_to_torchmm_ext(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Original ViLT ``state_dict`` (a Lightning ``.ckpt``'s) -> our layout."""
    return vilt_conversion(state_dict, layout="vilt").state_dict


def hf_vilt_to_torchmm_ext(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Hugging Face ViLT (``ViltModel`` or a ``ViltFor*`` task model) -> our layout."""
    return vilt_conversion(state_dict, layout="hf_vilt").state_dict


def _classifier_name(state_dict: Mapping[str, Tensor], width: int) -> str:
    """``nlvr2_classifier`` when the classifier reads two pooled outputs, else ``vqa_classifier``."""
    return "nlvr2_classifier" if state_dict["classifier.0.weight"].shape[1] == 2 * width else "vqa_classifier"


def _export(state_dict: Mapping[str, Tensor], top: Mapping[str, str], block_prefix: str,
            block: Mapping[str, str], qkv: Optional[Tuple[str, str, str]]) -> Tuple[StateDict, Set[str]]:
    src = dict(state_dict)
    out: StateDict = {}
    used: Set[str] = {"mlm_head.decoder.bias"} if "mlm_head.decoder.bias" in src else set()
    for theirs, ours in top.items():
        if ours in src and theirs not in out:
            out[theirs] = src[ours]
            used.add(ours)
    for n in _layers(src, "vilt.blocks."):
        base, dst = f"vilt.blocks.{n}.", f"{block_prefix}{n}."
        for theirs, ours in block.items():
            if base + ours in src:
                out[dst + theirs] = src[base + ours]
                used.add(base + ours)
        for p in ("weight", "bias") if qkv else ():
            key = f"{base}{_OUR_QKV}.{p}"
            if key in src:
                for name, part in zip(qkv, split_qkv(src[key])):
                    out[f"{dst}{name}.{p}"] = part
                used.add(key)
    return out, used


def torchmm_ext_to_vilt(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Our ViLT -> the original layout (``ViLTransformerSS.state_dict()``), as its
    ``load_state_dict`` reads it: ``classifier`` becomes ``vqa_classifier`` or
    ``nlvr2_classifier`` by its input size, and ``text_embeddings.position_ids`` is added.

    Raises:
        ValueError: a key of ours has no place in the original layout.
    """
    out, used = _export(state_dict, _ORIGINAL_TOP, "transformer.blocks.", _ORIGINAL_BLOCK, None)
    if "classifier.0.weight" in state_dict:
        width = state_dict["vilt.pooler.dense.weight"].shape[0]
        name = _classifier_name(state_dict, width)
        for sub in _CLASSIFIER:
            if f"classifier.{sub}" in state_dict:
                out[f"{name}.{sub}"] = state_dict[f"classifier.{sub}"]
                used.add(f"classifier.{sub}")
    if "vilt.text_embeddings.position_embeddings.weight" in state_dict:
        max_len = state_dict["vilt.text_embeddings.position_embeddings.weight"].shape[0]
        out["text_embeddings.position_ids"] = torch.arange(max_len).unsqueeze(0)
    left = sorted(set(state_dict) - used)
    if left:
        raise ValueError(f"{len(left)} keys have no place in the original ViLT layout: {', '.join(left[:5])}")
    return out


def torchmm_ext_to_hf_vilt(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Our ViLT -> Hugging Face ``ViltFor*`` keys (``classifier``, ``rank_output``,
    ``mlm_score``; the ITM head has no Hugging Face class and is dropped).

    Raises:
        ValueError: another key of ours has no place in the Hugging Face layout.
    """
    out, used = _export(state_dict, _HF_TOP, "vilt.encoder.layer.", _HF_BLOCK, _HF_QKV)
    for sub in _CLASSIFIER:
        if f"classifier.{sub}" in state_dict:
            out[f"classifier.{sub}"] = state_dict[f"classifier.{sub}"]
            used.add(f"classifier.{sub}")
    used |= {k for k in state_dict if k.startswith("itm_head.")}
    left = sorted(set(state_dict) - used)
    if left:
        raise ValueError(f"{len(left)} keys have no place in the Hugging Face ViLT layout: {', '.join(left[:5])}")
    return out


# ---- ViLT from unimodal encoders ------------------------------------------------------------

_VISION_TO_VILT = {
    "vision_encoder.embeddings.cls_token": "image_embeddings.patch_embeddings.cls_token",
    "vision_encoder.embeddings.position_embeddings": "image_embeddings.patch_embeddings.position_embeddings",
    **_wb({"vision_encoder.embeddings.conv_projection": "image_embeddings.patch_embeddings.conv_projection",
           "vision_encoder.norm": "norm"}),
}
_TEXT_TO_VILT = {
    **{f"text_encoder.embeddings.{n}.weight": f"text_embeddings.{n}.weight"
       for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")},
    **_wb({"text_encoder.embeddings.layer_norm": "text_embeddings.layer_norm"}),
}


def encoders_to_vilt(state_dict: Mapping[str, Tensor], prefix: str = "vilt.") -> Conversion:
    """Unimodal encoders in our layout -> ViLT's keys, as ViLT initialises its transformer from a
    ViT (ImageNet ViT-B/32 in the paper; e.g. the ViT of an ALBEF checkpoint on the shapes world).

    * ``vision_encoder.embeddings.{cls_token, position_embeddings, conv_projection}`` ->
      ``image_embeddings.patch_embeddings.*``; ``vision_encoder.blocks.N.*`` -> ``blocks.N.*``
      (the MLP's second Linear, ``feedforward.model.2`` in a dropout-free ViT, is ViLT's
      ``feedforward.model.3``); ``vision_encoder.norm`` -> ``norm`` (timm's final norm, which
      ViLT keeps);
    * ``text_encoder.embeddings.*`` (BERT's word, position, token-type embeddings and LayerNorm)
      -> ``text_embeddings.*``; ViLT has no text layers, so ``text_encoder.encoder.*`` is
      ignored, as is everything else (momentum copies, fusion layers, heads, a CLIP ``pre_norm``).

    Args:
        state_dict (Mapping[str, Tensor]): our keys (e.g. a ``timm_vit`` / ``hf_bert`` conversion,
            or a whole ALBEF checkpoint).
        prefix (str): prefix of ViLT's keys (``"vilt."`` in task models, ``""`` for ``ViltModel``).

    Returns:
        Conversion: ViLT keys, the ignored source keys, notes.
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        if key in _VISION_TO_VILT:
            out[prefix + _VISION_TO_VILT[key]] = value
        elif key in _TEXT_TO_VILT:
            out[prefix + _TEXT_TO_VILT[key]] = value
        else:
            block = re.match(r"vision_encoder\.blocks\.(\d+)\.(.+)$", key)
            if block:
                sub = block.group(2).replace("feedforward.model.2.", "feedforward.model.3.")
                out[f"{prefix}blocks.{block.group(1)}.{sub}"] = value
    ignored = sorted(k for k in state_dict if not (k in _VISION_TO_VILT or k in _TEXT_TO_VILT
                                                   or re.match(r"vision_encoder\.blocks\.\d+\.", k)))
    notes = []
    if any(k.startswith("text_encoder.encoder.") for k in ignored):
        notes.append("text_encoder.encoder.*: not loaded (ViLT has text embeddings only, no text layers)")
    return Conversion(out, ignored, notes)


# ---- task starting points -----------------------------------------------------------------


def load_vilt_state_dict(path: Union[str, Path]) -> StateDict:
    """A checkpoint file, or a Hugging Face model directory (``model.safetensors`` or
    ``pytorch_model.bin``), as a state dict in our layout (any layout ``load_pretrained`` knows)."""
    from torchmm_ext.checkpoints.loading import convert_to_torchmm_ext

    path = Path(path)
    if path.is_dir():
        files = [path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
        if not files:
            raise FileNotFoundError(f"{path} is a directory without model.safetensors or pytorch_model.bin")
        path = files[0]
    return dict(convert_to_torchmm_ext(load_state_dict_file(path)).state_dict)


class _ConvertedStateDict(dict):
    """A state dict converted in memory; load reports name it by its source."""

    def __init__(self, state_dict: Mapping[str, Tensor], description: str) -> None:
        super().__init__(state_dict)
        self.description = description

    def __repr__(self) -> str:
        return self.description


def _needs_memory_copy(path: Union[str, Path]) -> bool:
    return Path(path).is_dir()


def vilt_checkpoint(path: Union[str, Path], model: Optional[nn.Module] = None) -> Union[str, StateDict]:
    """What to load for ``--checkpoint path``: the path itself, or a Hugging Face model
    directory's weights read in memory."""
    return _ConvertedStateDict(load_vilt_state_dict(path), str(path)) if _needs_memory_copy(path) else str(path)


def vilt_nlvr_checkpoint(path: Union[str, Path], model: Optional[nn.Module] = None) -> Union[str, StateDict]:
    """What to load into a ViLT NLVR2 model for ``--checkpoint path``.

    A single-image checkpoint (2 modality rows) gets a third row, a copy of the image row
    (ViLT's ``nlvr2`` set-up: rows [text, image, image]); an NLVR2 checkpoint file is returned
    as its path. A Hugging Face directory is read in memory.
    """
    state = load_vilt_state_dict(path)
    key = "vilt.modality_embeddings.weight"
    if key in state and state[key].shape[0] == 2:
        state[key] = torch.cat([state[key], state[key][1:2]], dim=0)
        return _ConvertedStateDict(state, f"{path} (single-image: modality row 2 copied from row 1)")
    return _ConvertedStateDict(state, str(path)) if _needs_memory_copy(path) else str(path)


def vilt_retrieval_checkpoint(path: Union[str, Path], model: Optional[nn.Module] = None) -> Union[str, StateDict]:
    """What to load into a ViLT retrieval model for ``--checkpoint path``: a checkpoint with an
    ITM head and no ``rank_output`` (pre-training) gets ``rank_output`` = the ITM "match" row, as
    ViLT's IRTR fine-tuning starts; otherwise the path itself (a directory is read in memory)."""
    state = load_vilt_state_dict(path)
    if "itm_head.weight" in state and "rank_output.weight" not in state:
        state["rank_output.weight"] = state["itm_head.weight"][1:].clone()
        state["rank_output.bias"] = state["itm_head.bias"][1:].clone()
        return _ConvertedStateDict(state, f"{path} (rank_output initialised from the ITM match row)")
    return _ConvertedStateDict(state, str(path)) if _needs_memory_copy(path) else str(path)
