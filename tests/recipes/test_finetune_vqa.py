"""The VQA recipe end to end on a small cached shapes world, its shipped configs, and the answer
decoder initialisation from a checkpoint without one."""

import json
from pathlib import Path

import pytest
import torch

import finetune_vqa
from finetune_vqa import VQAConfig
from torchmm_ext.checkpoints import init_answer_decoder
from torchmm_ext.engine.recipe_utils import shapes_world_for_ranks, ShapesWorldConfig
from torchmm_ext.engine import check_kwargs, ConfigError, load_config
from torchmm_ext.models.albef import albef_model_for_vqa
from testing_utils import run_torchrun, shapes_world_opts, TINY_ENCODER_OPTS

RECIPE = Path(finetune_vqa.__file__)
SMALL_MODEL = TINY_ENCODER_OPTS


def small_world_opts(cache: Path, num_train: int = 40, num_eval: int = 10):
    return [*shapes_world_opts(cache, num_train, num_eval), "init.checkpoint="]


def test_every_shipped_config_loads():
    configs = sorted((RECIPE.parent / "configs").glob("vqa_*.yaml"))
    assert {c.name for c in configs} >= {"vqa_shapes.yaml", "vqa_v2.yaml"}
    for path in configs:
        cfg = load_config(path, VQAConfig)
        check_kwargs(albef_model_for_vqa, cfg.model, "model")
    v2 = load_config(RECIPE.parent / "configs" / "vqa_v2.yaml", VQAConfig)
    assert (v2.model["image_size"], v2.model["preset"], v2.model["distill"]) == (384, "base", True)
    assert (v2.train.lr, v2.train.min_lr, v2.train.epochs, v2.train.batch_size) == (2e-5, 1e-6, 8, 32)
    assert (v2.eval.batch_size, v2.eval.k_test, v2.loss.alpha, v2.loss.alpha_warmup) == (16, 128, 0.4, True)
    assert v2.data.train_files == ["data/vqa_train.json", "data/vqa_val.json", "data/vg_qa.json"]
    assert (v2.data.test_file, v2.data.answer_list, v2.data.eos) == ("data/vqa_test.json", "data/answer_list.json",
                                                                     "[SEP]")


def test_unknown_config_keys_name_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"model.*decoder_layer.*decoder_layers"):
        finetune_vqa.main(["--output-dir", str(tmp_path), "--opts", "model.decoder_layer=3"])


@pytest.mark.parametrize("distill", [False, True])
def test_recipe_runs_end_to_end(shapes_cache, tmp_path, capsys, distill):
    opts = [*small_world_opts(shapes_cache), *SMALL_MODEL, f"model.distill={str(distill).lower()}",
            "loss.alpha=0.4", "train.epochs=2", "train.max_steps_per_epoch=3", "train.batch_size=8",
            "eval.batch_size=16", "eval.k_test=5"]
    results = finetune_vqa.main(["--output-dir", str(tmp_path), "--opts", *opts])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"val", "test"} and saved == results
    # The session cache may hold other tests' worlds: find this one by its parameters.
    world = shapes_world_for_ranks(ShapesWorldConfig(cache_dir=str(shapes_cache), num_train=40, num_val=10,
                                                     num_test=10)).root
    answer_list = json.loads((world / "answer_list.json").read_text())
    for split in ("val", "test"):
        assert set(saved[split]) == {"acc", "num_questions", "max_acc"}
        assert 0.0 <= saved[split]["acc"] <= saved[split]["max_acc"] <= 100.0
        assert saved[split]["num_questions"] == 30  # 10 images x 3 questions
        records = json.loads((world / f"vqa_{split}.json").read_text())
        predictions = json.loads((tmp_path / f"vqa_result_{split}.json").read_text())
        assert sorted(p["question_id"] for p in predictions) == sorted(r["question_id"] for r in records)
        assert all(set(p) == {"question_id", "answer"} and p["answer"] in answer_list for p in predictions)
    assert (tmp_path / "vqa_result_val_epoch0.json").exists() and (tmp_path / "vqa_result_val_epoch1.json").exists()
    assert "[test] acc" in capsys.readouterr().out
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == [0, 1] and "val/acc" in logged[-1]
    if not distill:
        return
    # --evaluate --checkpoint on the best weights reproduces the test accuracy.
    evaluated = finetune_vqa.main(["--output-dir", str(tmp_path / "eval"), "--evaluate", "--checkpoint",
                                   str(tmp_path / "checkpoint_best.pth"), "--opts", *opts])
    assert evaluated["test"]["acc"] == pytest.approx(results["test"]["acc"])


def test_decoder_is_initialised_only_from_a_checkpoint_without_one(tmp_path):
    sizes = dict(image_size=32, patch_size=16, vision_width=32, vision_depth=1, vision_heads=2, vision_mlp_dim=64,
                 text_width=32, text_layers=1, fusion_layers=1, text_heads=2, text_ffn_dim=64, vocab_size=40)
    torch.manual_seed(0)
    source = albef_model_for_vqa("tiny", distill=False, **sizes)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("answer_decoder.")}
    head = {f"mlm_head.{k}": torch.randn_like(v) for k, v in source.answer_decoder.lm_head.state_dict().items()}
    torch.save({"model": {**state, **head}}, tmp_path / "pretrained.pth")
    torch.save({"model": source.state_dict()}, tmp_path / "vqa.pth")

    model = albef_model_for_vqa("tiny", distill=False, **sizes)
    model.load_state_dict(state, strict=False)
    assert init_answer_decoder(model, "") is None
    assert init_answer_decoder(model, str(tmp_path / "vqa.pth")) is None
    done = init_answer_decoder(model, str(tmp_path / "pretrained.pth"))
    assert done == ["embeddings", "layers.layer.0", "lm_head"]
    assert torch.equal(model.answer_decoder.layers.layer[0].attention.input_proj.weight,
                       source.fusion_encoder.layer[0].attention.input_proj.weight)
    assert torch.equal(model.answer_decoder.lm_head.dense.weight, head["mlm_head.dense.weight"])


@pytest.mark.slow
def test_torchrun_two_processes_shard_and_gather_the_evaluation(shapes_cache, tmp_path):
    proc = run_torchrun(RECIPE, tmp_path, [*small_world_opts(shapes_cache), *SMALL_MODEL, "model.distill=true",
                                           "train.epochs=1", "train.max_steps_per_epoch=3", "train.batch_size=4",
                                           "eval.k_test=5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for split in ("val", "test"):  # each rank answered half; the predictions are gathered
        assert results[split]["num_questions"] == 30 and 0 <= results[split]["acc"] <= 100
        assert len(json.loads((tmp_path / f"vqa_result_{split}.json").read_text())) == 30
    assert "[test] acc" in proc.stdout
