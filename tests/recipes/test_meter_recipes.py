"""The METER recipes end to end on a small cached shapes world: pre-training, then VQA, NLVR2
and retrieval fine-tuning from its weights; and every shipped config loads."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from torchmm_ext.engine import check_kwargs, load_config
from torchmm_ext.models.albef import albef_model_for_pretraining
from torchmm_ext.models.meter import (
    meter_model_for_nlvr,
    meter_model_for_pretraining,
    meter_model_for_retrieval,
    meter_model_for_vqa,
)
from torchmm_ext.tasks.nlvr import NLVRTaskConfig
from torchmm_ext.tasks.pretrain import PretrainTaskConfig
from torchmm_ext.tasks.retrieval import RetrievalTaskConfig
from torchmm_ext.tasks.vqa import ClassifierVQAConfig
from testing_utils import shapes_world_opts

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "meter"
SMALL = ["model.hidden_size=64", "model.fusion_heads=2", "model.fusion_ffn_dim=128", "model.vision_width=64",
         "model.vision_heads=2", "model.vision_mlp_dim=128", "model.text_width=64", "model.text_heads=2",
         "model.text_ffn_dim=128", "train.num_workers=0"]
BUILDERS = {"pretrain": (meter_model_for_pretraining, PretrainTaskConfig),
            "vqa": (meter_model_for_vqa, ClassifierVQAConfig),
            "nlvr": (meter_model_for_nlvr, NLVRTaskConfig),
            "retrieval": (meter_model_for_retrieval, RetrievalTaskConfig)}


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"meter_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_shipped_config_loads() -> None:
    configs = sorted((EXAMPLES / "configs").glob("*.yaml"))
    assert {c.name for c in configs} >= {"pretrain_shapes.yaml", "vqa_shapes.yaml", "nlvr_shapes.yaml",
                                         "retrieval_shapes.yaml", "vqa_v2.yaml", "nlvr2.yaml",
                                         "retrieval_flickr.yaml"}
    for path in configs:
        task = next(t for t in BUILDERS if path.name.startswith(t))
        builder, config_cls = BUILDERS[task]
        cfg = load_config(path, config_cls)
        check_kwargs(builder, cfg.model, "model")
        assert cfg.data.image.kind == "clip"
    vqa = load_config(EXAMPLES / "configs" / "vqa_v2.yaml", ClassifierVQAConfig)
    assert (vqa.model["preset"], vqa.data.image.size, vqa.data.tokenizer) == ("base", 576, "roberta-base")


def test_pretrain_then_finetune_every_task(shapes_cache: Path, tmp_path: Path, capsys) -> None:
    world = shapes_world_opts(shapes_cache, num_train=24, num_eval=6)
    steps = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=4", "eval.batch_size=8"]
    pre = tmp_path / "pretrain"
    # the default config starts both encoders from an ALBEF checkpoint (init.vision / init.text):
    # one of the small model's sizes stands in for the shapes pre-training
    albef = tmp_path / "albef.pth"
    from torchmm_ext.data.shapes_world import cached_shapes_world
    from torchmm_ext.data.tokenizer import build_tokenizer

    corpus = cached_shapes_world(shapes_cache, num_train=24, num_val=6, num_test=6).vocab_corpus
    albef_state = albef_model_for_pretraining(
        "tiny", vision_width=64, vision_heads=2, vision_mlp_dim=128, text_width=64, text_heads=2, text_ffn_dim=128,
        patch_size=16, queue_size=8, vocab_size=len(build_tokenizer("shapes", corpus_file=corpus))).state_dict()
    torch.save({"model": albef_state}, albef)
    results = _recipe("pretrain").main(["--output-dir", str(pre), "--opts", *world, *SMALL, *steps,
                                        f"init.vision={albef}", f"init.text={albef}"])
    trained = torch.load(pre / "pretrained.pth", map_location="cpu", weights_only=True)["model"]
    for key in ("vision_encoder.blocks.0.attention.input_proj.weight", "text_encoder.encoder.layer.1.feedforward.model.0.weight"):
        # two small steps away from ALBEF's weights (a fresh initialisation is ~0.03 away per entry)
        torch.testing.assert_close(trained[key], albef_state[key], rtol=0, atol=5e-3)
    assert 0.0 <= results["val"]["itm_acc"] <= 100.0 and 0.0 <= results["val"]["mlm_acc"] <= 100.0
    weights = pre / "pretrained.pth"
    assert weights.exists()
    common = ["--checkpoint", str(weights), "--opts", *world, *SMALL, *steps]

    vqa = _recipe("finetune_vqa").main(["--output-dir", str(tmp_path / "vqa"), *common])
    assert set(vqa) == {"val", "test"} and 0.0 <= vqa["test"]["vqa_score"] <= 100.0

    nlvr = _recipe("finetune_nlvr").main(["--output-dir", str(tmp_path / "nlvr"), *common])
    assert 0.0 <= nlvr["test"]["acc"] <= 100.0

    retrieval = _recipe("finetune_retrieval").main(
        ["--output-dir", str(tmp_path / "retrieval"), *common, "data.num_negatives=3", "eval.max_images=4"])
    assert 0.0 <= retrieval["test"]["r_mean"] <= 100.0
    out = capsys.readouterr().out
    assert "vqa_score" in out and "txt_r1" in out

    # The single-image pre-training weights gave NLVR2 its third modality row (a copy of row 1)
    # and retrieval its rank head (the ITM "match" row).
    pre_state = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    nlvr_start = tmp_path / "nlvr" / "checkpoint_last.pth"
    assert nlvr_start.exists()
    from torchmm_ext.checkpoints.meter import meter_nlvr_checkpoint, meter_retrieval_checkpoint

    adapted = meter_nlvr_checkpoint(weights)
    rows = adapted["modality_embeddings.weight"]
    assert rows.shape[0] == 3 and torch.equal(rows[2], pre_state["modality_embeddings.weight"][1])
    adapted = meter_retrieval_checkpoint(weights)
    assert torch.equal(adapted["rank_head.weight"], pre_state["itm_head.weight"][1:])
    saved = json.loads((tmp_path / "vqa" / "results.json").read_text())
    assert saved == vqa


def test_nlvr_checkpoint_of_another_architecture_is_an_error(tmp_path: Path) -> None:
    from torchmm_ext.checkpoints import load_pretrained
    from torchmm_ext.checkpoints.loading import CheckpointArchitectureError
    from torchmm_ext.models.albef import albef_model_for_ve

    path = tmp_path / "albef.pth"
    torch.save({"model": albef_model_for_ve("tiny", distill=False).state_dict()}, path)
    with pytest.raises(CheckpointArchitectureError, match=f"{path}.*checkpoint of ALBEF, another architecture"):
        load_pretrained(meter_model_for_nlvr("tiny"), path)
