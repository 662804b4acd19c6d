"""ALBEF builders, one module per task.

``albef_model_for_<task>(preset="base")`` gives the paper's model (ViT-B/16, BERT-base split at
layer 6); ``preset="tiny"`` is a small model that trains on a laptop CPU in minutes on the
built-in shapes world. Every size can be overridden by keyword.
"""

from torchmm_ext.models.albef._common import ALBEF_PRESETS, ImageEncoding, TextEncoding
from torchmm_ext.models.albef.pretraining import (
    ALBEFForPretraining,
    albef_model_for_pretraining,
    ALBEFPretrainingOutput,
)
from torchmm_ext.models.albef.retrieval import (
    ALBEFForRetrieval,
    albef_model_for_retrieval,
    ALBEFRetrievalOutput,
)
from torchmm_ext.models.albef.ve import ALBEFForVE, albef_model_for_ve, ALBEFVEOutput
from torchmm_ext.models.albef.nlvr import (
    ALBEFForNLVR,
    ALBEFForTextAssignment,
    albef_model_for_nlvr,
    albef_model_for_text_assignment,
    ALBEFNLVROutput,
    ALBEFTextAssignmentOutput,
    nlvr_state_dict_from_single_image,
    sample_text_assignment,
    TextAssignment,
)
from torchmm_ext.models.albef.vqa import (
    ALBEFAnswerDecoder,
    ALBEFForVQA,
    albef_model_for_vqa,
    ALBEFVQAOutput,
    answer_sequence_nll,
)

__all__ = [
    "ALBEF_PRESETS", "ImageEncoding", "TextEncoding",
    "ALBEFForRetrieval", "ALBEFRetrievalOutput", "albef_model_for_retrieval",
    "ALBEFForVE", "ALBEFVEOutput", "albef_model_for_ve",
    "ALBEFForNLVR", "ALBEFNLVROutput", "albef_model_for_nlvr",
    "ALBEFForTextAssignment", "ALBEFTextAssignmentOutput", "albef_model_for_text_assignment",
    "TextAssignment", "sample_text_assignment", "nlvr_state_dict_from_single_image",
    "ALBEFForVQA", "ALBEFVQAOutput", "ALBEFAnswerDecoder", "albef_model_for_vqa", "answer_sequence_nll",
    "ALBEFForPretraining", "ALBEFPretrainingOutput", "albef_model_for_pretraining",
]
