"""METER's weights in and out: the released METER checkpoints (zdou0830/METER, Lightning
``.ckpt`` whose ``state_dict`` holds ``vit_model.visual.*``, ``text_transformer.*``,
``cross_modal_*``, ``token_type_embeddings`` and the heads), and METER's fresh initialisation from
a CLIP vision tower (OpenAI ``visual.*`` or Hugging Face ``CLIPVisionModel`` layout) and a
Hugging Face RoBERTa.

Our layout (:mod:`torchmm_ext.models.meter`)::

    vision_encoder.embeddings.{cls_token [1,1,D], position_embeddings [1,N,D], conv_projection.weight},
        .pre_norm, .blocks.N.{attention.input_proj (packed qkv), attention.output_proj,
        attention_layernorm, feedforward.model.{0,2}, feedforward_layernorm}, .norm
    text_encoder.embeddings.{word,position,token_type}_embeddings, .layer_norm;
        text_encoder.encoder.layer.N.* (as ALBEF's text encoder)
    text_transform, image_transform, modality_embeddings, {text,image}_fusion.N.* (as ALBEF's
        fusion layers), {text,image}_pooler.dense, heads: itm_head, mlm_head, vqa_head.{0,1,3},
        nlvr_head.{0,1,3}, rank_head

What has no counterpart (reported as ignored, never silently dropped): METER's unused CLIP
text leftovers ``vit_model.positional_embedding`` / ``vit_model.ln_final.*``, RoBERTa's pooler
and ``position_ids`` / ``token_type_ids`` buffers, CLIP's ``proj`` and (for METER's 11-block
encoder) its 12th block, DAS's adapters and gates. Exporting to METER writes everything METER's
model reads; the CLIP text leftovers are not written (their values are unknown and METER's
forward never reads them; its loader is ``strict=False``).
"""

import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Set, Union

import torch
from torch import nn, Tensor

from torchmm_ext.checkpoints.convert import (
    _BERT_EMBEDDINGS,
    _BERT_LAYER,
    _BERT_QKV,
    _bert_import,
    _export_layers,
    _import_flat,
    _import_layers,
    _normalise_bert,
    _numbered,
    _prefixed,
    _sub,
    _wb,
    Conversion,
)
from torchmm_ext.checkpoints.primitives import interpolate_pos_embed, load_state_dict_file, StateDict

__all__ = [
    "clip_vision_conversion",
    "meter_conversion",
    "meter_init_state_dict",
    "meter_nlvr_checkpoint",
    "meter_retrieval_checkpoint",
    "meter_to_torchmm_ext",
    "roberta_conversion",
    "torchmm_ext_to_meter",
    "torchmm_ext_to_meter_conversion",
]

# ---- CLIP vision tower ------------------------------------------------------------------------

_CLIP_OPENAI_TOP = {
    "conv1.weight": "embeddings.conv_projection.weight",
    **_wb({"ln_pre": "pre_norm", "ln_post": "norm"}),
}
_CLIP_OPENAI_BLOCK = {
    "attn.in_proj_weight": "attention.input_proj.weight",
    "attn.in_proj_bias": "attention.input_proj.bias",
    **_wb({
        "attn.out_proj": "attention.output_proj",
        "ln_1": "attention_layernorm",
        "mlp.c_fc": "feedforward.model.0",
        "mlp.c_proj": "feedforward.model.2",
        "ln_2": "feedforward_layernorm",
    }),
}
_CLIP_HF_TOP = {
    "embeddings.patch_embedding.weight": "embeddings.conv_projection.weight",
    **_wb({"pre_layrnorm": "pre_norm", "post_layernorm": "norm"}),
}
_CLIP_HF_BLOCK = _wb({
    "self_attn.out_proj": "attention.output_proj",
    "layer_norm1": "attention_layernorm",
    "mlp.fc1": "feedforward.model.0",
    "mlp.fc2": "feedforward.model.2",
    "layer_norm2": "feedforward_layernorm",
})
_CLIP_HF_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _strip_clip(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The vision tower's keys relative to its root: ``vit_model.visual.`` (METER), ``visual.``
    (OpenAI CLIP), ``vision_model.`` (Hugging Face ``CLIPModel``) or none."""
    for prefix in ("vit_model.visual.", "visual.", "vision_model."):
        if any(k.startswith(prefix) for k in state_dict):
            return _sub(state_dict, prefix)
    return dict(state_dict)


def clip_vision_conversion(
    state_dict: Mapping[str, Tensor],
    *,
    image_size: Optional[int] = None,
    prefix: str = "vision_encoder.",
) -> Conversion:
    """A CLIP vision tower -> our :class:`~torchmm_ext.modules.vision_transformer.VisionTransformer`
    with CLIP's options (METER's image encoder).

    Accepts OpenAI's layout (``[visual.]conv1``, ``class_embedding``, ``positional_embedding``,
    ``ln_pre``, ``transformer.resblocks.N.{attn.in_proj_*, attn.out_proj, ln_1, mlp.c_fc,
    mlp.c_proj, ln_2}``, ``ln_post``, ``proj``; a whole CLIP file's text tower is ignored) and
    Hugging Face's (``[vision_model.]embeddings.{patch_embedding, class_embedding,
    position_embedding}``, ``pre_layrnorm``, ``encoder.layers.N.{self_attn.{q,k,v,out}_proj,
    layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}``, ``post_layernorm``). Every block is converted:
    a model with fewer blocks (METER builds 11 of 12) reports the rest as unexpected.

    Args:
        state_dict (Mapping[str, Tensor]): CLIP weights.
        image_size (Optional[int]): position embeddings resized (bicubic, as METER's
            ``adapt_position_encoding``) to this image size's grid.
        prefix (str): prefix of our keys (``""`` for a bare encoder).

    Returns:
        Conversion
    """
    src = _strip_clip(state_dict)
    back = {k: k for k in state_dict}
    for p in ("vit_model.visual.", "visual.", "vision_model."):
        back.update({k[len(p):]: k for k in state_dict if k.startswith(p)})
    out: StateDict = {}
    used: Set[str] = set()
    notes: List[str] = []
    if "conv1.weight" in src:  # OpenAI
        _import_flat(src, _CLIP_OPENAI_TOP, prefix, out, used)
        _import_layers(src, "transformer.resblocks.", _numbered(f"{prefix}blocks."), _CLIP_OPENAI_BLOCK,
                       None, out, used)
        cls_key, pos_key = "class_embedding", "positional_embedding"
    elif "embeddings.patch_embedding.weight" in src:  # Hugging Face
        _import_flat(src, _CLIP_HF_TOP, prefix, out, used)
        _import_layers(src, "encoder.layers.", _numbered(f"{prefix}blocks."), _CLIP_HF_BLOCK, _CLIP_HF_QKV,
                       out, used)
        cls_key, pos_key = "embeddings.class_embedding", "embeddings.position_embedding.weight"
    else:
        raise ValueError("not a CLIP vision tower: neither conv1.weight (OpenAI) nor "
                         "embeddings.patch_embedding.weight (Hugging Face) found; first keys: "
                         + ", ".join(list(state_dict)[:5]))
    if cls_key in src:
        out[f"{prefix}embeddings.cls_token"] = src[cls_key].reshape(1, 1, -1)
        used.add(cls_key)
    if pos_key in src:
        out[f"{prefix}embeddings.position_embeddings"] = src[pos_key].unsqueeze(0)
        used.add(pos_key)
    key, conv = f"{prefix}embeddings.position_embeddings", f"{prefix}embeddings.conv_projection.weight"
    if image_size is not None and key in out and conv in out:
        before = tuple(out[key].shape)
        out[key] = interpolate_pos_embed(out[key], image_size // out[conv].shape[-1])
        if tuple(out[key].shape) != before:
            notes.append(f"{key}: resized bicubically {before} -> {tuple(out[key].shape)} for {image_size} px")
    ignored = sorted(back.get(k, k) for k in set(src) - used)
    # The CLIP text tower of a whole OpenAI file is not a vision weight: say so once.
    text_tower = [k for k in state_dict if not k.startswith(("visual.", "vit_model.visual.", "vision_model."))]
    if len(src) != len(state_dict) and text_tower:
        notes.append(f"{len(text_tower)} tensors outside the vision tower (CLIP's text tower) ignored")
        ignored = sorted(set(ignored) | set(text_tower))
    return Conversion(out, ignored, notes)


# ---- Hugging Face RoBERTa ---------------------------------------------------------------------


def roberta_conversion(state_dict: Mapping[str, Tensor], *, prefix: str = "text_encoder.") -> Conversion:
    """Hugging Face RoBERTa (``RobertaModel`` / ``RobertaForMaskedLM``, with or without the
    ``roberta.`` prefix; METER's ``text_transformer.``) -> our RoBERTa-style text encoder:
    embeddings and every layer. The pooler, the LM head and the ``position_ids`` /
    ``token_type_ids`` buffers are ignored.

    Args:
        state_dict (Mapping[str, Tensor]): RoBERTa weights.
        prefix (str): prefix of our keys (``""`` for a bare encoder).

    Returns:
        Conversion
    """
    back: Dict[str, str] = {}
    for k in state_dict:
        back[re.sub(r"^(roberta|text_transformer)\.", "", k)] = k
    src = _normalise_bert({re.sub(r"^(roberta|text_transformer)\.", "", k): v for k, v in state_dict.items()})
    out: StateDict = {}
    used: Set[str] = set()
    _bert_import(src, prefix, None, 1 << 30, out, used)  # every layer is a text layer
    return Conversion(out, sorted(back.get(k, k) for k in set(src) - used), [])


# ---- METER -------------------------------------------------------------------------------------

_METER_FLAT = {
    **_wb({
        "cross_modal_text_transform": "text_transform",
        "cross_modal_image_transform": "image_transform",
        "cross_modal_text_pooler.dense": "text_pooler.dense",
        "cross_modal_image_pooler.dense": "image_pooler.dense",
        "itm_score.fc": "itm_head",
        "rank_output": "rank_head",
        "mlm_score.transform.dense": "mlm_head.dense",
        "mlm_score.transform.LayerNorm": "mlm_head.layer_norm",
        **{f"vqa_classifier.{i}": f"vqa_head.{i}" for i in (0, 1, 3)},
        **{f"nlvr2_classifier.{i}": f"nlvr_head.{i}" for i in (0, 1, 3)},
    }),
    "token_type_embeddings.weight": "modality_embeddings.weight",
    "mlm_score.decoder.weight": "mlm_head.decoder.weight",
    "mlm_score.bias": "mlm_head.bias",
}
_FUSION_SIDES = (("cross_modal_text_layers.", "text_fusion."), ("cross_modal_image_layers.", "image_fusion."))


def meter_conversion(state_dict: Mapping[str, Tensor], *, image_size: Optional[int] = None) -> Conversion:
    """A released METER checkpoint (its ``state_dict``) -> our layout (see :func:`meter_to_torchmm_ext`)."""
    src = dict(state_dict)
    out: StateDict = {}
    used: Set[str] = set()
    notes: List[str] = []
    vision = {k: v for k, v in src.items() if k.startswith("vit_model.visual.")}
    if vision:
        conversion = clip_vision_conversion(vision, image_size=image_size)
        out.update(conversion.state_dict)
        notes += conversion.notes
        used |= set(vision) - set(conversion.ignored)
    text = _sub(src, "text_transformer.")
    if text:
        conversion = roberta_conversion(text)
        out.update(conversion.state_dict)
        used |= _prefixed(set(text) - set(conversion.ignored), "text_transformer.")
    for theirs, ours in _FUSION_SIDES:
        sub, sub_used = _sub(src, theirs), set()  # type: Dict[str, Tensor], Set[str]
        _import_layers(sub, "", _numbered(ours), _BERT_LAYER, _BERT_QKV, out, sub_used)
        used |= _prefixed(sub_used, theirs)
    _import_flat(src, _METER_FLAT, "", out, used)
    if "mlm_head.bias" in out:
        out["mlm_head.decoder.bias"] = out["mlm_head.bias"]  # the same Parameter in our head
    return Conversion(out, sorted(set(src) - used), notes)


def meter_to_torchmm_ext(state_dict: Mapping[str, Tensor], *, image_size: Optional[int] = None) -> StateDict:
    """Converts a METER checkpoint (``ckpt["state_dict"]`` of ``meter_clip16_288_roberta_*.ckpt``)
    to our layout: CLIP blocks, RoBERTa, both co-attention stacks (``attention.self.{query,key,
    value}`` packed into ``attention.input_proj``), transforms, modality embedding, poolers and
    whichever heads it holds (``itm_score`` -> ``itm_head``, ``mlm_score`` -> ``mlm_head``,
    ``vqa_classifier`` -> ``vqa_head``, ``nlvr2_classifier`` -> ``nlvr_head``, ``rank_output`` ->
    ``rank_head``).

    Args:
        state_dict (Mapping[str, Tensor]): METER's tensors.
        image_size (Optional[int]): resize the position embeddings to this image size.

    Returns:
        StateDict: our keys.
    """
    return meter_conversion(state_dict, image_size=image_size).state_dict


def torchmm_ext_to_meter_conversion(state_dict: Mapping[str, Tensor]) -> Conversion:
    """Ours -> METER with ignored keys and notes (see :func:`torchmm_ext_to_meter`)."""
    src = dict(state_dict)
    out: StateDict = {}
    used: Set[str] = set()
    vis = _sub(src, "vision_encoder.")
    vis_used: Set[str] = set()
    _import_flat(vis, {d: s for s, d in _CLIP_OPENAI_TOP.items()}, "vit_model.visual.", out, vis_used)
    _import_layers(vis, "blocks.", _numbered("vit_model.visual.transformer.resblocks."),
                   {d: s for s, d in _CLIP_OPENAI_BLOCK.items()}, None, out, vis_used)
    if "embeddings.cls_token" in vis:
        out["vit_model.visual.class_embedding"] = vis["embeddings.cls_token"].reshape(-1)
        out["vit_model.visual.positional_embedding"] = vis["embeddings.position_embeddings"][0]
        vis_used |= {"embeddings.cls_token", "embeddings.position_embeddings"}
    used |= _prefixed(vis_used, "vision_encoder.")
    text, text_used = _sub(src, "text_encoder."), set()  # type: Dict[str, Tensor], Set[str]
    if text:
        _import_flat(text, {d: s for s, d in _BERT_EMBEDDINGS.items()}, "text_transformer.", out, text_used)
        _export_layers(text, "encoder.layer.", _numbered("text_transformer.encoder.layer."), _BERT_LAYER,
                       _BERT_QKV, out, text_used)
        max_pos = text["embeddings.position_embeddings.weight"].shape[0]
        # transformers 4.6 (METER's pin) keeps RoBERTa's position_ids as a persistent buffer.
        out["text_transformer.embeddings.position_ids"] = torch.arange(max_pos).unsqueeze(0)
        used |= _prefixed(text_used, "text_encoder.")
    for theirs, ours in _FUSION_SIDES:
        sub, sub_used = _sub(src, ours), set()
        _export_layers(sub, "", _numbered(theirs), _BERT_LAYER, _BERT_QKV, out, sub_used)
        used |= _prefixed(sub_used, ours)
    _import_flat(src, {d: s for s, d in _METER_FLAT.items()}, "", out, used)
    if "mlm_head.decoder.bias" in src:
        used.add("mlm_head.decoder.bias")  # the same tensor as mlm_head.bias (METER's mlm_score.bias)
    return Conversion(out, sorted(set(src) - used), [])


def torchmm_ext_to_meter(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Exports our METER model's ``state_dict()`` to METER's layout (what METER's
    ``load_state_dict(..., strict=False)`` reads; wrap it as ``{"state_dict": ...}`` for
    ``load_path``). Inverse of :func:`meter_to_torchmm_ext`.

    Args:
        state_dict (Mapping[str, Tensor]): our keys.

    Returns:
        StateDict: METER keys.
    """
    return torchmm_ext_to_meter_conversion(state_dict).state_dict


def meter_init_state_dict(
    clip_state_dict: Mapping[str, Tensor],
    roberta_state_dict: Mapping[str, Tensor],
    *,
    image_size: Optional[int] = None,
    num_vision_layers: int = 11,
) -> Conversion:
    """METER's fresh initialisation: the image encoder from a CLIP (ViT-B/16) vision tower with
    its first ``num_vision_layers`` blocks, the text encoder from RoBERTa; the transforms, fusion
    layers, poolers and heads are not in it (they keep their BERT initialisation).

    Args:
        clip_state_dict (Mapping[str, Tensor]): OpenAI or Hugging Face CLIP weights.
        roberta_state_dict (Mapping[str, Tensor]): Hugging Face RoBERTa weights.
        image_size (Optional[int]): resize the position embeddings to this image size.
        num_vision_layers (int): CLIP blocks kept (METER: all but the last).

    Returns:
        Conversion: our keys; the dropped CLIP blocks and unused tensors in ``ignored``.
    """
    clip = clip_vision_conversion(clip_state_dict, image_size=image_size)
    state = dict(clip.state_dict)
    dropped = sorted(k for k in state if (m := re.match(r"vision_encoder\.blocks\.(\d+)\.", k))
                     and int(m.group(1)) >= num_vision_layers)
    for key in dropped:
        del state[key]
    notes = list(clip.notes)
    if dropped:
        notes.append(f"CLIP blocks >= {num_vision_layers} not used (METER drops CLIP's last block): "
                     f"{len(dropped)} tensors")
    text = roberta_conversion(roberta_state_dict)
    state.update(text.state_dict)
    return Conversion(state, sorted(clip.ignored + text.ignored) + dropped, notes)


# ---- task starting points (the recipes' ``checkpoint_adapter``) --------------------------------


def _converted(path: Union[str, Path]) -> StateDict:
    # Imported here: loading.py imports this module.
    from torchmm_ext.checkpoints.loading import convert_to_torchmm_ext

    return dict(convert_to_torchmm_ext(load_state_dict_file(path)).state_dict)


def _in_memory(state: StateDict, description: str) -> StateDict:
    from torchmm_ext.checkpoints.tasks import _ConvertedStateDict  # load reports name it by its source

    return _ConvertedStateDict(state, description)


def meter_nlvr_checkpoint(path: Union[str, Path], model: Optional[nn.Module] = None) -> Union[str, StateDict]:
    """What to load into a METER NLVR2 model for ``--checkpoint path``: a single-image
    checkpoint (2 modality rows; any layout) gets the third row (the right image) as a copy of
    the image row, as METER does after loading; an NLVR2 checkpoint is returned as its path."""
    state = _converted(path)
    key = "modality_embeddings.weight"
    if key in state and state[key].shape[0] == 2:
        state[key] = torch.cat([state[key], state[key][1:2]], dim=0)
        return _in_memory(state, f"{path} (single-image: modality row 2 copied from row 1)")
    return str(path)


def meter_retrieval_checkpoint(path: Union[str, Path], model: Optional[nn.Module] = None) -> Union[str, StateDict]:
    """What to load into a METER retrieval model for ``--checkpoint path``: a checkpoint with an
    ITM head and no rank head (pre-training) gets ``rank_head`` = the ITM "match" row, as METER's
    retrieval fine-tuning starts; otherwise the path itself."""
    state = _converted(path)
    if "itm_head.weight" in state and "rank_head.weight" not in state:
        state["rank_head.weight"] = state["itm_head.weight"][1:].clone()
        state["rank_head.bias"] = state["itm_head.bias"][1:].clone()
        return _in_memory(state, f"{path} (rank_head initialised from the ITM match row)")
    return str(path)
