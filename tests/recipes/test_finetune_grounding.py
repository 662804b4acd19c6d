"""The grounding recipe end to end on a small cached shapes world, its configs and bad input."""

import json
from pathlib import Path

import pytest
import torch

import finetune_grounding
from finetune_grounding import GroundingConfig
from torchmm_ext.checkpoints import torchmm_ext_to_albef
from torchmm_ext.data.shapes_world import cached_shapes_world
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.engine import check_kwargs, load_config
from torchmm_ext.evaluation.grounding import fusion_layer_index
from torchmm_ext.models.albef import albef_model_for_retrieval
from testing_utils import run_torchrun, shapes_world_opts, TINY_ENCODER_OPTS

RECIPE = Path(finetune_grounding.__file__)
SMALL_MODEL = TINY_ENCODER_OPTS


def _expected_refs(cache: Path, num_train: int = 40, num_eval: int = 10):
    world = cached_shapes_world(cache, seed=0, image_size=64, num_train=num_train, num_val=num_eval,
                                num_test=num_eval, captions_per_image=5)
    return {split: len(json.loads(getattr(world, f"grounding_{split}").read_text()))
            for split in ("val", "testA", "testB")}


def test_shipped_configs_load_and_name_a_fusion_layer():
    configs = sorted((RECIPE.parent / "configs").glob("grounding_*.yaml"))
    assert {c.name for c in configs} == {"grounding_shapes.yaml", "grounding_refcoco.yaml"}
    for path in configs:
        cfg = load_config(path, GroundingConfig)
        check_kwargs(albef_model_for_retrieval, cfg.model, "model")
    ref = load_config(RECIPE.parent / "configs" / "grounding_refcoco.yaml", GroundingConfig)
    assert (ref.model["preset"], ref.model["image_size"], ref.eval.block_num) == ("base", 384, 8)
    assert fusion_layer_index(ref.eval.block_num, 6, 6) == 2
    assert (ref.train.lr, ref.train.min_lr, ref.train.epochs, ref.train.batch_size) == (1e-5, 1e-6, 5, 32)
    assert (ref.loss.alpha, ref.loss.distill, ref.loss.alpha_warmup) == (0.4, True, True)
    assert ref.data.train_file == "data/refcoco+_train.json"
    assert ref.data.eval_files == {"val": "data/refcoco+_val.json", "test": "data/refcoco+_test.json"}
    assert (ref.data.dets_file, ref.data.gt_file) == ("data/refcoco+/dets.json", "data/refcoco+/gt.json")


def test_recipe_runs_end_to_end_and_reevaluates_an_albef_layout_checkpoint(shapes_cache, tmp_path, capsys):
    opts = [*shapes_world_opts(shapes_cache), *SMALL_MODEL, "train.epochs=2", "train.max_steps_per_epoch=2",
            "train.batch_size=8", "eval.batch_size=16"]
    results = finetune_grounding.main(["--output-dir", str(tmp_path), "--opts", *opts])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == results and set(saved) == {"val", "testA", "testB"}
    for split, count in _expected_refs(shapes_cache).items():
        assert saved[split]["num_refs"] == count and 0.0 <= saved[split]["acc"] <= 100.0
    assert "[testB] acc" in capsys.readouterr().out
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == [0, 1] and "val/acc" in logged[-1]
    # --evaluate of the best weights in ALBEF's layout reproduces the scores
    best = torch.load(tmp_path / "checkpoint_best.pth", map_location="cpu", weights_only=True)["model"]
    torch.save({"model": torchmm_ext_to_albef(best)}, tmp_path / "albef_layout.pth")
    evaluated = finetune_grounding.main(["--output-dir", str(tmp_path / "eval"), "--evaluate", "--checkpoint",
                                         str(tmp_path / "albef_layout.pth"), "--opts", *opts])
    for split in results:
        assert evaluated[split]["acc"] == pytest.approx(results[split]["acc"]), split


def test_bad_ground_truth_fails_before_training_naming_the_record(shapes_cache, tmp_path):
    world = cached_shapes_world(shapes_cache, seed=0, image_size=64, num_train=40, num_val=10, num_test=10,
                                captions_per_image=5)
    gt = json.loads(world.grounding_gt.read_text())
    first = json.loads(world.grounding_val.read_text())[0]["ref_id"]
    gt[str(first)]["bbox"] = [60.0, 60.0, 20.0, 20.0]
    bad = tmp_path / "gt.json"
    bad.write_text(json.dumps(gt))
    build_tokenizer("shapes", corpus_file=world.vocab_corpus)
    vocab_dir = next(world.vocab_corpus.parent.glob("wordpiece_*"))
    # A real-data style config (no data.shapes) pointing at the world's files, one box moved out.
    config = tmp_path / "cfg.yaml"
    config.write_text(f"""
model: {{preset: tiny, patch_size: 16}}
data:
  train_file: {world.grounding_train}
  eval_files: {{val: {world.grounding_val}}}
  gt_file: {bad}
  dets_file: {world.grounding_dets}
  image_root: {world.image_root}
  tokenizer: {vocab_dir}
train: {{num_workers: 0}}
eval: {{block_num: 3}}
""")
    with pytest.raises(ValueError, match=rf"gt\.json: ref_id {first} \(image .*\): box .* inside its 64x64 image"):
        finetune_grounding.main(["--config", str(config), "--output-dir", str(tmp_path / "out")])


def test_torchrun_two_processes_shard_and_sum_the_evaluation(shapes_cache, tmp_path):
    _expected_refs(shapes_cache)  # generate the world once, outside the two processes
    proc = run_torchrun(RECIPE, tmp_path, [*shapes_world_opts(shapes_cache), *SMALL_MODEL, "train.epochs=1",
                                           "train.max_steps_per_epoch=2", "train.batch_size=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for split, count in _expected_refs(shapes_cache).items():  # each rank scored half; summed
        assert results[split]["num_refs"] == count
    assert "[val] acc" in proc.stdout
