"""ALBEF builders, one module per task.

``albef_model_for_<task>(preset="base")`` gives the paper's model (ViT-B/16, BERT-base split at
layer 6); ``preset="tiny"`` is a small model that trains on a laptop CPU in minutes on the
built-in shapes world. Every size can be overridden by keyword.
"""

from torchmm_ext.models.albef._common import ALBEF_PRESETS, ImageEncoding, TextEncoding
from torchmm_ext.models.albef.retrieval import (
    ALBEFForRetrieval,
    albef_model_for_retrieval,
    ALBEFRetrievalOutput,
)
from torchmm_ext.models.albef.ve import ALBEFForVE, albef_model_for_ve, ALBEFVEOutput

__all__ = [
    "ALBEF_PRESETS", "ImageEncoding", "TextEncoding",
    "ALBEFForRetrieval", "ALBEFRetrievalOutput", "albef_model_for_retrieval",
    "ALBEFForVE", "ALBEFVEOutput", "albef_model_for_ve",
]
