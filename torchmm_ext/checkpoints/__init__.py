"""Published weights in and out: salesforce/ALBEF, TorchMultimodal, Hugging Face BERT and timm
ViT/DeiT checkpoints to and from this library's ALBEF layout.

Entry points: :func:`load_pretrained` (what recipes' ``--checkpoint`` calls), the converters
(:func:`albef_to_torchmm_ext`, :func:`torchmm_ext_to_albef`, ...), :func:`detect_layout`, and
the command line ``python -m torchmm_ext.checkpoints {convert,inspect} --help``.
"""

from torchmm_ext.checkpoints.convert import (
    albef_conversion,
    albef_to_torchmm_ext,
    Conversion,
    fill_momentum,
    hf_bert_conversion,
    hf_bert_to_text_and_fusion,
    timm_vit_conversion,
    timm_vit_to_vision,
    torchmm_ext_to_albef,
    torchmm_ext_to_albef_conversion,
    torchmultimodal_conversion,
    torchmultimodal_to_torchmm_ext,
)
from torchmm_ext.checkpoints.layouts import detect_layout, KNOWN_LAYOUTS
from torchmm_ext.checkpoints.loading import (
    CheckpointArchitectureError,
    CheckpointShapeError,
    convert_to_torchmm_ext,
    load_pretrained,
    LoadReport,
)
from torchmm_ext.checkpoints.primitives import (
    group_keys,
    interpolate_pos_embed,
    load_state_dict_file,
    merge_qkv,
    split_qkv,
    unwrap_state_dict,
)
from torchmm_ext.checkpoints.tasks import dual_image_checkpoint, init_answer_decoder

__all__ = [
    "dual_image_checkpoint",
    "init_answer_decoder",
    "CheckpointArchitectureError",
    "CheckpointShapeError",
    "Conversion",
    "KNOWN_LAYOUTS",
    "LoadReport",
    "albef_conversion",
    "albef_to_torchmm_ext",
    "convert_to_torchmm_ext",
    "detect_layout",
    "fill_momentum",
    "group_keys",
    "hf_bert_conversion",
    "hf_bert_to_text_and_fusion",
    "interpolate_pos_embed",
    "load_pretrained",
    "load_state_dict_file",
    "merge_qkv",
    "split_qkv",
    "timm_vit_conversion",
    "timm_vit_to_vision",
    "torchmm_ext_to_albef",
    "torchmm_ext_to_albef_conversion",
    "torchmultimodal_conversion",
    "torchmultimodal_to_torchmm_ext",
    "unwrap_state_dict",
]
