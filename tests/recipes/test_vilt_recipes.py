"""The ViLT recipes end to end on a small cached shapes world (pre-training, then VQA, NLVR2 and
retrieval from its weights), on ViLT-format Arrow files, and their shipped configs."""

import importlib.util
import io
import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image

from torchmm_ext.engine import check_kwargs, load_config
from torchmm_ext.models.albef import albef_model_for_pretraining
from torchmm_ext.models.vilt import (
    vilt_model_for_nlvr,
    vilt_model_for_pretraining,
    vilt_model_for_retrieval,
    vilt_model_for_vqa,
)
from torchmm_ext.tasks.nlvr import NLVRTaskConfig
from torchmm_ext.tasks.pretrain import PretrainTaskConfig
from torchmm_ext.tasks.retrieval import RetrievalTaskConfig
from torchmm_ext.tasks.vqa import ClassifierVQAConfig
from testing_utils import shapes_world_opts

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "vilt"
SMALL_MODEL = ["model.width=32", "model.depth=1", "model.num_heads=2", "model.mlp_dim=64"]
SHORT = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=8", "eval.batch_size=16"]


def recipe(name: str):
    """Load ``examples/vilt/<name>.py`` under a unique module name (ALBEF's recipes share names)."""
    spec = importlib.util.spec_from_file_location(f"vilt_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pretrained(shapes_cache, tmp_path_factory):
    # the default config starts the transformer from an ALBEF checkpoint's ViT (init.vision):
    # one of the small model's size stands in for the shapes pre-training
    out = tmp_path_factory.mktemp("vilt_pretrain")
    albef = albef_model_for_pretraining("tiny", vision_width=32, vision_depth=1, vision_heads=2, vision_mlp_dim=64,
                                        patch_size=16, queue_size=8)
    torch.save({"model": albef.state_dict()}, out / "albef.pth")
    results = recipe("pretrain").main(["--output-dir", str(out), "--opts", *shapes_world_opts(shapes_cache),
                                       *SMALL_MODEL, *SHORT, f"init.vision={out / 'albef.pth'}"])
    assert set(results["val"]) == {"itm_acc", "mlm_acc", "num_samples"} and results["val"]["num_samples"] == 10
    assert (out / "pretrained.pth").is_file()
    weights = torch.load(out / "pretrained.pth", map_location="cpu", weights_only=True)["model"]
    # two small steps away from ALBEF's ViT (a fresh initialisation is ~0.03 away per entry)
    torch.testing.assert_close(weights["vilt.blocks.0.attention.input_proj.weight"],
                               albef.state_dict()["vision_encoder.blocks.0.attention.input_proj.weight"], rtol=0, atol=5e-3)
    return out / "pretrained.pth"


def test_pretraining_without_its_albef_vit_says_how_to_start_from_scratch(shapes_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"init.vision .*missing.pth does not exist .* --opts init.vision=''"):
        recipe("pretrain").main(["--output-dir", str(tmp_path), "--opts", *shapes_world_opts(shapes_cache),
                                 *SMALL_MODEL, *SHORT, f"init.vision={tmp_path / 'missing.pth'}"])


def test_vqa_from_the_pretrained_weights_writes_scored_results(shapes_cache, pretrained, tmp_path):
    results = recipe("finetune_vqa").main(["--output-dir", str(tmp_path), "--checkpoint", str(pretrained), "--opts",
                                           *shapes_world_opts(shapes_cache), *SMALL_MODEL, *SHORT])
    for split in ("val", "test"):
        assert set(results[split]) == {"vqa_score", "acc", "num_questions"} and results[split]["num_questions"] == 30
        assert 0 <= results[split]["vqa_score"] <= 100 and 0 <= results[split]["acc"] <= 100
        answers = json.loads((tmp_path / f"vqa_result_{split}.json").read_text())
        assert len(answers) == 30 and len({a["question_id"] for a in answers}) == 30


def test_nlvr_and_retrieval_from_the_pretrained_weights(shapes_cache, pretrained, tmp_path):
    nlvr = recipe("finetune_nlvr").main(["--output-dir", str(tmp_path / "nlvr"), "--checkpoint", str(pretrained),
                                         "--opts", *shapes_world_opts(shapes_cache), *SMALL_MODEL, *SHORT])
    assert {split: m["num_samples"] for split, m in nlvr.items()} == {"dev": 10, "test": 10}
    retrieval = recipe("finetune_retrieval").main(
        ["--output-dir", str(tmp_path / "ret"), "--checkpoint", str(pretrained), "--opts",
         *shapes_world_opts(shapes_cache), *SMALL_MODEL, *SHORT, "data.num_negatives=3", "eval.max_images=4"])
    for split in ("val", "test"):
        assert set(retrieval[split]) >= {"txt_r1", "img_r1", "r_mean"}
        assert retrieval[split]["img_r5"] == 100.0  # 4 images scored: each text's image is in the top 5


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: Path, columns: dict) -> str:
    table = pa.table(columns)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return str(path)


def test_vqa_recipe_reads_vilt_arrow_files(shapes_cache, tmp_path):
    colours = ["red", "blue", "green", "white"] * 4
    columns = {"image": [_png(c) for c in colours], "questions": [["what colour is it"]] * 16,
               "answers": [[[c]] for c in colours], "answer_labels": [[[["red", "blue", "green", "white"].index(c)]]
                                                                      for c in colours],
               "answer_scores": [[[1.0]] for _ in colours], "question_id": [[i] for i in range(16)]}
    train = _write(tmp_path / "vqav2_train.arrow", columns)
    val = _write(tmp_path / "vqav2_rest_val.arrow", columns)
    # the shapes tokenizer (the world's vocabulary) with ViLT arrow data files
    results = recipe("finetune_vqa").main(
        ["--output-dir", str(tmp_path / "out"), "--opts", *shapes_world_opts(shapes_cache), *SMALL_MODEL, *SHORT,
         "init.checkpoint=", "data.image.size=32"]
        + [f"data.shapes=null", f"data.train_files=[{train}]", f"data.val_files=[{val}]", "data.test_files=[]",
           "data.answer_list=", f"data.tokenizer={_shapes_tokenizer(shapes_cache)}"])
    assert set(results) == {"val"} and results["val"]["num_questions"] == 16
    assert "acc" not in results["val"]  # arrow files keep scores, not the annotators' answers


def _shapes_tokenizer(cache: Path) -> str:
    """A saved tokenizer directory of the small world (build_tokenizer takes a directory)."""
    from torchmm_ext.data.tokenizer import build_tokenizer
    from torchmm_ext.engine.recipe_utils import shapes_world_for_ranks, ShapesWorldConfig

    world = shapes_world_for_ranks(ShapesWorldConfig(cache_dir=str(cache), num_train=40, num_val=10, num_test=10))
    tokenizer = build_tokenizer("shapes", corpus_file=world.vocab_corpus)
    target = cache / "vilt_test_tokenizer"
    tokenizer.save_pretrained(str(target))
    return str(target)


@pytest.mark.parametrize("name,schema,builder", [
    ("pretrain", PretrainTaskConfig, vilt_model_for_pretraining),
    ("vqa", ClassifierVQAConfig, vilt_model_for_vqa),
    ("nlvr", NLVRTaskConfig, vilt_model_for_nlvr),
    ("retrieval", RetrievalTaskConfig, vilt_model_for_retrieval),
])
def test_shipped_configs_load_and_name_builder_arguments(name, schema, builder):
    configs = sorted((EXAMPLES / "configs").glob(f"{name}*.yaml"))
    assert len(configs) == 2, configs
    for path in configs:
        cfg = load_config(path, schema)
        check_kwargs(builder, cfg.model, "model")


def test_real_data_configs_carry_vilt_hyperparameters():
    vqa = load_config(EXAMPLES / "configs" / "vqa_v2.yaml", ClassifierVQAConfig)
    assert (vqa.model["preset"], vqa.train.lr, vqa.train.epochs, vqa.train.batch_size * 8) == ("base", 1e-4, 10, 256)
    assert (vqa.train.weight_decay, vqa.train.warmup_epochs / vqa.train.epochs) == (0.01, 0.1)
    assert (vqa.data.image.kind, vqa.data.image.size, vqa.data.max_tokens) == ("pixelbert", 384, 40)
    retrieval = load_config(EXAMPLES / "configs" / "retrieval_flickr.yaml", RetrievalTaskConfig)
    assert (retrieval.data.num_negatives, retrieval.eval.max_images) == (15, 0)
    pre = load_config(EXAMPLES / "configs" / "pretrain_4m.yaml", PretrainTaskConfig)
    assert (pre.model["max_image_len"], pre.train.batch_size * 64, pre.train.lr) == (200, 4096, 1e-4)
