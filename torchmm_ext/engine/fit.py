"""The epoch driver every recipe shares: resume, train, checkpoint, evaluate, keep the best.

A recipe builds its data, model, optimizer and step function, then calls :func:`fit`. One
implementation of resume/checkpoint/best-model logic serves every task.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from torchmm_ext.engine.checkpoint import (
    BEST_CHECKPOINT,
    build_train_state,
    LAST_CHECKPOINT,
    load_model_weights,
    resolve_resume_path,
    restore_train_state,
    save_checkpoint,
    unwrap_model,
)
from torchmm_ext.engine.config import ConfigError
from torchmm_ext.engine.distributed import barrier, is_main_process
from torchmm_ext.engine.metric_logging import get_logger, MetricLogger
from torchmm_ext.engine.optim import build_cosine_scheduler, build_optimizer
from torchmm_ext.engine.train_loop import StepFn, StepHook, steps_in_epoch, train_one_epoch
from torchmm_ext.modules.efficiency import applied_methods, module_path, momentum_twin, resolve_block_groups

logger = get_logger(__name__)


@dataclass
class TrainConfig:
    """Training hyperparameters shared by every recipe (the ``train:`` config section).

    Attributes:
        epochs (int): training epochs.
        batch_size (int): per-process batch size.
        lr (float): peak learning rate.
        min_lr (float): final learning rate of the cosine schedule.
        weight_decay (float): AdamW weight decay (not applied to biases, norms, embeddings'
            CLS/position tokens).
        warmup_epochs (float): linear warm-up length in epochs (from ``min_lr``).
        grad_clip (Optional[float]): global gradient-norm clip; None disables.
        precision (str): ``fp32``, ``bf16`` or ``auto`` (bf16 on GPUs and AMX CPUs).
        seed (int): global seed (offset by rank).
        num_workers (int): data-loader worker processes per rank.
        log_every (int): steps between progress/TensorBoard updates.
        checkpoint_every (int): steps between mid-epoch checkpoints (0: epoch ends only).
        max_steps_per_epoch (Optional[int]): cut every epoch short (smoke tests).
        eval_every (int): evaluate on the validation split every this many epochs (and after
            the last one).
        betas (List[float]): AdamW betas (ViLT and METER: 0.9, 0.98).
        lr_mult (Dict[str, float]): ``{parameter-name fragment: lr factor}`` (ViLT/METER's
            ``lr_mult_head`` and ``lr_mult_cross_modal``), see ``build_optimizer``.
        deterministic (bool): bitwise reproducible training on one machine (fp32 and
            deterministic algorithms, see
            :func:`~torchmm_ext.engine.distributed.use_deterministic_training`): two runs, or a
            run killed and resumed with ``--resume``, give identical weights and metrics.
            ``precision: auto`` then means fp32; ``bf16`` is a config error.
        find_unused_parameters (Optional[bool]): DDP's ``find_unused_parameters`` under
            torchrun (:func:`~torchmm_ext.engine.distributed.wrap_ddp`); None: on when a method
            leaves parameters without gradient on some steps (a DAS search), off otherwise.
        compile (bool): ``torch.compile`` each transformer block of the model's
            ``block_groups()`` and of their momentum copies (:func:`compile_blocks`), not the
            whole step with its Python control flow. Off by default: on a CPU the compile
            time outweighs the steady-state gain of short jobs (see benchmarks/RESULTS.md).
    """

    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-5
    min_lr: float = 1e-6
    weight_decay: float = 0.02
    warmup_epochs: float = 0.0
    grad_clip: Optional[float] = None
    precision: str = "auto"
    seed: int = 42
    num_workers: int = 4
    log_every: int = 50
    checkpoint_every: int = 0
    max_steps_per_epoch: Optional[int] = None
    eval_every: int = 1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_mult: Dict[str, float] = field(default_factory=dict)
    deterministic: bool = False
    find_unused_parameters: Optional[bool] = None
    compile: bool = False


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> List[str]:
    """``torch.compile`` every block of ``model.block_groups()`` and of the blocks' momentum
    (``_m``) copies, in place (``nn.Module.compile``: parameter names, checkpoints and the
    Python control flow around the blocks are unchanged).

    Args:
        model (nn.Module): a model with ``block_groups()`` (every ALBEF, ViLT and METER model),
            or its DDP wrapper.
        **compile_kwargs: passed to ``torch.compile`` (e.g. ``backend``, ``mode``).

    Returns:
        List[str]: the block lists compiled, e.g. ``["vision_encoder.blocks",
        "vision_encoder_m.blocks", ...]``.
    """
    model = unwrap_model(model)
    done = []
    for blocks in resolve_block_groups(model).values():
        path = module_path(model, blocks)
        twin = momentum_twin(model, path) if path else None
        for group in (blocks, twin):
            if group is not None:
                for block in group:
                    block.compile(**compile_kwargs)
                done.append(module_path(model, group))
    return done


def fit(
    *,
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step_fn: StepFn,
    train_cfg: TrainConfig,
    device: torch.device,
    output_dir: Path,
    config_dict: Mapping[str, Any],
    evaluate_fn: Optional[Callable[[int], Dict[str, float]]] = None,
    best_metric_key: Optional[str] = None,
    resume: Optional[str] = None,
    metric_logger: Optional[MetricLogger] = None,
    step_hooks: Sequence[StepHook] = (),
) -> Optional[float]:
    """Train for ``train_cfg.epochs`` epochs with checkpoints, evaluation and resume.

    Writes ``checkpoint_last.pth`` (full train state: model, optimizer, scheduler, data-loader
    position, RNG) at every epoch end and every ``checkpoint_every`` steps, and
    ``checkpoint_best.pth`` (model weights, epoch and metrics) whenever
    ``evaluate_fn(epoch)[best_metric_key]`` improves. Both are written atomically.

    Args:
        model (nn.Module): the (possibly DDP-wrapped) model.
        loader (Any): a ``StatefulDataLoader`` whose sampler has ``set_epoch``.
        optimizer (torch.optim.Optimizer): the optimizer.
        scheduler (Any): per-step LR scheduler.
        step_fn (StepFn): ``(model, batch, ctx) -> StepOutput``.
        train_cfg (TrainConfig): the ``train:`` section.
        device (torch.device): compute device.
        output_dir (Path): checkpoints, metrics and TensorBoard logs go here.
        config_dict (Mapping[str, Any]): the full config, stored in checkpoints.
        evaluate_fn (Optional[Callable[[int], Dict[str, float]]]): validation metrics of an
            epoch (called on every rank).
        best_metric_key (Optional[str]): key of ``evaluate_fn``'s result to maximise.
        resume (Optional[str]): a checkpoint path, ``"auto"`` (the last one in
            ``output_dir``) or None.
        metric_logger (Optional[MetricLogger]): TensorBoard/JSON logger (rank 0).
        step_hooks (Sequence[StepHook]): called after every optimizer step
            (:func:`~torchmm_ext.engine.efficiency.method_step_hooks`).

    Returns:
        Optional[float]: the best validation metric (None without ``evaluate_fn``).

    Raises:
        ConfigError: the model has a method that acts during training (the DAS search) and no
            ``step_hooks`` drive it.
    """
    if train_cfg.compile:
        logger.info("torch.compile of the blocks of " + ", ".join(compile_blocks(model)))
    driven = [name for name, m in unwrap_model(model).named_modules() if callable(getattr(m, "make_step_hook", None))]
    if driven and not step_hooks:  # e.g. das.search in a recipe that does not collect the hooks
        raise ConfigError(
            f"{driven[0]} ({', '.join(applied_methods(model)) or 'a method'}) acts after every training step, "
            "but this recipe passes no step_hooks: collect them with "
            "torchmm_ext.engine.efficiency.method_step_hooks(...) and pass them to fit/train_and_reload_best"
        )
    start_epoch, start_step, global_step, best = 0, 0, 0, None
    resume_path = resolve_resume_path(resume, output_dir)
    if resume_path is not None:
        info = restore_train_state(resume_path, model, optimizer, scheduler, loader)
        start_epoch, start_step, global_step, best = (
            info.epoch, info.step_in_epoch, info.global_step, info.best_metric
        )
        logger.info(f"resumed from {resume_path}: epoch {start_epoch}, step {start_step}")

    def save_last(epoch: int, step_in_epoch: int, step: int) -> None:
        state = build_train_state(
            model, optimizer, scheduler, loader, epoch, step_in_epoch, step,
            config=config_dict, best_metric=best,
        )  # collective: every rank contributes its RNG and loader state
        if is_main_process():
            save_checkpoint(output_dir / LAST_CHECKPOINT, state)

    for epoch in range(start_epoch, train_cfg.epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        result = train_one_epoch(
            model, loader, optimizer, scheduler, step_fn,
            epoch=epoch,
            device=device,
            precision=train_cfg.precision,
            grad_clip=train_cfg.grad_clip,
            log_every=train_cfg.log_every,
            metric_logger=metric_logger,
            global_step=global_step,
            start_step=start_step,
            checkpoint_fn=save_last,
            checkpoint_every=train_cfg.checkpoint_every,
            max_steps=train_cfg.max_steps_per_epoch,
            step_hooks=step_hooks,
        )
        global_step, start_step = result.global_step, 0
        epoch_metrics: Dict[str, Any] = {f"train/{k}": v for k, v in result.metrics.items()}

        last_epoch = epoch + 1 == train_cfg.epochs
        if evaluate_fn is not None and ((epoch + 1) % train_cfg.eval_every == 0 or last_epoch):
            val = evaluate_fn(epoch)
            epoch_metrics.update({f"val/{k}": v for k, v in val.items()})
            if best_metric_key is not None and (best is None or val[best_metric_key] > best):
                best = val[best_metric_key]
                if is_main_process():
                    save_checkpoint(
                        output_dir / BEST_CHECKPOINT,
                        {"model": unwrap_model(model).state_dict(), "epoch": epoch,
                         "metrics": dict(val), "config": dict(config_dict),
                         "methods": applied_methods(model)},
                    )
                logger.info(f"epoch {epoch}: new best {best_metric_key} = {best:.2f}")
        save_last(epoch + 1, 0, global_step)
        if metric_logger is not None:
            metric_logger.log_epoch(epoch, epoch_metrics, step=global_step)
        logger.info(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in epoch_metrics.items()))
        barrier()
    return best


def train_and_reload_best(
    *,
    model: nn.Module,
    train_model: nn.Module,
    loader: Any,
    step_fn: StepFn,
    train_cfg: TrainConfig,
    device: torch.device,
    output_dir: Path,
    config_dict: Mapping[str, Any],
    evaluate_fn: Optional[Callable[[int], Dict[str, float]]] = None,
    best_metric_key: Optional[str] = None,
    resume: Optional[str] = None,
    step_hooks: Sequence[StepHook] = (),
) -> Optional[float]:
    """What every fine-tuning recipe does to train: AdamW (no decay on biases/norms) with a
    per-step cosine schedule and linear warm-up from ``train_cfg``, :func:`fit` with TensorBoard
    and ``metrics.jsonl`` logging on rank 0, then the best validation weights back into
    ``model`` so that the test split is scored with them, as ALBEF does.

    Args:
        model (nn.Module): the bare model (receives the best weights).
        train_model (nn.Module): what is trained: ``model`` or its DDP wrapper.
        loader, step_fn, train_cfg, device, output_dir, config_dict, evaluate_fn,
        best_metric_key, resume, step_hooks: as in :func:`fit`.

    Returns:
        Optional[float]: the best validation metric (None without ``evaluate_fn``).
    """
    optimizer = build_optimizer(train_model, train_cfg.lr, train_cfg.weight_decay, betas=tuple(train_cfg.betas),
                                lr_mult=train_cfg.lr_mult)
    steps_per_epoch = steps_in_epoch(loader, train_cfg.max_steps_per_epoch)
    scheduler = build_cosine_scheduler(
        optimizer,
        total_steps=steps_per_epoch * train_cfg.epochs,
        warmup_steps=int(train_cfg.warmup_epochs * steps_per_epoch),
        min_lr=train_cfg.min_lr,
    )
    with MetricLogger(output_dir, enabled=is_main_process()) as metric_logger:
        best = fit(
            model=train_model, loader=loader, optimizer=optimizer, scheduler=scheduler,
            step_fn=step_fn, train_cfg=train_cfg, device=device, output_dir=output_dir,
            config_dict=config_dict, evaluate_fn=evaluate_fn, best_metric_key=best_metric_key,
            resume=resume, metric_logger=metric_logger, step_hooks=step_hooks,
        )
    if best is not None:
        load_model_weights(model, output_dir / BEST_CHECKPOINT)
    return best
