"""PELA's distillation pre-training losses: hidden-state distillation from the frozen full model
and the weight-perturbation regulariser that keeps each low-rank product near the full weight.

* :func:`hidden_state_mse`: MSE averaged over paired lists of hidden states.
* :func:`weight_perturbation_loss`: ``mean over layers of (max|B A - W_teacher| - eps)^2``.
* :class:`PELADistiller`: runs an ALBEF pre-training student (ITC + ITM + MLM) and adds
  ``kd_weight * L_kd + reg_weight * L_reg`` against a frozen, eval-mode teacher.

The student's hidden states are read through the encoders' ``return_hidden_states`` seam:
forward hooks on the student's online encoders switch it on during the student's own forward,
so the student runs once and its model code is unchanged.
"""

import contextlib
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn, Tensor

from torchmm_ext.modules.low_rank import low_rank_layers

__all__ = ["PELADistiller", "PELAPretrainingOutput", "hidden_state_mse", "weight_perturbation_loss"]


def hidden_state_mse(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Mean over pairs of ``MSE(student[i], teacher[i])`` (PELA's feature distillation).

    Args:
        student (Sequence[Tensor]): hidden states, any shapes.
        teacher (Sequence[Tensor]): the same number of tensors with the same shapes (detached).

    Returns:
        Tensor: scalar (float32).

    Raises:
        ValueError: the lists differ in length or a pair in shape (naming the index).
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"hidden_state_mse needs two equally long non-empty lists, got {len(student)} and {len(teacher)}")
    losses = []
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ValueError(f"hidden_state_mse pair {i}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        losses.append(F.mse_loss(s.float(), t.detach().float()))
    return torch.stack(losses).mean()


def weight_perturbation_loss(
    student: nn.Module,
    teacher: nn.Module,
    epsilon: float = 1e-3,
    include_momentum: bool = False,
) -> Tensor:
    """PELA's regulariser: for every low-rank layer of ``student`` and the full Linear at the same
    path in ``teacher``, ``(max|B A - W_teacher| - epsilon)^2``, averaged over layers.

    Args:
        student (nn.Module): a model changed by :func:`~torchmm_ext.modules.low_rank.apply_low_rank`.
        teacher (nn.Module): the full-rank model it came from.
        epsilon (float): tolerated deviation (1e-3).
        include_momentum (bool): also average over the momentum copies' pairs (paths whose first
            name ends in ``_m``), as the published code does; they get no gradient, so the
            online layers' effective weight halves. Default: online layers only.

    Returns:
        Tensor: scalar.

    Raises:
        ValueError: the student has no low-rank layer, or the teacher lacks one of its paths or
            has another shape there (naming the path).
    """
    terms = []
    for path, layer in low_rank_layers(student).items():
        if path.split(".")[0].endswith("_m") and not include_momentum:
            continue
        try:
            full = teacher.get_submodule(path)
        except AttributeError:
            raise ValueError(f"weight_perturbation_loss: the teacher has no module {path!r}") from None
        target = full.weight
        if tuple(target.shape) != (layer.out_features, layer.in_features):
            raise ValueError(f"weight_perturbation_loss: {path} is {layer.out_features}x{layer.in_features} "
                             f"in the student but {tuple(target.shape)} in the teacher")
        deviation = (layer.effective_weight().float() - target.detach().float()).abs().max()
        terms.append((deviation - epsilon) ** 2)
    if not terms:
        raise ValueError("weight_perturbation_loss: the student has no low-rank layer (apply_low_rank first)")
    return torch.stack(terms).mean()


class PELAPretrainingOutput(NamedTuple):
    """Attributes:
    loss (Tensor): ``loss_itc + loss_mlm + loss_itm + kd_weight * loss_kd + reg_weight * loss_reg``.
    loss_itc, loss_mlm, loss_itm (Tensor): the student's ALBEF losses.
    loss_kd (Tensor): hidden-state MSE against the teacher.
    loss_reg (Tensor): weight-perturbation regulariser.
    """

    loss: Tensor
    loss_itc: Tensor
    loss_mlm: Tensor
    loss_itm: Tensor
    loss_kd: Tensor
    loss_reg: Tensor


class _Calls:
    """Records every call of a module: its positional/keyword inputs and its hidden states."""

    def __init__(self) -> None:
        self.inputs: List[Tuple[tuple, dict]] = []
        self.hidden: List[List[Tensor]] = []


@contextlib.contextmanager
def _record_hidden_states(modules: Dict[str, nn.Module]) -> Iterator[Dict[str, _Calls]]:
    calls = {name: _Calls() for name in modules}
    handles = []
    for name, module in modules.items():
        record = calls[name]

        def pre_hook(mod, args, kwargs, record=record):
            record.inputs.append((args, dict(kwargs)))
            return args, {**kwargs, "return_hidden_states": True}

        def hook(mod, args, kwargs, output, record=record):
            record.hidden.append(list(output.hidden_states))

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


class PELADistiller:
    """PELA's intermediate pre-training step for an ALBEF pre-training model
    (:class:`~torchmm_ext.models.albef.ALBEFForPretraining`): the low-rank student's ITC + ITM +
    MLM losses plus feature distillation from a frozen full-rank teacher and the
    weight-perturbation regulariser.

    Distilled hidden states (33 for ALBEF base, as published): the ViT's embedding output and
    every block (before the final norm), the text encoder's embeddings and layers on the
    caption (text mode), and the MLM pass (embeddings, text layers, fusion layers) on the
    masked caption. Choices (configurable where they matter):

    * the teacher runs in eval mode (no dropout) on the student's own MLM mask, so every pair
      compares the same input; the published code runs it in train mode with its own mask;
    * the regulariser averages over the online layers (``include_momentum=False``); the
      published code also averages over the gradient-free momentum pairs.

    The teacher is held outside the module tree: it is not in the student's ``parameters()``,
    ``state_dict()`` or optimizer, and every parameter of it has ``requires_grad=False``.

    Args:
        teacher (nn.Module): the full-rank pre-training model (frozen and set to eval here).
        kd_weight (float): weight of the feature distillation (0.1).
        reg_weight (float): weight of the regulariser (1.0).
        epsilon (float): regulariser tolerance (1e-3).
        include_momentum (bool): regulariser over momentum pairs too (published behaviour).
    """

    def __init__(
        self,
        teacher: nn.Module,
        kd_weight: float = 0.1,
        reg_weight: float = 1.0,
        epsilon: float = 1e-3,
        include_momentum: bool = False,
    ) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.kd_weight, self.reg_weight = kd_weight, reg_weight
        self.epsilon, self.include_momentum = epsilon, include_momentum

    def to(self, device: torch.device) -> "PELADistiller":
        """Move the teacher."""
        self.teacher.to(device)
        return self

    @torch.no_grad()
    def teacher_hidden_states(self, image: Tensor, input_ids: Tensor, masked_ids: Tensor,
                              attention_mask: Tensor) -> List[Tensor]:
        """The teacher's hidden states in the order :meth:`__call__` pairs them."""
        t = self.teacher.eval()
        vision = t.vision_encoder(image, return_hidden_states=True)
        text = t.text_encoder(input_ids, attention_mask=attention_mask.bool(), return_hidden_states=True)
        mlm_text = t.text_encoder(masked_ids, attention_mask=attention_mask.bool(), return_hidden_states=True)
        fusion = t.fusion_encoder(mlm_text.last_hidden_state, attention_mask, vision.last_hidden_state,
                                  return_hidden_states=True)
        return [*vision.hidden_states, *text.hidden_states, *mlm_text.hidden_states, *fusion.hidden_states]

    def __call__(
        self,
        student: nn.Module,
        image: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        alpha: float = 0.0,
        idx: Optional[Tensor] = None,
    ) -> PELAPretrainingOutput:
        """One training forward.

        Inputs:
            student (nn.Module): the low-rank pre-training model (or its DDP wrapper).
            image, input_ids, attention_mask, alpha, idx: as the model's forward.

        Returns:
            PELAPretrainingOutput
        """
        inner = getattr(student, "module", student)
        encoders = {"vision": inner.vision_encoder, "text": inner.text_encoder, "fusion": inner.fusion_encoder}
        with _record_hidden_states(encoders) as calls:
            out = student(image, input_ids, attention_mask, alpha, idx)
        # Call order inside ALBEFForPretraining.forward: the text encoder's first call is the
        # caption (text mode), its last the masked caption (MLM pass); the fusion encoder's last
        # call is the MLM pass (the earlier ones are ITM).
        masked_ids = calls["text"].inputs[-1][0][0]
        student_states = [*calls["vision"].hidden[0], *calls["text"].hidden[0],
                          *calls["text"].hidden[-1], *calls["fusion"].hidden[-1]]
        teacher_states = self.teacher_hidden_states(image, input_ids, masked_ids, attention_mask)
        loss_kd = hidden_state_mse(student_states, teacher_states)
        loss_reg = weight_perturbation_loss(inner, self.teacher, self.epsilon, self.include_momentum)
        loss = out.loss + self.kd_weight * loss_kd + self.reg_weight * loss_reg
        return PELAPretrainingOutput(loss, out.loss_itc, out.loss_mlm, out.loss_itm, loss_kd, loss_reg)
