"""ALBEF's dual-image models at a tiny size: the fusion layers come in pairs (layer 2i attends
image 0, 2i+1 image 1, keys/values shared), single-image weights convert to that layout, the
NLVR2 loss and gradients, and the text-assignment pairs."""

import pytest
import torch
import torch.nn.functional as F

from torchmm_ext.checkpoints import load_pretrained, torchmm_ext_to_albef
from torchmm_ext.models.albef import (
    ALBEFForNLVR,
    albef_model_for_nlvr,
    albef_model_for_retrieval,
    albef_model_for_text_assignment,
    nlvr_state_dict_from_single_image,
    sample_text_assignment,
)
from torchmm_ext.modules.dual_image_fusion import DualImageFusionEncoder
from torchmm_ext.modules.text_encoder import ALBEFFusionEncoder

TINY = dict(image_size=32, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2, vision_mlp_dim=64,
            text_width=32, text_layers=1, fusion_layers=2, text_heads=2, text_ffn_dim=64, vocab_size=50)


def _batch(batch_size=4, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch_size, 2, 3, 32, 32, generator=g)
    input_ids = torch.randint(1, 50, (batch_size, length), generator=g)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    attention_mask[1, 4:] = 0
    input_ids[1, 4:] = 0
    labels = torch.tensor([0, 1, 1, 0])[:batch_size]
    return image, input_ids, attention_mask, labels


def _randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def _kv(layer):
    return [layer.cross_attention.k_proj.weight, layer.cross_attention.k_proj.bias,
            layer.cross_attention.v_proj.weight, layer.cross_attention.v_proj.bias]


def test_builder_doubles_the_fusion_layers_and_shares_keys_values_within_pairs():
    model = albef_model_for_nlvr("tiny", patch_size=16)
    assert isinstance(model, ALBEFForNLVR) and isinstance(model.fusion_encoder, DualImageFusionEncoder)
    layers = model.fusion_encoder.layer
    assert len(layers) == 4 and model.fusion_encoder.num_layer_pairs == 2  # tiny: 2 single-image layers
    assert [type(m).__name__ for m in model.cls_head] == ["Linear", "ReLU", "Linear"]
    assert (model.cls_head[0].in_features, model.cls_head[0].out_features, model.cls_head[2].out_features) == (192, 192, 2)
    for i in range(2):
        even, odd = layers[2 * i], layers[2 * i + 1]
        assert all(a is b for a, b in zip(_kv(even), _kv(odd)))
        assert even.cross_attention.q_proj.weight is not odd.cross_attention.q_proj.weight
        assert even.cross_attention.output_proj.weight is not odd.cross_attention.output_proj.weight
        assert even.feedforward is not odd.feedforward and even.attention is not odd.attention
    assert _kv(layers[0])[0] is not _kv(layers[2])[0]  # pairs do not share with each other
    # The momentum copy shares within its own pairs, not with the online model.
    layers_m = model.fusion_encoder_m.layer
    assert layers_m[0].cross_attention.k_proj.weight is layers_m[1].cross_attention.k_proj.weight
    assert layers_m[0].cross_attention.k_proj.weight is not layers[0].cross_attention.k_proj.weight
    # Checkpoint keys: every layer, ALBEF's order; shared tensors counted once by the optimizer.
    keys = model.state_dict()
    assert all(f"fusion_encoder.layer.{j}.cross_attention.k_proj.weight" in keys for j in range(4))
    assert "fusion_encoder.layer.4.attention.input_proj.weight" not in keys


def test_single_image_weights_initialise_both_layers_of_each_pair():
    torch.manual_seed(0)
    single = _randomise(albef_model_for_retrieval("tiny", **TINY))
    converted = nlvr_state_dict_from_single_image(single.state_dict())
    model = albef_model_for_nlvr("tiny", distill=False, **TINY)
    report = load_pretrained(model, converted)
    assert not any(k.startswith(("vision_encoder.", "text_encoder.", "fusion_encoder."))
                   for keys in report.missing.values() for k in keys)
    for i, source in enumerate(single.fusion_encoder.layer):
        for j in (2 * i, 2 * i + 1):
            target = model.fusion_encoder.layer[j].state_dict()
            for name, value in source.state_dict().items():
                assert torch.equal(target[name], value), (i, j, name)
    for name, value in single.text_encoder.state_dict().items():
        assert torch.equal(model.text_encoder.state_dict()[name], value)
    # A dual-image state dict passes unchanged when the pair count is known; other counts fail.
    dual = model.state_dict()
    assert nlvr_state_dict_from_single_image(dual, num_layer_pairs=2).keys() == dual.keys()
    with pytest.raises(ValueError, match="has 4 fusion layers: neither a single-image model with 3"):
        nlvr_state_dict_from_single_image(dual, num_layer_pairs=3)
    with pytest.raises(ValueError, match="no fusion_encoder.layer"):
        nlvr_state_dict_from_single_image({"vision_encoder.norm.weight": torch.ones(2)})


def test_shared_keys_values_stay_shared_and_queries_part_after_a_step():
    torch.manual_seed(0)
    single = albef_model_for_retrieval("tiny", **TINY)
    model = albef_model_for_nlvr("tiny", distill=False, dropout=0.0, **TINY)
    model.load_state_dict(nlvr_state_dict_from_single_image(single.state_dict()), strict=False)
    even, odd = model.fusion_encoder.layer[0], model.fusion_encoder.layer[1]
    assert torch.equal(even.cross_attention.q_proj.weight, odd.cross_attention.q_proj.weight)
    k_before = even.cross_attention.k_proj.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(*_batch()).loss.backward()
    optimizer.step()
    assert all(a is b for a, b in zip(_kv(even), _kv(odd)))
    assert not torch.equal(even.cross_attention.k_proj.weight, k_before)  # trained, still one tensor
    assert not torch.equal(even.cross_attention.q_proj.weight, odd.cross_attention.q_proj.weight)


def _reference_fusion(encoder: DualImageFusionEncoder, text, mask, image0, image1):
    """Layer by layer by hand: layer j attends image j % 2."""
    text_mask = mask.bool()[:, None, None, :]
    x = text
    for j, layer in enumerate(encoder.layer):
        x, _ = layer(x, text_mask, (image0, image1)[j % 2])
    return x


def test_even_layers_attend_image_0_and_odd_layers_image_1():
    torch.manual_seed(0)
    encoder = DualImageFusionEncoder(width=32, image_width=24, num_layer_pairs=2, num_heads=2, ffn_dim=64).eval()
    text, image0, image1 = torch.randn(3, 5, 32), torch.randn(3, 6, 24), torch.randn(3, 6, 24)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    out = encoder(text, mask, (image0, image1), return_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, _reference_fusion(encoder, text, mask, image0, image1))
    other1, other0 = torch.randn(3, 6, 24), torch.randn(3, 6, 24)
    changed1 = encoder(text, mask, (image0, other1), return_hidden_states=True)
    changed0 = encoder(text, mask, (other0, image1), return_hidden_states=True)
    torch.testing.assert_close(changed1.hidden_states[0], out.hidden_states[0])  # layer 0 never saw image 1
    assert not torch.allclose(changed1.hidden_states[1], out.hidden_states[1])
    assert not torch.allclose(changed0.hidden_states[0], out.hidden_states[0])
    # cls_only is the CLS row of the full computation.
    cls = encoder(text, mask, (image0, image1), cls_only=True).last_hidden_state
    torch.testing.assert_close(cls, out.last_hidden_state[:, :1])
    # Pairs gathered by index from one image batch equal the gathered tensors themselves.
    images = torch.randn(4, 6, 24)
    i0, i1 = torch.tensor([2, 0, 3]), torch.tensor([1, 1, 0])
    gathered = encoder(text, mask, (images, images), image_index=(i0, i1)).last_hidden_state
    torch.testing.assert_close(gathered, encoder(text, mask, (images[i0], images[i1])).last_hidden_state)
    with pytest.raises(ValueError, match="two image tensors"):
        encoder(text, mask, (image0,))


def test_nlvr_model_cut_after_the_first_layer_ignores_image_1():
    torch.manual_seed(0)
    model = albef_model_for_nlvr("tiny", distill=False, **TINY).eval()
    image, ids, mask, _ = _batch()
    changed = image.clone()
    changed[:, 1] = torch.randn_like(changed[:, 1])
    full = model.fusion_encoder.layer
    with torch.no_grad():
        assert not torch.allclose(model.predict(changed, ids, mask), model.predict(image, ids, mask))
        model.fusion_encoder.layer = full[:1]  # only layer 0 (ALBEF's layer 6): image 0
        torch.testing.assert_close(model.predict(changed, ids, mask), model.predict(image, ids, mask))
        model.fusion_encoder.layer = full[:2]  # layer 1 attends image 1: the change shows
        assert not torch.allclose(model.predict(changed, ids, mask), model.predict(image, ids, mask))
        changed0 = image.clone()
        changed0[:, 0] = torch.randn_like(changed0[:, 0])
        model.fusion_encoder.layer = full[:1]
        assert not torch.allclose(model.predict(changed0, ids, mask), model.predict(image, ids, mask))


def test_one_vit_call_encodes_both_images_of_each_pair():
    torch.manual_seed(0)
    model = albef_model_for_nlvr("tiny", distill=False, **TINY).eval()
    image, ids, mask, _ = _batch()
    with torch.no_grad():
        emb0 = model.vision_encoder(image[:, 0]).last_hidden_state
        emb1 = model.vision_encoder(image[:, 1]).last_hidden_state
        text = model.text_encoder(ids, attention_mask=mask.bool()).last_hidden_state
        expected = model.cls_head(_reference_fusion(model.fusion_encoder, text, mask, emb0, emb1)[:, 0])
        torch.testing.assert_close(model.predict(image, ids, mask), expected)
        with pytest.raises(ValueError, match=r"\[B, 2, 3, H, W\]"):
            model.predict(image[:, 0], ids, mask)


@pytest.mark.parametrize("distill", [True, False])
def test_nlvr_forward_backward_reaches_every_trainable_parameter(distill):
    torch.manual_seed(0)
    model = albef_model_for_nlvr("tiny", distill=distill, dropout=0.0, **TINY)
    image, ids, mask, labels = _batch()
    out = model(image, ids, mask, labels, alpha=0.4)
    assert out.logits.shape == (4, 2) and torch.isfinite(out.loss)
    if not distill:
        torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.float(), labels))
    out.loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert trainable and not missing, missing
    frozen = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == ({"vision_encoder_m", "text_encoder_m", "fusion_encoder_m", "cls_head_m"} if distill else set())
    with pytest.raises(TypeError, match="DualImageFusionEncoder"):
        ALBEFForNLVR(model.vision_encoder, model.text_encoder,
                     ALBEFFusionEncoder(width=32, image_width=32, num_layers=1, num_heads=2, ffn_dim=64))


def _check_assignment(pairs, b):
    own = torch.arange(b)
    assert pairs.labels.dtype == torch.long and set(pairs.labels.tolist()) <= {0, 1, 2}
    for label, i0, i1, k in zip(pairs.labels, pairs.image0_index, pairs.image1_index, own):
        if label == 0:
            assert i0 == k and i1 != k
        elif label == 1:
            assert i1 == k and i0 != k
        else:
            assert i0 != k and i1 != k and i0 != i1


def test_text_assignment_pairs_by_hand():
    # Images 0/1 are near-duplicates, so are 2/3 (cosine 1 vs 0: softmax weight ~1 - 1e-6 at
    # temperature 0.07), and 4 stands alone: a matched text's partner is its twin.
    features = F.normalize(torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]]), dim=-1)
    twin = {0: 1, 1: 0, 2: 3, 3: 2}
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(300):
        pairs = sample_text_assignment(features, generator=g)
        _check_assignment(pairs, 5)
        for k in range(4):
            label, i0, i1 = pairs.labels[k].item(), pairs.image0_index[k].item(), pairs.image1_index[k].item()
            if label == 0:
                assert i1 == twin[k]
            elif label == 1:
                assert i0 == twin[k]
            else:
                assert i0 == twin[k] and i1 != k  # first draw: the twin, second: any other
        counts += torch.bincount(pairs.labels, minlength=3)
    freq = counts / counts.sum()  # 1500 draws: 1/3 each, std ~0.012
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.05), freq
    again = sample_text_assignment(features, generator=torch.Generator().manual_seed(0))
    first = sample_text_assignment(features, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(again, first))
    with pytest.raises(ValueError, match="at least 3 samples"):
        sample_text_assignment(features[:2])


def test_text_assignment_model_loss_and_gradients():
    torch.manual_seed(0)
    model = albef_model_for_text_assignment("tiny", dropout=0.0, **TINY)
    image, ids, mask, _ = _batch(batch_size=4)
    out = model(image[:, 0], ids, mask, generator=torch.Generator().manual_seed(3))
    assert out.logits.shape == (4, 3) and out.labels.shape == (4,)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.float(), out.labels))
    # The logits are those of the drawn pairs run through the NLVR2 path by hand.
    pairs = sample_text_assignment(
        F.normalize(model.vision_proj(model.vision_encoder(image[:, 0]).last_hidden_state[:, 0]), dim=-1),
        generator=torch.Generator().manual_seed(3))
    assert torch.equal(pairs.labels, out.labels)
    with torch.no_grad():
        emb = model.vision_encoder(image[:, 0]).last_hidden_state
        text = model.text_encoder(ids, attention_mask=mask.bool()).last_hidden_state
        fused = _reference_fusion(model.fusion_encoder, text, mask, emb[pairs.image0_index], emb[pairs.image1_index])
        torch.testing.assert_close(out.logits, model.ta_head(fused[:, 0]))
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {
        "vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", "temp"}
    assert out.loss_itc == 0 and torch.equal(out.loss, out.loss_ta)


def test_text_assignment_with_the_contrastive_term():
    torch.manual_seed(0)
    model = albef_model_for_text_assignment("tiny", dropout=0.0, itc_weight=0.5, temp=0.1, **TINY)
    image, ids, mask, _ = _batch(batch_size=4)
    out = model(image[:, 0], ids, mask, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        img = F.normalize(model.vision_proj(model.vision_encoder(image[:, 0]).last_hidden_state[:, 0]), dim=-1)
        txt = F.normalize(model.text_proj(model.text_encoder(ids, attention_mask=mask.bool()).last_hidden_state[:, 0]), dim=-1)
    sim = img @ txt.t() / 0.1
    itc = sum(-(sim[b].log_softmax(0)[b] + sim[:, b].log_softmax(0)[b]) / 2 for b in range(4)) / 4
    torch.testing.assert_close(out.loss_itc, itc)
    torch.testing.assert_close(out.loss, out.loss_ta + 0.5 * itc)
    out.loss.backward()
    assert all(p.requires_grad and p.grad is not None for p in model.parameters())


def test_original_albef_layout_round_trip_keeps_the_pairs_in_order():
    # Our fusion layer j is ALBEF's BERT layer text_layers + j (6 + j at base), so the ALBEF
    # export/import maps the 2F layers in order and the shared keys/values come back shared.
    torch.manual_seed(0)
    model = _randomise(albef_model_for_nlvr("tiny", distill=False, **TINY))
    albef = torchmm_ext_to_albef(model.state_dict())
    q = "text_encoder.encoder.layer.{}.crossattention.self.query.weight"
    for j in range(4):
        assert torch.equal(albef[q.format(1 + j)], model.fusion_encoder.layer[j].cross_attention.q_proj.weight)
    fresh = albef_model_for_nlvr("tiny", distill=False, **TINY)
    load_pretrained(fresh, albef)
    for key, value in model.state_dict().items():
        if not key.startswith("cls_head."):  # task heads are not part of the layout conversion
            assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh.fusion_encoder.layer[0].cross_attention.k_proj.weight is fresh.fusion_encoder.layer[1].cross_attention.k_proj.weight
