"""The ``distill:`` section of the pre-training recipe: PELA's distillation from a frozen
full-rank teacher (:class:`~torchmm_ext.modules.distillation.PELADistiller`)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from torchmm_ext.checkpoints.loading import load_pretrained
from torchmm_ext.modules.distillation import PELADistiller

__all__ = ["DistillConfig", "build_distiller"]


@dataclass
class DistillConfig:
    """PELA's intermediate pre-training (``distill:`` in a pre-training config).

    Attributes:
        teacher (str): the full-rank checkpoint the teacher loads (any layout).
        teacher_hint (str): how to make ``teacher`` when it is missing (shown in the error).
        kd_weight (float): weight of the hidden-state MSE (PELA: 0.1).
        reg_weight (float): weight of the weight-perturbation regulariser (PELA: 1.0).
        epsilon (float): the regulariser's tolerance (PELA: 1e-3).
        include_momentum (bool): the regulariser also averages over the momentum pairs, as the
            published code does (default: online layers only).
    """

    teacher: str = ""
    teacher_hint: str = ""
    kd_weight: float = 0.1
    reg_weight: float = 1.0
    epsilon: float = 1e-3
    include_momentum: bool = False


def build_distiller(
    cfg: DistillConfig,
    build_teacher: Callable[[], nn.Module],
    device: torch.device,
    log: Optional[Callable[[str], None]] = None,
) -> PELADistiller:
    """The frozen teacher, loaded from ``cfg.teacher`` and moved to ``device``, in a
    :class:`PELADistiller`.

    Args:
        cfg (DistillConfig): the ``distill:`` section.
        build_teacher (Callable[[], nn.Module]): builds the full-rank model (the student's
            builder with the same keyword arguments).
        device (torch.device): where the teacher runs.
        log (Optional[Callable[[str], None]]): where the load report goes.

    Raises:
        FileNotFoundError: ``distill.teacher`` is empty or missing (with ``teacher_hint``).
    """
    if not cfg.teacher or not Path(cfg.teacher).is_file():
        hint = f" {cfg.teacher_hint}" if cfg.teacher_hint else ""
        raise FileNotFoundError(
            f"distill.teacher {cfg.teacher or '(empty)'!s} does not exist: PELA's distillation needs the "
            f"full-rank model as teacher.{hint} Or point it elsewhere: --opts distill.teacher=PATH"
        )
    teacher = build_teacher()
    report = load_pretrained(teacher, cfg.teacher)
    if log is not None:
        log(f"teacher loaded from {cfg.teacher}:\n{report.format()}")
    return PELADistiller(teacher, cfg.kd_weight, cfg.reg_weight, cfg.epsilon, cfg.include_momentum).to(device)
