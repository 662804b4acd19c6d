"""Accuracy of classification heads (SNLI-VE, NLVR2) over a sharded evaluation split."""

from typing import Callable, ContextManager, Dict

import torch
from torch import nn

from torchmm_ext.engine.distributed import all_reduce_sum


@torch.no_grad()
def classification_accuracy(
    model: nn.Module,
    loader,
    device: torch.device,
    precision_ctx: Callable[[], ContextManager],
) -> Dict[str, float]:
    """Accuracy (%) of ``model.predict`` over ``loader``, summed over ranks (each rank passes
    its own disjoint shard; a single process passes the whole split).

    Args:
        model (nn.Module): has ``predict(*inputs) -> logits [B, C]``; inputs are the batch's
            ``image``, ``input_ids`` and ``attention_mask``.
        loader: batches with those keys and the labels in ``idx`` (as ``RetrievalCollator``
            and ``NLVRCollator`` put them).
        device (torch.device): compute device.
        precision_ctx (Callable[[], ContextManager]): autocast context factory.

    Returns:
        Dict[str, float]: ``acc`` (%) and ``num_samples``.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, total
    for batch in loader:
        with precision_ctx():
            logits = model.predict(batch["image"].to(device), batch["input_ids"].to(device),
                                   batch["attention_mask"].to(device))
        labels = batch["idx"].to(device)
        counts[0] += (logits.argmax(dim=-1) == labels).sum()
        counts[1] += labels.numel()
    model.train(was_training)
    all_reduce_sum(counts)
    correct, total = counts.tolist()
    return {"acc": 100.0 * correct / max(total, 1.0), "num_samples": total}
