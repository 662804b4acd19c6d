"""Rank-0 logging: a Python logger, TensorBoard scalars and a JSON-lines metrics file."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from torchmm_ext.engine.distributed import get_rank, is_main_process

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _MainProcessFilter(logging.Filter):
    """Pass every record on rank 0; only errors (tagged with the rank) elsewhere.

    The rank is read at emit time, so loggers may be created before the process group.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if is_main_process():
            return True
        if record.levelno >= logging.ERROR:
            record.msg = f"[rank {get_rank()}] {record.msg}"
            return True
        return False


class _StdoutHandler(logging.StreamHandler):
    """A stream handler on whatever ``sys.stdout`` is when a record is written, not the one of
    the moment the logger was made: later redirections (``contextlib.redirect_stdout``,
    pytest's capture) see the log too."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def get_logger(name: str = "torchmm_ext", level: int = logging.INFO) -> logging.Logger:
    """A logger that prints to stdout on rank 0 only (errors from every rank).

    Args:
        name (str): logger name, e.g. the recipe's ``__name__``. Default: "torchmm_ext".
        level (int): logging level. Default: ``logging.INFO``.

    Returns:
        logging.Logger: configured once; later calls return the same logger.
    """
    logger = logging.getLogger(name)
    if not any(getattr(h, "_torchmm_ext", False) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        handler.addFilter(_MainProcessFilter())
        handler._torchmm_ext = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False  # avoid duplicates when the root logger is configured too
    logger.setLevel(level)
    return logger


def _to_float(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Mapping):
        return {k: _to_float(v) for k, v in value.items()}
    return value


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> Dict[str, float]:
    """Numeric leaves of a nested mapping as ``a/b`` -> float."""
    flat: Dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


class MetricLogger:
    """TensorBoard scalars plus ``metrics.jsonl`` / ``metrics_last.json`` in the output dir.

    Create it on every rank with ``enabled=is_main_process()``; disabled loggers do nothing,
    so call sites need no rank checks.

    Args:
        output_dir (Union[str, Path]): run directory; TensorBoard events go to ``tb/``.
        enabled (bool): write anything at all. Default: True.
        tensorboard (bool): also write TensorBoard events. Default: True.
    """

    def __init__(self, output_dir: Union[str, Path], enabled: bool = True, tensorboard: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self._writer: Optional[Any] = None
        if enabled:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                # imported lazily: tensorboard costs ~1 s to import
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.output_dir / "tb"))

    def log_scalars(self, tag_prefix: str, scalars: Mapping[str, Any], step: int) -> None:
        """Write scalars as ``{tag_prefix}/{name}`` at ``step`` (nested mappings flattened).

        Args:
            tag_prefix (str): e.g. "train" or "val".
            scalars (Mapping[str, Any]): name -> number or 1-element tensor.
            step (int): the global step.
        """
        if not self.enabled or self._writer is None:
            return
        for name, value in _flatten(_to_float(scalars)).items():
            if math.isfinite(value):
                self._writer.add_scalar(f"{tag_prefix}/{name}", value, step)

    def log_epoch(self, epoch: int, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Append one JSON line for the epoch and rewrite ``metrics_last.json``.

        Args:
            epoch (int): the epoch.
            metrics (Mapping[str, Any]): e.g. ``{"train": {...}, "val": {...}}``.
            step (Optional[int]): global step; when given, the numeric leaves also go to
                TensorBoard under ``epoch/``. Default: None.
        """
        if not self.enabled:
            return
        record = {"epoch": epoch, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **_to_float(metrics)}
        line = json.dumps(record, default=str)
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(line + "\n")
        (self.output_dir / "metrics_last.json").write_text(json.dumps(record, indent=2, default=str))
        if step is not None:
            self.log_scalars("epoch", metrics, step)

    def flush(self) -> None:
        """Flush pending TensorBoard events."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
