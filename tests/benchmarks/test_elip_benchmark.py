"""The ELIP benchmark's activation-memory measure and largest-batch arithmetic."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "elip.py"
_spec = importlib.util.spec_from_file_location("elip_benchmark", _PATH)
elip_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(elip_benchmark)


def test_saved_activation_counts_saved_tensors_once_and_skips_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 10))
    x = torch.randn(50, 100)
    # By hand: the first Linear keeps its input (50 x 100), ReLU its output (50 x 200), which the
    # second Linear keeps as its input too (the same storage, counted once); weights are not
    # activations. fp32: 4 bytes each.
    expected = (50 * 100 + 50 * 200) * 4 / 2**20
    assert elip_benchmark.saved_activation_mib(lambda: model(x).sum(), model) == pytest.approx(expected)
    # Nothing is saved without a graph.
    with torch.no_grad():
        assert elip_benchmark.saved_activation_mib(lambda: model(x), model) == 0


def test_largest_batch_from_two_batches() -> None:
    # 10 MiB per pair plus 40 MiB fixed; 1 GiB of weights (100 MiB of which train: x3 for grads and moments).
    result = dict(activation_mib=8 * 10 + 40, half_batch_activation_mib=4 * 10 + 40,
                  param_mib=1024, trainable_mib=100)
    # budget 2 GiB = 2048 MiB: 2048 - 1024 - 300 - 40 = 684 MiB -> 68 pairs
    assert elip_benchmark.largest_batch(result, batch=8, budget_gib=2) == 68
