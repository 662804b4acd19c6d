"""The efficiency-method convention: block groups, the method record, and prepare_model's order
of restructuring, loading and applying."""

from dataclasses import dataclass, field
from typing import Any, Dict, List

import pytest
import torch
from torch import nn

from torchmm_ext.engine import efficiency
from torchmm_ext.engine.checkpoint import save_checkpoint
from torchmm_ext.engine.config import ConfigError
from torchmm_ext.engine.efficiency import MethodsConfig, prepare_model, recorded_methods
from torchmm_ext.engine.recipe_utils import InitConfig
from torchmm_ext.models.albef import albef_model_for_retrieval, albef_model_for_vqa
from torchmm_ext.modules.efficiency import (
    applied_methods,
    momentum_twin,
    record_method,
    resolve_block_groups,
)


@pytest.fixture(scope="module")
def albef():
    return albef_model_for_retrieval("tiny", queue_size=8)


def test_albef_block_groups_and_momentum_twins(albef):
    groups = resolve_block_groups(albef)
    assert list(groups) == ["vision", "text", "fusion"]
    assert [len(g) for g in groups.values()] == [4, 2, 2]
    assert groups["vision"] is albef.vision_encoder.blocks
    assert momentum_twin(albef, "vision_encoder.blocks") is albef.vision_encoder_m.blocks
    assert momentum_twin(albef, "fusion_encoder.layer") is None  # retrieval has no momentum fusion
    vqa = albef_model_for_vqa("tiny", decoder_layers=2)
    assert list(resolve_block_groups(vqa)) == ["vision", "text", "fusion", "decoder"]


def test_block_groups_by_name_and_path(albef):
    assert list(resolve_block_groups(albef, "fusion")) == ["fusion"]
    by_path = resolve_block_groups(albef, {"v": "vision_encoder.blocks"})
    assert by_path["v"] is albef.vision_encoder.blocks
    assert list(resolve_block_groups(albef, ["text_encoder.encoder.layer"])) == ["text_encoder.encoder.layer"]
    with pytest.raises(ValueError, match=r"unknown block group 'decoder'.*\['fusion', 'text', 'vision'\]"):
        resolve_block_groups(albef, ["decoder"])
    with pytest.raises(ValueError, match="is a Linear, not an nn.ModuleList"):
        resolve_block_groups(albef, {"x": "itm_head"})
    with pytest.raises(ValueError, match="has no block_groups"):
        resolve_block_groups(nn.Linear(2, 2))


def test_record_is_kept_unwrapped_and_once():
    model = nn.Sequential(nn.Linear(2, 2))
    record_method(model, "low_rank", {"ratio": 3})
    wrapper = nn.Module()
    wrapper.module = model  # what DDP looks like
    assert applied_methods(wrapper) == {"low_rank": {"ratio": 3}}
    with pytest.raises(ValueError, match="low_rank was already applied"):
        record_method(wrapper, "low_rank", {"ratio": 2})


@dataclass
class _Cfg(MethodsConfig):
    init: InitConfig = field(default_factory=InitConfig)


def _tiny() -> nn.Module:
    return albef_model_for_retrieval("tiny", queue_size=8)


class _Fake:
    """A stand-in method: adds an extra Linear (whose trained weights only load when the model
    is restructured first) and logs what it was called with."""

    def __init__(self) -> None:
        self.calls: List[Dict[str, Any]] = []

    def __call__(self, model: nn.Module, width: int = 4, init: str = "svd") -> str:
        self.calls.append({"width": width, "init": init, "weight0": model.itm_head.weight.detach().clone()})
        model.add_module("extra", nn.Linear(width, width))
        record_method(model, "low_rank", {"width": width, "init": init})
        return "report"


@pytest.fixture
def fake_method(monkeypatch):
    fake = _Fake()
    monkeypatch.setattr(efficiency, "apply_function", lambda name: fake)
    return fake


def test_configured_method_applies_after_the_load(tmp_path, fake_method):
    source = _tiny()
    save_checkpoint(tmp_path / "plain.pth", {"model": source.state_dict()})
    model = _tiny()
    reports = prepare_model(model, _Cfg(low_rank={"width": 4}), str(tmp_path / "plain.pth"))
    assert reports == {"low_rank": "report"}
    # the method saw the loaded weights, not the fresh ones
    torch.testing.assert_close(fake_method.calls[0]["weight0"], source.itm_head.weight)
    assert fake_method.calls[0]["init"] == "svd"


def test_recorded_method_restructures_before_the_load(tmp_path, fake_method):
    changed = _tiny()
    fake_method(changed, width=4)
    save_checkpoint(tmp_path / "changed.pth", {"model": changed.state_dict(), "methods": applied_methods(changed)})
    assert recorded_methods(tmp_path / "changed.pth") == {"low_rank": {"width": 4, "init": "svd"}}

    model = _tiny()
    # with or without the config section, the recorded method restructures first (init none)
    reports = prepare_model(model, _Cfg(low_rank={"width": 4, "init": "svd"}), str(tmp_path / "changed.pth"))
    assert reports == {}
    assert fake_method.calls[-1]["init"] == "none"
    torch.testing.assert_close(model.extra.weight, changed.extra.weight)
    torch.testing.assert_close(model.itm_head.weight, changed.itm_head.weight)


def test_config_disagreeing_with_the_record_is_an_error(tmp_path, fake_method):
    changed = _tiny()
    fake_method(changed, width=4)
    save_checkpoint(tmp_path / "changed.pth", {"model": changed.state_dict(), "methods": applied_methods(changed)})
    with pytest.raises(ConfigError, match=r"low_rank.width=4 but the config sets low_rank.width=8.*--opts low_rank.width=4"):
        prepare_model(_tiny(), _Cfg(low_rank={"width": 8}), str(tmp_path / "changed.pth"))


def test_unknown_method_key_names_the_section(monkeypatch):
    monkeypatch.setattr(efficiency, "apply_function", lambda name: _Fake())
    with pytest.raises(ConfigError, match=r"'low_rank.ratoi'.*valid keys under 'low_rank': init, width"):
        efficiency.check_method_sections(_Cfg(low_rank={"ratoi": 3}))
