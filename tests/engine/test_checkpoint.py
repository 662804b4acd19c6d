import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from torchmm_ext.engine import checkpoint as ckpt_mod
from torchmm_ext.engine.checkpoint import (
    CheckpointError,
    get_rng_state,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    resolve_resume_path,
    save_checkpoint,
    set_rng_state,
)


def test_atomic_save_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pth"
    save_checkpoint(path, {"value": torch.tensor([1.0])})
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")  # a half-written file ...
        raise OSError("disk full")  # ... then the failure

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"value": torch.tensor([2.0])})
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)

    assert os.listdir(tmp_path) == ["checkpoint_last.pth"]  # no temp file left
    assert torch.equal(load_checkpoint(path)["value"], torch.tensor([1.0]))


def test_save_interrupted_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "new.pth"

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"xx")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"a": 1})
    assert os.listdir(tmp_path) == []


def test_latest_and_resume_path(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert resolve_resume_path("auto", tmp_path) is None
    save_checkpoint(tmp_path / "checkpoint_last.pth", {"a": 1})
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_last.pth"
    assert resolve_resume_path("auto", tmp_path) == tmp_path / "checkpoint_last.pth"
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        resolve_resume_path(str(tmp_path / "nope.pth"), tmp_path)


def test_truncated_file_names_path(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_checkpoint(path)


def test_rng_state_round_trip_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "rng.pth", {"rng": get_rng_state()})
    expected = (random.random(), np.random.randn(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])  # weights_only=True load
    got = (random.random(), np.random.randn(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


class Net(nn.Module):
    def __init__(self, hidden: int = 4, extra: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, hidden), nn.LayerNorm(hidden))
        self.head = nn.Linear(hidden, 2)
        if extra:
            self.adapter = nn.ModuleDict({"down": nn.Linear(hidden, 2), "up": nn.Linear(2, hidden)})


def test_load_weights_round_trip_from_train_state_and_ddp_prefix(tmp_path):
    src, dst = Net(), Net()
    save_checkpoint(tmp_path / "a.pth", {"model": src.state_dict(), "optimizer": {}})
    report = load_model_weights(dst, tmp_path / "a.pth")
    assert report == ([], [])
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    prefixed = {f"module.{k}": v for k, v in src.state_dict().items()}
    load_model_weights(Net(), prefixed)


def test_load_weights_error_groups_and_shapes(tmp_path):
    path = tmp_path / "other.pth"
    save_checkpoint(path, Net(hidden=6).state_dict())
    with pytest.raises(CheckpointError) as err:
        load_model_weights(Net(hidden=4, extra=True), path)
    msg = str(err.value)
    assert str(path) in msg
    assert "encoder.0.weight: checkpoint (6, 3) vs model (4, 3)" in msg
    assert "head.weight: checkpoint (2, 6) vs model (2, 4)" in msg
    assert "missing from the checkpoint (4)" in msg
    assert "adapter.down.* (2): adapter.down.weight, adapter.down.bias" in msg
    assert "adapter.up.* (2)" in msg


def test_load_weights_other_architecture_message(tmp_path):
    path = tmp_path / "vit.pth"
    save_checkpoint(path, {"model": {f"blocks.{i}.attn.qkv.weight": torch.zeros(3, 3) for i in range(5)}})
    with pytest.raises(CheckpointError) as err:
        load_model_weights(Net(), path)
    msg = str(err.value)
    assert "vit.pth" in msg and "another architecture" in msg
    assert "unexpected in the checkpoint (5)" in msg
    assert "blocks.0.* (1)" in msg


def test_load_weights_non_strict_reports_but_shapes_raise():
    src = Net(extra=True)
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("head")}
    state["old_head.weight"] = torch.zeros(1)
    dst = Net(extra=True)
    report = load_model_weights(dst, state, strict=False)
    assert sorted(report.missing_keys) == ["head.bias", "head.weight"]
    assert report.unexpected_keys == ["old_head.weight"]
    assert torch.equal(dst.encoder[0].weight, src.encoder[0].weight)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model_weights(Net(), Net(hidden=5).state_dict(), strict=False)


def test_load_weights_non_strict_still_rejects_another_architecture(tmp_path):
    # Filling only 4 of 10 tensors is not "a few new heads": it is another model.
    path = tmp_path / "small.pth"
    save_checkpoint(path, {k: v for k, v in Net().state_dict().items() if not k.startswith("head")})
    with pytest.raises(CheckpointError, match=r"small\.pth.*\n.*only 4 of the model's 10 tensors"):
        load_model_weights(Net(extra=True), path, strict=False)
