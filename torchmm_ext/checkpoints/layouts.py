"""Recognising which published layout a state dict is in."""

import re
from typing import Mapping, Tuple

from torch import Tensor

from torchmm_ext.checkpoints.vilt import VILT_LAYOUTS

__all__ = ["KNOWN_LAYOUTS", "detect_layout"]

#: Layouts :func:`detect_layout` recognises, with a one-line description each.
KNOWN_LAYOUTS: Mapping[str, str] = {
    "torchmm_ext": "this library's ALBEF (vision_encoder.*, text_encoder.*, fusion_encoder.*)",
    "pela": "guoyang9/PELA low-rank ALBEF (ALBEF names, factorised Linears as <name>.0/.1)",
    "albef": "salesforce/ALBEF (visual_encoder.*, text_encoder[.bert].*, pre-training or fine-tuned)",
    "torchmultimodal": "TorchMultimodal's ALBEF (albef_model.{vision,text,multimodal}_encoder.*)",
    "hf_bert": "Hugging Face BERT ([bert.]embeddings.*, encoder.layer.N.attention.self.query.*)",
    "timm_vit": "timm ViT / DeiT (cls_token, pos_embed, patch_embed.proj.*, blocks.N.attn.qkv.*)",
    "meter": "zdou0830/METER (vit_model.visual.*, text_transformer.*, cross_modal_{text,image}_layers.*)",
    "clip": "CLIP vision tower, OpenAI ([visual.]conv1.*, transformer.resblocks.*) or Hugging Face "
            "([vision_model.]embeddings.patch_embedding.*)",
    "roberta": "Hugging Face RoBERTa with its prefix (roberta.encoder.layer.N.*); a bare one reads as hf_bert",
    **VILT_LAYOUTS,
}

_RULES: Tuple[Tuple[str, "re.Pattern[str]"], ...] = (
    (
        "torchmm_ext",
        re.compile(
            r"^(vision_encoder\.embeddings\.conv_projection\.|"
            r"text_encoder\.encoder\.layer\.\d+\.attention\.input_proj\.|fusion_encoder\.layer\.)"
        ),
    ),
    # PELA before ALBEF: the same names, with factor pairs (<layer>.1.weight) in the encoders.
    ("pela", re.compile(r"^(visual_encoder|text_encoder|text_decoder)(_m)?\..*\.1\.weight$")),
    (
        "albef",
        re.compile(
            r"^(visual_encoder\.|text_encoder\.bert\.|"
            r"text_encoder\.encoder\.layer\.\d+\.(attention|crossattention)\.self\.)"
        ),
    ),
    (
        "torchmultimodal",
        re.compile(
            r"(^|\.)(albef_model\.|vision_encoder\.encoder\.encoder\.layers\.|multimodal_encoder\.layer\.)"
        ),
    ),
    ("hf_bert", re.compile(r"^(bert\.)?encoder\.layer\.\d+\.attention\.self\.query\.")),
    ("timm_vit", re.compile(r"^(blocks\.\d+\.attn\.qkv\.|patch_embed\.proj\.)")),
    ("meter", re.compile(r"^(vit_model\.visual\.|cross_modal_(text|image)_layers\.\d+\.)")),
    ("clip", re.compile(r"^(visual\.conv1\.|conv1\.weight$|(vision_model\.)?embeddings\.patch_embedding\.)")),
    ("roberta", re.compile(r"^roberta\.encoder\.layer\.\d+\.attention\.self\.query\.")),
    ("vilt", re.compile(r"^transformer\.(blocks\.\d+\.attn\.qkv\.|pos_embed$|patch_embed\.proj\.)")),
    ("hf_vilt", re.compile(r"^(vilt\.)?(embeddings\.text_embeddings\.|encoder\.layer\.\d+\.layernorm_before\.)")),
    ("torchmm_ext_vilt", re.compile(r"^(vilt\.)?(image_embeddings\.patch_embeddings\.|modality_embeddings\.)")),
)


def detect_layout(state_dict: Mapping[str, Tensor]) -> str:
    """Names the layout of an (unwrapped) state dict.

    Args:
        state_dict (Mapping[str, Tensor]): checkpoint tensors (see
            :func:`~torchmm_ext.checkpoints.unwrap_state_dict`).

    Returns:
        str: one of :data:`KNOWN_LAYOUTS`.

    Raises:
        ValueError: no layout matches; the message lists the known layouts and a few keys.
    """
    keys = list(state_dict)
    for name, pattern in _RULES:
        if any(pattern.search(k) for k in keys):
            return name
    known = "\n".join(f"  {name}: {desc}" for name, desc in KNOWN_LAYOUTS.items())
    sample = ", ".join(keys[:6]) if keys else "(no tensors)"
    raise ValueError(
        f"unknown checkpoint layout ({len(keys)} tensors; first keys: {sample}).\n"
        f"Known layouts:\n{known}"
    )
