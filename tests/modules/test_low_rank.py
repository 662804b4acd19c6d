"""PELA's low-rank layers: SVD exactness, rank rule, exclusion, counts, foreign models, errors."""

import numpy as np
import pytest
import torch
from torch import nn

from torchmm_ext.models.albef import albef_model_for_pretraining, albef_model_for_ve
from torchmm_ext.modules.efficiency import applied_methods
from torchmm_ext.modules.low_rank import apply_low_rank, low_rank_layers, low_rank_rank, LowRankLinear

FULL = 10**6  # a rank above every layer's: the factorisation is exact


def _tiny_pretraining() -> nn.Module:
    torch.manual_seed(0)
    model = albef_model_for_pretraining("tiny", image_size=32, patch_size=16, vision_depth=2,
                                        text_layers=1, fusion_layers=1, vocab_size=64, queue_size=8,
                                        dropout=0.0).eval()
    with torch.no_grad():  # momentum weights that differ from their online twins
        for name, p in model.named_parameters():
            if name.split(".")[0].endswith("_m"):
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_rank_rule() -> None:
    assert low_rank_rank(768, 768, 3) == 128
    assert low_rank_rank(768, 2304, 3) == 192
    assert low_rank_rank(768, 3072, 3) == 204 and low_rank_rank(3072, 768, 3) == 204
    assert low_rank_rank(12, 24, 2) == 4  # floor(288 / 72)


@pytest.mark.parametrize("chunks", [1, 3])
def test_full_rank_svd_reproduces_outputs(chunks: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(20, 30)
    low, error = LowRankLinear.from_linear(linear, rank=min(20, 30 // chunks), chunks=chunks)
    x = torch.randn(4, 7, 20)
    torch.testing.assert_close(low(x), linear(x), atol=1e-5, rtol=0)
    assert error < 1e-5
    assert set(low.state_dict()) == {"0.weight", "1.weight", "1.bias"}


def test_truncated_error_is_the_dropped_singular_values() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 24)
    w = linear.weight.detach().double().numpy()
    s = np.linalg.svd(w, compute_uv=False)
    for rank in (1, 5, 11):
        low, relative = LowRankLinear.from_linear(linear, rank)
        product = (low[1].weight.detach().double() @ low[0].weight.detach().double()).numpy()
        expected = np.sqrt((s[rank:] ** 2).sum())
        assert np.linalg.norm(w - product) == pytest.approx(expected, rel=1e-4)
        assert relative == pytest.approx(expected / np.linalg.norm(w), rel=1e-4)
        # factor split: the first factor's rows are sqrt(S) V^T (orthogonal, norms sqrt(s))
        row_norms = low[0].weight.detach().double().norm(dim=1).numpy()
        np.testing.assert_allclose(row_norms, np.sqrt(s[:rank]), rtol=1e-4)


def test_packed_chunks_factorise_each_chunk_separately() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(12, 18)
    low, _ = LowRankLinear.from_linear(linear, rank=2, chunks=3)
    w = linear.weight.detach()
    for c in range(3):  # chunk c equals its own rank-2 SVD truncation
        u, s, vh = torch.linalg.svd(w[6 * c:6 * (c + 1)])
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(low.effective_weight()[6 * c:6 * (c + 1)], best, atol=1e-5, rtol=0)
    x = torch.randn(5, 12)
    torch.testing.assert_close(low(x), x @ low.effective_weight().T + linear.bias, atol=1e-5, rtol=0)


def test_hand_count_on_a_small_model() -> None:
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 12, bias=False), nn.Linear(12, 4))
    report = apply_low_rank(model, ratio=2)
    # 12->24: r=4, 12*4 + 4*24 + 24 = 168; 24->12: r=4, 24*4 + 4*12 = 144; 12->4 kept (<10): 52
    assert report.total == (12 * 24 + 24 + 24 * 12 + 12 * 4 + 4, 168 + 144 + 52)
    assert sum(p.numel() for p in model.parameters()) == 364
    assert [(l.name, l.rank) for l in report.layers] == [("0", 4), ("2", 4)]
    assert report.skipped == [("3", "4 outputs < min_out_features=10")]
    assert isinstance(model[3], nn.Linear) and isinstance(model[0], LowRankLinear)
    assert applied_methods(model)["low_rank"]["ratio"] == 2.0
    assert "rank 4" in report.format()


def test_albef_exclusion_momentum_and_counts() -> None:
    model = _tiny_pretraining()
    online_before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = apply_low_rank(model, ratio=3, rank=None)
    layers = low_rank_layers(model)
    kept = {n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rpartition(".")[0] not in layers}
    assert kept == {"vision_proj", "text_proj", "vision_proj_m", "text_proj_m", "itm_head",
                    "mlm_head.dense", "mlm_head.decoder", "mlm_head_m.dense", "mlm_head_m.decoder"}
    assert "vision_encoder_m.blocks.0.attention.input_proj" in layers
    assert "fusion_encoder_m.layer.0.cross_attention.k_proj" in layers
    # packed BERT q/k/v per chunk (as PELA's separate query/key/value); the ViT's qkv not
    assert layers["text_encoder.encoder.layer.0.attention.input_proj"].chunks == 3
    assert layers["fusion_encoder.layer.0.attention.input_proj"].chunks == 3
    assert layers["vision_encoder.blocks.0.attention.input_proj"].chunks == 1
    # hand count: each factorised layer loses in*out - r*(in+out) (per chunk)
    saved = {"online": 0, "momentum copies": 0}
    for layer in report.layers:
        out = layer.out_features // layer.chunks
        lost = layer.chunks * (layer.in_features * out - layer.rank * (layer.in_features + out))
        saved["momentum copies" if layer.name.split(".")[0].endswith("_m") else "online"] += lost
    for group in saved:
        before, after = report.params[group]
        assert before - after == saved[group] > 0
    online = sum(p.numel() for n, p in model.named_parameters() if not n.split(".")[0].endswith("_m"))
    assert report.params["online"][1] == online
    assert set(report.params) >= {"vision", "text", "fusion", "heads and other", "momentum copies"}
    # momentum copies are factorised from their own (different) weights
    name = "vision_encoder_m.blocks.0.feedforward.model.0"
    mom, online_twin = online_before[name], online_before[name.replace("_m.", ".", 1)]
    assert not torch.allclose(mom, online_twin)
    u, sv, vh = torch.linalg.svd(mom)
    r = layers[name].rank
    torch.testing.assert_close(layers[name].effective_weight(), (u[:, :r] * sv[:r]) @ vh[:r], atol=1e-5, rtol=0)


def test_full_rank_albef_outputs_unchanged_and_task_head_excluded() -> None:
    torch.manual_seed(0)
    model = albef_model_for_ve("tiny", image_size=32, patch_size=16, vision_depth=1, text_layers=1,
                               fusion_layers=1, vocab_size=64, dropout=0.0).eval()
    image, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 64, (2, 6))
    mask = torch.ones_like(ids)
    before = model(image, ids, mask, torch.tensor([0, 2])).logits
    apply_low_rank(model, rank=FULL)
    assert isinstance(model.cls_head[0], nn.Linear)  # cls_head excluded by name
    torch.testing.assert_close(model(image, ids, mask, torch.tensor([0, 2])).logits, before, atol=1e-4, rtol=0)


def test_timm_vit() -> None:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    make = lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                     num_classes=10).eval()
    model, x = make(), torch.randn(2, 3, 32, 32)
    reference = model(x)
    apply_low_rank(model, rank=FULL, exclude=())
    torch.testing.assert_close(model(x), reference, atol=1e-4, rtol=0)
    model = make()
    report = apply_low_rank(model, ratio=3, exclude=("head",))
    assert model.blocks[0].attn.qkv[0].weight.shape == (low_rank_rank(48, 144, 3), 48)  # 36 x 48
    assert model.blocks[0].mlp.fc1[1].weight.shape == (192, 12)  # 48*192 // (3*240)
    assert isinstance(model.head, nn.Linear) and model(x).shape == (2, 10)
    assert report.total[1] == sum(p.numel() for p in model.parameters())


def test_hf_bert() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=96, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model, ids = BertModel(config).eval(), torch.randint(0, 50, (2, 5))
    reference = model(ids).last_hidden_state
    apply_low_rank(model, rank=FULL)
    torch.testing.assert_close(model(ids).last_hidden_state, reference, atol=1e-4, rtol=0)
    model = BertModel(config).eval()
    report = apply_low_rank(model, ratio=3)
    assert model.encoder.layer[0].attention.self.query[0].weight.shape == (8, 48)  # 48*48/(3*96)
    assert model.encoder.layer[0].intermediate.dense[0].weight.shape == (10, 48)  # 4608/432
    assert len(report.layers) == 2 * 6 + 1  # q, k, v, out, intermediate, output; pooler
    assert model(ids).last_hidden_state.shape == (2, 5, 48)


def test_torchmultimodal_albef_model() -> None:
    from torchmultimodal.models.albef.image_encoder import ALBEFVisionEncoder
    from torchmultimodal.models.albef.model import ALBEFModel
    from torchmultimodal.models.albef.multimodal_encoder import ALBEFMultimodalEncoder
    from torchmultimodal.modules.encoders.bert_text_encoder import bert_text_encoder

    def make() -> nn.Module:
        torch.manual_seed(0)
        vision = ALBEFVisionEncoder(image_size=32, patch_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, hidden_size=32, mlp_dim=64)
        text = bert_text_encoder(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, vocab_size=50, dropout=0.0)
        fusion = ALBEFMultimodalEncoder(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64)
        return ALBEFModel(vision, text, fusion).eval()

    image, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 50, (2, 5))
    mask = torch.ones_like(ids)
    model = make()
    reference = model(image, ids, mask).multimodal_embeddings
    apply_low_rank(model, rank=FULL)
    torch.testing.assert_close(model(image, ids, mask).multimodal_embeddings, reference, atol=1e-4, rtol=0)
    model = make()
    before = sum(p.numel() for p in model.parameters())
    report = apply_low_rank(model, ratio=3)
    assert report.total == (before, sum(p.numel() for p in model.parameters())) and report.total[1] < before
    assert model(image, ids, mask).multimodal_embeddings.shape == (2, 5, 32)


def test_shared_linear_stays_shared() -> None:
    shared = nn.Linear(16, 16)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    report = apply_low_rank(model, ratio=2)
    assert model["a"][0] is model["b"][0] and len(report.layers) == 1


def test_groups_limit_the_change_to_blocks_and_their_twins() -> None:
    model = _tiny_pretraining()
    apply_low_rank(model, ratio=3, groups=["vision"])
    names = set(low_rank_layers(model))
    assert names and all(n.startswith(("vision_encoder.", "vision_encoder_m.")) for n in names)
    assert any(n.startswith("vision_encoder_m.") for n in names)


def test_init_none_restructures_for_loading() -> None:
    source = _tiny_pretraining()
    apply_low_rank(source, ratio=3)
    target = _tiny_pretraining()
    apply_low_rank(target, ratio=3, init="none")
    missing, unexpected = target.load_state_dict(source.state_dict())
    assert not missing and not unexpected


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="ratio=1.0: the ratio must be > 1"):
        apply_low_rank(nn.Sequential(nn.Linear(16, 16)), ratio=1.0)
    with pytest.raises(ValueError, match=r"0 \(16->12\) gets rank 0 at ratio=50"):
        apply_low_rank(nn.Sequential(nn.Linear(16, 12)), ratio=50)
    with pytest.raises(ValueError, match=r"nothing to factorise.*exclude=\['enc'\]"):
        apply_low_rank(nn.ModuleDict({"enc": nn.Linear(16, 16)}), exclude=["enc"])
    with pytest.raises(ValueError, match="init='random'"):
        apply_low_rank(nn.Sequential(nn.Linear(16, 16)), init="random")
    model = nn.Sequential(nn.Linear(16, 16))
    apply_low_rank(model)
    with pytest.raises(ValueError, match="already applied"):
        apply_low_rank(model)


def test_base_albef_counts_match_the_published_rule(monkeypatch) -> None:
    """PELA's rule on ALBEF's pre-training model (256 px), as computed from the published code
    (REFERENCE.md): online 209.94M -> 87.11M (k=3), 117.89M (k=2), 148.49M (k=1.5). Built on
    the meta device: no memory, no time."""
    linspace = torch.linspace  # the ViT's drop-path schedule is read with .tolist()
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
    for ratio, published in ((3, 87.11), (2, 117.89), (1.5, 148.49)):
        with torch.device("meta"):
            model = albef_model_for_pretraining("base", image_size=256)
        before, after = apply_low_rank(model, ratio=ratio, init="none").params["online"]
        assert (round(before / 1e6, 2), round(after / 1e6, 2)) == (209.94, published)
