"""The ELIP entry points end to end on a small shapes world (tiny model, a few steps): they run
the ALBEF recipes with the ELIP configs, log the tokens per layer, record the pruning in the
weights, and a pruned pre-training fine-tunes with or without pruning. The shipped configs are
the ALBEF ones plus the token_pruning section, and the 4M config holds ELIP's settings."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from testing_utils import shapes_world_opts, TINY_ENCODER_OPTS

REPO = Path(__file__).resolve().parents[2]
ELIP = REPO / "examples" / "elip"
ALBEF_CONFIGS = REPO / "examples" / "albef" / "configs"


def load(name):
    spec = importlib.util.spec_from_file_location(f"elip_{name}", ELIP / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("elip, albef", [("pretrain_shapes.yaml", "pretrain_shapes.yaml"),
                                         ("finetune_retrieval_shapes.yaml", "retrieval_shapes.yaml"),
                                         ("pretrain_4m.yaml", "pretrain_4m.yaml"),
                                         ("finetune_retrieval_coco.yaml", "retrieval_coco.yaml"),
                                         ("finetune_retrieval_flickr.yaml", "retrieval_flickr.yaml")])
def test_elip_configs_are_the_albef_configs_plus_token_pruning(elip, albef):
    ours = yaml.safe_load((ELIP / "configs" / elip).read_text())
    theirs = yaml.safe_load((ALBEF_CONFIGS / albef).read_text())
    section = ours.pop("token_pruning")
    assert ours.pop("output_dir").startswith("outputs/elip_")
    theirs.pop("output_dir")
    if elip.endswith("_shapes.yaml"):  # shapes: the same run, pruned
        assert ours == theirs and section["begin_layers"] == [1, 2, 3]
    else:  # real data: the published schedule
        assert section["begin_layers"] == [2, 4, 10] and section["keep_ratios"] == [0.9, 0.65, 0.4]
        assert ours["model"] == theirs["model"] and ours["data"] == theirs["data"]
    assert section["guidance_weight"] == 0.2 and section["lookahead"] and not section["prune_momentum"]
    if elip == "pretrain_4m.yaml":  # ELIP's pre-training hyperparameters
        train = ours["train"]
        assert (train["epochs"], train["batch_size"], train["lr"], train["min_lr"], train["weight_decay"]) == \
            (20, 40, 1e-4, 1e-5, 0.02)
        assert (ours["model"]["image_size"], ours["loss"]["alpha"]) == (256, 0.4)
    if elip.startswith("finetune_retrieval_") and not elip.endswith("_shapes.yaml"):
        assert (ours["train"]["epochs"], ours["train"]["batch_size"]) == (5, 16)


def test_pretrain_then_finetune_with_and_without_pruning(shapes_cache, tmp_path, capsys):
    opts = [*shapes_world_opts(shapes_cache), *TINY_ENCODER_OPTS, "train.epochs=1", "train.max_steps_per_epoch=2",
            "train.batch_size=8", "eval.batch_size=16", "eval.k_test=4"]
    results = load("pretrain").main(["--output-dir", str(tmp_path / "pre"), "--opts", *opts])
    assert "tokens per layer [17, 16, 12, 8]" in capsys.readouterr().out
    assert 0.0 <= results["val_zero_shot"]["r_mean"] <= 100.0
    weights = tmp_path / "pre" / "pretrained.pth"
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    assert saved["methods"]["token_pruning"]["begin_layers"] == [1, 2, 3]
    assert json.loads((tmp_path / "pre" / "results.json").read_text()) == results

    finetune = load("finetune_retrieval")
    pruned = finetune.main(["--output-dir", str(tmp_path / "ft"), "--checkpoint", str(weights), "--opts", *opts])
    assert "tokens per layer [17, 16, 12, 8]" in capsys.readouterr().out and 0.0 <= pruned["test"]["r_mean"] <= 100.0
    plain = finetune.main(["--output-dir", str(tmp_path / "ft_off"), "--checkpoint", str(weights),
                           "--opts", *opts, "token_pruning=null"])
    out = capsys.readouterr().out
    assert "changes no weights" in out and "tokens per layer" not in out
    assert 0.0 <= plain["test"]["r_mean"] <= 100.0
    assert "token_pruning" not in torch.load(tmp_path / "ft_off" / "checkpoint_best.pth", map_location="cpu",
                                             weights_only=True).get("methods", {})
