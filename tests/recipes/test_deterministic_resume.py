"""``train.deterministic: true``: a run killed with SIGKILL and resumed with ``--resume`` ends
bitwise where the uninterrupted run ends (weights, optimizer, queue, validation and test scores).

The runs are real subprocesses of the retrieval recipe, with the feature queue, momentum
distillation, hard-negative sampling, dropout and random crops all on.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import torch

import finetune_retrieval
from testing_utils import cpu_only_env, shapes_world_opts, TINY_ENCODER_OPTS

RECIPE = Path(finetune_retrieval.__file__)
NUM_TRAIN_IMAGES, BATCH, EPOCHS = 16, 8, 2
STEPS_PER_EPOCH = NUM_TRAIN_IMAGES * 5 // BATCH  # 5 captions per image


def _opts(cache: Path) -> List[str]:
    return [*shapes_world_opts(cache, num_train=NUM_TRAIN_IMAGES, num_eval=10), *TINY_ENCODER_OPTS,
            "model.embed_dim=32", "model.queue_size=48", "loss.distill=true", "eval.k_test=4",
            f"train.epochs={EPOCHS}", f"train.batch_size={BATCH}", "train.checkpoint_every=3",
            "train.deterministic=true", "train.log_every=1"]


def _command(output_dir: Path, opts: List[str], *extra: str) -> List[str]:
    return [sys.executable, str(RECIPE), "--output-dir", str(output_dir), *extra, "--opts", *opts]


def _run(output_dir: Path, opts: List[str], *extra: str) -> None:
    run = subprocess.run(_command(output_dir, opts, *extra), env=cpu_only_env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def _last(output_dir: Path) -> dict:
    return torch.load(output_dir / "checkpoint_last.pth", map_location="cpu", weights_only=False)


def _assert_same_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_sigkill_and_resume_reproduce_the_uninterrupted_run(shapes_cache, tmp_path):
    opts = _opts(shapes_cache)
    uninterrupted = tmp_path / "uninterrupted"
    _run(uninterrupted, opts)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_command(killed, opts), env=cpu_only_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (killed / "checkpoint_last.pth").exists():  # written atomically: complete once visible
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    at_kill = _last(killed)
    assert at_kill["global_step"] < STEPS_PER_EPOCH * EPOCHS, "killed after the end: nothing to resume"

    _run(killed, opts, "--resume")

    expected, resumed = _last(uninterrupted), _last(killed)
    assert resumed["global_step"] == expected["global_step"] == STEPS_PER_EPOCH * EPOCHS
    for part in ("model", "optimizer", "scheduler"):
        _assert_same_tensors(expected[part], resumed[part], part)
    results = [json.loads((d / "results.json").read_text()) for d in (uninterrupted, killed)]
    for split_metrics in (m for r in results for m in r.values()):
        split_metrics.pop("eval_seconds")  # wall time: the only figure allowed to differ
    assert results[0] == results[1]


def test_deterministic_refuses_bf16(shapes_cache, tmp_path):
    from torchmm_ext.engine import ConfigError

    with pytest.raises(ConfigError, match="deterministic needs fp32"):
        finetune_retrieval.main(["--output-dir", str(tmp_path), "--opts", *shapes_world_opts(shapes_cache),
                                 "train.deterministic=true", "train.precision=bf16"])
