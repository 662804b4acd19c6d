"""Training ITM with the pairs of each image grouped (``ALBEFFusionEncoder.group_pairs``): one
cross-attention call per image against its keys/values instead of per-pair gathered copies.
Same outputs and gradients as the plain (gathered) path, fp32 to 1e-5, same weights and inputs."""

import copy

import pytest
import torch

from torchmm_ext.models.albef import albef_model_for_retrieval
from torchmm_ext.modules import text_encoder as text_encoder_module
from torchmm_ext.modules.text_encoder import ALBEFFusionEncoder
from testing_utils import SMALL_ALBEF, small_albef_batch


def _count_grouped_calls(monkeypatch) -> list:
    calls: list = []
    attend = text_encoder_module._attend_image_runs
    monkeypatch.setattr(text_encoder_module, "_attend_image_runs",
                        lambda *a, **k: calls.append(len(a[3])) or attend(*a, **k))
    return calls


@pytest.mark.parametrize("cls_only", [False, True])
def test_grouped_training_fusion_equals_gathered_with_gradients(monkeypatch, cls_only):
    torch.manual_seed(0)
    fusion = ALBEFFusionEncoder(width=32, image_width=24, num_layers=2, num_heads=4, ffn_dim=64,
                                dropout=0.0).train()
    plain = copy.deepcopy(fusion)
    plain.group_pairs = False
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(5, 10, 24, generator=gen)  # image 4 is in no pair
    # ITM's layout: positives, (text, hard-negative image), (hard-negative text, image).
    index = torch.tensor([0, 1, 2, 3, 2, 0, 3, 2, 0, 1, 2, 3])
    text = torch.randn(12, 7, 32, generator=gen)
    mask = torch.ones(12, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[6, 2:] = 0
    calls = _count_grouped_calls(monkeypatch)

    outs, grads = [], []
    for model in (fusion, plain):
        t, im = text.clone().requires_grad_(), images.clone().requires_grad_()
        out = model(t, mask, im, image_index=index, cls_only=cls_only).last_hidden_state
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out)
        grads.append([t.grad, im.grad] + [p.grad for p in model.parameters()])
    assert calls == [5, 5]  # the grouped path ran in each layer (5 images), the plain one not
    assert outs[0].shape == (12, 1 if cls_only else 7, 32)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(grads[0][1][4], torch.zeros(10, 24))  # the unused image
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_grouping_keeps_the_gathered_path_with_an_image_mask_probabilities_or_compiled_layers(monkeypatch):
    torch.manual_seed(0)
    fusion = ALBEFFusionEncoder(width=32, image_width=24, num_layers=2, num_heads=4, ffn_dim=64).eval()
    images, text = torch.randn(2, 10, 24), torch.randn(4, 6, 32)
    mask = torch.ones(4, 6, dtype=torch.long)
    index = torch.tensor([1, 0, 1, 0])
    calls = _count_grouped_calls(monkeypatch)
    fusion(text, mask, images, image_index=index, image_attention_mask=torch.ones(2, 10, dtype=torch.long))
    out = fusion(text, mask, images, image_index=index, return_cross_attention_layer=1)
    assert not calls and out.cross_attention.shape == (4, 4, 6, 10)
    index = torch.tensor([1, 0, 1, 1])  # runs of 1 and 3 pairs: one call per image
    fusion(text, mask, images, image_index=index)
    assert calls == [2, 2]  # grouped without mask or probabilities...
    fusion.layer[0].compile(backend="eager")  # ...but not with compiled layers (train.compile)
    fusion(text, mask, images, image_index=index)
    assert calls == [2, 2]


def test_retrieval_training_losses_and_gradients_equal_the_gathered_path(monkeypatch):
    torch.manual_seed(0)
    model = albef_model_for_retrieval("tiny", queue_size=8, dropout=0.0, **SMALL_ALBEF)
    with torch.no_grad():  # online weights != momentum weights, a trained ITM head
        for module in model._momentum_pairs()[0] + [model.itm_head]:
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    plain = copy.deepcopy(model)
    plain.fusion_encoder.group_pairs = False
    image, ids, mask = small_albef_batch()
    calls = _count_grouped_calls(monkeypatch)
    results = []
    for m in (model, plain):
        m.train()
        torch.manual_seed(3)  # same hard negatives
        out = m(image, ids, mask, torch.tensor([0, 1, 2, 1]), alpha=0.4)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    assert calls == [4] * len(model.fusion_encoder.layer)
    (out_g, grads_g), (out_p, grads_p) = results
    for a, b in zip(out_g, out_p):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads_g.keys() == grads_p.keys() and any("fusion_encoder" in n for n in grads_g)
    for name in grads_g:
        torch.testing.assert_close(grads_g[name], grads_p[name], atol=1e-5, rtol=1e-5, msg=name)
