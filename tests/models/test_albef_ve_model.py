"""ALBEFForVE at a tiny size: gradients reach every trainable parameter, the loss is CE without
distillation and ALBEF's CE / momentum soft-CE mix with it, momentum copies follow the EMA."""

import pytest
import torch
import torch.nn.functional as F

from torchmm_ext.data.datasets import VE_LABELS
from torchmm_ext.models.albef import ALBEFForVE, albef_model_for_ve

TINY = dict(image_size=32, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2, vision_mlp_dim=64,
            text_width=32, text_layers=1, fusion_layers=1, text_heads=2, text_ffn_dim=64, vocab_size=50)


def _batch(batch_size=4, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch_size, 3, 32, 32, generator=g)
    input_ids = torch.randint(1, 50, (batch_size, length), generator=g)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    attention_mask[1, 4:] = 0
    input_ids[1, 4:] = 0
    labels = torch.tensor([VE_LABELS["contradiction"], VE_LABELS["neutral"], VE_LABELS["entailment"],
                           VE_LABELS["entailment"]])[:batch_size]
    return image, input_ids, attention_mask, labels


def test_builder_sizes_and_head():
    model = albef_model_for_ve("tiny", patch_size=16)
    assert isinstance(model, ALBEFForVE)
    assert [type(m).__name__ for m in model.cls_head] == ["Linear", "ReLU", "Linear"]
    assert model.cls_head[0].in_features == model.cls_head[0].out_features == 192
    assert model.cls_head[2].out_features == 3
    assert VE_LABELS == {"contradiction": 0, "neutral": 1, "entailment": 2}
    with pytest.raises(ValueError, match="unknown ALBEF preset"):
        albef_model_for_ve("huge")
    plain = albef_model_for_ve("tiny", distill=False, **TINY)
    assert not any(name.endswith("_m") for name, _ in plain.named_children())


@pytest.mark.parametrize("distill", [True, False])
def test_forward_backward_reaches_every_trainable_parameter(distill):
    torch.manual_seed(0)
    model = albef_model_for_ve("tiny", distill=distill, **TINY)
    out = model(*_batch(), alpha=0.4)
    assert out.logits.shape == (4, 3) and out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(not n.split(".")[0].endswith("_m") for n, _ in trainable)
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    if distill:
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert {n.split(".")[0] for n in frozen} == {"vision_encoder_m", "text_encoder_m", "fusion_encoder_m",
                                                      "cls_head_m"}


def test_loss_is_cross_entropy_without_distillation():
    torch.manual_seed(0)
    model = albef_model_for_ve("tiny", dropout=0.0, **TINY)
    image, ids, mask, labels = _batch()
    out = model(image, ids, mask, labels, alpha=0.0)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.float(), labels))
    torch.testing.assert_close(out.logits, model.predict(image, ids, mask))


def test_loss_mixes_cross_entropy_and_momentum_soft_targets():
    torch.manual_seed(0)
    model = albef_model_for_ve("tiny", dropout=0.0, momentum=1.0, **TINY)  # momentum 1: copies stay put
    with torch.no_grad():  # make the momentum model differ from the online one
        for p in model.cls_head_m.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    image, ids, mask, labels = _batch()
    alpha = 0.4
    out = model(image, ids, mask, labels, alpha=alpha)
    with torch.no_grad():
        logits_m = ALBEFForVE._logits(model.vision_encoder_m, model.text_encoder_m, model.fusion_encoder_m,
                                      model.cls_head_m, image, ids, mask)
    assert not torch.allclose(logits_m, out.logits)
    ce = F.cross_entropy(out.logits, labels)
    soft = -(F.softmax(logits_m, dim=-1) * F.log_softmax(out.logits, dim=-1)).sum(dim=-1).mean()
    torch.testing.assert_close(out.loss, (1 - alpha) * ce + alpha * soft)
    # In eval mode forward is plain CE (no momentum pass), as ALBEF's inference.
    model.eval()
    torch.testing.assert_close(model(image, ids, mask, labels, alpha=alpha).loss, ce)


def test_momentum_copies_follow_the_ema():
    torch.manual_seed(0)
    model = albef_model_for_ve("tiny", momentum=0.9, **TINY)
    before = model.cls_head_m[0].weight.clone()
    with torch.no_grad():
        model.cls_head[0].weight.add_(1.0)
    model(*_batch(), alpha=0.4)
    torch.testing.assert_close(model.cls_head_m[0].weight, 0.9 * before + 0.1 * model.cls_head[0].weight)
    assert model.copy_params_to_momentum(only=["fusion_encoder_m"]) == ["fusion_encoder_m"]
    assert not torch.equal(model.cls_head_m[0].weight, model.cls_head[0].weight)
    with torch.no_grad():
        next(model.fusion_encoder.parameters()).add_(1.0)
    assert model.copy_params_to_momentum() == ["vision_encoder_m", "text_encoder_m", "fusion_encoder_m", "cls_head_m"]
    for module, module_m in zip(*model._momentum_pairs()):
        for p, p_m in zip(module.parameters(), module_m.parameters()):
            assert torch.equal(p, p_m)
