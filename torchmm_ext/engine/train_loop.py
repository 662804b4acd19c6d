"""The one training epoch loop every recipe uses.

A recipe supplies only ``step_fn(model, batch, ctx) -> StepOutput`` (forward + loss); this
module does device transfer, autocast, the non-finite check, backward, clipping, the
optimizer and scheduler steps, metric averaging, progress, TensorBoard and mid-epoch
checkpoints::

    for epoch in range(start_epoch, cfg.train.epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)        # before the iterator is created
        result = train_one_epoch(model, loader, optimizer, scheduler, step_fn, epoch=epoch, ...,
                                 global_step=global_step, start_step=start_step)
        global_step, start_step = result.global_step, 0
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn, Tensor
from tqdm import tqdm

from torchmm_ext.engine.checkpoint import unwrap_model
from torchmm_ext.engine.distributed import all_reduce_sum, is_main_process
from torchmm_ext.engine.precision import autocast_context


class StepContext(NamedTuple):
    """Where a training step is, for schedules inside ``step_fn`` (e.g. ALBEF's alpha ramp).

    Attributes:
        epoch (int): current epoch.
        step_in_epoch (int): index of this step in the epoch.
        steps_per_epoch (int): steps in a full epoch (after ``max_steps``).
        global_step (int): optimizer steps taken before this one.
    """

    epoch: int
    step_in_epoch: int
    steps_per_epoch: int
    global_step: int


class StepOutput(NamedTuple):
    """What ``step_fn`` returns.

    Attributes:
        loss (Tensor): scalar to backpropagate.
        metrics (Dict[str, Union[float, Tensor]]): scalars to log (e.g. loss_itc, loss_itm);
            the loop adds ``loss`` itself.
    """

    loss: Tensor
    metrics: Dict[str, Union[float, Tensor]]


class EpochResult(NamedTuple):
    """Summary of one ``train_one_epoch`` call.

    Attributes:
        metrics (Dict[str, float]): step metrics averaged over the steps run and over ranks,
            plus the last ``lr``.
        global_step (int): optimizer steps taken after the epoch.
        steps (int): steps run in this call (fewer than an epoch when resumed mid-epoch).
    """

    metrics: Dict[str, float]
    global_step: int
    steps: int


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN/inf; raised before the optimizer step."""


StepFn = Callable[[nn.Module, Any, StepContext], StepOutput]
CheckpointFn = Callable[[int, int, int], None]
# Called after every optimizer step as hook(model, ctx, run_step); run_step(batch) returns the
# StepOutput of a (host) batch computed as the training step computes it (device transfer,
# autocast, step_fn with this step's ctx) and does not backpropagate. Methods that act during
# training use it (the DAS search scores skip sets on held-out batches).
StepHook = Callable[[nn.Module, StepContext, Callable[[Any], StepOutput]], None]


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) dict/list/tuple to ``device``; other values unchanged.

    Args:
        batch (Any): a collated batch.
        device (torch.device): target device.

    Returns:
        Any: the same structure with tensors on ``device`` (non-blocking copies).
    """
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # NamedTuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def steps_in_epoch(loader: Iterable, max_steps: Optional[int] = None) -> int:
    """Optimizer steps one epoch runs: ``len(loader)`` capped by ``max_steps``.

    Use it to size the lr schedule: ``total_steps = epochs * steps_in_epoch(loader, max_steps)``.
    """
    n = len(loader)  # type: ignore[arg-type]
    return min(n, max_steps) if max_steps else n


def _stack_values(loss: Tensor, metrics: Mapping[str, Union[float, Tensor]]) -> List[float]:
    """Loss and metric values as floats with a single device->host transfer."""
    values = [loss.detach().float().reshape(())]
    for v in metrics.values():
        if isinstance(v, Tensor):
            values.append(v.detach().float().reshape(()).to(loss.device))
        else:
            values.append(torch.tensor(float(v), device=loss.device))
    return torch.stack(values).cpu().tolist()


def _describe(names: List[str], values: List[float]) -> str:
    return ", ".join(f"{n}={v:.4g}" for n, v in zip(names, values))


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: Optional[Any],
    step_fn: StepFn,
    *,
    epoch: int,
    device: torch.device,
    precision: str = "auto",
    grad_clip: Optional[float] = None,
    log_every: int = 50,
    metric_logger: Optional[Any] = None,
    global_step: int = 0,
    start_step: int = 0,
    checkpoint_fn: Optional[CheckpointFn] = None,
    checkpoint_every: int = 0,
    max_steps: Optional[int] = None,
    step_hooks: Sequence[StepHook] = (),
) -> EpochResult:
    """Train for one epoch (or the rest of one, when resuming).

    Call ``loader.sampler.set_epoch(epoch)`` (if the sampler has it) before this function:
    the iterator is created here. When resuming mid-epoch, restore the loader's state first
    (:func:`restore_train_state`); its iterator then starts at ``start_step``.

    The loss is checked before backward and the gradient norm (when clipping) before the
    optimizer step; a NaN/inf raises :class:`NonFiniteLossError`, so the parameters, the
    optimizer and the last checkpoint stay as they were.

    Args:
        model (nn.Module): the (possibly DDP-wrapped) model; set to train mode here.
        loader (Iterable): yields batches; ``len(loader)`` is the number of steps per epoch.
        optimizer (torch.optim.Optimizer): the optimizer.
        scheduler (Optional[Any]): stepped after every optimizer step, or None.
        step_fn (StepFn): ``(model, batch_on_device, ctx) -> StepOutput``; runs under autocast.
        epoch (int): current epoch.
        device (torch.device): compute device.
        precision (str): "fp32", "bf16" or "auto". Default: "auto".
        grad_clip (Optional[float]): max global grad norm; None or <= 0 disables. Default: None.
        log_every (int): steps between progress/TensorBoard updates. Default: 50.
        metric_logger (Optional[MetricLogger]): receives ``train/*`` scalars. Default: None.
        global_step (int): optimizer steps taken before this call. Default: 0.
        start_step (int): index in the epoch of the first step to run (resume). Default: 0.
        checkpoint_fn (Optional[CheckpointFn]): called as ``checkpoint_fn(epoch,
            next_step_in_epoch, global_step)`` every ``checkpoint_every`` steps, not after
            the epoch's last step (the recipe checkpoints at epoch end). Called on every
            rank (building the state is collective). Default: None.
        checkpoint_every (int): steps between mid-epoch checkpoints; 0 disables. Default: 0.
        max_steps (Optional[int]): truncate every epoch to this many steps (debugging).
            Default: None.
        step_hooks (Sequence[StepHook]): called after every optimizer step (see
            :data:`StepHook`). Default: none.

    Returns:
        EpochResult: averaged metrics, global step after the epoch, steps run.

    Raises:
        NonFiniteLossError: on a NaN/inf loss or gradient norm, naming epoch, step and metrics.
    """
    model.train()
    steps_per_epoch = steps_in_epoch(loader, max_steps)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    optimizer.zero_grad(set_to_none=True)

    # creating the iterator may draw from the global torch RNG (the loader's base seed);
    # fork it so that a resumed run, which re-creates the iterator, sees the same RNG stream
    with torch.random.fork_rng(devices=[]):
        iterator = iter(loader)

    names: List[str] = []
    epoch_sums: Optional[Tensor] = None
    window_sums: Optional[Tensor] = None
    window_count = steps_run = 0
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch}",
               disable=not is_main_process(), dynamic_ncols=True, leave=False)
    # Submodules with a per-step schedule (ELIP's keep-ratio warm-up) set it from each step's
    # context before the step runs, so a resumed run continues the same schedule.
    schedules = [m.before_train_step for m in unwrap_model(model).modules()
                 if callable(getattr(m, "before_train_step", None))]
    step = start_step
    try:
        while step < steps_per_epoch:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            ctx = StepContext(epoch, step, steps_per_epoch, global_step)
            for schedule in schedules:
                schedule(ctx)
            batch = move_to_device(batch, device)
            with autocast_context(device, precision):
                out = step_fn(model, batch, ctx)

            step_names = ["loss", *out.metrics.keys()]
            values = _stack_values(out.loss, out.metrics)  # the step's only host sync
            if not math.isfinite(values[0]):
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {epoch}, step {step} (global step {global_step}): "
                    f"{_describe(step_names, values)}; stopping before the optimizer step, the "
                    "last checkpoint is kept"
                )
            out.loss.backward()
            if grad_clip is not None and grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
                step_names.append("grad_norm")
                values.append(float(grad_norm))
                if not math.isfinite(values[-1]):
                    optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(
                        f"non-finite gradient norm at epoch {epoch}, step {step} (global step "
                        f"{global_step}): {_describe(step_names, values)}; stopping before the "
                        "optimizer step, the last checkpoint is kept"
                    )
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            for hook in step_hooks:
                hook(model, ctx, lambda extra, ctx=ctx: _run_step(model, step_fn, extra, ctx, device, precision))
            global_step += 1
            steps_run += 1
            step += 1

            if not names:
                names = step_names
                epoch_sums = torch.zeros(len(names), dtype=torch.float64)
                window_sums = torch.zeros(len(names), dtype=torch.float64)
            elif step_names != names:
                raise ValueError(
                    f"step_fn returned metrics {step_names[1:]} at step {step - 1}, "
                    f"but {names[1:]} before; every step must return the same keys"
                )
            current = torch.tensor(values, dtype=torch.float64)
            epoch_sums += current
            window_sums += current
            window_count += 1

            bar.update(1)
            if step % log_every == 0 or step == steps_per_epoch:
                window = {n: v / window_count for n, v in zip(names, window_sums.tolist())}
                bar.set_postfix(loss=f"{window['loss']:.4f}", lr=f"{lr:.2e}")
                if metric_logger is not None:
                    metric_logger.log_scalars("train", {**window, "lr": lr}, global_step)
                window_sums.zero_()
                window_count = 0
            if (checkpoint_fn is not None and checkpoint_every > 0
                    and step % checkpoint_every == 0 and step < steps_per_epoch):
                checkpoint_fn(epoch, step, global_step)
    finally:
        bar.close()

    metrics = _reduce_epoch_metrics(names, epoch_sums, steps_run, device)
    metrics["lr"] = lr
    return EpochResult(metrics, global_step, steps_run)


def _run_step(model: nn.Module, step_fn: StepFn, batch: Any, ctx: StepContext, device: torch.device,
              precision: str) -> StepOutput:
    batch = move_to_device(batch, device)
    with autocast_context(device, precision):
        return step_fn(model, batch, ctx)


def _reduce_epoch_metrics(
    names: List[str], sums: Optional[Tensor], count: int, device: torch.device
) -> Dict[str, float]:
    """Average per-step sums over the steps of all ranks (one all-reduce)."""
    if not names:  # no step ran (every rank shares the position, so none joins a collective)
        return {}
    # the collective runs on the compute device (nccl cannot reduce CPU tensors)
    packed = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64)]).to(device)
    all_reduce_sum(packed)
    packed = packed.cpu()
    total = max(packed[-1].item(), 1.0)
    return {n: v / total for n, v in zip(names, packed[:-1].tolist())}
