"""torchmm_ext.evaluation: metrics and evaluation loops."""

from torchmm_ext.evaluation.grounding import (
    evaluate_grounding,
    GradCAMOutput,
    grounding_accuracy,
    itm_gradcam,
    load_grounding_targets,
    score_boxes,
)
from torchmm_ext.evaluation.retrieval import (
    evaluate_retrieval,
    recall_metrics,
    RetrievalModel,
    RetrievalScores,
)
from torchmm_ext.evaluation.vqa import (
    evaluate_vqa,
    ground_truth_answers,
    vqa_accuracy,
    vqa_metrics,
    VQAModel,
)

__all__ = [
    "GradCAMOutput",
    "itm_gradcam",
    "score_boxes",
    "grounding_accuracy",
    "load_grounding_targets",
    "evaluate_grounding",
    "RetrievalModel",
    "RetrievalScores",
    "evaluate_retrieval",
    "recall_metrics",
    "VQAModel",
    "evaluate_vqa",
    "ground_truth_answers",
    "vqa_accuracy",
    "vqa_metrics",
]
