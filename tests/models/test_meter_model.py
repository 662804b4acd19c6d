"""METER: each part against its Hugging Face oracle with the same random weights passed through
our converters (CLIPVisionModel + post_layernorm on every token, RobertaModel, BertLayer with
cross-attention), one co-attention step against the published equations written out, the
whole backbone against METER's ``infer`` re-assembled from those oracles on a state dict in
METER's layout, and forward/backward of every task model at tiny size."""

import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, CLIPVisionConfig, CLIPVisionModel, RobertaConfig, RobertaModel
from transformers.models.bert.modeling_bert import BertLayer

from torchmm_ext.checkpoints import load_pretrained
from torchmm_ext.checkpoints.meter import clip_vision_conversion, meter_conversion, roberta_conversion
from torchmm_ext.models.meter import (
    meter_model,
    meter_model_for_nlvr,
    meter_model_for_pretraining,
    meter_model_for_retrieval,
    meter_model_for_vqa,
    vqa_soft_bce,
)
from torchmm_ext.modules.efficiency import resolve_block_groups
from torchmm_ext.modules.text_encoder import albef_text_encoder, FusionLayer, padding_mask
from torchmm_ext.modules.vision_transformer import QuickGELU, VisionTransformer

WIDTH, HEADS, FFN = 64, 4, 128


def _randomise(module: nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorms included), so no conversion slip hides behind 1/0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_scale = name.endswith("weight") and ("norm" in name.lower())
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if is_norm_scale else 0.0))


def _clip_oracle(layers: int = 3, image_size: int = 32) -> CLIPVisionModel:
    config = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=FFN, num_attention_heads=HEADS,
                              num_hidden_layers=layers, patch_size=8, image_size=image_size,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0)
    config._attn_implementation = "eager"
    model = CLIPVisionModel(config).eval()
    _randomise(model, 1)
    return model


def _our_clip(layers: int = 3, image_size: int = 32) -> VisionTransformer:
    return VisionTransformer(image_size=image_size, patch_size=8, width=WIDTH, depth=layers, num_heads=HEADS,
                             mlp_dim=FFN, layer_norm_eps=1e-5, activation=QuickGELU, pre_norm=True,
                             patch_bias=False).eval()


def _roberta_oracle(vocab: int = 100, max_pos: int = 40) -> RobertaModel:
    config = RobertaConfig(vocab_size=vocab, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
                           intermediate_size=FFN, max_position_embeddings=max_pos, type_vocab_size=1,
                           pad_token_id=1, layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    model = RobertaModel(config, add_pooling_layer=True).eval()
    _randomise(model, 2)
    return model


def _our_roberta(vocab: int = 100, max_pos: int = 40) -> nn.Module:
    return albef_text_encoder(vocab_size=vocab, width=WIDTH, num_layers=2, num_heads=HEADS, ffn_dim=FFN,
                              max_position_embeddings=max_pos, pad_token_id=1, dropout=0.0,
                              layer_norm_eps=1e-5, type_vocab_size=1, offset_pos_ids=True).eval()


def _cross_layer_oracle(seed: int) -> BertLayer:
    config = BertConfig(hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=FFN, is_decoder=True,
                        add_cross_attention=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        layer_norm_eps=1e-12)
    config._attn_implementation = "eager"
    layer = BertLayer(config).eval()
    _randomise(layer, seed)
    return layer


def _extended(mask: torch.Tensor) -> torch.Tensor:
    """transformers 4.6's ``get_extended_attention_mask`` (METER's masks): ``(1 - m) * -10000``."""
    return (1.0 - mask[:, None, None, :].float()) * -10000.0


def _texts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0, 17, 33, 52, 9, 2, 1, 1], [0, 5, 6, 7, 8, 9, 10, 2]])
    return ids, (ids != 1).long()


def test_image_encoder_matches_hf_clip_vision_model_with_post_layernorm_on_every_token() -> None:
    oracle = _clip_oracle()
    conversion = clip_vision_conversion(oracle.state_dict(), prefix="")
    assert conversion.ignored == ["embeddings.position_ids"] or conversion.ignored == []
    ours = _our_clip()
    missing, unexpected = ours.load_state_dict(conversion.state_dict, strict=False)
    assert not missing and not unexpected
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = oracle.post_layernorm(oracle(pixel_values=images).last_hidden_state)
        got = ours(images).last_hidden_state
    assert got.shape == (2, 17, WIDTH)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_openai_and_hf_clip_layouts_convert_to_the_same_weights() -> None:
    hf = _clip_oracle(layers=2).state_dict()
    # The OpenAI layout written out independently from CLIP's module names.
    openai = {
        "visual.conv1.weight": hf["embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf["embeddings.class_embedding"],
        "visual.positional_embedding": hf["embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf["pre_layrnorm.weight"], "visual.ln_pre.bias": hf["pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["post_layernorm.weight"], "visual.ln_post.bias": hf["post_layernorm.bias"],
        "visual.proj": torch.randn(WIDTH, 32),
        "token_embedding.weight": torch.randn(10, 32),  # the text tower of a whole CLIP file
    }
    for i in range(2):
        h, o = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            openai[f"{o}attn.in_proj_{p}"] = torch.cat([hf[f"{h}self_attn.{x}_proj.{p}"] for x in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                openai[f"{o}{a}.{p}"] = hf[f"{h}{b}.{p}"]
    from_openai = clip_vision_conversion(openai)
    from_hf = clip_vision_conversion(hf)
    assert from_openai.state_dict.keys() == from_hf.state_dict.keys()
    for key, value in from_hf.state_dict.items():
        assert torch.equal(from_openai.state_dict[key], value), key
    assert {"visual.proj", "token_embedding.weight"} <= set(from_openai.ignored)


def test_position_embeddings_resized_bicubically_as_meter_adapt_position_encoding() -> None:
    hf = _clip_oracle(layers=1, image_size=32).state_dict()
    out = clip_vision_conversion(hf, image_size=48, prefix="").state_dict["embeddings.position_embeddings"]
    pos = hf["embeddings.position_embedding.weight"]  # [1 + 4 * 4, D]
    # METER's adapt_position_encoding, written out: grid [4, 4, D] -> bicubic -> [6, 6, D].
    grid = pos[1:].reshape(4, 4, WIDTH).permute(2, 0, 1).unsqueeze(0)
    grid = F.interpolate(grid, size=(6, 6), mode="bicubic").squeeze(0).permute(1, 2, 0).reshape(-1, WIDTH)
    torch.testing.assert_close(out[0], torch.cat([pos[:1], grid]), atol=0, rtol=0)


def test_text_encoder_matches_hf_roberta_with_padding() -> None:
    oracle = _roberta_oracle()
    conversion = roberta_conversion(oracle.state_dict(), prefix="")
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= set(conversion.ignored)
    ours = _our_roberta()
    missing, unexpected = ours.load_state_dict(conversion.state_dict, strict=False)
    assert not missing and not unexpected
    ids, mask = _texts()
    with torch.no_grad():
        expected = oracle(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask.bool()).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)
    # RoBERTa's positions: padding_idx + 1 + count of non-pad tokens so far; pads get padding_idx.
    positions = ours.embeddings.create_position_ids_from_input_ids(ids)
    assert positions[0].tolist() == [2, 3, 4, 5, 6, 7, 1, 1]


def _our_fusion_layer(oracle: BertLayer) -> FusionLayer:
    state = meter_conversion({f"cross_modal_text_layers.0.{k}": v for k, v in oracle.state_dict().items()}).state_dict
    layer = FusionLayer(WIDTH, WIDTH, HEADS, FFN, dropout=0.0, layer_norm_eps=1e-12).eval()
    layer.load_state_dict({k[len("text_fusion.0."):]: v for k, v in state.items()})
    return layer


def test_co_attention_layer_matches_hf_bert_layer_with_cross_attention() -> None:
    oracle = _cross_layer_oracle(4)
    ours = _our_fusion_layer(oracle)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 6, WIDTH, generator=g), torch.randn(2, 9, WIDTH, generator=g)
    x_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    y_mask = torch.tensor([[1] * 9, [1] * 7 + [0, 0]])
    with torch.no_grad():
        expected = oracle(x, attention_mask=_extended(x_mask), encoder_hidden_states=y,
                          encoder_attention_mask=_extended(y_mask))
        expected = expected[0] if isinstance(expected, tuple) else expected
        got, _ = ours(x, padding_mask(x_mask), y, image_mask=padding_mask(y_mask))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _layer_by_the_equations(p: dict, x: torch.Tensor, x_keep: torch.Tensor, y: torch.Tensor,
                            y_keep: torch.Tensor) -> torch.Tensor:
    """METER's BertCrossLayer from its published equations, on METER's parameter names."""

    def lin(name, t):
        return t @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def ln(name, t):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-12) * p[f"{name}.weight"] + p[f"{name}.bias"]

    def mha(prefix, q_in, kv_in, keep):
        d = WIDTH // HEADS
        split = lambda t: t.view(t.shape[0], t.shape[1], HEADS, d).transpose(1, 2)  # noqa: E731
        q, k, v = (split(lin(f"{prefix}.self.{n}", src)) for n, src in
                   (("query", q_in), ("key", kv_in), ("value", kv_in)))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + (1.0 - keep[:, None, None, :].float()) * -10000.0
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(q_in.shape)
        return lin(f"{prefix}.output.dense", out)

    a = ln("attention.output.LayerNorm", x + mha("attention", x, x, x_keep))
    c = ln("crossattention.output.LayerNorm", a + mha("crossattention", a, y, y_keep))
    h = F.gelu(lin("intermediate.dense", c))
    return ln("output.LayerNorm", c + lin("output.dense", h))


def test_one_co_attention_step_follows_the_published_equations_and_ignores_text_padding() -> None:
    # One fusion step of a tiny METER (both sides), from METER-layout weights.
    text_layer, image_layer = _cross_layer_oracle(6), _cross_layer_oracle(7)
    meter = {f"cross_modal_text_layers.0.{k}": v for k, v in text_layer.state_dict().items()}
    meter.update({f"cross_modal_image_layers.0.{k}": v for k, v in image_layer.state_dict().items()})
    model = meter_model("tiny", text_width=WIDTH, vision_width=WIDTH, hidden_size=WIDTH, fusion_layers=1,
                        fusion_heads=HEADS, fusion_ffn_dim=FFN, vision_heads=HEADS, text_heads=HEADS,
                        pad_token_id=1, dropout=0.0).eval()
    _, unexpected = model.load_state_dict(meter_conversion(meter).state_dict, strict=False)
    assert not unexpected
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(2, 5, WIDTH, generator=g), torch.randn(2, 7, WIDTH, generator=g)
    x_keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    y_keep = torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        x1, _ = model.text_fusion[0](x, padding_mask(x_keep), y, image_mask=None)
        y1, _ = model.image_fusion[0](y, None, x, image_mask=padding_mask(x_keep))
        tp = {k[len("cross_modal_text_layers.0."):]: v for k, v in meter.items() if "text_layers" in k}
        ip = {k[len("cross_modal_image_layers.0."):]: v for k, v in meter.items() if "image_layers" in k}
        torch.testing.assert_close(x1, _layer_by_the_equations(tp, x, x_keep, y, y_keep), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y1, _layer_by_the_equations(ip, y, y_keep, x, x_keep), atol=1e-5, rtol=1e-5)
        # The image side never reads the text padding.
        x_other = x.clone()
        x_other[0, 3:] = 100.0
        y1_other, _ = model.image_fusion[0](y, None, x_other, image_mask=padding_mask(x_keep))
        torch.testing.assert_close(y1_other, y1, atol=0, rtol=0)


def _meter_layout_state(vision: CLIPVisionModel, text: RobertaModel, layers: int, seed: int) -> dict:
    """A METER-layout state dict (METER's key names) holding the oracles' weights and random
    transforms, fusion layers, poolers and heads."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    hf = vision.state_dict()
    state = {
        "vit_model.visual.conv1.weight": hf["embeddings.patch_embedding.weight"],
        "vit_model.visual.class_embedding": hf["embeddings.class_embedding"],
        "vit_model.visual.positional_embedding": hf["embeddings.position_embedding.weight"],
        "vit_model.positional_embedding": r(77, 32), "vit_model.ln_final.weight": r(32),
        "vit_model.ln_final.bias": r(32),
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            state[f"vit_model.visual.{ours}.{p}"] = hf[f"{theirs}.{p}"]
    for i in range(vision.config.num_hidden_layers):
        h, o = f"encoder.layers.{i}.", f"vit_model.visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            state[f"{o}attn.in_proj_{p}"] = torch.cat([hf[f"{h}self_attn.{x}_proj.{p}"] for x in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                state[f"{o}{a}.{p}"] = hf[f"{h}{b}.{p}"]
    state.update({f"text_transformer.{k}": v for k, v in text.state_dict().items()})
    for side in ("text", "image"):
        for i in range(layers):
            layer = _cross_layer_oracle(100 + 10 * i + (side == "image"))
            state.update({f"cross_modal_{side}_layers.{i}.{k}": v for k, v in layer.state_dict().items()})
        for name in (f"cross_modal_{side}_transform", f"cross_modal_{side}_pooler.dense"):
            state[f"{name}.weight"], state[f"{name}.bias"] = r(WIDTH, WIDTH), r(WIDTH)
    state["token_type_embeddings.weight"] = r(2, WIDTH)
    state.update({"vqa_classifier.0.weight": r(2 * WIDTH, 2 * WIDTH), "vqa_classifier.0.bias": r(2 * WIDTH),
                  "vqa_classifier.1.weight": 1 + r(2 * WIDTH), "vqa_classifier.1.bias": r(2 * WIDTH),
                  "vqa_classifier.3.weight": r(11, 2 * WIDTH), "vqa_classifier.3.bias": r(11)})
    return state


def _meter_infer(state: dict, vision: CLIPVisionModel, text: RobertaModel, layers: int,
                 images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 token4classifier: Optional[torch.Tensor] = None) -> torch.Tensor:
    """METER's ``infer`` + ``vqa_classifier`` re-assembled from the Hugging Face oracles (with
    METER-DAS's ``token4classifier`` in place of the first text state when given)."""
    lin = lambda n, t: t @ state[f"{n}.weight"].T + state[f"{n}.bias"]  # noqa: E731
    x = text.embeddings(input_ids=ids)
    for layer in text.encoder.layer:
        x = layer(x, _extended(mask))
        x = x[0] if isinstance(x, tuple) else x
    x = lin("cross_modal_text_transform", x)
    if token4classifier is not None:
        x = torch.cat([token4classifier.repeat(x.shape[0], 1, 1), x[:, 1:]], dim=1)
    x = x + state["token_type_embeddings.weight"][0]
    y = vision.post_layernorm(vision(pixel_values=images).last_hidden_state)
    y = lin("cross_modal_image_transform", y) + state["token_type_embeddings.weight"][1]
    y_mask = torch.ones(y.shape[:2], dtype=torch.long)
    for i in range(layers):
        tl, il = _cross_layer_oracle(0), _cross_layer_oracle(0)
        tl.load_state_dict({k.split(f"text_layers.{i}.")[1]: v for k, v in state.items()
                            if k.startswith(f"cross_modal_text_layers.{i}.")})
        il.load_state_dict({k.split(f"image_layers.{i}.")[1]: v for k, v in state.items()
                            if k.startswith(f"cross_modal_image_layers.{i}.")})
        x1 = tl(x, attention_mask=_extended(mask), encoder_hidden_states=y, encoder_attention_mask=_extended(y_mask))
        y1 = il(y, attention_mask=_extended(y_mask), encoder_hidden_states=x, encoder_attention_mask=_extended(mask))
        x, y = (x1[0] if isinstance(x1, tuple) else x1), (y1[0] if isinstance(y1, tuple) else y1)
    pooled = torch.cat([torch.tanh(lin("cross_modal_text_pooler.dense", x[:, 0])),
                        torch.tanh(lin("cross_modal_image_pooler.dense", y[:, 0]))], dim=-1)
    h = lin("vqa_classifier.0", pooled)
    h = F.layer_norm(h, h.shape[-1:], state["vqa_classifier.1.weight"], state["vqa_classifier.1.bias"])
    return lin("vqa_classifier.3", F.gelu(h))


def _oracle_sized_vqa_model(layers: int):
    """A METER VQA model of the oracles' sizes (11 answers, no dropout), in eval mode."""
    return meter_model_for_vqa("tiny", num_answers=11, image_size=32, vision_width=WIDTH, vision_layers=2,
                               vision_heads=HEADS, vision_mlp_dim=FFN, text_width=WIDTH, text_layers=2,
                               text_heads=HEADS, text_ffn_dim=FFN, vocab_size=100, max_position_embeddings=40,
                               hidden_size=WIDTH, fusion_layers=layers, fusion_heads=HEADS, fusion_ffn_dim=FFN,
                               pad_token_id=1, dropout=0.0).eval()


def test_whole_vqa_model_from_a_meter_layout_state_dict_matches_meter_infer() -> None:
    layers = 2
    vision, text = _clip_oracle(layers=2), _roberta_oracle()
    state = _meter_layout_state(vision, text, layers, seed=9)
    model = _oracle_sized_vqa_model(layers)
    report = load_pretrained(model, state)
    assert report.layout == "meter"
    assert not report.missing and not report.unexpected
    # Only the documented leftovers are ignored.
    assert set(report.ignored) == {"vit_model.positional_embedding", "vit_model.ln_final.weight",
                                   "vit_model.ln_final.bias", "text_transformer.pooler.dense.weight",
                                   "text_transformer.pooler.dense.bias"} | {
        k for k in state if k.startswith("text_transformer.embeddings.") and k.endswith("_ids")}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    ids, mask = _texts()
    with torch.no_grad():
        expected = _meter_infer(state, vision, text, layers, images, ids, mask)
        got = model(images, ids, mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_das_classifier_token_starts_from_the_roberta_embedding_and_replaces_the_first_text_state() -> None:
    """METER-DAS's ``token4classifier``: ``text_transformer.embeddings([[0]])`` (RoBERTa ``<s>``
    at position id 2) after the load, put in place of the first mapped text state."""
    layers = 2
    vision, text = _clip_oracle(layers=2), _roberta_oracle()
    state = _meter_layout_state(vision, text, layers, seed=9)
    model = _oracle_sized_vqa_model(layers)
    load_pretrained(model, state)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    ids, mask = _texts()
    with torch.no_grad():
        plain = model(images, ids, mask).logits
        model.add_classifier_token(0)
        token4classifier = text.embeddings(input_ids=torch.tensor([[0]]))
        torch.testing.assert_close(model.classifier_token.detach(), token4classifier, atol=1e-6, rtol=1e-6)
        # a distinct value, so that the check below sees where it goes
        model.classifier_token.mul_(-2.0)
        expected = _meter_infer(state, vision, text, layers, images, ids, mask, -2.0 * token4classifier)
        got = model(images, ids, mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3
    assert "classifier_token" in model.state_dict()
    with pytest.raises(ValueError, match="classifier token id 100 is outside the text vocabulary"):
        model.add_classifier_token(100)


# ---- task models at tiny size ------------------------------------------------------------------


def _batch(b: int = 3, length: int = 9):
    g = torch.Generator().manual_seed(11)
    images = torch.randn(b, 3, 64, 64, generator=g)
    ids = torch.randint(5, 500, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    ids[0, 6:], mask[0, 6:] = 0, 0
    ids[:, 0] = 2
    return images, ids, mask


def _grads_reach(model: nn.Module, *names: str) -> None:
    for name in names:
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name) and p.requires_grad]
        assert grads and all(gr is not None and gr.abs().sum() > 0 for gr in grads), name


def test_vqa_forward_backward_and_soft_score_loss() -> None:
    torch.manual_seed(0)
    model = meter_model_for_vqa("tiny", num_answers=7, pad_token_id=0)
    images, ids, mask = _batch()
    targets = torch.zeros(3, 7)
    targets[0, 2], targets[1, 5], targets[2, 1] = 1.0, 0.6, 0.3
    out = model(images, ids, mask, targets=targets)
    assert out.logits.shape == (3, 7)
    # BCE mean over B x A times A, written out.
    p = torch.sigmoid(out.logits.double())
    manual = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean() * 7
    torch.testing.assert_close(out.loss.double(), manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vqa_soft_bce(out.logits, targets), out.loss)
    out.loss.backward()
    _grads_reach(model, "vqa_head", "text_fusion", "image_fusion", "vision_encoder.blocks", "text_encoder.encoder")
    assert model(images, ids, mask).loss is None


def test_nlvr_two_passes_with_image_types_1_and_2() -> None:
    torch.manual_seed(0)
    model = meter_model_for_nlvr("tiny", pad_token_id=0, dropout=0.0)
    assert model.modality_embeddings.num_embeddings == 3
    images, ids, mask = _batch()
    other = images.flip(0)
    pairs = torch.stack([images, other], dim=1)
    out = model(pairs, ids, mask, labels=torch.tensor([0, 1, 1]))
    assert out.logits.shape == (3, 2)
    out.loss.backward()
    _grads_reach(model, "nlvr_head", "modality_embeddings", "text_fusion")
    model.eval()
    with torch.no_grad():
        expected = model.nlvr_head(torch.cat([model.infer(images, ids, mask, 1).pooled,
                                              model.infer(other, ids, mask, 2).pooled], dim=-1))
        torch.testing.assert_close(model(pairs, ids, mask).logits, expected, atol=1e-5, rtol=1e-5)
        # The pair is ordered: swapping the images changes the answer's input.
        assert not torch.allclose(model(pairs.flip(1), ids, mask).logits, expected)
    with pytest.raises(ValueError, match=r"images \[B, 2, 3, H, W\]"):
        model(images, ids, mask)


def test_retrieval_ranks_the_caption_among_negatives_and_scores_pairs_like_single_passes() -> None:
    torch.manual_seed(0)
    model = meter_model_for_retrieval("tiny", pad_token_id=0, dropout=0.0)
    torch.testing.assert_close(model.rank_head.weight, model.itm_head.weight[1:])
    assert not any(p.requires_grad for p in model.itm_head.parameters())
    images, ids, mask = _batch(b=2)
    group_ids = torch.stack([ids, ids.roll(1, 0), ids.flip(1)], dim=1)  # [B, G=3, L]
    group_mask = torch.stack([mask, mask.roll(1, 0), mask.flip(1)], dim=1)
    out = model(images, group_ids, group_mask)
    assert out.scores.shape == (2, 3)
    expected_rank = F.cross_entropy(out.scores, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out.loss_rank, expected_rank)
    torch.testing.assert_close(out.loss, out.loss_rank + out.loss_itm)
    out.loss.backward()
    # rank_head.bias adds the same to every candidate of an image: the softmax cancels it, so its
    # gradient is zero up to rounding (the ITM head that the bias came from is frozen)
    _grads_reach(model, "rank_head.weight", "text_fusion", "vision_encoder.blocks")
    model.eval()
    with torch.no_grad():
        scores = model(images, group_ids, group_mask).scores
        encoding = model.embed_images(images)
        for i in range(2):
            for j in range(3):
                single = model.rank_scores(images[i:i + 1], group_ids[i, j:j + 1], group_mask[i, j:j + 1])
                torch.testing.assert_close(scores[i, j:j + 1], single, atol=1e-5, rtol=1e-5)
            # The evaluation path: one image encoding expanded over the image's texts.
            pair = type(encoding)(*(t[i:i + 1].expand(3, *t.shape[1:]) for t in encoding))
            torch.testing.assert_close(model.score_pairs(pair, group_ids[i], group_mask[i]), scores[i],
                                       atol=1e-5, rtol=1e-5)


def test_pretraining_mlm_with_own_image_and_itm_on_the_given_images() -> None:
    torch.manual_seed(0)
    model = meter_model_for_pretraining("tiny", pad_token_id=0, dropout=0.0)
    images, ids, mask = _batch(b=4)
    mlm_ids, mlm_labels = ids.clone(), torch.full_like(ids, -100)
    mlm_ids[:, 2], mlm_labels[:, 2] = 4, ids[:, 2]  # one masked token per caption
    itm_images, itm_labels = images[[0, 2, 1, 3]], torch.tensor([1, 0, 0, 1])
    out = model(images, ids, mask, mlm_ids, mlm_labels, itm_images, itm_labels)
    assert out.itm_logits.shape == (4, 2) and out.mlm_logits.shape == (4, 9, 512)
    torch.testing.assert_close(out.loss, out.mlm_loss + out.itm_loss)
    torch.testing.assert_close(out.mlm_loss, F.cross_entropy(out.mlm_logits[:, 2], ids[:, 2]))
    torch.testing.assert_close(out.itm_loss, F.cross_entropy(out.itm_logits, itm_labels))
    model.eval()
    with torch.no_grad():  # MLM reads the caption's own image, ITM the given ones
        torch.testing.assert_close(model(images, ids, mask, mlm_ids, mlm_labels, itm_images, itm_labels).mlm_logits,
                                   model.mlm_head(model.infer(images, mlm_ids, mask).text_states))
        torch.testing.assert_close(model(images, ids, mask, mlm_ids, mlm_labels, itm_images, itm_labels).itm_logits,
                                   model.itm_head(model.infer(itm_images, ids, mask).pooled))
    model.train()
    out.loss.backward()
    _grads_reach(model, "mlm_head.dense", "itm_head", "text_fusion", "image_fusion")
    # The MLM decoder is not tied to the word embeddings (METER's MLMHead).
    assert model.mlm_head.decoder.weight is not model.text_encoder.embeddings.word_embeddings.weight


def test_block_groups_and_presets() -> None:
    model = meter_model_for_vqa("tiny", num_answers=3)
    groups = resolve_block_groups(model)
    assert list(groups) == ["vision", "text", "text_fusion", "image_fusion"]
    assert [len(g) for g in groups.values()] == [3, 2, 2, 2]
    assert resolve_block_groups(model, ["text_fusion", "image_fusion"])["image_fusion"] is model.image_fusion
    with torch.device("meta"):
        base = meter_model("base")
    assert len(base.vision_encoder.blocks) == 11 and base.vision_encoder.image_size == 288
    assert base.text_encoder.embeddings.word_embeddings.num_embeddings == 50265
    assert base.text_encoder.embeddings.pad_token_id == 1
    assert len(base.text_fusion) == len(base.image_fusion) == 6
    assert base.vision_encoder.embeddings.conv_projection.bias is None


def test_bad_builder_arguments() -> None:
    with pytest.raises(ValueError, match="unknown METER preset 'huge'"):
        meter_model_for_vqa("huge")
    with pytest.raises(TypeError, match="unknown METER builder argument.*vision_depth"):
        meter_model_for_nlvr("tiny", vision_depth=3)

