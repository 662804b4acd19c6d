"""PELA's distillation losses and pre-training step: hand values, frozen teacher, same inputs."""

import copy

import pytest
import torch
from torch import nn

from torchmm_ext.engine.optim import build_optimizer
from torchmm_ext.models.albef import albef_model_for_pretraining
from torchmm_ext.modules.distillation import hidden_state_mse, PELADistiller, weight_perturbation_loss
from torchmm_ext.modules.low_rank import apply_low_rank, LowRankLinear


def test_hidden_state_mse_by_hand() -> None:
    student = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0, 0.0], [0.0, 3.0]])]
    teacher = [torch.zeros(2), torch.zeros(2, 2)]
    # (1 + 4) / 2 = 2.5 and 9 / 4 = 2.25, averaged
    assert hidden_state_mse(student, teacher).item() == pytest.approx(2.375)
    with pytest.raises(ValueError, match=r"pair 1: student \(2, 2\) vs teacher \(4,\)"):
        hidden_state_mse(student, [torch.zeros(2), torch.zeros(4)])


def _pair(weight_gap: float) -> LowRankLinear:
    low = LowRankLinear(4, 6, rank=1)
    with torch.no_grad():
        low[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        low[1].weight.zero_()
        low[1].weight[2, 0] = weight_gap  # B A differs from a zero weight by weight_gap at one entry
    return low


def test_weight_perturbation_by_hand_and_momentum_option() -> None:
    student = nn.ModuleDict({"enc": nn.Sequential(_pair(0.5)), "enc_m": nn.Sequential(_pair(0.2))})
    teacher = nn.ModuleDict({"enc": nn.Sequential(nn.Linear(4, 6)), "enc_m": nn.Sequential(nn.Linear(4, 6))})
    with torch.no_grad():
        teacher["enc"][0].weight.zero_()
        teacher["enc_m"][0].weight.zero_()
        teacher["enc"][0].weight[0, 3] = -0.1  # max |BA - W| is still 0.5
    online = weight_perturbation_loss(student, teacher)
    assert online.item() == pytest.approx((0.5 - 1e-3) ** 2)
    both = weight_perturbation_loss(student, teacher, include_momentum=True)
    assert both.item() == pytest.approx(((0.5 - 1e-3) ** 2 + (0.2 - 1e-3) ** 2) / 2)
    with pytest.raises(ValueError, match="teacher has no module 'enc.0'"):
        weight_perturbation_loss(student, nn.ModuleDict({"other": nn.Linear(4, 6)}))


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return albef_model_for_pretraining("tiny", image_size=32, patch_size=16, vision_depth=2, text_layers=1,
                                       fusion_layers=1, vocab_size=64, queue_size=8, dropout=0.0,
                                       mask_token_id=3, cls_token_id=1, pad_token_id=0)


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(4, 64, (4, 8))
    ids[:, 0] = 1
    return torch.randn(4, 3, 32, 32), ids, torch.ones_like(ids)


def test_full_rank_student_matches_teacher_on_the_same_mask() -> None:
    teacher = _tiny()
    student = copy.deepcopy(teacher).eval()  # eval: no dropout, so states can match exactly
    apply_low_rank(student, rank=10**6)
    distiller = PELADistiller(teacher)
    out = distiller(student, *_batch(), alpha=0.4)
    # every distilled pair compares the same input (the student's own MLM mask): KD ~ 0
    assert out.loss_kd.item() < 1e-8
    # full-rank factors reproduce W: each term is (0 - 1e-3)^2 up to rounding
    assert out.loss_reg.item() == pytest.approx(1e-6, rel=0.05)
    base = out.loss_itc + out.loss_mlm + out.loss_itm
    assert out.loss.item() == pytest.approx((base + 0.1 * out.loss_kd + out.loss_reg).item(), rel=1e-6)


def test_low_rank_step_teacher_frozen_and_outside_the_optimizer() -> None:
    teacher = _tiny()
    student = copy.deepcopy(teacher)
    apply_low_rank(student, ratio=3)
    distiller = PELADistiller(teacher)
    student.train()
    assert not teacher.training
    out = distiller(student, *_batch(), alpha=0.0)
    assert out.loss_kd.item() > 0 and out.loss_reg.item() > 0
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    factor = student.vision_encoder.blocks[0].attention.input_proj[0].weight
    assert factor.grad is not None and factor.grad.abs().sum() > 0
    optimizer = build_optimizer(student, lr=1e-4, weight_decay=0.02)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert not any(k.startswith("teacher") for k in student.state_dict())


def test_distilled_state_count() -> None:
    teacher = _tiny()
    student = copy.deepcopy(teacher).eval()
    apply_low_rank(student, ratio=3)
    image, ids, mask = _batch()
    states = PELADistiller(teacher).teacher_hidden_states(image, ids, ids, mask)
    # ViT: embeddings + 2 blocks; text mode: embeddings + 1 layer; MLM: embeddings + 1 + fusion 1
    assert len(states) == 3 + 2 + 3
