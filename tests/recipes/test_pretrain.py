"""The pre-training recipe end to end on a small cached shapes world: its weights load into the
fine-tuning models and recipes, resume continues the run, and the shipped configs hold ALBEF's
hyperparameters."""

import json
from pathlib import Path

import pytest
import torch

import finetune_retrieval
import pretrain
from pretrain import PretrainConfig
from torchmm_ext.checkpoints import load_pretrained
from torchmm_ext.engine import check_kwargs, ConfigError, load_config
from torchmm_ext.models.albef import albef_model_for_pretraining, albef_model_for_retrieval, albef_model_for_ve
from testing_utils import run_torchrun, shapes_world_opts

RECIPE = Path(pretrain.__file__)
SIZES = dict(patch_size=16, vision_width=64, vision_heads=2, vision_mlp_dim=128, text_width=64, text_heads=2,
             text_ffn_dim=128)
SMALL_MODEL = [f"model.{k}={v}" for k, v in SIZES.items()]


def test_every_shipped_config_loads():
    configs = sorted((RECIPE.parent / "configs").glob("pretrain_*.yaml"))
    assert {c.name for c in configs} >= {"pretrain_shapes.yaml", "pretrain_4m.yaml"}
    for path in configs:
        cfg = load_config(path, PretrainConfig)
        check_kwargs(albef_model_for_pretraining, cfg.model, "model")
    real = load_config(RECIPE.parent / "configs" / "pretrain_4m.yaml", PretrainConfig)
    assert (real.model["preset"], real.model["image_size"], real.model["queue_size"]) == ("base", 256, 65536)
    assert (real.model["momentum"], real.model["temp"], real.model["mlm_probability"]) == (0.995, 0.07, 0.15)
    assert (real.train.lr, real.train.min_lr, real.train.epochs, real.train.batch_size) == (1e-4, 1e-5, 30, 64)
    assert (real.train.weight_decay, real.loss.alpha, real.loss.alpha_warmup) == (0.02, 0.4, True)
    assert (real.data.crop_scale, real.data.max_tokens, real.data.tokenizer) == ([0.2, 1.0], 25, "bert-base-uncased")
    assert real.data.train_file == ["data/coco.json", "data/vg.json", "data/cc3m_train.json",
                                    "data/cc3m_val.json", "data/sbu.json"]


def test_unknown_config_keys_name_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"model.*mlm_probabilty.*mlm_probability"):
        pretrain.main(["--output-dir", str(tmp_path), "--opts", "model.mlm_probabilty=0.2"])


def test_recipe_runs_and_its_weights_fill_the_finetuning_models(shapes_cache, tmp_path, capsys):
    opts = [*shapes_world_opts(shapes_cache), *SMALL_MODEL, "loss.alpha=0.4", "train.epochs=1",
            "train.max_steps_per_epoch=2", "train.batch_size=8", "eval.batch_size=16", "eval.k_test=4"]
    results = pretrain.main(["--output-dir", str(tmp_path), "--opts", *opts])
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert {"txt_r1", "img_r1", "r_mean", "itc_r_mean"} <= set(results["val_zero_shot"])
    weights = tmp_path / "pretrained.pth"
    assert f"pre-trained weights: {weights}" in capsys.readouterr().out
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss_itc", "train/loss_mlm", "train/loss_itm"} <= set(logged[-1])

    state = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    assert not any(k.startswith("queue.") for k in state)  # the shapes config has no queue
    assert any(k.startswith("mlm_head.") for k in state) and any(k.startswith("fusion_encoder_m.") for k in state)
    vocab_size = state["text_encoder.embeddings.word_embeddings.weight"].shape[0]
    retrieval = albef_model_for_retrieval("tiny", vocab_size=vocab_size, **SIZES)  # queue of 4,096
    report = load_pretrained(retrieval, weights)
    assert set(report.missing) == {"queue"}  # the fine-tuning queue starts empty
    assert {"mlm_head", "mlm_head_m", "fusion_encoder_m"} <= {group.split(".")[0] for group in report.unexpected}
    torch.testing.assert_close(retrieval.itm_head.weight, state["itm_head.weight"])
    torch.testing.assert_close(retrieval.text_encoder_m.embeddings.word_embeddings.weight,
                               state["text_encoder_m.embeddings.word_embeddings.weight"])
    ve = albef_model_for_ve("tiny", vocab_size=vocab_size, **SIZES)
    report = load_pretrained(ve, weights)
    assert {group.split(".")[0] for group in report.missing} == {"cls_head", "cls_head_m"}
    key = "fusion_encoder.layer.1.cross_attention.k_proj.weight"
    torch.testing.assert_close(ve.state_dict()[key], state[key])
    torch.testing.assert_close(ve.state_dict()[key.replace("encoder.", "encoder_m.", 1)],
                               state[key.replace("encoder.", "encoder_m.", 1)])
    # The retrieval recipe takes the file with --checkpoint.
    evaluated = finetune_retrieval.main(
        ["--output-dir", str(tmp_path / "ft"), "--evaluate", "--checkpoint", str(weights), "--opts",
         *shapes_world_opts(shapes_cache), *SMALL_MODEL, "eval.k_test=4", "eval.batch_size=16"])
    assert 0.0 <= evaluated["test"]["r_mean"] <= 100.0


def test_resume_continues_the_run(shapes_cache, tmp_path):
    opts = [*shapes_world_opts(shapes_cache), *SMALL_MODEL, "train.max_steps_per_epoch=2", "train.batch_size=8",
            "eval.k_test=4"]
    pretrain.main(["--output-dir", str(tmp_path), "--opts", *opts, "train.epochs=1"])
    first = torch.load(tmp_path / "pretrained.pth", map_location="cpu", weights_only=True)["model"]
    pretrain.main(["--output-dir", str(tmp_path), "--resume", "--opts", *opts, "train.epochs=2"])
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == [0, 1]  # epoch 0 was not trained again
    second = torch.load(tmp_path / "pretrained.pth", map_location="cpu", weights_only=True)["model"]
    assert not torch.equal(first["vision_proj.weight"], second["vision_proj.weight"])


@pytest.mark.slow
def test_torchrun_two_processes(shapes_cache, tmp_path):
    proc = run_torchrun(RECIPE, tmp_path, [*shapes_world_opts(shapes_cache), *SMALL_MODEL, "loss.alpha=0.4",
                                           "model.queue_size=32", "model.itc_online_batch=false",
                                           "train.epochs=1", "train.max_steps_per_epoch=3", "train.batch_size=4",
                                           "eval.k_test=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "pretrained.pth", map_location="cpu", weights_only=True)["model"]
    # 3 steps x 2 ranks x 4 samples went through the queue, gathered over both ranks.
    assert (state["queue.idx_queue"] == -1).sum() == 24 and int(state["queue.ptr"]) == 24
    assert "r_mean" in json.loads((tmp_path / "results.json").read_text())["val_zero_shot"]
