"""DAS entry points end to end on a small shapes world (tiny model, a few steps): the search writes
skip.json and the gate plot, fine-tuning reads them back, checkpoints of the DAS model reload,
and the configs and bad inputs fail clearly."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from torchmm_ext.engine import ConfigError, load_config
from testing_utils import shapes_world_opts, TINY_ENCODER_OPTS

DAS = Path(__file__).resolve().parents[2] / "examples" / "das"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"das_{name}", DAS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = [*TINY_ENCODER_OPTS, "init.checkpoint=", "train.batch_size=8", "eval.batch_size=16", "das.adapter_dim=8"]
VQA = [*SMALL, "eval.k_test=5"]


#: Shapes configs whose 100-step budget keeps its own schedule: ViLT's recipe trains VQA and
#: NLVR2 at lr 3e-4 for 6-8 epochs, which leaves 100 steps of adapters under-trained (README, DAS).
OWN_SCHEDULE = {("vilt", "vqa"), ("vilt", "nlvr")}
SCHEDULE_KEYS = {"lr", "warmup_epochs", "lr_mult"}

#: The DAS groups of each backbone's configs: ViLT's blocks, METER's co-attention layers (published).
FAMILY_GROUPS = {"vilt": ["transformer"], "meter": ["text_fusion", "image_fusion"]}


@pytest.mark.parametrize("family", ["vilt", "meter"])
@pytest.mark.parametrize("task", ["vqa", "nlvr", "retrieval"])
def test_vilt_meter_shapes_configs_are_the_backbone_configs_plus_das(family, task):
    """DAS keeps the backbone's model, data and learning rates (as published), so its shapes
    configs must follow the backbone's shapes configs; only the step budget differs (and, for
    the configs in ``OWN_SCHEDULE``, the schedule measured for that budget)."""
    import yaml

    ours = yaml.safe_load((DAS / "configs" / f"{family}_{task}_shapes.yaml").read_text())
    backbone = yaml.safe_load((DAS.parent / family / "configs" / f"{task}_shapes.yaml").read_text())
    assert ours["model"] == backbone["model"] and ours["data"] == backbone["data"]
    budget = {"epochs": 2, "max_steps_per_epoch": 50, "eval_every": 2}
    own = budget.keys() | (SCHEDULE_KEYS if (family, task) in OWN_SCHEDULE else set())
    assert {k: v for k, v in ours["train"].items() if k not in own} == \
        {k: v for k, v in backbone["train"].items() if k not in own}
    assert {k: ours["train"][k] for k in budget} == budget


def test_shipped_configs_load_and_name_their_stages():
    search = load("search")
    configs = sorted((DAS / "configs").glob("*.yaml"))
    names = {p.name for p in configs}
    for family in ("albef", "vilt", "meter"):
        for task in ("vqa", "nlvr", "retrieval"):
            assert f"{family}_{task}_shapes.yaml" in names
    for path in configs:
        task, family = search.task_of(path, None), search.family_of(path)
        cfg = load_config(path, search.config_class(family, task))
        assert cfg.das["search"]["skip_num"] >= 1 and cfg.das["adapter_dim"] == 96, path
        assert cfg.das["skip_from"].endswith("_search/skip.json"), path
        assert cfg.das["skip_from"].startswith(cfg.output_dir), path
        if family in FAMILY_GROUPS:
            assert cfg.das["groups"] == cfg.das["search"]["groups"] == FAMILY_GROUPS[family], path
        if path.stem.endswith("_shapes"):  # every stage starts from the backbone's shapes pre-training
            assert cfg.init.checkpoint == f"outputs/{family}_pretrain_shapes/pretrained.pth", path
    with pytest.raises(ConfigError, match=r"starts with its backbone family .*got 'blip_vqa.yaml'"):
        search.family_of(Path("blip_vqa.yaml"))


def test_vqa_search_then_finetuning_from_its_skip_json(shapes_cache, tmp_path):
    world = shapes_world_opts(shapes_cache, num_train=40, num_eval=10)
    search = load("search")
    result = search.main(["--config", str(DAS / "configs" / "albef_vqa_shapes.yaml"),
                          "--output-dir", str(tmp_path / "search"), "--opts", *world, *VQA,
                          "das.search.epochs=2", "das.search.das_turn=2", "das.search.skip_num=2",
                          "das.search.max_steps_per_epoch=9"])
    saved = json.loads((tmp_path / "search" / "skip.json").read_text())
    assert saved == result and saved["model"] == "ALBEFForVQA" and saved["skip_num"] == 2
    # 40 images x 3 questions / 8 = 15 steps an epoch, cut to 9 by das.search.max_steps_per_epoch
    # (the config's train.max_steps_per_epoch, 50, is the fine-tuning's); no rounds in the warm-up
    # epoch 0, then (the step count kept running, as published) at epoch 1's steps 1, 3, 5, 7, 9
    assert len(saved["gate_history"]) == 5 and all(r["epoch"] == 1 for r in saved["reward_history"])
    assert len(saved["gates"]) == 4 + 2 + 2 + 2 and [e["epoch"] for e in saved["epochs"]] == [0, 1]
    chosen = sorted((g, i) for g, v in saved["skip"].items() for i in v)
    assert len(chosen) == 2 and [list(c) for c in chosen] == sorted(
        [saved["candidates"][i] for i in saved["skip_candidates"]])
    assert (tmp_path / "search" / "gates.png").stat().st_size > 1000
    assert (tmp_path / "search" / "results.json").exists()

    finetune = load("finetune_vqa")
    out = tmp_path / "finetune"
    results = finetune.main(["--output-dir", str(out), "--opts", *world, *VQA, "train.epochs=1",
                             "train.max_steps_per_epoch=3", f"das.skip_from={tmp_path / 'search' / 'skip.json'}"])
    assert set(results) == {"val", "test"}
    best = torch.load(out / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    assert best["methods"]["das"]["skip"] == saved["skip"] and best["methods"]["das"]["search"] is None
    assert not any(k.startswith("das_search.") for k in best["model"])
    # --evaluate --checkpoint rebuilds the skipped model from the record and scores the same
    evaluated = finetune.main(["--output-dir", str(tmp_path / "eval"), "--evaluate", "--checkpoint",
                               str(out / "checkpoint_best.pth"), "--opts", *world, *VQA,
                               "das.skip_from=null"])
    assert evaluated["test"]["acc"] == pytest.approx(results["test"]["acc"])


def test_nlvr_finetuning_with_a_skip_list(shapes_cache, tmp_path):
    world = shapes_world_opts(shapes_cache, num_train=40, num_eval=10)
    finetune = load("finetune_nlvr")
    results = finetune.main(["--output-dir", str(tmp_path), "--opts", *world, *SMALL, "train.epochs=1",
                             "train.max_steps_per_epoch=2", "das.skip_from=null", "das.skip={fusion: [1, 2]}"])
    assert set(results) == {"dev", "test"}
    best = torch.load(tmp_path / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    assert best["methods"]["das"]["skip"] == {"fusion": [1, 2]}


def test_bad_inputs_fail_clearly(shapes_cache, tmp_path):
    world = shapes_world_opts(shapes_cache, num_train=40, num_eval=10)
    finetune = load("finetune_vqa")
    with pytest.raises(FileNotFoundError, match=r"nowhere.json does not exist; run the search first"):
        finetune.main(["--output-dir", str(tmp_path / "a"), "--opts", *world, *VQA,
                       f"das.skip_from={tmp_path / 'nowhere.json'}"])
    other = tmp_path / "nlvr_skip.json"
    other.write_text(json.dumps({"model": "ALBEFForNLVR", "skip": {"fusion": [3]}, "group_sizes": {"fusion": 4}}))
    with pytest.raises(ValueError, match=r"searched on ALBEFForNLVR, but this model is ALBEFForVQA"):
        finetune.main(["--output-dir", str(tmp_path / "b"), "--opts", *world, *VQA, f"das.skip_from={other}"])
    search = load("search")
    with pytest.raises(ValueError, match=r"skip_num=11 is larger than the 10 candidate blocks"):
        search.main(["--output-dir", str(tmp_path / "c"), "--opts", *world, *VQA, "das.search.skip_num=11"])


def test_retrieval_search_scores_val_caption_pairs(shapes_cache, tmp_path):
    world = shapes_world_opts(shapes_cache, num_train=40, num_eval=10)
    search = load("search")
    result = search.main(["--config", str(DAS / "configs" / "albef_retrieval_shapes.yaml"),
                          "--output-dir", str(tmp_path), "--opts", *world, *SMALL, "eval.k_test=4",
                          "das.search.epochs=2", "das.search.das_turn=3", "das.search.skip_num=1",
                          "train.max_steps_per_epoch=6"])
    assert result["model"] == "ALBEFForRetrieval" and len(result["gates"]) == 4 + 2  # ViT + text candidates
    assert len(result["reward_history"]) == 2 and all(len(r["losses"]) == 3 for r in result["reward_history"])


VILT_SMALL = ["model.width=32", "model.num_heads=2", "model.mlp_dim=64", "init.checkpoint=", "train.batch_size=8",
              "eval.batch_size=16", "das.adapter_dim=8", "train.num_workers=0"]
METER_SMALL = ["model.hidden_size=32", "model.fusion_heads=2", "model.fusion_ffn_dim=64", "model.vision_width=32",
               "model.vision_heads=2", "model.vision_mlp_dim=64", "model.text_width=32", "model.text_heads=2",
               "model.text_ffn_dim=64", "init.checkpoint=", "train.batch_size=8", "eval.batch_size=16",
               "das.adapter_dim=8", "train.num_workers=0"]


def test_vilt_vqa_search_drives_the_gates_then_finetuning_reads_its_skip_json(shapes_cache, tmp_path):
    world = shapes_world_opts(shapes_cache, num_train=40, num_eval=10)
    search = load("search")
    result = search.main(["--config", str(DAS / "configs" / "vilt_vqa_shapes.yaml"),
                          "--output-dir", str(tmp_path / "search"), "--opts", *world, *VILT_SMALL,
                          "das.search.epochs=2", "das.search.das_turn=2", "das.search.max_steps_per_epoch=6"])
    assert result["model"] == "ViltForVQA" and result["candidates"] == [["transformer", i] for i in range(4)]
    # the task recipe passed the search's step hook: rounds ran in epoch 1 (steps 2, 4, 6) on val batches
    assert len(result["reward_history"]) == 3 and all(r["epoch"] == 1 for r in result["reward_history"])
    assert any(g != 0 for g in result["gates"])
    finetune = load("finetune_vqa")
    out = tmp_path / "finetune"
    results = finetune.main(["--config", str(DAS / "configs" / "vilt_vqa_shapes.yaml"), "--output-dir", str(out),
                             "--opts", *world, *VILT_SMALL, "train.epochs=1", "train.max_steps_per_epoch=2",
                             "train.eval_every=1", f"das.skip_from={tmp_path / 'search' / 'skip.json'}"])
    assert set(results) == {"val", "test"}
    best = torch.load(out / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    assert best["methods"]["das"]["skip"] == result["skip"] and len(result["skip"]["transformer"]) == 1
    assert any(k.startswith(f"vilt.blocks.{result['skip']['transformer'][0]}.adapter.") for k in best["model"])


def test_meter_nlvr_finetuning_with_a_flat_skip_list(shapes_cache, tmp_path):
    world = shapes_world_opts(shapes_cache, num_train=40, num_eval=10)
    finetune = load("finetune_nlvr")
    results = finetune.main(["--config", str(DAS / "configs" / "meter_nlvr_shapes.yaml"), "--output-dir", str(tmp_path),
                             "--opts", *world, *METER_SMALL, "train.epochs=1", "train.max_steps_per_epoch=2",
                             "train.eval_every=1", "das.skip_from=null", "das.skip=[1, 2]"])
    assert set(results) == {"dev", "test"}
    best = torch.load(tmp_path / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    assert best["methods"]["das"]["skip"] == {"text_fusion": [1], "image_fusion": [0]}


def test_search_without_the_pretraining_output_says_how_to_make_it(tmp_path):
    search = load("search")
    with pytest.raises(ConfigError, match=r"the DAS search starts from pre-trained weights, but init.checkpoint "
                                          r".*nowhere.pth does not exist. Make it first with: python "
                                          r"examples/meter/pretrain.py"):
        search.main(["--config", str(DAS / "configs" / "meter_vqa_shapes.yaml"), "--output-dir", str(tmp_path),
                     "--opts", f"init.checkpoint={tmp_path / 'nowhere.pth'}"])
