"""Converters between the published ALBEF-family layouts and this library's layout.

Every converter is a pure function of a state dict. The ``*_conversion`` variants return a
:class:`Conversion` that also lists the source keys with no place in our model and notes on
what was synthesised (momentum copies, interpolated position embeddings); the plain variants
return only the converted dict.

Our layout (``albef_model_for_retrieval``)::

    vision_encoder[_m].embeddings.{cls_token, position_embeddings, conv_projection.*}
    vision_encoder[_m].blocks.N.{attention.input_proj (packed qkv), attention.output_proj,
        attention_layernorm, feedforward.model.{0,2}, feedforward_layernorm}, .norm
    text_encoder[_m].embeddings.{word,position,token_type}_embeddings, .layer_norm
    text_encoder[_m].encoder.layer.N.{attention.input_proj (packed [query; key; value]),
        attention.output_proj, attention_layernorm, feedforward.model.{0,2}, feedforward_layernorm}
    fusion_encoder.layer.M.{... as above ..., cross_attention.{q,k,v,output}_proj,
        cross_attention_layernorm}
    vision_proj[_m], text_proj[_m], itm_head, temp, queue.{image_queue, text_queue, idx_queue, ptr}
"""

import re
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Set, Tuple

import torch
from torch import Tensor

from torchmm_ext.checkpoints.primitives import interpolate_pos_embed, merge_qkv, split_qkv, StateDict

__all__ = [
    "Conversion",
    "albef_conversion",
    "albef_to_torchmm_ext",
    "fill_momentum",
    "hf_bert_conversion",
    "hf_bert_to_text_and_fusion",
    "interpolate_vision_pos_embeds",
    "timm_vit_conversion",
    "timm_vit_to_vision",
    "torchmm_ext_to_albef",
    "torchmm_ext_to_albef_conversion",
    "torchmultimodal_conversion",
    "torchmultimodal_to_torchmm_ext",
]


class Conversion(NamedTuple):
    """Result of a conversion.

    Attributes:
        state_dict (StateDict): the converted tensors.
        ignored (List[str]): source keys that have no place in the target (e.g. BERT's
            ``position_ids`` buffers, TorchMultimodal's momentum answer decoder).
        notes (List[str]): what was synthesised or changed (momentum copies filled from the
            online weights, position embeddings interpolated, ...).
    """

    state_dict: StateDict
    ignored: List[str]
    notes: List[str]


def _wb(renames: Mapping[str, str]) -> Dict[str, str]:
    """Expands ``{src_module: dst_module}`` to weight and bias parameter names."""
    return {f"{s}.{p}": f"{d}.{p}" for s, d in renames.items() for p in ("weight", "bias")}


# ---- per-layer renames (source sub-key -> our sub-key) ----------------------------------

_TIMM_TOP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    **_wb({"patch_embed.proj": "embeddings.conv_projection", "norm": "norm"}),
}
_TIMM_BLOCK = _wb(
    {
        "norm1": "attention_layernorm",
        "attn.qkv": "attention.input_proj",
        "attn.proj": "attention.output_proj",
        "norm2": "feedforward_layernorm",
        "mlp.fc1": "feedforward.model.0",
        "mlp.fc2": "feedforward.model.2",
    }
)
_TV_TOP = {
    "encoder.class_token": "embeddings.cls_token",
    "encoder.encoder.pos_embedding": "embeddings.position_embeddings",
    **_wb({"encoder.conv_proj": "embeddings.conv_projection", "encoder.encoder.ln": "norm"}),
}
_TV_BLOCK = {
    "self_attention.in_proj_weight": "attention.input_proj.weight",
    "self_attention.in_proj_bias": "attention.input_proj.bias",
    **_wb(
        {
            "ln_1": "attention_layernorm",
            "self_attention.out_proj": "attention.output_proj",
            "ln_2": "feedforward_layernorm",
            "mlp.0": "feedforward.model.0",
            "mlp.3": "feedforward.model.2",
            "mlp.linear_1": "feedforward.model.0",  # torchvision < 0.13
            "mlp.linear_2": "feedforward.model.2",
        }
    ),
}
_BERT_EMBEDDINGS = {
    **_wb(
        {
            "embeddings.word_embeddings": "embeddings.word_embeddings",
            "embeddings.position_embeddings": "embeddings.position_embeddings",
            "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
            "embeddings.LayerNorm": "embeddings.layer_norm",
        }
    ),
}
_BERT_LAYER = _wb(
    {
        "attention.output.dense": "attention.output_proj",
        "attention.output.LayerNorm": "attention_layernorm",
        "intermediate.dense": "feedforward.model.0",
        "output.dense": "feedforward.model.2",
        "output.LayerNorm": "feedforward_layernorm",
        "crossattention.self.query": "cross_attention.q_proj",
        "crossattention.self.key": "cross_attention.k_proj",
        "crossattention.self.value": "cross_attention.v_proj",
        "crossattention.output.dense": "cross_attention.output_proj",
        "crossattention.output.LayerNorm": "cross_attention_layernorm",
    }
)
_BERT_TEXT_LAYER = {k: v for k, v in _BERT_LAYER.items() if not k.startswith("crossattention.")}
_BERT_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")
# BERT's MLM / LM head (``cls.predictions.*``) -> torchmultimodal's ``MaskedPredictionHead``
# (our pre-training ``mlm_head`` and the VQA decoder's ``lm_head``).
_BERT_LM_HEAD = {
    **_wb({"predictions.transform.dense": "dense", "predictions.transform.LayerNorm": "layer_norm"}),
    "predictions.bias": "bias",
    "predictions.decoder.weight": "decoder.weight",
    "predictions.decoder.bias": "decoder.bias",
}
_TMM_LAYER = _wb(
    {
        "attention.output": "attention.output_proj",
        "attention_layernorm": "attention_layernorm",
        "feedforward.model.0": "feedforward.model.0",
        "feedforward.model.2": "feedforward.model.2",
        "feedforward.model.3": "feedforward.model.2",  # FLAVA-style MLP: dropout at index 2
        "feedforward_layernorm": "feedforward_layernorm",
        "cross_attention.query": "cross_attention.q_proj",
        "cross_attention.key": "cross_attention.k_proj",
        "cross_attention.value": "cross_attention.v_proj",
        "cross_attention.output": "cross_attention.output_proj",
        "cross_attention_layernorm": "cross_attention_layernorm",
    }
)
_TMM_QKV = ("attention.query", "attention.key", "attention.value")
_OUR_QKV = "attention.input_proj"

_LAYER = re.compile(r"(\d+)\.(.+)")


def _sub(sd: Mapping[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    """Entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _numbered(prefix: str, offset: int = 0) -> Callable[[int], str]:
    """``n -> f"{prefix}{n + offset}."``: where layer ``n`` goes."""

    def name(n: int) -> str:
        return f"{prefix}{n + offset}."

    return name


def _layer_indices(sd: Mapping[str, Tensor], layer_prefix: str) -> List[int]:
    found = {int(m.group(1)) for k in sd if k.startswith(layer_prefix)
             for m in [_LAYER.match(k[len(layer_prefix):])] if m}
    return sorted(found)


def _import_layers(
    src: Mapping[str, Tensor],
    layer_prefix: str,
    dst_prefix: Callable[[int], Optional[str]],
    renames: Mapping[str, str],
    qkv: Optional[Tuple[str, str, str]],
    out: StateDict,
    used: Set[str],
) -> None:
    """Renames the layers ``layer_prefix + N + '.' + sub`` of ``src`` into ``out`` under
    ``dst_prefix(N)`` (skipped when it returns ``None``), packing the ``qkv`` triple into
    ``attention.input_proj``. Marks consumed source keys in ``used``."""
    for n in _layer_indices(src, layer_prefix):
        dst = dst_prefix(n)
        if dst is None:
            continue
        base = f"{layer_prefix}{n}."
        for key in src:
            if key.startswith(base) and key[len(base):] in renames:
                out[dst + renames[key[len(base):]]] = src[key]
                used.add(key)
        if qkv is None:
            continue
        for p in ("weight", "bias"):
            parts = [f"{base}{name}.{p}" for name in qkv]
            if all(k in src for k in parts):
                out[f"{dst}{_OUR_QKV}.{p}"] = merge_qkv(*(src[k] for k in parts))
                used.update(parts)


def _export_layers(
    src: Mapping[str, Tensor],
    layer_prefix: str,
    dst_prefix: Callable[[int], str],
    renames: Mapping[str, str],
    qkv: Tuple[str, str, str],
    out: StateDict,
    used: Set[str],
) -> None:
    """Inverse of :func:`_import_layers`: our layers back to the source names, unpacking
    ``attention.input_proj`` into the ``qkv`` triple."""
    inverse: Dict[str, str] = {}
    for s, d in renames.items():
        inverse.setdefault(d, s)
    for n in _layer_indices(src, layer_prefix):
        base, dst = f"{layer_prefix}{n}.", dst_prefix(n)
        for key in src:
            sub = key[len(base):]
            if key.startswith(base) and sub in inverse:
                out[dst + inverse[sub]] = src[key]
                used.add(key)
        for p in ("weight", "bias"):
            key = f"{base}{_OUR_QKV}.{p}"
            if key in src:
                for name, part in zip(qkv, split_qkv(src[key])):
                    out[f"{dst}{name}.{p}"] = part
                used.add(key)


def _import_flat(
    src: Mapping[str, Tensor], renames: Mapping[str, str], dst: str, out: StateDict, used: Set[str]
) -> None:
    for s, d in renames.items():
        if s in src:
            out[dst + d] = src[s]
            used.add(s)


def _prefixed(keys: Set[str], prefix: str) -> Set[str]:
    return {prefix + k for k in keys}


def interpolate_vision_pos_embeds(out: StateDict, image_size: Optional[int], notes: List[str]) -> None:
    """Interpolates ``vision_encoder(_m).embeddings.position_embeddings`` in ``out`` (in place)
    to the patch grid of ``image_size``; a no-op when ``image_size`` is ``None``.

    Args:
        out (StateDict): state dict in our layout.
        image_size (Optional[int]): target image size.
        notes (List[str]): receives a line per changed table.
    """
    if image_size is None:
        return
    for prefix in ("vision_encoder.", "vision_encoder_m."):
        key, conv = prefix + "embeddings.position_embeddings", prefix + "embeddings.conv_projection.weight"
        if key not in out or conv not in out:
            continue
        grid = image_size // out[conv].shape[-1]
        before = tuple(out[key].shape)
        out[key] = interpolate_pos_embed(out[key], grid)
        if tuple(out[key].shape) != before:
            notes.append(f"{key}: interpolated {before} -> {tuple(out[key].shape)} for {image_size} px")


_MOMENTUM_PAIRS = (
    ("vision_encoder.", "vision_encoder_m."),
    ("text_encoder.", "text_encoder_m."),
    ("vision_proj.", "vision_proj_m."),
    ("text_proj.", "text_proj_m."),
)
# Momentum modules only some task models have: filled only for a target model that has them.
_TASK_MOMENTUM_PAIRS = (
    ("fusion_encoder.", "fusion_encoder_m."),
    ("mlm_head.", "mlm_head_m."),
    ("answer_decoder.", "answer_decoder_m."),
    ("cls_head.", "cls_head_m."),
)


def fill_momentum(state_dict: StateDict, notes: Optional[List[str]] = None,
                  wanted: Optional[Set[str]] = None) -> StateDict:
    """Copies online weights into absent momentum modules (``vision_encoder_m`` & co.), which is
    what ALBEF's momentum encoders are at initialisation. Released fine-tuned ALBEF checkpoints
    carry no momentum weights.

    Args:
        state_dict (StateDict): converted state dict, modified in place.
        notes (Optional[List[str]]): receives one line per filled module.
        wanted (Optional[Set[str]]): if given, only momentum keys in this set are written
            (the target model's keys), and the momentum copies of task modules (fusion
            encoder, MLM head, answer decoder, classifier head) are filled too.

    Returns:
        StateDict: ``state_dict``.
    """
    pairs = _MOMENTUM_PAIRS if wanted is None else _MOMENTUM_PAIRS + _TASK_MOMENTUM_PAIRS
    for online, momentum in pairs:
        if any(k.startswith(momentum) for k in state_dict):
            continue
        filled = 0
        for key in [k for k in state_dict if k.startswith(online)]:
            target = momentum + key[len(online):]
            if wanted is None or target in wanted:
                state_dict[target] = state_dict[key].clone()
                filled += 1
        if filled and notes is not None:
            notes.append(f"{momentum.rstrip('.')}: absent from the checkpoint, copied from "
                         f"{online.rstrip('.')} ({filled} tensors)")
    return state_dict


# ---- timm ViT / DeiT ----------------------------------------------------------------------


def timm_vit_conversion(
    state_dict: Mapping[str, Tensor], *, image_size: Optional[int] = None, prefix: str = "vision_encoder."
) -> Conversion:
    """timm ViT / DeiT weights -> our :class:`VisionTransformer` (see :func:`timm_vit_to_vision`)."""
    out: StateDict = {}
    used: Set[str] = set()
    notes: List[str] = []
    src = dict(state_dict)
    if "dist_token" in src and "pos_embed" in src:  # DeiT-distilled: drop the distillation token
        pos = src["pos_embed"]
        src["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
        notes.append("dist_token and its position embedding dropped (distilled DeiT)")
    _import_flat(src, _TIMM_TOP, prefix, out, used)
    _import_layers(src, "blocks.", _numbered(f"{prefix}blocks."), _TIMM_BLOCK, None, out, used)
    if prefix == "vision_encoder.":
        interpolate_vision_pos_embeds(out, image_size, notes)
    elif image_size is not None:
        key, conv = prefix + "embeddings.position_embeddings", prefix + "embeddings.conv_projection.weight"
        out[key] = interpolate_pos_embed(out[key], image_size // out[conv].shape[-1])
    return Conversion(out, sorted(set(state_dict) - used), notes)


def timm_vit_to_vision(
    state_dict: Mapping[str, Tensor], image_size: Optional[int] = None, *, prefix: str = "vision_encoder."
) -> StateDict:
    """Converts a timm ViT / DeiT state dict (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
    ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``) to our vision
    encoder. The classifier ``head.*`` is dropped.

    Args:
        state_dict (Mapping[str, Tensor]): timm weights.
        image_size (Optional[int]): target image size; the position embeddings are
            interpolated when it gives another patch grid.
        prefix (str): prefix of the output keys (``""`` for a bare ``VisionTransformer``).

    Returns:
        StateDict: our keys.
    """
    return timm_vit_conversion(state_dict, image_size=image_size, prefix=prefix).state_dict


# ---- Hugging Face BERT ----------------------------------------------------------------------


def _normalise_bert(src: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Old BERT checkpoints name LayerNorm parameters gamma / beta."""
    out = {}
    for k, v in src.items():
        if ".LayerNorm." in k:
            k = k.replace(".LayerNorm.gamma", ".LayerNorm.weight").replace(".LayerNorm.beta", ".LayerNorm.bias")
        out[k] = v
    return out


def _bert_import(
    src: Mapping[str, Tensor],
    text_prefix: str,
    fusion_prefix: Optional[str],
    fusion_layer: int,
    out: StateDict,
    used: Set[str],
) -> None:
    """BERT keys relative to the ``BertModel`` root -> our text (layers < ``fusion_layer``) and
    fusion (the others; skipped when ``fusion_prefix`` is None) encoders."""
    _import_flat(src, _BERT_EMBEDDINGS, text_prefix, out, used)

    def text_dst(n: int) -> Optional[str]:
        return f"{text_prefix}encoder.layer.{n}." if n < fusion_layer else None

    def fusion_dst(n: int) -> Optional[str]:
        if n < fusion_layer or fusion_prefix is None:
            return None
        return f"{fusion_prefix}layer.{n - fusion_layer}."

    _import_layers(src, "encoder.layer.", text_dst, _BERT_TEXT_LAYER, _BERT_QKV, out, used)
    _import_layers(src, "encoder.layer.", fusion_dst, _BERT_LAYER, _BERT_QKV, out, used)


def _import_lm_head(
    src: Mapping[str, Tensor],
    dst: str,
    word_embeddings_key: Optional[str],
    out: StateDict,
    used: Set[str],
    used_prefix: str = "",
) -> None:
    """BERT ``cls.*`` keys (relative to ``cls.``) -> a ``MaskedPredictionHead`` under ``dst``.

    BERT ties the head's decoder weight to the word embeddings and its decoder bias to
    ``predictions.bias``: tied tensors a checkpoint leaves out are filled from their twins."""
    sub_used: Set[str] = set()
    _import_flat(src, _BERT_LM_HEAD, dst, out, sub_used)
    used |= _prefixed(sub_used, used_prefix)
    if not sub_used:
        return
    for a, b in (("bias", "decoder.bias"), ("decoder.bias", "bias")):
        if dst + a in out and dst + b not in out:
            out[dst + b] = out[dst + a]
    if dst + "decoder.weight" not in out and word_embeddings_key in out:
        out[dst + "decoder.weight"] = out[word_embeddings_key]


def _export_lm_head(src: Mapping[str, Tensor], prefix: str, dst: str, out: StateDict, used: Set[str]) -> None:
    """Inverse of :func:`_import_lm_head`: ``prefix`` (our head) -> BERT ``dst`` (``...cls.``)."""
    for theirs, ours in _BERT_LM_HEAD.items():
        if prefix + ours in src:
            out[dst + theirs] = src[prefix + ours]
            used.add(prefix + ours)


def _import_albef_decoder(src: Mapping[str, Tensor], theirs: str, ours: str, out: StateDict, used: Set[str]) -> None:
    """ALBEF's VQA answer decoder (``BertLMHeadModel``: ``bert.embeddings``, ``bert.encoder.layer.N``
    with cross-attention in every layer, ``cls.predictions``) -> ``ours`` (``answer_decoder.``:
    ``embeddings``, ``layers.layer.N``, ``lm_head``)."""
    sub = {re.sub(r"^bert\.", "", k): v for k, v in _sub(src, theirs).items()}
    back = {re.sub(r"^bert\.", "", k): k for k in _sub(src, theirs)}
    sub_used: Set[str] = set()
    _bert_import(sub, ours, f"{ours}layers.", 0, out, sub_used)
    _import_lm_head(_sub(sub, "cls."), f"{ours}lm_head.", f"{ours}embeddings.word_embeddings.weight",
                    out, sub_used, "cls.")
    used |= {theirs + back[k] for k in sub_used}


def hf_bert_conversion(
    state_dict: Mapping[str, Tensor],
    fusion_layer: int = 6,
    *,
    text_prefix: str = "text_encoder.",
    fusion_prefix: str = "fusion_encoder.",
) -> Conversion:
    """Hugging Face BERT -> our text + fusion encoders (see :func:`hf_bert_to_text_and_fusion`)."""
    src = _normalise_bert({k[5:] if k.startswith("bert.") else k: v for k, v in state_dict.items()})
    out: StateDict = {}
    used: Set[str] = set()
    _bert_import(src, text_prefix, fusion_prefix, fusion_layer, out, used)
    _import_lm_head(_sub(src, "cls."), "mlm_head.", f"{text_prefix}embeddings.word_embeddings.weight",
                    out, used, "cls.")
    notes = []
    if any(k.startswith(fusion_prefix) for k in out):
        notes.append(f"{fusion_prefix.rstrip('.')}: cross-attention not in a BERT checkpoint, "
                     "left at its initialisation")
    back = {k[5:] if k.startswith("bert.") else k: k for k in state_dict}
    ignored = sorted(back.get(k, k) for k in set(src) - used)
    return Conversion(out, ignored, notes)


def hf_bert_to_text_and_fusion(
    state_dict: Mapping[str, Tensor],
    fusion_layer: int = 6,
    *,
    text_prefix: str = "text_encoder.",
    fusion_prefix: str = "fusion_encoder.",
) -> StateDict:
    """Initialises ALBEF's text and fusion encoders from a Hugging Face BERT state dict, as
    ALBEF does from ``bert-base-uncased``: BERT layers ``0..fusion_layer-1`` become the text
    encoder, layers ``fusion_layer..`` the self-attention and feed-forward parts of the fusion
    layers (their cross-attention stays freshly initialised: it is missing from the result).
    The pooler and MLM / NSP heads are dropped.

    Args:
        state_dict (Mapping[str, Tensor]): ``BertModel`` / ``BertForMaskedLM`` weights
            (with or without the ``bert.`` prefix; ``LayerNorm.gamma/beta`` accepted).
        fusion_layer (int): first BERT layer of the fusion encoder.
        text_prefix (str): prefix of the text-encoder keys (``""`` for a bare text encoder).
        fusion_prefix (str): prefix of the fusion-encoder keys.

    Returns:
        StateDict: our keys.
    """
    return hf_bert_conversion(state_dict, fusion_layer, text_prefix=text_prefix,
                              fusion_prefix=fusion_prefix).state_dict


# ---- salesforce/ALBEF -------------------------------------------------------------------------

_ALBEF_DIRECT = (
    "temp",
    *(f"{m}.{p}" for m in ("vision_proj", "text_proj", "itm_head", "vision_proj_m", "text_proj_m")
      for p in ("weight", "bias")),
)
# Task heads (SNLI-VE / NLVR2 ``cls_head`` and its momentum copy, NLVR2 text assignment's
# ``ta_head``): the same module names and key names in ALBEF and here.
_ALBEF_TASK_HEADS = ("cls_head.", "cls_head_m.", "ta_head.")
_ALBEF_QUEUES = {
    "image_queue": "queue.image_queue",
    "text_queue": "queue.text_queue",
    "idx_queue": "queue.idx_queue",
    "queue_ptr": "queue.ptr",
}


def _albef_fusion_layer(src: Mapping[str, Tensor], default: int = 6) -> int:
    """First BERT layer holding cross-attention (ALBEF's ``fusion_layer``)."""
    layers = [int(m.group(1)) for k in src
              for m in [re.match(r"text_encoder\.encoder\.layer\.(\d+)\.crossattention\.", k)] if m]
    return min(layers) if layers else default


def albef_conversion(
    state_dict: Mapping[str, Tensor],
    *,
    image_size: Optional[int] = None,
    fusion_layer: Optional[int] = None,
    fill_momentum_weights: bool = True,
) -> Conversion:
    """ALBEF -> ours with the list of ignored keys and notes (see :func:`albef_to_torchmm_ext`)."""
    # Pre-training checkpoints hold BertForMaskedLM (text_encoder.bert.*, text_encoder.cls.*).
    src: Dict[str, Tensor] = {}
    renamed: Dict[str, str] = {}
    for k, v in state_dict.items():
        new = re.sub(r"^(text_encoder(_m)?)\.bert\.", r"\1.", k)
        src[new], renamed[new] = v, k
    src = _normalise_bert(src)
    fusion = _albef_fusion_layer(src) if fusion_layer is None else fusion_layer
    out: StateDict = {}
    used: Set[str] = set()
    for theirs, ours in (("visual_encoder.", "vision_encoder."), ("visual_encoder_m.", "vision_encoder_m.")):
        sub, sub_used = _sub(src, theirs), set()  # type: Dict[str, Tensor], Set[str]
        _import_flat(sub, _TIMM_TOP, ours, out, sub_used)
        _import_layers(sub, "blocks.", _numbered(f"{ours}blocks."), _TIMM_BLOCK, None, out, sub_used)
        used |= _prefixed(sub_used, theirs)
    for theirs, fusion_prefix, head in (("text_encoder.", "fusion_encoder.", "mlm_head."),
                                        ("text_encoder_m.", "fusion_encoder_m.", "mlm_head_m.")):
        sub, sub_used = _sub(src, theirs), set()
        _bert_import(sub, theirs, fusion_prefix, fusion, out, sub_used)
        # Pre-training checkpoints: BertForMaskedLM's MLM head.
        _import_lm_head(_sub(sub, "cls."), head, f"{theirs}embeddings.word_embeddings.weight",
                        out, sub_used, "cls.")
        used |= _prefixed(sub_used, theirs)
    for theirs, ours in (("text_decoder.", "answer_decoder."), ("text_decoder_m.", "answer_decoder_m.")):
        _import_albef_decoder(src, theirs, ours, out, used)
    for key in _ALBEF_DIRECT:
        if key in src:
            out[key] = src[key]
            used.add(key)
    _import_flat(src, _ALBEF_QUEUES, "", out, used)
    for key in src:
        if key.startswith(_ALBEF_TASK_HEADS):
            out[key] = src[key]
            used.add(key)

    notes: List[str] = []
    if fill_momentum_weights:
        fill_momentum(out, notes)
    if "queue.image_queue" in out and "queue.idx_queue" not in out:
        # Pre-training checkpoints keep feature queues but no ids. ALBEF's fine-tuning uses
        # those features as negatives; id -1 (no real image id) keeps them filled, where the
        # model's empty marker (-100) would mask them out.
        size = out["queue.image_queue"].shape[1]
        out["queue.idx_queue"] = torch.full((1, size), -1, dtype=torch.long)
        notes.append(f"queue.idx_queue: the checkpoint has none; its {size} queued features are "
                     "kept as negatives of no image (id -1)")
    interpolate_vision_pos_embeds(out, image_size, notes)
    ignored = sorted(renamed.get(k, k) for k in set(src) - used)
    return Conversion(out, ignored, notes)


def albef_to_torchmm_ext(
    state_dict: Mapping[str, Tensor],
    *,
    image_size: Optional[int] = None,
    fusion_layer: Optional[int] = None,
) -> StateDict:
    """Converts an original ALBEF state dict to our layout.

    Accepts the pre-training form (``text_encoder.bert.*``, MLM head ``text_encoder.cls.*`` ->
    ``mlm_head``), the fine-tuned forms (``text_encoder.*``; VQA's ``text_decoder.*`` ->
    ``answer_decoder``) and NLVR2's 18-layer text encoder (layers from ``fusion_layer`` on ->
    ``fusion_encoder.layer.*`` in order). The momentum text encoder's fusion layers become
    ``fusion_encoder_m``. Momentum weights absent from the checkpoint (released fine-tuned files)
    are copied from the online weights. Task heads (``cls_head``, ``cls_head_m``, ``ta_head``)
    have the same names in both layouts and are taken as they are.

    Args:
        state_dict (Mapping[str, Tensor]): unwrapped ALBEF state dict.
        image_size (Optional[int]): target image size; the position embeddings of
            ``vision_encoder`` and ``vision_encoder_m`` are interpolated when the grid differs.
        fusion_layer (Optional[int]): first cross-attention BERT layer; found from the
            ``crossattention`` keys when ``None`` (6 in every released ALBEF).

    Returns:
        StateDict: our keys.
    """
    return albef_conversion(state_dict, image_size=image_size, fusion_layer=fusion_layer).state_dict


def torchmm_ext_to_albef_conversion(state_dict: Mapping[str, Tensor], *, momentum_fusion: bool = True) -> Conversion:
    """Ours -> ALBEF with ignored keys and notes (see :func:`torchmm_ext_to_albef`)."""
    src = dict(state_dict)
    out: StateDict = {}
    used: Set[str] = set()
    for ours, theirs in (("vision_encoder.", "visual_encoder."), ("vision_encoder_m.", "visual_encoder_m.")):
        sub, sub_used = _sub(src, ours), set()  # type: Dict[str, Tensor], Set[str]
        inverse_top = {d: s for s, d in _TIMM_TOP.items()}
        _import_flat(sub, inverse_top, theirs, out, sub_used)
        inverse_block = {d: s for s, d in _TIMM_BLOCK.items()}
        _import_layers(sub, "blocks.", _numbered(f"{theirs}blocks."), inverse_block, None, out, sub_used)
        used |= _prefixed(sub_used, ours)
    bert_inverse_emb = {d: s for s, d in _BERT_EMBEDDINGS.items()}
    notes: List[str] = []
    for ours, theirs in (("text_encoder.", "text_encoder."), ("text_encoder_m.", "text_encoder_m.")):
        sub, sub_used = _sub(src, ours), set()
        if not sub:
            continue
        _import_flat(sub, bert_inverse_emb, theirs, out, sub_used)
        _export_layers(sub, "encoder.layer.", _numbered(f"{theirs}encoder.layer."),
                       _BERT_LAYER, _BERT_QKV, out, sub_used)
        used |= _prefixed(sub_used, ours)
        max_pos = sub["embeddings.position_embeddings.weight"].shape[0]
        out[f"{theirs}embeddings.position_ids"] = torch.arange(max_pos).unsqueeze(0)
    num_text = len(_layer_indices(src, "text_encoder.encoder.layer."))
    for ours, theirs in (("fusion_encoder.", "text_encoder."), ("fusion_encoder_m.", "text_encoder_m.")):
        fusion_src, fusion_used = _sub(src, ours), set()  # type: Dict[str, Tensor], Set[str]
        _export_layers(fusion_src, "layer.", _numbered(f"{theirs}encoder.layer.", num_text),
                       _BERT_LAYER, _BERT_QKV, out, fusion_used)
        used |= _prefixed(fusion_used, ours)
    for ours, theirs in (("mlm_head.", "text_encoder.cls."), ("mlm_head_m.", "text_encoder_m.cls.")):
        _export_lm_head(src, ours, theirs, out, used)
    for ours, theirs in (("answer_decoder.", "text_decoder."), ("answer_decoder_m.", "text_decoder_m.")):
        decoder_src, decoder_used = _sub(src, ours), set()
        if not decoder_src:
            continue
        _import_flat(decoder_src, bert_inverse_emb, f"{theirs}bert.", out, decoder_used)
        _export_layers(decoder_src, "layers.layer.", _numbered(f"{theirs}bert.encoder.layer."),
                       _BERT_LAYER, _BERT_QKV, out, decoder_used)
        _export_lm_head(decoder_src, "lm_head.", f"{theirs}cls.", out, decoder_used)
        max_pos = decoder_src["embeddings.position_embeddings.weight"].shape[0]
        out[f"{theirs}bert.embeddings.position_ids"] = torch.arange(max_pos).unsqueeze(0)
        used |= _prefixed(decoder_used, ours)
    has_momentum_fusion = any(k.startswith("fusion_encoder_m.") for k in src)
    if momentum_fusion and not has_momentum_fusion and any(k.startswith("fusion_encoder.") for k in src) \
            and any(k.startswith("text_encoder_m.") for k in out):
        # ALBEF's momentum BERT has fusion layers too (unused by retrieval): copy the online ones.
        for key in [k for k in out if k.startswith("text_encoder.encoder.layer.")]:
            if int(key.split(".")[3]) >= num_text:
                out["text_encoder_m." + key[len("text_encoder."):]] = out[key].clone()
        notes.append(f"text_encoder_m layers >= {num_text}: copied from the online fusion layers "
                     "(our model keeps no momentum fusion encoder)")
    for key in _ALBEF_DIRECT:
        if key in src:
            out[key] = src[key]
            used.add(key)
    pretraining = any(k.startswith("text_encoder.cls.") for k in out)
    queues = {d: s for s, d in _ALBEF_QUEUES.items()}
    if pretraining and "queue.idx_queue" in src:
        # ALBEF's pre-training model (model_pretrain.py) has no image-id queue and loads its
        # checkpoints strictly: the ids stay behind (listed as ignored).
        del queues["queue.idx_queue"]
        notes.append("queue.idx_queue: not exported (ALBEF's pre-training model keeps no image-id queue)")
    _import_flat(src, queues, "", out, used)
    for key in src:  # task heads have ALBEF's names already
        if key.startswith(_ALBEF_TASK_HEADS):
            out[key] = src[key]
            used.add(key)
    if pretraining:
        # A model with an MLM head exports to ALBEF's pre-training layout (BertForMaskedLM).
        out = {re.sub(r"^(text_encoder(_m)?)\.(?!cls\.)", r"\1.bert.", k): v for k, v in out.items()}
    return Conversion(out, sorted(set(src) - used), notes)


def torchmm_ext_to_albef(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Exports our ALBEF retrieval model to salesforce/ALBEF's retrieval layout
    (``models/model_retrieval.py``: ``visual_encoder``, ``text_encoder`` = ``BertModel`` without
    the ``bert.`` prefix, ``*_m`` copies, ``image_queue``/``text_queue``/``idx_queue``/``queue_ptr``).

    ``text_encoder(_m).embeddings.position_ids`` is written (ALBEF's BERT registers it), and the
    momentum text encoder's fusion layers, which ALBEF's retrieval model has and ours does not,
    are copies of the online fusion layers. A model with an MLM head (pre-training) goes to
    ``models/model_pretrain.py``'s layout instead (``text_encoder.bert.*``, ``text_encoder.cls.*``,
    no ``idx_queue``); task heads (``cls_head[_m]``, ``ta_head``) keep their names.

    Args:
        state_dict (Mapping[str, Tensor]): our model's ``state_dict()``.

    Returns:
        StateDict: ALBEF keys.
    """
    return torchmm_ext_to_albef_conversion(state_dict).state_dict


# ---- TorchMultimodal -------------------------------------------------------------------------


def _strip_torchmultimodal(key: str) -> str:
    """``model_with_similarity.albef_model.X`` / ``model.X`` / ``albef_model.X`` -> ``X``."""
    for prefix in ("model_with_similarity.", "albef_model.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def torchmultimodal_conversion(
    state_dict: Mapping[str, Tensor], *, image_size: Optional[int] = None
) -> Conversion:
    """TorchMultimodal ALBEF -> ours (see :func:`torchmultimodal_to_torchmm_ext`)."""
    src: Dict[str, Tensor] = {}
    original: Dict[str, str] = {}
    for k, v in state_dict.items():
        new = _strip_torchmultimodal(k)
        src[new], original[new] = v, k
    out: StateDict = {}
    used: Set[str] = set()
    for name in ("vision_encoder.", "vision_encoder_m."):
        sub, sub_used = _sub(src, name), set()  # type: Dict[str, Tensor], Set[str]
        _import_flat(sub, _TV_TOP, name, out, sub_used)
        _import_layers(sub, "encoder.encoder.layers.encoder_layer_", _numbered(f"{name}blocks."),
                       _TV_BLOCK, None, out, sub_used)
        used |= _prefixed(sub_used, name)
    emb = {k: k for k in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                          "embeddings.token_type_embeddings.weight", "embeddings.layer_norm.weight",
                          "embeddings.layer_norm.bias")}
    for theirs, ours, layer_prefix, dst in (
        ("text_encoder.", "text_encoder.", "encoder.layer.", "text_encoder.encoder.layer."),
        ("text_encoder_m.", "text_encoder_m.", "encoder.layer.", "text_encoder_m.encoder.layer."),
        ("multimodal_encoder.", None, "layer.", "fusion_encoder.layer."),
    ):
        sub, sub_used = _sub(src, theirs), set()
        if ours is not None:
            _import_flat(sub, emb, ours, out, sub_used)
        _import_layers(sub, layer_prefix, _numbered(dst), _TMM_LAYER, _TMM_QKV, out, sub_used)
        used |= _prefixed(sub_used, theirs)
    # The momentum fusion encoder (TorchMultimodal keeps one for VQA) and the VQA answer
    # decoder (examples/albef ALBEFDecoder: text_embeddings, multimodal_encoder, prediction_head).
    decoder_emb = {f"text_{k}": k for k in emb}
    head = {**_wb({"prediction_head.dense": "lm_head.dense", "prediction_head.layer_norm": "lm_head.layer_norm"}),
            "prediction_head.decoder.weight": "lm_head.decoder.weight",
            "prediction_head.decoder.bias": "lm_head.bias"}
    for theirs, ours in (("multimodal_encoder_m.", "fusion_encoder_m."), ("answer_decoder.", "answer_decoder."),
                         ("answer_decoder_m.", "answer_decoder_m.")):
        sub, sub_used = _sub(src, theirs), set()
        is_decoder = theirs.startswith("answer_decoder")
        layer_prefix, dst = ("multimodal_encoder.layer.", f"{ours}layers.layer.") if is_decoder else ("layer.", f"{ours}layer.")
        _import_layers(sub, layer_prefix, _numbered(dst), _TMM_LAYER, _TMM_QKV, out, sub_used)
        if is_decoder:
            _import_flat(sub, decoder_emb, ours, out, sub_used)
            _import_flat(sub, head, ours, out, sub_used)
            if f"{ours}lm_head.bias" in out:
                out[f"{ours}lm_head.decoder.bias"] = out[f"{ours}lm_head.bias"]
        used |= _prefixed(sub_used, theirs)
    for key in _ALBEF_DIRECT:
        if key in src:
            out[key] = src[key]
            used.add(key)
    _import_flat(src, _ALBEF_QUEUES, "", out, used)
    notes: List[str] = []
    if "answer_decoder.lm_head.decoder.weight" in out:
        notes.append("answer_decoder.lm_head.decoder.weight: TorchMultimodal's prediction head is not tied "
                     "to the decoder's word embeddings; ours is (BERT/ALBEF), the head's copy is loaded last")
    fill_momentum(out, notes)
    interpolate_vision_pos_embeds(out, image_size, notes)
    return Conversion(out, sorted(original[k] for k in set(src) - used), notes)


def torchmultimodal_to_torchmm_ext(
    state_dict: Mapping[str, Tensor], *, image_size: Optional[int] = None
) -> StateDict:
    """Converts TorchMultimodal's ALBEF (``examples/albef``: ``ALBEFModelForRetrieval`` with
    ``model_with_similarity.albef_model.{vision_encoder (torchvision ViT), text_encoder,
    multimodal_encoder}[_m]``, projections, queues, ``itm_head``; the VQA model's
    ``model.*`` encoder part and its ``answer_decoder[_m]``) to our layout. Names follow the
    installed torchmultimodal's modules; the momentum multimodal encoder becomes
    ``fusion_encoder_m``, the answer decoder ``answer_decoder`` (embeddings, layers, lm_head).

    Args:
        state_dict (Mapping[str, Tensor]): unwrapped TorchMultimodal state dict.
        image_size (Optional[int]): target image size for position-embedding interpolation.

    Returns:
        StateDict: our keys.
    """
    return torchmultimodal_conversion(state_dict, image_size=image_size).state_dict
