"""AdamW with decay/no-decay parameter groups and a warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

NO_DECAY_KEYWORDS = ("pos_embed", "cls_token")


class ParamSplit(NamedTuple):
    """Trainable parameters split by weight decay.

    Attributes:
        decay (List[Tuple[str, nn.Parameter]]): matrices (Linear/conv/embedding weights).
        no_decay (List[Tuple[str, nn.Parameter]]): biases, norm parameters, scalars such as
            temperatures, and positional/class embeddings.
    """

    decay: List[Tuple[str, nn.Parameter]]
    no_decay: List[Tuple[str, nn.Parameter]]


def split_decay_params(
    model: nn.Module, no_decay_keywords: Sequence[str] = NO_DECAY_KEYWORDS
) -> ParamSplit:
    """Split trainable parameters into weight-decay and no-decay sets.

    A parameter gets no decay when it has at most one dimension (biases, LayerNorm weights,
    temperatures) or its name contains one of ``no_decay_keywords``. Frozen parameters
    (``requires_grad=False``) are left out; shared parameters appear once.

    Args:
        model (nn.Module): the model (DDP-wrapped is fine).
        no_decay_keywords (Sequence[str]): name fragments exempt from decay.
            Default: ("pos_embed", "cls_token").

    Returns:
        ParamSplit: (decay, no_decay) lists of (name, parameter).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or any(k in name for k in no_decay_keywords):
            no_decay.append((name, param))
        else:
            decay.append((name, param))
    return ParamSplit(decay, no_decay)


def _fused_supported(params: Sequence[nn.Parameter]) -> bool:
    return all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: Optional[bool] = None,
    no_decay_keywords: Sequence[str] = NO_DECAY_KEYWORDS,
    lr_mult: Optional[Mapping[str, float]] = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with a decay and a no-decay group (each split by
    learning-rate multiplier when ``lr_mult`` is given).

    Args:
        model (nn.Module): the model.
        lr (float): base learning rate of both groups.
        weight_decay (float): decay of the "decay" group (the other group gets 0).
        betas (Tuple[float, float]): Adam betas. Default: (0.9, 0.999).
        eps (float): Adam epsilon. Default: 1e-8.
        fused (Optional[bool]): fused kernel; None uses it where supported (CPU and CUDA
            floating-point parameters), else the multi-tensor ``foreach`` path. Default: None.
        no_decay_keywords (Sequence[str]): see :func:`split_decay_params`.
        lr_mult (Optional[Mapping[str, float]]): ``{name fragment: factor}``: a parameter whose
            name contains a fragment trains at ``lr * factor`` (the first matching fragment
            counts), as ViLT's and METER's ``lr_mult_head`` / ``lr_mult_cross_modal``.

    Returns:
        torch.optim.AdamW: groups are tagged with ``"name": "decay" | "no_decay"`` and
        ``"param_names"`` for debugging; empty groups are dropped.

    Raises:
        ValueError: when the model has no trainable parameter.
    """
    split = split_decay_params(model, no_decay_keywords)
    groups = []
    for tag, named, wd in (("decay", split.decay, weight_decay), ("no_decay", split.no_decay, 0.0)):
        by_factor: Dict[float, List[Tuple[str, nn.Parameter]]] = {}
        for name, param in named:
            factor = next((f for key, f in (lr_mult or {}).items() if key in name), 1.0)
            by_factor.setdefault(factor, []).append((name, param))
        for factor, members in by_factor.items():
            group = {"params": [p for _, p in members], "weight_decay": wd, "name": tag,
                     "param_names": [n for n, _ in members]}
            if factor != 1.0:
                group.update(lr=lr * factor, name=f"{tag}_lr_x{factor:g}")
            groups.append(group)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameter to optimise")
    all_params = [p for g in groups for p in g["params"]]
    use_fused = _fused_supported(all_params) if fused is None else fused
    if use_fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        except (RuntimeError, ValueError):
            if fused:  # explicitly requested: do not hide the problem
                raise
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def cosine_schedule_factor(
    step: int, total_steps: int, warmup_steps: int, min_ratio: float, start_ratio: float
) -> float:
    """Learning-rate multiplier at ``step`` for linear warm-up then cosine decay.

    Args:
        step (int): optimizer steps taken so far.
        total_steps (int): step at which the schedule reaches ``min_ratio``.
        warmup_steps (int): length of the linear warm-up from ``start_ratio`` to 1.
        min_ratio (float): final multiplier.
        start_ratio (float): multiplier at step 0 (when ``warmup_steps > 0``).

    Returns:
        float: the multiplier of the base learning rate.
    """
    if step < warmup_steps:
        return start_ratio + (1.0 - start_ratio) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    min_lr: float,
    warmup_start_lr: Optional[float] = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up to each group's base lr, then cosine to ``min_lr``.

    Step it once after every optimizer step. ``min_lr`` and ``warmup_start_lr`` are absolute
    and shared by all groups (each group's multiplier is ``min_lr / base_lr``, capped at 1 so
    a group whose base lr is below ``min_lr`` stays constant). After ``total_steps`` the lr
    stays at ``min_lr``.

    Args:
        optimizer (torch.optim.Optimizer): the optimizer; its current lrs are the base lrs.
        total_steps (int): optimizer steps of the whole run.
        warmup_steps (int): warm-up steps (0 for none).
        min_lr (float): final learning rate.
        warmup_start_lr (Optional[float]): lr at step 0; None starts the warm-up at ``min_lr``.
            Default: None.

    Returns:
        torch.optim.lr_scheduler.LambdaLR: its state_dict holds no code, so it is
        checkpoint-safe.
    """
    if total_steps <= 0 or warmup_steps < 0:
        raise ValueError(f"need total_steps > 0 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
    start_lr = min_lr if warmup_start_lr is None else warmup_start_lr

    def make(base_lr: float) -> Callable[[int], float]:
        min_ratio = min(1.0, min_lr / base_lr) if base_lr > 0 else 0.0
        start_ratio = min(1.0, start_lr / base_lr) if base_lr > 0 else 0.0

        def factor(step: int) -> float:
            return cosine_schedule_factor(step, total_steps, warmup_steps, min_ratio, start_ratio)

        return factor

    lambdas = [make(group["lr"]) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambdas)
