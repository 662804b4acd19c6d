import math

import pytest
import torch
from torch import nn

from torchmm_ext.engine.optim import build_cosine_scheduler, build_optimizer, split_decay_params


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_param_groups():
    model = Tiny()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["decay"]["param_names"] == ["proj.weight"]
    assert groups["decay"]["weight_decay"] == 0.05
    assert sorted(groups["no_decay"]["param_names"]) == [
        "cls_token", "norm.bias", "norm.weight", "pos_embed", "proj.bias", "temp"]
    assert groups["no_decay"]["weight_decay"] == 0.0
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.frozen.weight) not in ids and id(model.frozen.bias) not in ids
    assert id(model.proj.weight) in ids


def test_fused_default_on_cpu_and_steps():
    model = Tiny()
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    assert optimizer.defaults["fused"] is True
    before = model.proj.weight.detach().clone()
    model.norm(model.proj(model.pos_embed)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.proj.weight)
    # foreach fallback when fused is disabled
    assert build_optimizer(Tiny(), 1e-3, 0.0, fused=False).defaults["fused"] in (None, False)


def test_split_shared_param_once():
    lin = nn.Linear(2, 2)
    model = nn.Sequential(lin, lin)
    split = split_decay_params(model)
    assert len(split.decay) == 1 and len(split.no_decay) == 1


def _hand_lr(step, base, total, warmup, min_lr, start_lr):
    # independent closed form: linear ramp start_lr -> base, then half-cosine base -> min_lr
    if step < warmup:
        return start_lr + (base - start_lr) * step / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("start_lr", [None, 0.0])
def test_cosine_schedule_matches_formula(start_lr):
    model = Tiny()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    optimizer.param_groups[1]["lr"] = 4e-3  # groups with different base lrs
    total, warmup, min_lr = 100, 10, 1e-5
    scheduler = build_cosine_scheduler(optimizer, total, warmup, min_lr, warmup_start_lr=start_lr)
    start = min_lr if start_lr is None else start_lr
    seen = {}
    for step in range(total + 5):
        seen[step] = [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
    for step in (0, 5, warmup, 55, total - 1, total, total + 3):
        for lr, base in zip(seen[step], (1e-3, 4e-3)):
            assert lr == pytest.approx(_hand_lr(step, base, total, warmup, min_lr, start), rel=1e-9, abs=1e-15)
    assert seen[0][0] == pytest.approx(start, abs=1e-15)
    assert seen[warmup] == pytest.approx([1e-3, 4e-3])
    assert seen[55][0] == pytest.approx((1e-3 + min_lr) / 2)  # midpoint of the cosine
    assert seen[total] == pytest.approx([min_lr, min_lr])


def test_schedule_state_round_trip():
    model = Tiny()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    sched = build_cosine_scheduler(opt, 20, 5, 0.0)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer(Tiny(), lr=1e-3, weight_decay=0.0)
    sched2 = build_cosine_scheduler(opt2, 20, 5, 0.0)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
