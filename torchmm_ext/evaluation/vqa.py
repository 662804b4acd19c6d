"""VQA evaluation: rank a fixed answer list for every question (ALBEF ``VQA.py``
``evaluation``), sharded across ranks, and the VQA accuracy where answers are known.

The predictions are what the official VQA server takes: ``[{"question_id", "answer"}]``.

The accuracy is the plain formula ``min(#annotators who gave the answer / 3, 1)`` averaged over
questions, with exact string comparison. The official evaluation differs in two ways, neither
reproduced: it normalises answers (punctuation, articles, number words) and averages the
formula over the ten leave-one-annotator-out subsets of the ten answers.
"""

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "VQAModel",
    "vqa_accuracy",
    "evaluate_vqa",
    "vqa_metrics",
    "ground_truth_answers",
]


class VQAModel(Protocol):
    """What :func:`evaluate_vqa` needs (:class:`~torchmm_ext.models.albef.ALBEFForVQA`)."""

    def rank_answers(
        self, image: Tensor, question_ids: Tensor, question_mask: Tensor, answer_ids: Tensor,
        answer_mask: Tensor, k: int,
    ) -> Tuple[Tensor, Tensor]: ...


def vqa_accuracy(predicted: str, gt_answers: Sequence[str]) -> float:
    """VQA accuracy of one predicted answer: ``min(#annotators who gave it / 3, 1)``.

    Args:
        predicted (str): the predicted answer.
        gt_answers (Sequence[str]): the annotators' answers (10 in VQA v2), repeats included.

    Returns:
        float: 0, 1/3, 2/3 or 1.
    """
    return min(sum(answer == predicted for answer in gt_answers) / 3.0, 1.0)


@torch.no_grad()
def evaluate_vqa(
    model: VQAModel,
    loader: Iterable[Mapping[str, Any]],
    answer_list: Sequence[str],
    answer_ids: Tensor,
    answer_mask: Tensor,
    k: int,
    device: torch.device,
    autocast: Optional[Callable[[], ContextManager]] = None,
) -> List[Dict[str, Any]]:
    """Answer every question of ``loader`` with the best of ``answer_list``.

    Each rank passes its own shard of the questions (a single process passes them all); the
    predictions of all ranks are gathered, so every rank returns the full list.

    Args:
        model (VQAModel): the model (its ``rank_answers``); set to eval mode here and restored.
        loader (Iterable[Mapping[str, Any]]): batches of :class:`~torchmm_ext.data.datasets.VQACollator`
            test samples (``image``, ``question_ids``, ``question_mask``, ``question_id``).
        answer_list (Sequence[str]): the candidate answers (without end token).
        answer_ids (Tensor): ``[A, La]`` the answers tokenized with the end token appended.
        answer_mask (Tensor): ``[A, La]``.
        k (int): candidates re-scored per question (``k_test``).
        device (torch.device): compute device.
        autocast (Optional[Callable[[], ContextManager]]): precision context factory.

    Returns:
        List[Dict[str, Any]]: ``{"question_id", "answer"}`` per question, rank by rank.
    """
    if answer_ids.size(0) != len(answer_list):
        raise ValueError(f"answer_ids has {answer_ids.size(0)} rows for {len(answer_list)} answers")
    autocast = autocast or nullcontext
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()  # type: ignore[attr-defined]
    answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
    predictions: List[Dict[str, Any]] = []
    for batch in loader:
        with autocast():
            top_ids, _ = model.rank_answers(
                batch["image"].to(device), batch["question_ids"].to(device), batch["question_mask"].to(device),
                answer_ids, answer_mask, k,
            )
        for question_id, best in zip(batch["question_id"], top_ids[:, 0].tolist()):
            predictions.append({"question_id": question_id, "answer": answer_list[best]})
    if hasattr(model, "train"):
        model.train(was_training)  # type: ignore[attr-defined]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, predictions)
        predictions = [p for part in gathered for p in part]
    return predictions


def ground_truth_answers(records: Sequence[Mapping[str, Any]], source: str = "annotations") -> Optional[Dict[Any, List[str]]]:
    """The annotators' answers of a VQA split by ``question_id``, or None when no record has
    an ``answer`` (a test split without answers: only the result JSON can be written).

    Args:
        records (Sequence[Mapping[str, Any]]): VQA records (``VQADataset.records``).
        source (str): where they come from, for error messages (the annotation file).

    Returns:
        Optional[Dict[Any, List[str]]]: ``question_id -> answers`` (a string answer becomes a
        one-element list).

    Raises:
        ValueError: some records have answers and others not, or an answer is not a string or
            a non-empty list of strings; the message names the record.
    """
    with_answer = [i for i, rec in enumerate(records) if "answer" in rec]
    if not with_answer:
        return None
    if len(with_answer) != len(records):
        missing = next(i for i, rec in enumerate(records) if "answer" not in rec)
        raise ValueError(f"{source}: record {missing} has no 'answer' but {len(with_answer)} other records do; "
                         "a split is scored only when every question has its answers")
    answers: Dict[Any, List[str]] = {}
    for i, rec in enumerate(records):
        value = rec["answer"]
        value = [value] if isinstance(value, str) else value
        if not (isinstance(value, list) and value and all(isinstance(a, str) for a in value)):
            raise ValueError(f"{source}: record {i} key 'answer' must be a string or a non-empty list of strings, "
                             f"got {rec['answer']!r:.80}")
        answers[rec["question_id"]] = value
    return answers


def vqa_metrics(
    predictions: Sequence[Mapping[str, Any]],
    gt_answers: Mapping[Any, Sequence[str]],
    answer_list: Optional[Sequence[str]] = None,
) -> Dict[str, float]:
    """Mean VQA accuracy (%) of ``predictions``.

    Ground-truth answers may be anything (an answer outside ``answer_list`` simply cannot be
    predicted); every predicted answer must come from ``answer_list`` when it is given, and the
    predictions must cover each question of ``gt_answers`` exactly once.

    Args:
        predictions (Sequence[Mapping[str, Any]]): ``{"question_id", "answer"}`` per question.
        gt_answers (Mapping[Any, Sequence[str]]): annotators' answers by question id.
        answer_list (Optional[Sequence[str]]): the candidate answers; also gives ``max_acc``,
            the best accuracy any answer of the list could reach (the ceiling it sets).

    Returns:
        Dict[str, float]: ``acc``, ``num_questions`` and, with ``answer_list``, ``max_acc``.

    Raises:
        ValueError: a prediction for an unknown or repeated question id, a question without a
            prediction, or a predicted answer outside ``answer_list``.
    """
    allowed = set(answer_list) if answer_list is not None else None
    seen = set()
    total = 0.0
    for p in predictions:
        qid = p["question_id"]
        if qid not in gt_answers:
            raise ValueError(f"prediction for question_id {qid!r}, which has no ground-truth answers")
        if qid in seen:
            raise ValueError(f"question_id {qid!r} predicted twice")
        if allowed is not None and p["answer"] not in allowed:
            raise ValueError(f"question_id {qid!r}: predicted answer {p['answer']!r} is not in the answer list")
        seen.add(qid)
        total += vqa_accuracy(p["answer"], gt_answers[qid])
    if len(seen) != len(gt_answers):
        missing = next(q for q in gt_answers if q not in seen)
        raise ValueError(f"{len(gt_answers) - len(seen)} questions have no prediction (e.g. question_id {missing!r})")
    n = max(len(gt_answers), 1)
    out = {"acc": 100.0 * total / n, "num_questions": float(len(gt_answers))}
    if allowed is not None:
        best = sum(max((vqa_accuracy(a, gt) for a in set(gt) if a in allowed), default=0.0)
                   for gt in gt_answers.values())
        out["max_acc"] = 100.0 * best / n
    return out
