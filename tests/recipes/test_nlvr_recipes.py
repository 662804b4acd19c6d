"""The NLVR2 recipes end to end on a small cached shapes world (text-assignment pre-training,
then fine-tuning from its checkpoint), single-image checkpoints, bad input, shipped configs."""

import json
from pathlib import Path

import pytest
import torch

import finetune_nlvr
import pretrain_nlvr
from finetune_nlvr import NLVRConfig
from pretrain_nlvr import TAConfig
from torchmm_ext.checkpoints import dual_image_checkpoint
from torchmm_ext.checkpoints import torchmm_ext_to_albef
from torchmm_ext.data.datasets import NLVRCollator
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.engine import check_kwargs, load_config
from torchmm_ext.engine.recipe_utils import shapes_world_for_ranks, ShapesWorldConfig
from torchmm_ext.models.albef import albef_model_for_nlvr, albef_model_for_retrieval, albef_model_for_text_assignment
from testing_utils import run_torchrun, shapes_world_opts, TINY_ENCODER_OPTS

CONFIGS = Path(finetune_nlvr.__file__).parent / "configs"
SMALL_MODEL = [*TINY_ENCODER_OPTS, "model.fusion_layers=1"]
SHORT = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=8", "eval.batch_size=16"]


def small_world_opts(cache: Path, num_train: int = 40, num_eval: int = 10):
    return [*shapes_world_opts(cache, num_train, num_eval), "init.checkpoint="]



def test_finetune_under_torchrun_two_processes_shards_and_sums_the_evaluation(shapes_cache, tmp_path):
    proc = run_torchrun(Path(finetune_nlvr.__file__), tmp_path,
                        [*small_world_opts(shapes_cache), *SMALL_MODEL, "model.distill=true", "train.epochs=1",
                         "train.max_steps_per_epoch=2", "train.batch_size=4", "eval.batch_size=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for split in ("dev", "test"):  # each rank scored its own shard; the counts are summed, none twice
        assert results[split]["num_samples"] == 10 and 0 <= results[split]["acc"] <= 100
    state = torch.load(tmp_path / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    assert len(state["rng_per_rank"]) == 2

def test_shipped_configs_load_with_albef_hyperparameters():
    for name, schema, builder in (("nlvr_ta_shapes.yaml", TAConfig, albef_model_for_text_assignment),
                                  ("nlvr_ta_4m.yaml", TAConfig, albef_model_for_text_assignment),
                                  ("nlvr_shapes.yaml", NLVRConfig, albef_model_for_nlvr),
                                  ("nlvr2.yaml", NLVRConfig, albef_model_for_nlvr)):
        cfg = load_config(CONFIGS / name, schema)
        check_kwargs(builder, cfg.model, "model")
    ta = load_config(CONFIGS / "nlvr_ta_4m.yaml", TAConfig)
    assert (ta.model["preset"], ta.model["image_size"], ta.train.epochs, ta.train.batch_size) == ("base", 256, 1, 64)
    assert (ta.train.lr, ta.train.min_lr, ta.data.max_tokens, ta.data.crop_scale) == (2e-5, 1e-5, 25, [0.2, 1.0])
    assert len(ta.data.train_files) == 5 and ta.data.tokenizer == "bert-base-uncased"
    ft = load_config(CONFIGS / "nlvr2.yaml", NLVRConfig)
    assert (ft.model["preset"], ft.model["image_size"], ft.model["distill"]) == ("base", 384, True)
    assert (ft.train.lr, ft.train.min_lr, ft.train.epochs, ft.train.batch_size) == (2e-5, 1e-6, 10, 16)
    assert (ft.loss.alpha, ft.loss.alpha_warmup) == (0.4, True)
    assert (ft.data.train_file, ft.data.dev_file, ft.data.test_file) == (
        "data/nlvr_train.json", "data/nlvr_dev.json", "data/nlvr_test.json")


def test_ta_then_finetune_from_its_checkpoint(shapes_cache, tmp_path, capsys):
    ta_dir, ft_dir = tmp_path / "ta", tmp_path / "ft"
    opts = [*small_world_opts(shapes_cache), *SMALL_MODEL, *SHORT]
    ta = pretrain_nlvr.main(["--output-dir", str(ta_dir), "--opts", *opts])
    assert set(ta) == {"val"} and ta["val"]["num_samples"] == 10 and 0 <= ta["val"]["ta_acc"] <= 100
    assert "[val] ta_acc" in capsys.readouterr().out
    ta_weights = torch.load(ta_dir / "checkpoint_best.pth", map_location="cpu", weights_only=True)["model"]
    assert "ta_head.weight" in ta_weights and "fusion_encoder.layer.1.cross_attention.q_proj.weight" in ta_weights

    results = finetune_nlvr.main(["--output-dir", str(ft_dir), "--checkpoint", str(ta_dir / "checkpoint_best.pth"),
                                  "--opts", *opts, "model.distill=true", "loss.alpha=0.4"])
    saved = json.loads((ft_dir / "results.json").read_text())
    assert saved == results and set(saved) == {"dev", "test"}
    assert all(saved[s]["num_samples"] == 10 and 0 <= saved[s]["acc"] <= 100 for s in saved)
    assert "[test] acc" in capsys.readouterr().out
    logged = [json.loads(line) for line in (ft_dir / "metrics.jsonl").read_text().splitlines()]
    assert "val/acc" in logged[-1]
    # The encoders started from the TA weights (checked on a parameter the 2 steps barely move
    # relative to the distance between a fresh init and the TA weights), the 2-way head fresh.
    tuned = torch.load(ft_dir / "checkpoint_best.pth", map_location="cpu", weights_only=True)["model"]
    assert tuned["cls_head.2.weight"].shape[0] == 2 and "ta_head.weight" not in tuned
    key = "text_encoder.embeddings.word_embeddings.weight"
    fresh = albef_model_for_nlvr("tiny", vocab_size=ta_weights[key].shape[0], distill=False,
                                 **{o.split("=")[0][6:]: int(o.split("=")[1]) for o in SMALL_MODEL}).state_dict()[key]
    assert (tuned[key] - ta_weights[key]).norm() < 0.5 * (fresh - ta_weights[key]).norm()
    # Momentum copies restart from the loaded weights (the TA checkpoint has none).
    torch.testing.assert_close(tuned["fusion_encoder_m.layer.0.attention.input_proj.weight"],
                               tuned["fusion_encoder.layer.0.attention.input_proj.weight"], atol=0.05, rtol=0)


def test_finetune_from_a_single_image_checkpoint(shapes_cache, tmp_path):
    # Recognisable weights: every fusion query projection of the single-image model is 0.3.
    vocab = len(build_tokenizer("shapes", corpus_file=shapes_world_for_ranks(ShapesWorldConfig(
        cache_dir=str(shapes_cache), num_train=40, num_val=10, num_test=10)).vocab_corpus))
    sizes = {o.split("=")[0][len("model."):]: int(o.split("=")[1]) for o in SMALL_MODEL}
    single = albef_model_for_retrieval("tiny", patch_size=16, vocab_size=vocab, **sizes)
    with torch.no_grad():
        single.fusion_encoder.layer[0].cross_attention.q_proj.weight.fill_(0.3)
    torch.save({"model": single.state_dict()}, tmp_path / "single.pth")
    finetune_nlvr.main(["--output-dir", str(tmp_path / "ft"), "--checkpoint", str(tmp_path / "single.pth"),
                        "--opts", *small_world_opts(shapes_cache), *SMALL_MODEL, *SHORT, "model.distill=false"])
    tuned = torch.load(tmp_path / "ft" / "checkpoint_best.pth", map_location="cpu", weights_only=True)["model"]
    for j in (0, 1):  # both layers of the pair started from single-image layer 0
        q = tuned[f"fusion_encoder.layer.{j}.cross_attention.q_proj.weight"]
        assert (q - 0.3).abs().max() < 0.05


@pytest.mark.parametrize("layout", ["ours", "albef"])
def test_single_image_checkpoint_is_duplicated_into_pairs(tmp_path, layout):
    torch.manual_seed(0)
    sizes = dict(vision_width=64, vision_heads=2, vision_mlp_dim=128, text_width=64, text_heads=2,
                 text_ffn_dim=128, patch_size=16, vocab_size=60)
    single = albef_model_for_retrieval("tiny", **sizes).state_dict()
    path = tmp_path / "single.pth"
    torch.save({"model": single if layout == "ours" else torchmm_ext_to_albef(single)}, path)
    converted = dual_image_checkpoint(str(path), num_layer_pairs=2)
    assert str(path) in repr(converted) and "duplicated" in repr(converted)
    for i in range(2):
        for j in (2 * i, 2 * i + 1):
            torch.testing.assert_close(converted[f"fusion_encoder.layer.{j}.cross_attention.q_proj.weight"],
                                       single[f"fusion_encoder.layer.{i}.cross_attention.q_proj.weight"])
    # A dual-image checkpoint is passed on as its path (the normal loading path keeps its head).
    dual = tmp_path / "dual.pth"
    torch.save({"model": albef_model_for_nlvr("tiny", distill=False, **sizes).state_dict()}, dual)
    assert dual_image_checkpoint(str(dual), num_layer_pairs=2) == str(dual)
    with pytest.raises(ValueError, match=r"single.pth.*neither a single-image model with 3"):
        dual_image_checkpoint(str(path), num_layer_pairs=3)


def test_nlvr_record_with_one_image_is_reported_with_file_and_record(shapes_cache, tmp_path):
    world = shapes_world_for_ranks(ShapesWorldConfig(cache_dir=str(shapes_cache), num_train=40, num_val=10, num_test=10))
    records = json.loads(Path(world.nlvr_train).read_text())
    records[3]["images"] = records[3]["images"][:1]
    bad = tmp_path / "nlvr_bad.json"
    bad.write_text(json.dumps(records))
    build_tokenizer("shapes", corpus_file=world.vocab_corpus)  # cached next to the corpus
    vocab_dir = next(Path(world.vocab_corpus).parent.glob("wordpiece_*"))
    opts = ["data.shapes=null", f"data.train_file={bad}", f"data.dev_file={world.nlvr_dev}", f"data.test_file={world.nlvr_test}",
            f"data.image_root={world.image_root}", f"data.tokenizer={vocab_dir}", *SMALL_MODEL, *SHORT,
            "train.num_workers=0", "init.checkpoint="]
    with pytest.raises(ValueError, match=r"nlvr_bad.json: record 3 key 'images' must be a list of two paths"):
        finetune_nlvr.main(["--output-dir", str(tmp_path / "out"), "--opts", *opts])


def test_ta_rejects_batches_too_small_to_pair(tmp_path):
    with pytest.raises(ValueError, match="at least 3 samples"):
        pretrain_nlvr.main(["--output-dir", str(tmp_path), "--opts", "train.batch_size=2"])


def test_pair_collator_stacks_the_two_images():
    class Tok:
        def __call__(self, texts, **kwargs):
            n = max(len(t.split()) for t in texts)
            ids = torch.tensor([[i + 1 for i, _ in enumerate(t.split())] + [0] * (n - len(t.split())) for t in texts])
            return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    left, right = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    batch = NLVRCollator(Tok())([(left, right, "a b", 1), (right, left, "c", 0)])
    assert batch["image"].shape == (2, 2, 3, 4, 4)
    assert torch.equal(batch["image"][0, 0], left) and torch.equal(batch["image"][0, 1], right)
    assert torch.equal(batch["image"][1, 0], right) and batch["idx"].tolist() == [1, 0]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
