"""Atomic checkpoints, full train-state save/resume, and model-weight loading with clear errors.

A train-state checkpoint is a plain dict that ``torch.load(weights_only=True)`` can read
(no pickled code): model, optimizer, scheduler, data-loader position (torchdata's
``StatefulDataLoader``), every rank's RNG states, counters, best metric and config.

Position convention: ``epoch`` and ``step_in_epoch`` name the next step to run. A checkpoint
taken after step ``i`` of epoch ``e`` stores ``(e, i + 1)``; one taken at the end of epoch
``e`` stores ``(e + 1, 0)``.
"""

from __future__ import annotations

import os
import pickle
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn, Tensor

from torchmm_ext.engine.distributed import all_gather_object, get_rank
from torchmm_ext.modules.efficiency import applied_methods

FORMAT_VERSION = 1
LAST_CHECKPOINT = "checkpoint_last.pth"
BEST_CHECKPOINT = "checkpoint_best.pth"

PathLike = Union[str, Path]
_MAX_SHAPE_LINES = 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model."""


def epoch_checkpoint_name(epoch: int) -> str:
    """File name of the optional per-epoch checkpoint, ``checkpoint_epoch{epoch}.pth``."""
    return f"checkpoint_epoch{epoch}.pth"


# ----------------------------------------------------------------------------------------
# atomic save / load
# ----------------------------------------------------------------------------------------


def save_checkpoint(path: PathLike, state: Mapping[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` atomically.

    The data goes to ``.tmp-<name>-<pid>`` in the same directory, is flushed and fsynced, and
    is then renamed over ``path`` (``os.replace`` is atomic on POSIX). A crash or error at any
    point leaves either the previous file or the new one under ``path``, never a partial one.

    Args:
        path (PathLike): destination file; its directory is created if needed.
        state (Mapping[str, Any]): what to save.

    Raises:
        Exception: whatever the write raised, after removing the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # persist the rename itself (directory entry); not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Read a checkpoint onto the CPU with ``weights_only=True`` (no code is unpickled).

    Args:
        path (PathLike): the file.

    Returns:
        Dict[str, Any]: its content.

    Raises:
        CheckpointError: missing, truncated, or holding pickled objects other than tensors
            and plain containers; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"cannot load {path} with weights_only=True (it holds pickled objects). If you "
            f"trust the file, convert it once: torch.save(torch.load(p, weights_only=False)"
            f"['model'], out). Cause: {err}"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a torch "
                              f"file?): {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The resume checkpoint of a run, ``output_dir/checkpoint_last.pth``, if it exists."""
    path = Path(output_dir) / LAST_CHECKPOINT
    return path if path.is_file() else None


def resolve_resume_path(resume: Optional[str], output_dir: PathLike) -> Optional[Path]:
    """Resolve the ``--resume`` argument: None, ``"auto"`` (latest in output dir) or a path.

    Args:
        resume (Optional[str]): the command-line value.
        output_dir (PathLike): the run's output directory.

    Returns:
        Optional[Path]: the file to resume from; None when there is nothing to resume
        (``auto`` with no checkpoint yet starts a fresh run).

    Raises:
        CheckpointError: when an explicit path does not exist.
    """
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no such checkpoint file")
    return path


# ----------------------------------------------------------------------------------------
# model weights
# ----------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP/DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class LoadReport(NamedTuple):
    """Keys that did not match when loading weights non-strictly.

    Attributes:
        missing_keys (List[str]): in the model, not in the checkpoint (left as initialised).
        unexpected_keys (List[str]): in the checkpoint, not in the model (ignored).
    """

    missing_keys: List[str]
    unexpected_keys: List[str]


def _group_keys(keys: Sequence[str], examples: int = 3) -> List[str]:
    """Lines ``prefix.* (count): a, b, c`` grouping keys by their first two components."""
    groups: Dict[str, List[str]] = defaultdict(list)
    for key in keys:
        groups[".".join(key.split(".")[:2])].append(key)
    lines = []
    for prefix, members in sorted(groups.items()):
        shown = ", ".join(members[:examples]) + (", ..." if len(members) > examples else "")
        lines.append(f"    {prefix}.* ({len(members)}): {shown}")
    return lines


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def extract_state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """The model weights inside a checkpoint dict.

    Accepts our train state (key ``"model"``), common wrappers (``"state_dict"``,
    ``"module"``) or a bare state dict, and strips a DDP ``module.`` prefix.

    Args:
        checkpoint (Mapping[str, Any]): the loaded file.

    Returns:
        Dict[str, Any]: parameter/buffer name -> tensor.
    """
    for key in ("model", "state_dict", "module"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state = dict(checkpoint)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_model_weights(
    model: nn.Module,
    path_or_state_dict: Union[PathLike, Mapping[str, Any]],
    strict: bool = True,
) -> LoadReport:
    """Load weights into ``model`` with an explanation of every mismatch.

    Args:
        model (nn.Module): the model (wrappers are unwrapped).
        path_or_state_dict (Union[PathLike, Mapping[str, Any]]): a checkpoint file (train
            state or bare state dict) or an already loaded dict.
        strict (bool): raise on missing/unexpected keys. Shape mismatches, and a checkpoint
            that fills under half of the model's tensors (another architecture), always raise.
            Default: True.

    Returns:
        LoadReport: missing and unexpected keys (both empty when strict).

    Raises:
        CheckpointError: listing missing/unexpected keys grouped by module prefix with
            counts and examples, and every shape mismatch as
            ``key: checkpoint (a, b) vs model (c, d)``; names the file.
    """
    if isinstance(path_or_state_dict, (str, Path)):
        source = f"checkpoint {path_or_state_dict}"
        checkpoint = load_checkpoint(path_or_state_dict)
    else:
        source = "the given state dict"
        checkpoint = path_or_state_dict
    state = extract_state_dict(checkpoint)
    model = unwrap_model(model)
    expected = model.state_dict()

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"    {k}: checkpoint {_shape(state[k])} vs model {_shape(expected[k])}"
        for k in expected
        # non-tensor entries are modules' extra state (nn.Module.get_extra_state), e.g. the DAS
        # search's RNG and histories
        if k in state and (isinstance(state[k], Tensor) != isinstance(expected[k], Tensor)
                           or isinstance(state[k], Tensor) and state[k].shape != expected[k].shape)
    ]
    matched = len(expected) - len(missing)
    # Even when missing keys are allowed, a checkpoint that fills under half of the model is
    # almost surely another architecture; loading it silently would train from scratch.
    other_architecture = bool(expected) and matched < 0.5 * len(expected)
    if mismatched or other_architecture or (strict and (missing or unexpected)):
        lines = [f"{source} does not fit {type(model).__name__}:"]
        if other_architecture:
            lines.append(
                f"  only {matched} of the model's {len(expected)} tensors are in the "
                "checkpoint: is it a checkpoint of another architecture or preset?"
            )
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}):")
            lines.extend(mismatched[:_MAX_SHAPE_LINES])
            if len(mismatched) > _MAX_SHAPE_LINES:
                lines.append(f"    ... and {len(mismatched) - _MAX_SHAPE_LINES} more")
        if missing and (strict or other_architecture):
            lines.append(f"  missing from the checkpoint ({len(missing)}):")
            lines.extend(_group_keys(missing))
        if unexpected and (strict or other_architecture):
            lines.append(f"  unexpected in the checkpoint ({len(unexpected)}):")
            lines.extend(_group_keys(unexpected))
        if strict and not mismatched and not other_architecture:
            lines.append("  (load with strict=False to keep the matching tensors)")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return LoadReport(missing, unexpected)


# ----------------------------------------------------------------------------------------
# train state
# ----------------------------------------------------------------------------------------


def get_rng_state() -> Dict[str, Any]:
    """RNG states of Python, NumPy and torch (CPU and every CUDA device), weights_only-safe.

    Returns:
        Dict[str, Any]: tensors and plain containers only (NumPy's key array as a tensor).
    """
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "algorithm": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states saved by :func:`get_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((
        np_state["algorithm"],
        np_state["keys"].numpy().astype(np.uint32),
        np_state["pos"],
        np_state["has_gauss"],
        np_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # different machine shape: at least restore this process's device
            torch.cuda.set_rng_state(cuda_states[torch.cuda.current_device() % len(cuda_states)])


def build_train_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Optional[Any],
    loader: Optional[Any],
    epoch: int,
    step_in_epoch: int,
    global_step: int,
    config: Optional[Mapping[str, Any]] = None,
    best_metric: Optional[float] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Everything needed to continue a run exactly.

    Collective when distributed: call it on every rank (it gathers each rank's RNG and
    data-loader state), then save on rank 0 only.

    Args:
        model (nn.Module): the model (DDP/compile wrappers are unwrapped).
        optimizer (torch.optim.Optimizer): the optimizer.
        scheduler (Optional[Any]): an lr scheduler or None.
        loader (Optional[Any]): a ``StatefulDataLoader`` (anything with ``state_dict``) or None.
        epoch (int): epoch of the next step to run.
        step_in_epoch (int): index in that epoch of the next step to run.
        global_step (int): optimizer steps taken so far.
        config (Optional[Mapping[str, Any]]): the resolved config (``config_to_dict``).
        best_metric (Optional[float]): best validation score so far.
        extra (Optional[Mapping[str, Any]]): recipe state (e.g. queues); tensors and plain
            containers only, to stay ``weights_only``-loadable.

    Returns:
        Dict[str, Any]: the state dict to pass to :func:`save_checkpoint`.
    """
    local = {
        "rng": get_rng_state(),
        "loader": loader.state_dict() if loader is not None and hasattr(loader, "state_dict") else None,
    }
    per_rank = all_gather_object(local)
    return {
        "format_version": FORMAT_VERSION,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "loader_per_rank": [r["loader"] for r in per_rank],
        "rng_per_rank": [r["rng"] for r in per_rank],
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": global_step,
        "best_metric": best_metric,
        "config": dict(config) if config is not None else None,
        "methods": applied_methods(model),
        "extra": dict(extra) if extra is not None else {},
    }


class ResumeInfo(NamedTuple):
    """Where a resumed run continues.

    Attributes:
        epoch (int): epoch of the next step.
        step_in_epoch (int): index of the next step in that epoch.
        global_step (int): optimizer steps already taken.
        best_metric (Optional[float]): best validation score so far.
        extra (Dict[str, Any]): the recipe's extra state.
        config (Optional[Dict[str, Any]]): the config the checkpoint was written with.
    """

    epoch: int
    step_in_epoch: int
    global_step: int
    best_metric: Optional[float]
    extra: Dict[str, Any]
    config: Optional[Dict[str, Any]] = None


def restore_train_state(
    path: PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    loader: Optional[Any] = None,
    restore_rng: bool = True,
) -> ResumeInfo:
    """Load a train-state checkpoint into freshly built objects.

    Restore after building model, optimizer, scheduler and loader, and before creating the
    loader's iterator. The RNG states are those of this rank at save time (rank ``r`` reads
    entry ``r % saved_world_size``).

    Args:
        path (PathLike): a file written from :func:`build_train_state`.
        model (nn.Module): receives the weights (strict, with explained mismatches).
        optimizer (Optional[torch.optim.Optimizer]): receives its state when given.
        scheduler (Optional[Any]): receives its state when given.
        loader (Optional[Any]): a ``StatefulDataLoader``; positioned mid-epoch when given.
        restore_rng (bool): restore Python/NumPy/torch RNG states. Default: True.

    Returns:
        ResumeInfo: epoch, step_in_epoch, global_step, best_metric, extra, config.

    Raises:
        CheckpointError: not a train-state file, or its model does not fit.
    """
    state = load_checkpoint(path)
    if "format_version" not in state or "optimizer" not in state:
        raise CheckpointError(
            f"{path} is not a train-state checkpoint (no optimizer/format_version); to start "
            "from its weights use --checkpoint instead of --resume"
        )
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {state['format_version']}, newer than this code "
            f"({FORMAT_VERSION})"
        )
    load_model_weights(model, state["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    rank = get_rank()
    loaders = state.get("loader_per_rank") or []
    if loader is not None and loaders and loaders[rank % len(loaders)] is not None:
        loader.load_state_dict(loaders[rank % len(loaders)])
    rngs = state.get("rng_per_rank") or []
    if restore_rng and rngs:
        set_rng_state(rngs[rank % len(rngs)])
    return ResumeInfo(
        epoch=int(state["epoch"]),
        step_in_epoch=int(state["step_in_epoch"]),
        global_step=int(state["global_step"]),
        best_metric=state.get("best_metric"),
        extra=state.get("extra") or {},
        config=state.get("config"),
    )
