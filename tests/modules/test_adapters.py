"""DAS adapters and apply_das: the published adapter (init, placement beside each sub-layer),
skip adapters that replace a block so that it never runs, the momentum mirror, what trains, the
skip-list checks and skip.json files."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchmultimodal.modules.layers.transformer import TransformerEncoderLayer

from torchmm_ext.models.albef import albef_model_for_nlvr, albef_model_for_retrieval, albef_model_for_vqa
from torchmm_ext.modules.adapters import (
    add_parallel_adapters,
    apply_das,
    BottleneckAdapter,
    FusionSkipAdapter,
    make_skip_adapter,
    SkipAdapter,
)
from torchmm_ext.modules.efficiency import applied_methods
from torchmm_ext.modules.momentum import momentum_update
from torchmm_ext.modules.text_encoder import FusionLayer, padding_mask

TINY = dict(image_size=32, patch_size=16, vision_width=32, vision_depth=3, vision_heads=2, vision_mlp_dim=64,
            text_width=32, text_layers=2, fusion_layers=2, text_heads=2, text_ffn_dim=64, vocab_size=40,
            embed_dim=16, queue_size=32)


def constant_adapter(adapter: BottleneckAdapter, value: float) -> None:
    """Make ``adapter(x) == value`` everywhere."""
    with torch.no_grad():
        adapter.up_proj.weight.zero_()
        adapter.up_proj.bias.fill_(value)


def test_bottleneck_adapter_has_the_published_layout_and_init():
    torch.manual_seed(0)
    a = BottleneckAdapter(768, 96)
    assert a.layer_norm.eps == 1e-5 and a.scale == 1.0
    assert (a.down_proj.in_features, a.down_proj.out_features, a.up_proj.out_features) == (768, 96, 768)
    assert torch.equal(a.layer_norm.weight, torch.ones(768)) and torch.equal(a.layer_norm.bias, torch.zeros(768))
    for linear in (a.down_proj, a.up_proj):
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.03)
        assert abs(linear.weight.mean().item()) < 1e-3
    # not an identity at init (the up-projection is not zero)
    x = torch.randn(2, 5, 768)
    assert a(x).abs().mean() > 1e-3
    expected = F.linear(torch.relu(F.linear(F.layer_norm(x, (768,), eps=1e-5), a.down_proj.weight)), a.up_proj.weight)
    torch.testing.assert_close(a(x), expected)


def layer(norm_first: bool) -> TransformerEncoderLayer:
    torch.manual_seed(1)
    block = TransformerEncoderLayer(16, 2, 32, activation=nn.GELU, norm_first=norm_first)
    return block.eval()


@pytest.mark.parametrize("norm_first", [True, False])
def test_parallel_adapters_of_an_encoder_layer_read_the_residual_input(norm_first):
    block = layer(norm_first)
    x = torch.randn(2, 5, 16)
    plain = block(x)
    add_parallel_adapters(block, 4)
    assert len(block.adapters) == 2 and block.adapters[0].down_proj.out_features == 4
    assert isinstance(block, TransformerEncoderLayer)  # keeps its type (ELIP still reads its attention)
    a0, a1 = block.adapters
    for a in (a0, a1):
        constant_adapter(a, 0.0)
    torch.testing.assert_close(block(x), plain)  # zero adapters: the plain block
    constant_adapter(a1, 0.5)  # the second adapter is added after everything
    torch.testing.assert_close(block(x), plain + 0.5)
    # the first adapter sees the raw block input x (not its LayerNorm), added beside attention
    seen = []
    a0.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    constant_adapter(a1, 0.0)
    constant_adapter(a0, 0.25)
    out = block(x)
    assert torch.equal(seen[-1], x)
    attn = block.attention(block.attention_layernorm(x) if norm_first else x)
    ff = lambda h: block.feedforward(h)  # noqa: E731
    if norm_first:  # ViLT: x + attn(ln1 x) + a0(x); h + mlp(ln2 h) + a1(h)
        h = x + attn + 0.25
        expected = h + ff(block.feedforward_layernorm(h))
    else:  # METER: ln1(x + attn(x) + a0(x)); ln2(h + ffn(h)) + a1(h)
        h = block.attention_layernorm(x + attn + 0.25)
        expected = block.feedforward_layernorm(h + ff(h))
    torch.testing.assert_close(out, expected)


def test_parallel_adapters_of_a_fusion_layer_sit_inside_two_norms_and_after_the_last():
    torch.manual_seed(2)
    block = FusionLayer(16, 12, 2, 32, dropout=0.0).eval()
    x, images = torch.randn(3, 4, 16), torch.randn(3, 6, 12)
    mask = padding_mask(torch.ones(3, 4, dtype=torch.long))
    plain, _ = block(x, mask, images)
    plain_cls, _ = block(x, mask, images, first_token_only=True)
    add_parallel_adapters(block, 4)
    a0, a1, a2 = block.adapters
    for a in block.adapters:
        constant_adapter(a, 0.0)
    torch.testing.assert_close(block(x, mask, images)[0], plain)
    torch.testing.assert_close(block(x, mask, images, first_token_only=True)[0], plain_cls)
    constant_adapter(a2, 0.5)
    torch.testing.assert_close(block(x, mask, images)[0], plain + 0.5)
    constant_adapter(a2, 0.0)
    constant_adapter(a1, 0.25)  # inside the cross-attention's norm
    h1 = block.attention_layernorm(x + block.attention(x, mask))
    h2 = block.cross_attention_layernorm(h1 + block._cross_attend(h1, images, None, None, None) + 0.25)
    expected = block.feedforward_layernorm(h2 + block.feedforward(h2))
    torch.testing.assert_close(block(x, mask, images)[0], expected)
    # returned attention probabilities still work
    out, probs = block(x, mask, images, return_cross_attention=True)
    assert probs.shape == (3, 2, 4, 6)
    torch.testing.assert_close(out, expected)


def test_skip_adapters_are_96_times_the_parallel_count_wide_and_residual():
    enc = make_skip_adapter(layer(True))
    fusion = make_skip_adapter(FusionLayer(16, 12, 2, 32))
    assert isinstance(fusion, FusionSkipAdapter) and type(enc) is SkipAdapter
    assert enc.adapter.down_proj.out_features == 192 and fusion.adapter.down_proj.out_features == 288
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(enc(x, None), x + enc.adapter(x))
    out, probs = fusion(x, None, None, first_token_only=True)
    assert probs is None and out.shape == (2, 1, 16)
    torch.testing.assert_close(out, x[:, :1] + fusion.adapter(x[:, :1]))


def batch(model_kind: str, b: int = 2):
    torch.manual_seed(3)
    img = torch.randn(b, 3, 32, 32)
    ids = torch.randint(5, 40, (b, 6))
    mask = torch.ones(b, 6, dtype=torch.long)
    return img, ids, mask


def test_a_skipped_block_is_never_run_and_its_flops_are_gone():
    torch.manual_seed(0)
    model = albef_model_for_retrieval(**TINY).eval()
    img, ids, mask = batch("retrieval")

    def flops(m):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m.encode_image(img)
        return counter.get_total_flops()

    base = flops(model)
    one_block = FlopCounterMode(display=False)
    with torch.no_grad():
        tokens = model.vision_encoder.embeddings(img).embeddings
        with one_block:
            model.vision_encoder.blocks[1](tokens)
    apply_das(model, skip={"vision": [1]}, adapter_dim=4)

    def boom(*args, **kwargs):
        raise AssertionError("a skipped block ran")

    skip = model.vision_encoder.blocks[1]
    assert isinstance(skip, SkipAdapter)
    skipped_flops = flops(model)
    # the block's FLOPs are gone; adapters (three parallel r=4, one skip r=8) add a little
    assert base - one_block.get_total_flops() < skipped_flops < base - 0.8 * one_block.get_total_flops()
    for name, module in model.named_modules():  # nothing left of the block can run
        if name.startswith("vision_encoder.blocks.1."):
            assert "adapter" in name
    calls = []
    model.vision_encoder.blocks[0].register_forward_hook(lambda *a: calls.append(0))
    model.vision_encoder.blocks[2].register_forward_hook(lambda *a: calls.append(2))
    skip.register_forward_hook(lambda *a: calls.append("skip"))
    model.encode_image(img)
    assert calls == [0, "skip", 2]
    # a searchable block runs its skip adapter only while skipped
    model2 = albef_model_for_retrieval(**TINY).eval()
    apply_das(model2, search={"skip_num": 1, "groups": ["vision"], "das_step": 1})
    block = model2.vision_encoder.blocks[0]
    block.block.forward = boom
    block.skipped = True
    model2.encode_image(img)
    block.skipped = False
    with pytest.raises(AssertionError, match="a skipped block ran"):
        model2.encode_image(img)


def test_only_adapters_and_heads_train_and_momentum_copies_mirror_them():
    torch.manual_seed(0)
    model = albef_model_for_retrieval(**TINY)
    with torch.no_grad():  # momentum weights that differ from the online ones
        for p in model.text_encoder_m.parameters():
            p.add_(0.01)
    before_m = {k: v.clone() for k, v in model.text_encoder_m.state_dict().items()}
    report = apply_das(model, skip={"text": [0], "fusion": [1]}, adapter_dim=4)
    assert report.skipped == {"text": [0], "fusion": [1]}
    assert report.momentum_mirrored == ["vision_encoder_m", "text_encoder_m"]
    # the momentum copy keeps its own weights, gets the same skip and the online adapters
    twin_state = model.text_encoder_m.state_dict()
    for key, value in before_m.items():
        if key.startswith("encoder.layer.0."):
            continue  # skipped in both
        assert torch.equal(twin_state[key], value), key
    online = model.text_encoder.state_dict()
    adapter_keys = [k for k in online if "adapter" in k]
    assert adapter_keys and all(torch.equal(online[k], twin_state[k]) for k in adapter_keys)
    assert isinstance(model.text_encoder_m.encoder.layer[0], SkipAdapter)

    img, ids, mask = batch("retrieval", 4)
    out = model(img, ids, mask, torch.arange(4), 0.4)
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad <= trainable
    heads = {"temp", "vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias",
             "itm_head.weight", "itm_head.bias", "text_encoder.embeddings.token_type_embeddings.weight"}
    assert trainable - heads == {n for n in trainable if "adapter" in n and not n.split(".")[0].endswith("_m")}
    assert heads <= trainable
    assert not any(n.split(".")[0].endswith("_m") for n in trainable)
    # every online adapter and the heads learn from this loss
    assert {n for n in trainable if "adapter" in n} <= with_grad
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # EMA pairs the right tensors: momentum adapters move toward the online ones
    with torch.no_grad():
        model.text_encoder.encoder.layer[1].adapters[0].up_proj.bias.fill_(1.0)
    momentum_update(*model._momentum_pairs(), 0.5)
    torch.testing.assert_close(model.text_encoder_m.encoder.layer[1].adapters[0].up_proj.bias,
                               torch.full((32,), 0.5))
    assert applied_methods(model)["das"]["skip"] == {"text": [0], "fusion": [1]}


def test_vqa_decoder_and_nlvr_pairs_are_groups_too():
    sizes = {k: v for k, v in TINY.items() if k not in ("embed_dim", "queue_size")}
    model = albef_model_for_vqa(**sizes, distill=False)
    report = apply_das(model, skip={"decoder": [0]}, groups=["fusion", "decoder"], adapter_dim=4)
    assert report.adapted == {"fusion": 2, "decoder": 1}
    assert "answer_decoder.lm_head.dense.weight" in report.trainable_names
    # the LM head's tied word embeddings stay frozen
    assert not model.answer_decoder.embeddings.word_embeddings.weight.requires_grad
    nlvr = albef_model_for_nlvr(**sizes, distill=False)
    # a flat list indexes the groups in order (vision 3, text 2, fusion 4)
    assert apply_das(nlvr, skip=[2, 5, 8], adapter_dim=4).skipped == {"vision": [2], "fusion": [0, 3]}


@pytest.mark.parametrize("kwargs, message", [
    (dict(skip={"fusion": [2]}), r"das.skip.fusion: index 2 is outside 0..1"),
    (dict(skip={"fusion": [1, 1]}), r"das.skip.fusion: index 1 is given more than once"),
    (dict(skip={"fusin": [0]}), r"unknown block group 'fusin'"),
    (dict(skip=[99]), r"index 99 is outside 0..6"),
    (dict(skip={"fusion": [0]}, skip_from="x.json"), r"either with das.skip or with das.skip_from"),
    (dict(mirror_momentum=False), r"das.mirror_momentum=true"),
    (dict(search={"skip_num": 8}), r"skip_num=8 is larger than the 7 candidate blocks"),
    (dict(search={"skip_num": 1, "das_turns": 3}), r"unknown key\(s\) \['das_turns'\]"),
    (dict(search={"skip_num": 1, "groups": ["decoder"]}), r"'decoder' is not one of the DAS groups"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    model = albef_model_for_retrieval(**TINY)
    with pytest.raises(ValueError, match=message):
        apply_das(model, **kwargs)


def test_unknown_block_types_say_how_to_register_them():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(TypeError, match="register_das_block"):
        apply_das(Net(), groups={"b": "blocks"})


def test_skip_files_are_checked_against_the_model(tmp_path):
    model = albef_model_for_retrieval(**TINY)
    with pytest.raises(FileNotFoundError, match=r"missing.json does not exist; run the search first"):
        apply_das(model, skip_from=str(tmp_path / "missing.json"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": "ViLTForVQA", "skip": {"transformer": [3]},
                                 "group_sizes": {"transformer": 12}}))
    with pytest.raises(ValueError, match=r"searched on ViLTForVQA, but this model is ALBEFForRetrieval"):
        apply_das(model, skip_from=str(other))
    resized = tmp_path / "resized.json"
    resized.write_text(json.dumps({"model": "ALBEFForRetrieval", "skip": {"vision": [0]},
                                   "group_sizes": {"vision": 12}}))
    with pytest.raises(ValueError, match=r"searched with 12 blocks in group 'vision', but this model has 3"):
        apply_das(model, skip_from=str(resized))
    good = tmp_path / "skip.json"
    good.write_text(json.dumps({"model": "ALBEFForRetrieval", "skip": {"vision": [2], "text": [1]},
                                "group_sizes": {"vision": 3, "text": 2, "fusion": 2}}))
    assert apply_das(model, skip_from=str(good)).skipped == {"vision": [2], "text": [1]}
    # the record holds the resolved list, not the file
    assert applied_methods(model)["das"]["skip"] == {"vision": [2], "text": [1]}
