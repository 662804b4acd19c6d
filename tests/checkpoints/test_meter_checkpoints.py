"""METER checkpoints: the released layout (key names and shapes as published), exact round
trips our -> METER -> our, METER's fresh initialisation from CLIP + RoBERTa, layout detection and
the errors for checkpoints of another architecture."""

from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, RobertaConfig, RobertaModel

from torchmm_ext.checkpoints import detect_layout, load_pretrained
from torchmm_ext.checkpoints.loading import CheckpointArchitectureError, CheckpointShapeError
from torchmm_ext.checkpoints.meter import (
    clip_vision_conversion,
    meter_conversion,
    meter_init_state_dict,
    torchmm_ext_to_meter,
    torchmm_ext_to_meter_conversion,
)
from torchmm_ext.models.albef import albef_model_for_ve
from torchmm_ext.models.meter import (
    meter_model_for_nlvr,
    meter_model_for_pretraining,
    meter_model_for_retrieval,
    meter_model_for_vqa,
)

# The documented tensors with no place in our model.
DOCUMENTED_IGNORED = {"vit_model.positional_embedding", "vit_model.ln_final.weight", "vit_model.ln_final.bias",
                      "text_transformer.pooler.dense.weight", "text_transformer.pooler.dense.bias",
                      "text_transformer.embeddings.position_ids"}


def _published_meter_keys(task: str, grid: int) -> dict:
    """Key names and shapes of a released METER clip16/roberta checkpoint (zdou0830/METER's module
    tree, reference notes section 2.4), as meta tensors."""
    shapes = {
        "vit_model.visual.conv1.weight": (768, 3, 16, 16),
        "vit_model.visual.class_embedding": (768,),
        "vit_model.visual.positional_embedding": (grid * grid + 1, 768),
        "vit_model.visual.ln_pre.weight": (768,), "vit_model.visual.ln_pre.bias": (768,),
        "vit_model.visual.ln_post.weight": (768,), "vit_model.visual.ln_post.bias": (768,),
        "vit_model.positional_embedding": (77, 512),
        "vit_model.ln_final.weight": (512,), "vit_model.ln_final.bias": (512,),
        "text_transformer.embeddings.word_embeddings.weight": (50265, 768),
        "text_transformer.embeddings.position_embeddings.weight": (514, 768),
        "text_transformer.embeddings.token_type_embeddings.weight": (1, 768),
        "text_transformer.embeddings.LayerNorm.weight": (768,), "text_transformer.embeddings.LayerNorm.bias": (768,),
        "text_transformer.embeddings.position_ids": (1, 514),
        "text_transformer.pooler.dense.weight": (768, 768), "text_transformer.pooler.dense.bias": (768,),
        "cross_modal_text_transform.weight": (768, 768), "cross_modal_text_transform.bias": (768,),
        "cross_modal_image_transform.weight": (768, 768), "cross_modal_image_transform.bias": (768,),
        "token_type_embeddings.weight": (3 if task == "nlvr2" else 2, 768),
    }
    for side in ("text", "image"):
        shapes[f"cross_modal_{side}_pooler.dense.weight"] = (768, 768)
        shapes[f"cross_modal_{side}_pooler.dense.bias"] = (768,)
    for i in range(11):
        b = f"vit_model.visual.transformer.resblocks.{i}."
        shapes.update({f"{b}attn.in_proj_weight": (2304, 768), f"{b}attn.in_proj_bias": (2304,),
                       f"{b}attn.out_proj.weight": (768, 768), f"{b}attn.out_proj.bias": (768,),
                       f"{b}mlp.c_fc.weight": (3072, 768), f"{b}mlp.c_fc.bias": (3072,),
                       f"{b}mlp.c_proj.weight": (768, 3072), f"{b}mlp.c_proj.bias": (768,)})
        for ln in ("ln_1", "ln_2"):
            shapes[f"{b}{ln}.weight"] = shapes[f"{b}{ln}.bias"] = (768,)
    bert = {"attention.self.query": 768, "attention.self.key": 768, "attention.self.value": 768,
            "attention.output.dense": 768, "intermediate.dense": 3072, "output.dense": 768}
    cross = {f"crossattention.{k.split('.', 1)[1]}": v for k, v in bert.items() if k.startswith("attention.")}
    layers = [("text_transformer.encoder.layer.", 12, bert)]
    layers += [(f"cross_modal_{s}_layers.", 6, {**bert, **cross}) for s in ("text", "image")]
    for prefix, count, linears in layers:
        for i in range(count):
            for name, out in linears.items():
                fan_in = 3072 if name == "output.dense" else 768
                shapes[f"{prefix}{i}.{name}.weight"], shapes[f"{prefix}{i}.{name}.bias"] = (out, fan_in), (out,)
            for ln in ("attention.output.LayerNorm", "output.LayerNorm") + (
                    ("crossattention.output.LayerNorm",) if "cross" in prefix else ()):
                shapes[f"{prefix}{i}.{ln}.weight"] = shapes[f"{prefix}{i}.{ln}.bias"] = (768,)
    heads = {
        "pretrain": {"mlm_score.transform.dense.weight": (768, 768), "mlm_score.transform.dense.bias": (768,),
                     "mlm_score.transform.LayerNorm.weight": (768,), "mlm_score.transform.LayerNorm.bias": (768,),
                     "mlm_score.decoder.weight": (50265, 768), "mlm_score.bias": (50265,),
                     "itm_score.fc.weight": (2, 1536), "itm_score.fc.bias": (2,)},
        "vqa": {"vqa_classifier.0.weight": (1536, 1536), "vqa_classifier.0.bias": (1536,),
                "vqa_classifier.1.weight": (1536,), "vqa_classifier.1.bias": (1536,),
                "vqa_classifier.3.weight": (3129, 1536), "vqa_classifier.3.bias": (3129,)},
        "nlvr2": {"nlvr2_classifier.0.weight": (1536, 3072), "nlvr2_classifier.0.bias": (1536,),
                  "nlvr2_classifier.1.weight": (1536,), "nlvr2_classifier.1.bias": (1536,),
                  "nlvr2_classifier.3.weight": (2, 1536), "nlvr2_classifier.3.bias": (2,)},
        "flickr": {"itm_score.fc.weight": (2, 1536), "itm_score.fc.bias": (2,),
                   "rank_output.weight": (1, 1536), "rank_output.bias": (1,)},
    }
    shapes.update(heads[task])
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize(
    "task, grid, builder",
    [("pretrain", 18, meter_model_for_pretraining), ("vqa", 36, meter_model_for_vqa),
     ("nlvr2", 18, meter_model_for_nlvr), ("flickr", 24, meter_model_for_retrieval)],
)
def test_published_meter_layout_fills_the_base_model_exactly(task, grid, builder) -> None:
    source = _published_meter_keys(task, grid)
    assert detect_layout(source) == "meter"
    conversion = meter_conversion(source, image_size=288)
    with torch.device("meta"):
        model = builder("base")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in conversion.state_dict.items()}
    assert set(got) == set(expected), (sorted(set(expected) - set(got)), sorted(set(got) - set(expected)))
    assert got == expected  # every shape, the position embeddings resized to 288 px (18 x 18 + 1)
    assert set(conversion.ignored) == DOCUMENTED_IGNORED
    if grid != 18:
        assert any("resized bicubically" in n for n in conversion.notes)


def _random_state(model: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.state_dict()


@pytest.mark.parametrize("builder", [meter_model_for_pretraining, meter_model_for_vqa, meter_model_for_nlvr,
                                     meter_model_for_retrieval])
def test_round_trip_ours_meter_ours_is_exact(builder) -> None:
    model = builder("tiny") if builder is not meter_model_for_vqa else builder("tiny", num_answers=5)
    ours = _random_state(model, 0)
    exported = torchmm_ext_to_meter_conversion(ours)
    assert exported.ignored == []  # everything of ours has a place in METER's layout
    assert detect_layout(exported.state_dict) == "meter"
    back = meter_conversion(exported.state_dict)
    assert set(back.ignored) == {"text_transformer.embeddings.position_ids"}
    assert back.state_dict.keys() == ours.keys()
    for key, value in ours.items():
        assert torch.equal(back.state_dict[key], value), key
    # METER's names, packed q/k/v split in query/key/value order.
    meter = exported.state_dict
    d = model.hidden_size
    packed = ours["text_fusion.0.attention.input_proj.weight"]
    assert torch.equal(meter["cross_modal_text_layers.0.attention.self.key.weight"], packed[d:2 * d])
    assert meter["vit_model.visual.class_embedding"].shape == (model.vision_encoder.width,)


def test_load_a_meter_lightning_file_reports_nothing_missing(tmp_path: Path) -> None:
    source = meter_model_for_vqa("tiny", num_answers=5)
    ours = _random_state(source, 1)
    path = tmp_path / "meter_vqa.ckpt"
    torch.save({"state_dict": torch_to_meter_with_leftovers(ours), "epoch": 3}, path)
    target = meter_model_for_vqa("tiny", num_answers=5)
    report = load_pretrained(target, path)
    assert report.layout == "meter" and not report.missing and not report.unexpected
    assert set(report.ignored) == {"vit_model.positional_embedding", "text_transformer.embeddings.position_ids"}
    for key, value in target.state_dict().items():
        assert torch.equal(value, ours[key]), key


def torch_to_meter_with_leftovers(ours: dict) -> dict:
    meter = torchmm_ext_to_meter(ours)
    meter["vit_model.positional_embedding"] = torch.zeros(77, 16)  # CLIP text leftover
    return meter


def test_meter_checkpoint_at_another_image_size_is_resized_to_the_model() -> None:
    source = meter_model_for_nlvr("tiny", image_size=48)
    ours = _random_state(source, 2)
    target = meter_model_for_nlvr("tiny")  # 64 px: grid 8
    report = load_pretrained(target, torchmm_ext_to_meter(ours))
    assert target.vision_encoder.embeddings.position_embeddings.shape == (1, 65, 192)
    assert any("interpolated" in n for n in report.notes)


def _tiny_clip_openai(layers: int = 4) -> dict:
    """A whole OpenAI CLIP state dict (vision + text tower) at tiny sizes."""
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_attention_heads=3,
                                          num_hidden_layers=layers, patch_size=8, image_size=32)).state_dict()
    openai = {"visual.conv1.weight": hf["embeddings.patch_embedding.weight"],
              "visual.class_embedding": hf["embeddings.class_embedding"],
              "visual.positional_embedding": hf["embeddings.position_embedding.weight"],
              "visual.proj": torch.randn(192, 64), "text_projection": torch.randn(64, 64),
              "transformer.resblocks.0.attn.in_proj_weight": torch.randn(192, 64),
              "logit_scale": torch.tensor(4.6)}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            openai[f"visual.{ours}.{p}"] = hf[f"{theirs}.{p}"]
    for i in range(layers):
        h, o = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            openai[f"{o}attn.in_proj_{p}"] = torch.cat([hf[f"{h}self_attn.{x}_proj.{p}"] for x in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                openai[f"{o}{a}.{p}"] = hf[f"{h}{b}.{p}"]
    return openai


def _tiny_roberta() -> RobertaModel:
    return RobertaModel(RobertaConfig(vocab_size=512, hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
                                      intermediate_size=768, max_position_embeddings=128, type_vocab_size=1,
                                      pad_token_id=1, layer_norm_eps=1e-5))


def test_fresh_initialisation_from_clip_and_roberta(tmp_path: Path) -> None:
    clip, roberta = _tiny_clip_openai(layers=4), _tiny_roberta().state_dict()
    assert detect_layout(clip) == "clip"
    model = meter_model_for_vqa("tiny", num_answers=5, pad_token_id=1)  # 3 ViT blocks: CLIP's last is dropped
    init = meter_init_state_dict(clip, roberta, image_size=64, num_vision_layers=3)
    assert not any(k.startswith("vision_encoder.blocks.3.") for k in init.state_dict)
    assert any("METER drops CLIP's last block" in n for n in init.notes)
    missing, unexpected = model.load_state_dict(init.state_dict, strict=False)
    assert not unexpected
    assert {k.split(".")[0] for k in missing} == {"text_transform", "image_transform", "modality_embeddings",
                                                   "text_fusion", "image_fusion", "text_pooler", "image_pooler",
                                                   "vqa_head"}
    # The recipes' init.vision / init.text path: one file each through load_pretrained.
    torch.save(clip, tmp_path / "ViT-B-16.pt")
    torch.save(roberta, tmp_path / "roberta.bin")  # bare RobertaModel keys (read as BERT-like)
    model = meter_model_for_vqa("tiny", num_answers=5, pad_token_id=1)
    vision_report = load_pretrained(model, tmp_path / "ViT-B-16.pt")
    assert vision_report.layout == "clip"
    assert set(vision_report.unexpected) == {"vision_encoder.blocks"}  # block 3 of 4: reported, not loaded
    assert {"visual.proj", "logit_scale", "text_projection"} <= set(vision_report.ignored)
    text_report = load_pretrained(model, tmp_path / "roberta.bin")
    assert text_report.layout == "roberta" and not text_report.unexpected
    assert "text_encoder.encoder" not in text_report.missing  # both RoBERTa layers loaded
    torch.testing.assert_close(model.text_encoder.encoder.layer[1].feedforward.model[2].weight,
                               roberta["encoder.layer.1.output.dense.weight"])
    torch.testing.assert_close(model.vision_encoder.embeddings.position_embeddings[0, 0],
                               clip["visual.positional_embedding"][0])
    prefixed = {f"roberta.{k}": v for k, v in roberta.items()}
    assert detect_layout(prefixed) == "roberta"


def test_checkpoint_of_another_architecture_is_a_clear_error() -> None:
    meter = meter_model_for_vqa("tiny", num_answers=5)
    albef = albef_model_for_ve("tiny", distill=False)
    with pytest.raises(CheckpointArchitectureError, match=r"is a checkpoint of ALBEF, another architecture than METERForVQA \(METER\)"):
        load_pretrained(meter, albef.state_dict())
    with pytest.raises(CheckpointArchitectureError, match=r"is a checkpoint of METER, another architecture than ALBEFForVE \(ALBEF\)"):
        load_pretrained(albef, torchmm_ext_to_meter(meter.state_dict()))
    with pytest.raises(ValueError, match="not a CLIP vision tower"):
        clip_vision_conversion({"patch_embed.proj.weight": torch.zeros(1)})
    # A METER checkpoint of the base size does not fit the tiny model: every tensor is named.
    other = torchmm_ext_to_meter(meter_model_for_vqa("tiny", num_answers=9).state_dict())
    with pytest.raises(CheckpointShapeError, match="vqa_head.3.weight: checkpoint \\(9, 384\\) vs model \\(5, 384\\)"):
        load_pretrained(meter, other)
