"""The momentum step's low-precision shadows (``MomentumCopiesMixin.momentum_step``): the fused
EMA + cast keeps the fp32 EMA bit for bit, and every ALBEF task's training forward under bf16
autocast gives exactly the outputs of the plain path (autocast re-casting each fp32 momentum
weight at use)."""

import copy

import pytest
import torch
from torch import nn

from torchmm_ext.models.albef import (
    albef_model_for_nlvr,
    albef_model_for_pretraining,
    albef_model_for_retrieval,
    albef_model_for_ve,
    albef_model_for_vqa,
)
from torchmm_ext.modules import momentum as momentum_module
from torchmm_ext.modules.momentum import momentum_update
from testing_utils import SMALL_ALBEF, small_albef_batch

SMALL = SMALL_ALBEF


def _perturb_online(model: nn.Module) -> None:
    """Online weights != momentum weights, so the EMA moves every copy."""
    online, _ = model._momentum_pairs()
    with torch.no_grad():
        for module in online:
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))


def test_fused_ema_and_cast_is_the_plain_ema_bit_for_bit(monkeypatch):
    # Slices much smaller than the tensors, with a ragged last slice.
    monkeypatch.setattr(momentum_module, "_CPU_SLICE", 1000)
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(70, 90), nn.LayerNorm(90), nn.Conv2d(3, 5, 3))
    copies = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    reference = copy.deepcopy(copies)
    shadows = {id(p): torch.empty_like(p, dtype=torch.bfloat16)
               for m in (copies[0], copies[2]) for p in m.parameters()}
    momentum_update([online], [copies], 0.995, shadows)
    with torch.no_grad():
        torch._foreach_lerp_(list(reference.parameters()), [p.detach() for p in online.parameters()],
                             1.0 - 0.995)
    for ours, ref in zip(copies.parameters(), reference.parameters()):
        assert torch.equal(ours, ref)
        if id(ours) in shadows:
            assert torch.equal(shadows[id(ours)], ref.to(torch.bfloat16))


def _first_linear_weight_dtype(module: nn.Module, seen: list):
    linear = next(m for m in module.modules() if isinstance(m, nn.Linear))
    return linear.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))


@pytest.mark.parametrize("task", ["retrieval", "pretraining", "ve", "nlvr", "vqa"])
def test_bf16_training_forward_with_shadows_equals_plain_autocast(task):
    torch.manual_seed(0)
    if task == "retrieval":
        model = albef_model_for_retrieval("tiny", queue_size=8, **SMALL)
    elif task == "pretraining":
        model = albef_model_for_pretraining("tiny", queue_size=8, mask_token_id=3, cls_token_id=1, **SMALL)
    else:
        sizes = {k: v for k, v in SMALL.items() if k != "embed_dim"}
        builder = {"ve": albef_model_for_ve, "nlvr": albef_model_for_nlvr, "vqa": albef_model_for_vqa}[task]
        model = builder("tiny", **sizes)
    _perturb_online(model)
    shadowed, plain = model, copy.deepcopy(model)
    plain.momentum_shadows = False
    image, ids, mask = small_albef_batch()
    copies_before = [copy.deepcopy(m) for m in shadowed._momentum_pairs()[1]]
    originals = [p for m in shadowed._momentum_pairs()[1] for p in m.parameters()]

    results = []
    for m in (shadowed, plain):
        m.train()
        seen: list = []
        hook = _first_linear_weight_dtype(m._momentum_pairs()[1][0], seen)
        torch.manual_seed(3)  # same dropout masks and negatives for both
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if task == "ve":
                out = m(image, ids, mask, torch.tensor([0, 1, 2, 1]), alpha=0.4)
            elif task == "nlvr":  # image pairs [B, 2, 3, H, W]
                out = m(torch.stack([image, image.flip(0)], dim=1), ids, mask, torch.tensor([0, 1, 1, 0]),
                        alpha=0.4)
            elif task == "vqa":  # the captions as questions, answers with a tied LM head
                answers = ids[:, :5].clone()
                out = m(image, ids, mask, answers, torch.ones_like(answers), torch.full((4,), 0.5),
                        torch.arange(4), alpha=0.4)
            else:
                out = m(image, ids, mask, alpha=0.4, **({"idx": torch.tensor([0, 1, 2, 1])} if task == "retrieval" else {}))
        hook.remove()
        results.append((out, seen))

    (out_s, seen_s), (out_p, seen_p) = results
    # The shadows were really used (and only in the shadowed model).
    assert seen_s and set(seen_s) == {torch.bfloat16}
    assert seen_p and set(seen_p) == {torch.float32}
    for a, b in zip(out_s, out_p):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # Same fp32 EMA state, the real Parameters back in place, one EMA step (not two when nested).
    ema = 1.0 - model.momentum
    online = [p for m in shadowed._momentum_pairs()[0] for p in m.parameters()]
    for p_s, p_p, p_0, p_on, orig in zip(
        (p for m in shadowed._momentum_pairs()[1] for p in m.parameters()),
        (p for m in plain._momentum_pairs()[1] for p in m.parameters()),
        (p for m in copies_before for p in m.parameters()),
        online,
        originals,
    ):
        assert p_s is orig and isinstance(p_s, nn.Parameter) and p_s.dtype == torch.float32
        assert torch.equal(p_s, p_p)
        torch.testing.assert_close(p_s, torch.lerp(p_0, p_on.detach(), ema), atol=1e-6, rtol=1e-5)
    if task in ("retrieval", "pretraining"):
        assert torch.equal(shadowed.queue.image_queue, plain.queue.image_queue)


def test_fp32_training_forward_is_unchanged_by_the_switch():
    torch.manual_seed(0)
    model = albef_model_for_retrieval("tiny", queue_size=8, **SMALL)
    _perturb_online(model)
    plain = copy.deepcopy(model)
    plain.momentum_shadows = False
    image, ids, mask = small_albef_batch()
    outs = []
    for m in (model, plain):
        torch.manual_seed(3)
        outs.append(m(image, ids, mask, torch.tensor([0, 1, 2, 3]), alpha=0.4))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not getattr(model, "_momentum_shadow_cache", {})  # no shadow made without autocast


def test_no_shadows_when_no_momentum_feature_is_read():
    # The default shapes job: no queue, in-batch online ITC columns, alpha 0: the momentum
    # forward passes are skipped, so no bf16 copy is made; the EMA still runs.
    torch.manual_seed(0)
    model = albef_model_for_retrieval("tiny", queue_size=0, itc_online_batch=True, **SMALL)
    _perturb_online(model)
    before = [p.clone() for m in model._momentum_pairs()[1] for p in m.parameters()]
    image, ids, mask = small_albef_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(image, ids, mask, torch.tensor([0, 1, 2, 3]), alpha=0.0)
    assert not getattr(model, "_momentum_shadow_cache", {})
    after = [p for m in model._momentum_pairs()[1] for p in m.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(after, before))
