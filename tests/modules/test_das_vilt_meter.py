"""DAS on ViLT and METER (tiny presets): where the adapters go (2 per ViLT block beside attention
and MLP, 3 per METER co-attention layer), the skip adapters' width (96 x that count), what trains,
the search candidates of the published configs, and block outputs against a hand computation
from the weights (the unchanged block's own sub-layers plus the adapter equations)."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torchmm_ext.engine import load_config
from torchmm_ext.engine.efficiency import apply_methods
from torchmm_ext.models.meter import meter_model_for_vqa
from torchmm_ext.models.vilt import vilt_model_for_vqa
from torchmm_ext.modules.adapters import apply_das, BottleneckAdapter, FusionSkipAdapter, SkipAdapter
from torchmm_ext.modules.efficiency import applied_methods
from torchmm_ext.modules.text_encoder import padding_mask
from torchmm_ext.tasks.vqa import ClassifierVQAConfig

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "das" / "configs"
METER_FUSION = ["text_fusion", "image_fusion"]


def adapter_size(d: int, r: int) -> int:
    """Parameters of LayerNorm(d) -> Linear(d, r) -> Linear(r, d)."""
    return 2 * d + (d * r + r) + (r * d + d)


def by_hand(adapter: BottleneckAdapter, x: torch.Tensor) -> torch.Tensor:
    """The published adapter, written out: up(relu(down(layer_norm(x)))) * 1.0 (LayerNorm eps 1e-5)."""
    ln, down, up = adapter.layer_norm, adapter.down_proj, adapter.up_proj
    h = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, 1e-5)
    return F.linear(torch.relu(F.linear(h, down.weight, down.bias)), up.weight, up.bias)


def randomize(module: torch.nn.Module) -> None:
    """Non-trivial adapter LayerNorms (published init: 1/0) so that a swapped weight shows."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "adapter" in name and "layer_norm" in name:
                p.add_(0.3 * torch.randn_like(p))


def numel(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def vilt_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 64, 64, generator=g)
    ids = torch.randint(5, 100, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return images, ids, mask


def test_vilt_blocks_get_two_parallel_adapters_and_a_skipped_block_a_192_wide_adapter():
    torch.manual_seed(0)
    model = vilt_model_for_vqa("tiny", vocab_size=100, num_answers=29, patch_size=16)
    d = model.vilt.width
    report = apply_das(model, skip=[1])
    blocks = model.vilt.blocks
    assert isinstance(blocks[1], SkipAdapter) and blocks[1].adapter.down_proj.out_features == 192
    for i in (0, 2, 3):
        assert [a.down_proj.out_features for a in blocks[i].adapters] == [96, 96]
    adapters = 3 * 2 * adapter_size(d, 96) + adapter_size(d, 192)
    heads = numel(model.classifier, model.vilt.pooler, model.vilt.modality_embeddings,
                  model.vilt.text_embeddings.token_type_embeddings)
    assert report.adapter_params == adapters
    assert report.trainable_params == adapters + heads
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapters + heads

    images, ids, mask = vilt_inputs()
    targets = torch.rand(2, 29)
    model(images, ids, mask, targets=targets).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("vilt.blocks.0.attention") or "word_embeddings" in n for n in with_grad)


def test_vilt_block_outputs_match_a_hand_computation():
    torch.manual_seed(0)
    model = vilt_model_for_vqa("tiny", vocab_size=100, num_answers=29, patch_size=16).eval()
    originals = copy.deepcopy(model.vilt.blocks)
    apply_das(model, skip=[1])
    randomize(model)
    images, ids, mask = vilt_inputs()
    with torch.no_grad():
        out = model.vilt(ids, mask, images, return_hidden_states=True)
        states, attn_mask = out.hidden_states, out.attention_mask.bool()[:, None, None, :]
        # the skipped block 1: x + adapter_192(x), nothing else
        skip = model.vilt.blocks[1].adapter
        torch.testing.assert_close(states[2], states[1] + by_hand(skip, states[1]), rtol=1e-5, atol=1e-5)
        # a kept block: h = x + attn(ln1(x)) + a0(x); y = h + mlp(ln2(h)) + a1(h) (ViLT-DAS's Block),
        # with the block's unchanged sub-layers
        for i in (0, 2, 3):
            orig, (a0, a1) = originals[i], model.vilt.blocks[i].adapters
            x = states[i]
            h = x + orig._attention_block(orig.attention_layernorm(x), attn_mask) + by_hand(a0, x)
            y = h + orig._feedforward_block(orig.feedforward_layernorm(h)) + by_hand(a1, h)
            torch.testing.assert_close(states[i + 1], y, rtol=1e-5, atol=1e-5)


def meter_tiny(**sizes):
    torch.manual_seed(0)
    return meter_model_for_vqa("tiny", num_answers=29, patch_size=16, **sizes)


def meter_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(2)
    images = torch.randn(batch, 3, 64, 64, generator=g)
    ids = torch.randint(5, 500, (batch, 6), generator=g)
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    return images, ids, mask


def test_meter_co_attention_layers_get_three_parallel_adapters_and_a_288_wide_skip_adapter():
    model = meter_tiny()
    d = model.hidden_size
    # flat indices as published: 0..L-1 the text side, L.. the image side (L = 2 in the tiny preset)
    report = apply_das(model, skip=[1, 2], groups=METER_FUSION)
    assert report.skipped == {"text_fusion": [1], "image_fusion": [0]}
    assert isinstance(model.text_fusion[1], FusionSkipAdapter) and isinstance(model.image_fusion[0], FusionSkipAdapter)
    for skipped in (model.text_fusion[1], model.image_fusion[0]):
        assert skipped.adapter.down_proj.out_features == 288
    for kept in (model.text_fusion[0], model.image_fusion[1]):
        assert [a.down_proj.out_features for a in kept.adapters] == [96, 96, 96]
    # the unimodal encoders are neither candidates nor adapted, and stay frozen (published)
    assert not any("adapter" in n for n, _ in model.vision_encoder.named_parameters())
    assert not any("adapter" in n for n, _ in model.text_encoder.named_parameters())
    adapters = 2 * 3 * adapter_size(d, 96) + 2 * adapter_size(d, 288)
    heads = numel(model.vqa_head, model.text_pooler, model.image_pooler, model.modality_embeddings,
                  model.text_encoder.embeddings.token_type_embeddings)
    assert report.adapter_params == adapters and report.trainable_params == adapters + heads

    images, ids, mask = meter_inputs()
    model(images, ids, mask, targets=torch.rand(2, 29)).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("text_transform", "image_transform", "vision_encoder.blocks")) for n in with_grad)


def test_meter_das_classifier_token_trains_is_recorded_and_reloads_into_a_fresh_model():
    model = meter_tiny()
    with torch.no_grad():
        start = model.text_encoder.eval().embeddings(torch.tensor([[2]]))
    report = apply_das(model, skip=[1], groups=METER_FUSION, classifier_token=2)
    torch.testing.assert_close(model.classifier_token.detach(), start)
    assert "classifier_token" in report.trainable_names and model.classifier_token.requires_grad
    without = meter_tiny()
    assert report.trainable_params == apply_das(without, skip=[1], groups=METER_FUSION).trainable_params + model.hidden_size

    images, ids, mask = meter_inputs()
    model.train()(images, ids, mask, targets=torch.rand(2, 29)).loss.backward()
    assert model.classifier_token.grad.abs().sum() > 0

    # a checkpoint's record restructures a fresh model (token included) for the weights to load
    record = applied_methods(model)["das"]
    assert record["classifier_token"] == 2
    with torch.no_grad():
        model.classifier_token.add_(1.0)
    fresh = meter_tiny()
    apply_methods(fresh, {"das": record}, restructure_only=True)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images, ids, mask).logits, model.eval()(images, ids, mask).logits)

    vilt = vilt_model_for_vqa("tiny", vocab_size=100, num_answers=29)
    with pytest.raises(ValueError, match=r"das.classifier_token=0: ViltForVQA has no classifier token to add"):
        apply_das(vilt, classifier_token=0)


def test_meter_layer_outputs_match_a_hand_computation():
    model = meter_tiny().eval()
    originals = {"text": copy.deepcopy(model.text_fusion), "image": copy.deepcopy(model.image_fusion)}
    apply_das(model, skip={"text_fusion": [0]}, groups=METER_FUSION)
    randomize(model)
    seen = {}

    def keep(name):
        def hook(module, args, kwargs, output):
            seen[name] = (args, kwargs, output)
        return hook

    for side in ("text", "image"):
        for i, layer in enumerate(getattr(model, f"{side}_fusion")):
            layer.register_forward_hook(keep(f"{side}{i}"), with_kwargs=True)
    images, ids, mask = meter_inputs()
    with torch.no_grad():
        model(images, ids, mask)
        # the skipped text layer 0: x + adapter_288(x), and the image side's layer 1 reads it
        (x, *_), _, (text0, probs) = seen["text0"]
        torch.testing.assert_close(text0, x + by_hand(model.text_fusion[0].adapter, x), rtol=1e-5, atol=1e-5)
        assert probs is None
        torch.testing.assert_close(seen["image1"][0][2], text0)
        # a kept layer (METER-DAS's BertCrossLayer): adapters inside the self- and cross-attention
        # LayerNorms, and after the FFN's LayerNorm, each reading its sub-layer's input
        text_keys = padding_mask(mask)
        for name, side, i, self_mask, other_mask in (("text1", "text", 1, text_keys, None),
                                                     ("image0", "image", 0, None, text_keys),
                                                     ("image1", "image", 1, None, text_keys)):
            (x, _, other), _, (y, _) = seen[name]
            orig = originals[side][i]
            a0, a1, a2 = getattr(model, f"{side}_fusion")[i].adapters
            h1 = orig.attention_layernorm(x + orig.attention(x, self_mask) + by_hand(a0, x))
            h2 = orig.cross_attention_layernorm(h1 + orig._cross_attend(h1, other, None, other_mask, None)
                                                + by_hand(a1, h1))
            expected = orig.feedforward_layernorm(h2 + orig.feedforward(h2)) + by_hand(a2, h2)
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def search_section(config: str):
    das = dict(load_config(CONFIGS / config, ClassifierVQAConfig).das)
    das.pop("skip_from")
    return das


def test_published_search_candidates_are_vilts_12_blocks_and_meters_12_co_attention_layers():
    vilt = vilt_model_for_vqa("tiny", vocab_size=100, num_answers=29, depth=12)
    apply_das(vilt, **search_section("vilt_vqa_v2.yaml"))
    assert vilt.das_search.candidates == [("transformer", i) for i in range(12)]
    assert vilt.das_search.cfg.skip_num == 1

    meter = meter_tiny(fusion_layers=6)
    apply_das(meter, **search_section("meter_vqa_v2.yaml"))
    assert meter.das_search.candidates == [("text_fusion", i) for i in range(6)] + [("image_fusion", i) for i in range(6)]
    assert meter.das_search.cfg.skip_num == 4
    assert not any("adapter" in n for n, _ in meter.vision_encoder.named_parameters())
    # a search step's skip set switches exactly the sampled co-attention layers
    meter.das_search.set_skipped([2, 7])
    skipped = [(side, i) for side in METER_FUSION for i, b in enumerate(getattr(meter, side)) if b.skipped]
    assert skipped == [("text_fusion", 2), ("image_fusion", 1)]
