"""The SNLI-VE recipe end to end on a small cached shapes world, and its shipped configs."""

import json
from pathlib import Path

import pytest
import torch

import finetune_ve
from finetune_ve import VEConfig
from torchmm_ext.checkpoints import CheckpointShapeError, load_pretrained, torchmm_ext_to_albef
from torchmm_ext.engine import check_kwargs, ConfigError, load_config
from torchmm_ext.engine.recipe_utils import load_task_head, rank_shard
from torchmm_ext.models.albef import albef_model_for_ve
from testing_utils import run_torchrun, shapes_world_opts, TINY_ENCODER_OPTS

RECIPE = Path(finetune_ve.__file__)
SMALL_MODEL = TINY_ENCODER_OPTS


def test_every_shipped_config_loads():
    configs = sorted((RECIPE.parent / "configs").glob("ve_*.yaml"))
    assert {c.name for c in configs} >= {"ve_shapes.yaml", "ve_snli.yaml"}
    for path in configs:
        cfg = load_config(path, VEConfig)
        check_kwargs(albef_model_for_ve, cfg.model, "model")
    snli = load_config(RECIPE.parent / "configs" / "ve_snli.yaml", VEConfig)
    assert (snli.model["image_size"], snli.model["preset"], snli.model.get("distill", True)) == (384, "base", True)
    assert (snli.train.lr, snli.train.min_lr, snli.train.epochs, snli.train.batch_size) == (2e-5, 1e-6, 5, 32)
    assert (snli.loss.alpha, snli.eval.batch_size, snli.data.tokenizer) == (0.4, 64, "bert-base-uncased")
    assert (snli.data.train_file, snli.data.val_file, snli.data.test_file) == (
        "data/ve_train.json", "data/ve_dev.json", "data/ve_test.json")
    assert (snli.data.image_root, snli.data.image_ext) == ("images/flickr30k", ".jpg")


def test_unknown_config_keys_name_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"model.*num_clases.*num_classes"):
        finetune_ve.main(["--output-dir", str(tmp_path), "--opts", "model.num_clases=3"])


@pytest.mark.parametrize("distill", [False, True])
def test_recipe_runs_end_to_end(shapes_cache, tmp_path, capsys, distill):
    opts = [*shapes_world_opts(shapes_cache), *SMALL_MODEL, f"model.distill={str(distill).lower()}",
            "loss.alpha=0.4", "train.epochs=2", "train.max_steps_per_epoch=3", "train.batch_size=8",
            "eval.batch_size=16"]
    results = finetune_ve.main(["--output-dir", str(tmp_path), "--opts", *opts])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"val", "test"} and saved == results
    for split in ("val", "test"):
        assert set(saved[split]) == {"acc", "num_samples"}
        assert 0.0 <= saved[split]["acc"] <= 100.0
        assert saved[split]["num_samples"] == 30  # 10 images x 3 statements
    assert "[test] acc" in capsys.readouterr().out
    assert (tmp_path / "checkpoint_best.pth").exists() and (tmp_path / "checkpoint_last.pth").exists()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == [0, 1] and "val/acc" in logged[-1]
    if not distill:
        return
    # --evaluate --checkpoint on the best weights reproduces the test accuracy, in our layout
    # and in the original ALBEF layout (the export keeps cls_head under ALBEF's own names; the
    # import leaves it to the recipe, which takes it directly).
    best = torch.load(tmp_path / "checkpoint_best.pth", map_location="cpu", weights_only=True)["model"]
    assert any(k.startswith("cls_head_m.") for k in best)
    albef = torchmm_ext_to_albef(best)
    head = [k for k in best if k.startswith("cls_head.")]
    assert head and all(torch.equal(albef[k], best[k]) for k in head)
    torch.save({"model": best}, tmp_path / "ours.pth")
    torch.save({"model": albef}, tmp_path / "albef_layout.pth")
    for name in ("ours.pth", "albef_layout.pth"):
        evaluated = finetune_ve.main(["--output-dir", str(tmp_path / f"eval_{name}"), "--evaluate",
                                      "--checkpoint", str(tmp_path / name), "--opts", *opts])
        assert evaluated["test"]["acc"] == pytest.approx(results["test"]["acc"]), name


def test_task_head_of_an_albef_checkpoint_must_fit(tmp_path):
    model = albef_model_for_ve("tiny", num_classes=2, image_size=32, patch_size=16, vision_depth=1,
                               text_layers=1, fusion_layers=1)
    other = albef_model_for_ve("tiny", num_classes=3, image_size=32, patch_size=16, vision_depth=1,
                               text_layers=1, fusion_layers=1)
    albef = torchmm_ext_to_albef(other.state_dict())
    albef.update({k: v for k, v in other.state_dict().items() if k.startswith("cls_head.")})
    # The layout conversion takes the head, so the load itself names the misfit.
    with pytest.raises(CheckpointShapeError, match=r"cls_head\.2\.weight: checkpoint \(3, 192\) vs model \(2, 192\)"):
        load_pretrained(model, albef)
    # load_task_head still covers layouts whose conversion leaves a head out.
    report = load_pretrained(model, {k: v for k, v in albef.items() if not k.startswith("cls_head")})
    report = report._replace(ignored=sorted(k for k in albef if k.startswith("cls_head.")))
    with pytest.raises(CheckpointShapeError, match=r"cls_head\.2\.weight: checkpoint \(3, 192\) vs model \(2, 192\)"):
        load_task_head(model, albef, report, ("cls_head.",))
    assert load_task_head(model, albef, report, ("nothing.",)) == []
    assert list(rank_shard(7, 1, 3)) == [1, 4] and sum(len(rank_shard(7, r, 3)) for r in range(3)) == 7


def test_small_run_beats_chance_by_a_wide_margin(shapes_cache, tmp_path):
    # The default tiny model from scratch on 400 images (1,200 statements), 3 epochs of 37 steps
    # (~20 s on 2 cores). Chance is 33%; reading the text alone gives ~67% (neutral statements
    # are recognisable); measured: val 74.7%, test 76.7%.
    opts = [*shapes_world_opts(shapes_cache, 400, 50), "train.epochs=3", "train.batch_size=32",
            "train.checkpoint_every=0", "train.eval_every=3"]
    results = finetune_ve.main(["--output-dir", str(tmp_path), "--opts", *opts])
    assert results["test"]["acc"] > 60, results


def test_torchrun_two_processes_shard_and_sum_the_evaluation(shapes_cache, tmp_path):
    proc = run_torchrun(RECIPE, tmp_path, [*shapes_world_opts(shapes_cache), *SMALL_MODEL, "model.distill=true",
                                           "train.epochs=1", "train.max_steps_per_epoch=3", "train.batch_size=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for split in ("val", "test"):  # each rank scored half; the counts are summed over ranks
        assert results[split]["num_samples"] == 30 and 0 <= results[split]["acc"] <= 100
    assert "[test] acc" in proc.stdout
