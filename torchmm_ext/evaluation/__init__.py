"""torchmm_ext.evaluation: metrics and evaluation loops."""

from torchmm_ext.evaluation.retrieval import (
    evaluate_retrieval,
    recall_metrics,
    RetrievalModel,
    RetrievalScores,
)

__all__ = [
    "RetrievalModel",
    "RetrievalScores",
    "evaluate_retrieval",
    "recall_metrics",
]
