import random
from typing import Dict, List

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from torchmm_ext.engine import (
    build_cosine_scheduler,
    build_optimizer,
    build_train_state,
    NonFiniteLossError,
    restore_train_state,
    save_checkpoint,
    seed_everything,
    StepContext,
    StepOutput,
    train_one_epoch,
)

CPU = torch.device("cpu")


def _build(seed: int):
    seed_everything(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(1234)  # same data for every build
    data = TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
    loader = StatefulDataLoader(data, batch_size=4, shuffle=True)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.01)
    scheduler = build_cosine_scheduler(optimizer, total_steps=16, warmup_steps=2, min_lr=1e-4)
    return model, loader, optimizer, scheduler


def _make_step_fn(losses: List[torch.Tensor]):
    def step_fn(model, batch, ctx: StepContext) -> StepOutput:
        x, y = batch
        # python/numpy RNG enter the loss too, so all three RNG restores are checked
        jitter = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
        loss = ((model(x) - y) ** 2).mean() * jitter
        losses.append(loss.detach().clone())
        return StepOutput(loss, {"mse": loss.detach()})

    return step_fn


def _run(model, loader, optimizer, scheduler, step_fn, epochs, start_epoch=0, start_step=0,
         global_step=0, checkpoint_fn=None):
    for epoch in range(start_epoch, epochs):
        result = train_one_epoch(
            model, loader, optimizer, scheduler, step_fn, epoch=epoch, device=CPU,
            precision="fp32", grad_clip=1.0, log_every=2, metric_logger=None,
            global_step=global_step, start_step=start_step, checkpoint_fn=checkpoint_fn,
            checkpoint_every=3)
        global_step, start_step = result.global_step, 0
    return global_step


def test_resume_mid_epoch_reproduces_run(tmp_path):
    path = tmp_path / "checkpoint_last.pth"
    model, loader, optimizer, scheduler = _build(seed=0)
    losses: List[torch.Tensor] = []

    def checkpoint_fn(epoch, step_in_epoch, global_step):
        if (epoch, step_in_epoch) == (0, 3):  # after 3 steps of epoch 0
            state = build_train_state(model, optimizer, scheduler, loader, epoch, step_in_epoch,
                                      global_step, config={"lr": 1e-2}, best_metric=0.5,
                                      extra={"queue": torch.arange(3)})
            save_checkpoint(path, state)

    final_step = _run(model, loader, optimizer, scheduler, _make_step_fn(losses), epochs=2,
                      checkpoint_fn=checkpoint_fn)
    assert final_step == 16 and len(losses) == 16

    # from scratch, with another seed: everything must come from the checkpoint
    model2, loader2, optimizer2, scheduler2 = _build(seed=99)
    info = restore_train_state(path, model2, optimizer2, scheduler2, loader2)
    assert (info.epoch, info.step_in_epoch, info.global_step, info.best_metric) == (0, 3, 3, 0.5)
    assert torch.equal(info.extra["queue"], torch.arange(3)) and info.config == {"lr": 1e-2}
    losses2: List[torch.Tensor] = []
    final_step2 = _run(model2, loader2, optimizer2, scheduler2, _make_step_fn(losses2), epochs=2,
                       start_epoch=info.epoch, start_step=info.step_in_epoch,
                       global_step=info.global_step)
    assert final_step2 == 16 and len(losses2) == 13
    assert torch.equal(losses2[0], losses[3])  # step 4 identical
    assert all(torch.equal(a, b) for a, b in zip(losses2, losses[3:]))  # and the rest
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)
    assert scheduler2.last_epoch == scheduler.last_epoch


def test_non_finite_loss_stops_before_optimizer_step():
    model, loader, optimizer, scheduler = _build(seed=0)
    snapshots: List[Dict[str, torch.Tensor]] = []

    def step_fn(model, batch, ctx):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        if ctx.step_in_epoch == 2:
            loss = loss * float("nan")
        return StepOutput(loss, {"itc": torch.tensor(0.25)})

    with pytest.raises(NonFiniteLossError, match=r"epoch 0, step 2 .*loss=nan, itc=0.25"):
        train_one_epoch(model, loader, optimizer, scheduler, step_fn, epoch=0, device=CPU,
                        precision="fp32", grad_clip=None, log_every=1, metric_logger=None,
                        global_step=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[2][k])  # unchanged since the bad step started
    assert scheduler.last_epoch == 2
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_gradient_stops_with_clipping():
    model, loader, optimizer, scheduler = _build(seed=0)
    before = [p.detach().clone() for p in model.parameters()]

    def step_fn(model, batch, ctx):
        x, _ = batch
        out = model(x)
        # finite loss whose gradient is 0 * inf = nan
        return StepOutput(torch.sqrt(out - out.detach()).sum() + out.detach().mean(), {})

    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm at epoch 0, step 0"):
        train_one_epoch(model, loader, optimizer, scheduler, step_fn, epoch=0, device=CPU,
                        precision="fp32", grad_clip=1.0, log_every=1, global_step=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class _Recorder:
    def __init__(self) -> None:
        self.calls = []

    def log_scalars(self, prefix, scalars, step):
        self.calls.append((prefix, dict(scalars), step))


def test_metrics_averaging_logging_and_max_steps():
    model, loader, optimizer, scheduler = _build(seed=0)
    recorder = _Recorder()
    contexts: List[StepContext] = []

    def step_fn(model, batch, ctx):
        contexts.append(ctx)
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        return StepOutput(loss, {"idx": float(ctx.step_in_epoch)})

    result = train_one_epoch(model, loader, optimizer, scheduler, step_fn, epoch=1, device=CPU,
                             precision="auto", log_every=2, metric_logger=recorder,
                             global_step=10, max_steps=5)
    assert result.steps == 5 and result.global_step == 15
    assert result.metrics["idx"] == pytest.approx(2.0)  # mean of 0..4
    assert contexts[0] == StepContext(1, 0, 5, 10) and contexts[-1] == StepContext(1, 4, 5, 14)
    # windows: steps {0,1}, {2,3}, {4}
    assert [c[2] for c in recorder.calls] == [12, 14, 15]
    assert [c[1]["idx"] for c in recorder.calls] == [0.5, 2.5, 4.0]
    assert all(c[0] == "train" and "lr" in c[1] and "loss" in c[1] for c in recorder.calls)


def test_batch_dict_moved_and_checkpoint_fn_schedule():
    data = [{"x": torch.randn(2, 4), "meta": "id"} for _ in range(7)]
    model = nn.Linear(4, 1)
    optimizer = build_optimizer(model, 1e-3, 0.0)
    calls = []

    def step_fn(model, batch, ctx):
        assert batch["meta"] == "id"
        return StepOutput(model(batch["x"]).mean() ** 2, {})

    result = train_one_epoch(model, data, optimizer, None, step_fn, epoch=0, device=CPU,
                             precision="fp32", checkpoint_fn=lambda *a: calls.append(a),
                             checkpoint_every=3, start_step=0)
    assert result.steps == 7
    assert calls == [(0, 3, 3), (0, 6, 6)]
