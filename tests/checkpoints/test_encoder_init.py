"""``init.vision`` / ``init.text`` from a whole ALBEF checkpoint (``load_pretrained(part=...)``):
ViLT's transformer from ALBEF's ViT (``encoders_to_vilt``), METER's encoders from ALBEF's.

Golden values come from the ALBEF model itself: after the load, our ViLT's image path (image
embeddings -> blocks -> final norm, run on the image tokens alone) must reproduce ALBEF's ViT
output, its text embeddings ALBEF's, and METER's encoders ALBEF's encoders. The ALBEF state has
momentum weights that differ from their online twins and task heads, so a conversion that read
the wrong copy, or dropped a renamed tensor, fails."""

import pytest
import torch

from torchmm_ext.checkpoints import load_pretrained
from torchmm_ext.checkpoints.loading import CheckpointArchitectureError
from torchmm_ext.checkpoints.vilt import encoders_to_vilt
from torchmm_ext.engine.recipe_utils import initialize_weights, InitConfig
from torchmm_ext.models.albef import albef_model_for_pretraining
from torchmm_ext.models.meter import meter_model_for_pretraining, meter_model_for_vqa
from torchmm_ext.models.vilt import vilt_model, vilt_model_for_pretraining

VOCAB = 60


def _albef_state(seed: int = 0) -> dict:
    """A tiny ALBEF pre-training state with every tensor random and momentum != online."""
    torch.manual_seed(seed)
    model = albef_model_for_pretraining("tiny", patch_size=16, vocab_size=VOCAB, queue_size=8)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value = value + 0.1 * torch.randn(value.shape, generator=g)
        state[key] = value
    assert not torch.equal(state["vision_encoder.blocks.0.attention.input_proj.weight"],
                           state["vision_encoder_m.blocks.0.attention.input_proj.weight"])
    model.load_state_dict(state)
    # the MLM decoder is tied to the word embeddings: read the state back from the model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return model.eval(), state


def _images(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def test_vilt_transformer_from_albef_vit_reproduces_its_image_path_and_text_embeddings():
    albef, state = _albef_state()
    vilt = vilt_model_for_pretraining("tiny", vocab_size=VOCAB, patch_size=16, dropout=0.0).eval()
    vision = load_pretrained(vilt, state, part="vision")
    text = load_pretrained(vilt, state, part="text")

    assert vision.loaded == 4 + 4 * 12 + 2 and not vision.missing and not vision.unexpected
    assert any(k.startswith("text_encoder.") for k in vision.ignored)
    assert text.loaded == 5 and not text.missing and not text.unexpected
    assert any("first 40 of its 512 positions" in n for n in text.notes)
    assert any("no text layers" in n for n in text.notes)

    images = _images()
    with torch.no_grad():
        x = vilt.vilt.image_embeddings(images).embeddings
        for block in vilt.vilt.blocks:
            x = block(x)
        ours = vilt.vilt.norm(x)
        expected = albef.vision_encoder(images).last_hidden_state
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
        ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(vilt.vilt.text_embeddings(ids), albef.text_encoder.embeddings(ids),
                                   rtol=0, atol=1e-6)
    # The ViLT-only parts keep their initialisation.
    assert not torch.equal(vilt.itm_head.weight, state["itm_head.weight"])


def test_encoders_to_vilt_maps_every_vit_tensor_and_names_what_it_leaves():
    _, state = _albef_state()
    conversion = encoders_to_vilt(state, prefix="")
    model_keys = set(vilt_model("tiny", vocab_size=VOCAB, patch_size=16).state_dict())
    assert set(conversion.state_dict) <= model_keys
    vit = [k for k in state if k.startswith("vision_encoder.")]
    vilt_image = [k for k in model_keys if k.startswith(("image_embeddings.", "blocks.", "norm."))]
    assert len(vit) == len(vilt_image) == sum(k.startswith(("image_embeddings.", "blocks.", "norm."))
                                              for k in conversion.state_dict)
    assert torch.equal(conversion.state_dict["blocks.3.feedforward.model.3.weight"],
                       state["vision_encoder.blocks.3.feedforward.model.2.weight"])
    assert "vision_encoder_m.norm.weight" in conversion.ignored and "itm_head.weight" in conversion.ignored


def test_meter_encoders_from_albef_reproduce_its_vit_and_text_encoder():
    albef, state = _albef_state(seed=1)
    meter = meter_model_for_pretraining("tiny", vocab_size=VOCAB, patch_size=16, pad_token_id=0, dropout=0.0,
                                        vision_kind="vit", text_kind="bert",
                                        max_position_embeddings=512).eval()
    vision = load_pretrained(meter, state, part="vision")
    text = load_pretrained(meter, state, part="text")
    # METER keeps 3 of the ViT's 4 blocks (as it keeps 11 of CLIP's 12): the 4th is reported.
    assert not vision.missing and list(vision.unexpected) == ["vision_encoder.blocks"]
    assert all(".blocks.3." in k for k in vision.unexpected["vision_encoder.blocks"])
    assert not text.missing and not text.unexpected

    images = _images()
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        hidden = albef.vision_encoder(images, return_hidden_states=True).hidden_states
        torch.testing.assert_close(meter.encode_image(images), albef.vision_encoder.norm(hidden[3]),
                                   rtol=0, atol=1e-5)
        expected_text = albef.text_encoder(ids, attention_mask=mask.bool()).last_hidden_state
        torch.testing.assert_close(meter.encode_text(ids, mask), expected_text, rtol=0, atol=1e-5)


def test_meter_clip_encoder_from_an_albef_vit_reports_what_does_not_fit():
    _, state = _albef_state()
    meter = meter_model_for_vqa("tiny", num_answers=3, vocab_size=VOCAB, patch_size=16)  # CLIP-style ViT
    report = load_pretrained(meter, state, part="vision")
    assert report.missing == {"vision_encoder.pre_norm": ["vision_encoder.pre_norm.weight",
                                                          "vision_encoder.pre_norm.bias"]}
    assert "vision_encoder.embeddings.conv_projection.bias" in report.unexpected["vision_encoder.embeddings"]


def test_part_errors_name_the_problem(tmp_path):
    _, state = _albef_state()
    vilt = vilt_model_for_pretraining("tiny", vocab_size=VOCAB, patch_size=16)
    with pytest.raises(ValueError, match=r"part='audio': choose one of \['text', 'vision'\]"):
        load_pretrained(vilt, state, part="audio")
    with pytest.raises(CheckpointArchitectureError, match="ViLT checkpoint: it has no separate vision encoder"):
        load_pretrained(vilt, vilt.state_dict(), part="vision")
    # another width: every tensor that does not fit is named
    wide = vilt_model_for_pretraining("tiny", vocab_size=VOCAB, patch_size=16, width=128, num_heads=4, mlp_dim=512)
    with pytest.raises(ValueError, match=r"vilt\.blocks\.0\.attention\.input_proj\.weight: checkpoint \(576, 192\)"):
        load_pretrained(wide, state, part="vision")
    with pytest.raises(ValueError, match=r"unknown METER vision_kind 'swin'; choose one of \['clip', 'vit'\]"):
        meter_model_for_vqa("tiny", vision_kind="swin")
    with pytest.raises(ValueError, match=r"unknown METER text_kind 'electra'"):
        meter_model_for_vqa("tiny", text_kind="electra")


def test_init_config_vision_and_text_take_the_encoders_of_a_whole_checkpoint(tmp_path):
    _, state = _albef_state()
    path = tmp_path / "albef.pth"
    torch.save({"model": state}, path)
    vilt = vilt_model_for_pretraining("tiny", vocab_size=VOCAB, patch_size=16)
    logs = []
    initialize_weights(vilt, InitConfig(vision=str(path), text=str(path)), log=logs.append)
    assert logs[0].startswith(f"vision encoder initialised from {path}") and "loaded 54 tensors" in logs[0]
    assert logs[1].startswith(f"text encoder initialised from {path}") and "loaded 5 tensors" in logs[1]
    assert torch.equal(vilt.vilt.blocks[2].attention.output_proj.weight,
                       state["vision_encoder.blocks.2.attention.output_proj.weight"])
    assert torch.equal(vilt.vilt.text_embeddings.word_embeddings.weight,
                       state["text_encoder.embeddings.word_embeddings.weight"])


def test_vilt_from_a_timm_vit_as_the_paper_starts_reproduces_its_features(tmp_path):
    import timm

    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=0).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    vilt = vilt_model("tiny", vocab_size=VOCAB, width=48, depth=2, num_heads=3, mlp_dim=96, patch_size=16,
                      dropout=0.0).eval()
    report = load_pretrained(vilt, tmp_path / "vit.pth", part="vision")
    assert report.layout == "timm_vit" and not report.missing and not report.unexpected
    images = _images()
    with torch.no_grad():
        x = vilt.image_embeddings(images).embeddings
        for block in vilt.blocks:
            x = block(x)
        torch.testing.assert_close(vilt.norm(x), vit.forward_features(images), rtol=0, atol=1e-5)
