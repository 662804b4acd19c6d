"""PELA's recipes end to end on a small shapes world: compress, distillation pre-training, and a
low-rank fine-tuning; the shipped configs."""

import json
from pathlib import Path

import pytest
import torch

from torchmm_ext.engine import load_config
from torchmm_ext.engine.efficiency import check_method_sections, recorded_methods
from torchmm_ext.engine.recipe_utils import load_recipe
from testing_utils import shapes_world_opts

REPO = Path(__file__).resolve().parents[2]
PELA = REPO / "examples" / "pela"
compress = load_recipe(PELA / "compress.py")
pela_finetune_ve = load_recipe(PELA / "finetune_ve.py")
pela_pretrain = load_recipe(PELA / "pretrain.py")


def albef_recipe(name: str):
    return load_recipe(REPO / "examples" / "albef" / f"{name}.py")

SIZES = dict(patch_size=16, vision_width=64, vision_heads=2, vision_mlp_dim=128, text_width=64, text_heads=2,
             text_ffn_dim=128)
SMALL_MODEL = [f"model.{k}={v}" for k, v in SIZES.items()]
SHORT = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=8", "eval.batch_size=16"]

CONFIG_CLASSES = {"pretrain": ("pretrain", "PretrainConfig"), "retrieval": ("finetune_retrieval", "RetrievalConfig"),
                  "vqa": ("finetune_vqa", "VQAConfig"), "ve": ("finetune_ve", "VEConfig"),
                  "grounding": ("finetune_grounding", "GroundingConfig"), "nlvr": ("finetune_nlvr", "NLVRConfig")}


def _config_class(recipe: str, name: str):
    return getattr(albef_recipe(recipe), name)


def test_every_shipped_config_loads_with_the_albef_recipe_and_has_low_rank():
    configs = sorted((PELA / "configs").glob("*.yaml"))
    assert len(configs) == 13
    for path in configs:
        task = path.stem.split("_")[0].replace("nlvr2", "nlvr")
        cfg = load_config(path, _config_class(*CONFIG_CLASSES[task]))
        check_method_sections(cfg)
        assert cfg.low_rank == {"ratio": 3.0, "init": "svd"}, path.name
        if not path.stem.endswith("shapes") and task != "pretrain":
            assert cfg.train.batch_size == 16, path.name  # PELA halves ALBEF's batch
    real = load_config(PELA / "configs" / "pretrain_4m.yaml", _config_class("pretrain", "PretrainConfig"))
    assert (real.train.lr, real.train.min_lr, real.train.epochs, real.train.batch_size) == (1e-4, 1e-5, 20, 32)
    assert (real.distill.kd_weight, real.distill.reg_weight, real.distill.epsilon) == (0.1, 1.0, 1e-3)


def test_compress_pretrain_finetune(shapes_cache, tmp_path, capsys):
    # the teacher: a few steps of ALBEF pre-training
    teacher_dir = tmp_path / "teacher"
    albef_recipe("pretrain").main(["--output-dir", str(teacher_dir), "--opts",
                                          *shapes_world_opts(shapes_cache), *SMALL_MODEL, *SHORT, "eval.k_test=4"])
    teacher = teacher_dir / "pretrained.pth"

    # compress: table, record, loadable
    report = compress.main(["--checkpoint", str(teacher), "--output", str(tmp_path / "low_rank.pth")])
    printed = capsys.readouterr().out
    assert "online model:" in printed and "momentum copies" in printed and "rel. error" in printed
    assert recorded_methods(str(tmp_path / "low_rank.pth"))["low_rank"]["ratio"] == 3.0
    online_before, online_after = report.params["online"]
    assert online_after < online_before

    # missing teacher: one clear error saying how to make it
    with pytest.raises(FileNotFoundError, match=r"distill.teacher .*nowhere.pth does not exist.*examples/albef/pretrain.py"):
        pela_pretrain.main(["--output-dir", str(tmp_path / "x"), "--checkpoint", str(teacher), "--opts",
                            *shapes_world_opts(shapes_cache), *SMALL_MODEL, *SHORT,
                            f"distill.teacher={tmp_path / 'nowhere.pth'}"])

    # PELA pre-training: SVD of the teacher, distilled from it
    pela_dir = tmp_path / "pela"
    pela_pretrain.main(["--output-dir", str(pela_dir), "--checkpoint", str(teacher), "--opts",
                        *shapes_world_opts(shapes_cache), *SMALL_MODEL, *SHORT, "eval.k_test=4",
                        f"distill.teacher={teacher}"])
    logged = [json.loads(line) for line in (pela_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss_kd", "train/loss_reg", "train/loss_mlm"} <= set(logged[-1])
    weights = pela_dir / "pretrained.pth"
    assert recorded_methods(str(weights))["low_rank"]["ratio"] == 3.0
    state = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    assert "vision_encoder.blocks.0.attention.input_proj.0.weight" in state
    assert not any(k.startswith("teacher") for k in state)

    # low-rank fine-tuning from it (the record restructures the model before the load)
    ve_dir = tmp_path / "ve"
    results = pela_finetune_ve.main(["--output-dir", str(ve_dir), "--checkpoint", str(weights), "--opts",
                                     *shapes_world_opts(shapes_cache), *SMALL_MODEL, *SHORT])
    assert 0.0 <= results["test"]["acc"] <= 100.0
    best = torch.load(ve_dir / "checkpoint_best.pth", map_location="cpu", weights_only=True)
    assert best["methods"]["low_rank"]["ratio"] == 3.0
    assert "fusion_encoder.layer.0.cross_attention.q_proj.1.weight" in best["model"]
