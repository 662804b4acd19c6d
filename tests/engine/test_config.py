from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import yaml

from torchmm_ext.engine.config import (
    check_kwargs,
    config_from_dict,
    config_to_dict,
    ConfigError,
    load_config,
    parse_args,
    save_config,
)


@dataclass
class TrainCfg:
    batch_size: int = 8
    epochs: int = 2
    lr: float = 1e-4
    grad_clip: Optional[float] = None


@dataclass
class DataCfg:
    root: str  # required
    hflip: bool = True
    image_size: Tuple[int, int] = (32, 32)
    splits: List[str] = field(default_factory=lambda: ["train"])


@dataclass
class Cfg:
    data: DataCfg
    train: TrainCfg = field(default_factory=TrainCfg)
    model: Dict[str, Any] = field(default_factory=dict)
    name: Optional[str] = "run"


def _write(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_nested_load(tmp_path):
    path = _write(tmp_path, {"data": {"root": "/d", "image_size": [64, 48]},
                             "train": {"lr": 3, "epochs": 5}, "model": {"k_test": 16}})
    cfg = load_config(path, Cfg)
    assert isinstance(cfg.train, TrainCfg) and isinstance(cfg.data, DataCfg)
    assert cfg.train.lr == 3.0 and isinstance(cfg.train.lr, float)  # int accepted for float
    assert cfg.train.epochs == 5 and cfg.train.batch_size == 8
    assert cfg.data.image_size == (64, 48)
    assert cfg.model == {"k_test": 16}
    assert cfg.name == "run"


def test_overrides_of_each_type(tmp_path):
    path = _write(tmp_path, {"data": {"root": "/d"}, "model": {"k_test": 16}})
    cfg = load_config(path, Cfg, [
        "train.lr=2e-5",            # YAML 1.1 reads this as a string
        "train.grad_clip=1.5",
        "train.batch_size=4",
        "data.hflip=false",
        "data.splits=[val, test]",
        "data.image_size=[8,9]",
        "name=null",
        "model.k_test=64",
        "model.new_key=abc",         # free sections may gain keys
    ])
    assert cfg.train.lr == pytest.approx(2e-5) and isinstance(cfg.train.lr, float)
    assert cfg.train.grad_clip == 1.5
    assert cfg.train.batch_size == 4
    assert cfg.data.hflip is False
    assert cfg.data.splits == ["val", "test"]
    assert cfg.data.image_size == (8, 9)
    assert cfg.name is None
    assert cfg.model == {"k_test": 64, "new_key": "abc"}


def test_required_field_from_override_and_missing():
    cfg = load_config(None, Cfg, ["data.root=/x"])
    assert cfg.data.root == "/x"
    with pytest.raises(ConfigError, match=r"missing required config key 'data.root'"):
        load_config(None, Cfg)


def test_unknown_key_lists_valid_keys(tmp_path):
    path = _write(tmp_path, {"data": {"root": "/d"}, "train": {"lrr": 0.1}})
    with pytest.raises(ConfigError) as err:
        load_config(path, Cfg)
    msg = str(err.value)
    assert "unknown config key 'train.lrr'" in msg
    assert str(path) in msg
    assert "valid keys under 'train': batch_size, epochs, grad_clip, lr" in msg
    assert "did you mean 'lr'" in msg


def test_unknown_key_from_override_names_opts():
    with pytest.raises(ConfigError, match=r"'trainn'.*--opts.*valid keys at the top level: data, model, name, train"):
        load_config(None, Cfg, ["data.root=/d", "trainn.lr=1"])


@pytest.mark.parametrize("override, expected", [
    ("train.epochs=1.5", r"'train.epochs'.*expects int, got float 1.5"),
    ("train.epochs=true", r"'train.epochs'.*expects int, got bool"),
    ("train.lr=abc", r"'train.lr'.*expects float, got str 'abc'"),
    ("data.hflip=1", r"'data.hflip'.*expects bool"),
    ("data.root=5", r"'data.root'.*expects str, got int 5"),
    ("data.splits=val", r"'data.splits'.*expects List\[str\]"),
    ("train=3", r"'train'.*expects TrainCfg"),
])
def test_wrong_type(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, Cfg, ["data.root=/d", override])


def test_malformed_override():
    with pytest.raises(ConfigError, match=r"expected the form section.key=value"):
        load_config(None, Cfg, ["data.root"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, Cfg, ["data.root=/d", "data.root.x=1"])


def test_top_level_not_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="bad.yaml must hold a mapping"):
        load_config(path, Cfg)


def test_check_kwargs():
    def builder(vocab_size: int, *, embed_dim: int = 256, k_test: int = 128) -> None:
        ...

    check_kwargs(builder, {"embed_dim": 3, "k_test": 1}, "model")
    with pytest.raises(ConfigError) as err:
        check_kwargs(builder, {"embed_dimm": 3}, "model")
    msg = str(err.value)
    assert "'model.embed_dimm'" in msg and "did you mean 'embed_dim'" in msg
    assert "valid keys under 'model': embed_dim, k_test, vocab_size" in msg


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, Cfg, ["data.root=/d", "model.depth=2"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml", Cfg)
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg), Cfg) == cfg
    assert config_to_dict(cfg)["data"]["image_size"] == [32, 32]


def test_parse_args():
    args = parse_args(["--opts", "a=1", "b.c=2", "--resume"], default_config="configs/x.yaml")
    assert args.config == "configs/x.yaml" and args.opts == ["a=1", "b.c=2"]
    assert args.resume == "auto" and not args.evaluate and args.checkpoint is None
    args = parse_args(["--resume", "r.pth", "--evaluate", "--output-dir", "o", "--checkpoint", "w.pth"])
    assert (args.resume, args.evaluate, args.output_dir, args.checkpoint) == ("r.pth", True, "o", "w.pth")
    assert parse_args([]).resume is None


def test_resolve_checkpoint_prefers_the_command_line_and_explains_a_missing_file(tmp_path):
    from torchmm_ext.engine.recipe_utils import InitConfig, resolve_checkpoint

    weights = tmp_path / "pretrained.pth"
    weights.write_bytes(b"")
    init = InitConfig(checkpoint=str(tmp_path / "missing.pth"), checkpoint_hint="run pretrain.py first")
    assert resolve_checkpoint(str(weights), init) == str(weights)
    assert resolve_checkpoint(None, InitConfig()) == ""
    with pytest.raises(FileNotFoundError, match=r"init.checkpoint .*missing.pth does not exist\. run pretrain.py first\."
                                                r".*init.checkpoint=''"):
        resolve_checkpoint(None, init)
    with pytest.raises(FileNotFoundError, match=r"--checkpoint .*nope.pth does not exist\. To train"):
        resolve_checkpoint(str(tmp_path / "nope.pth"), init)
