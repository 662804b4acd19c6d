"""The online modules' bf16 weight copies of the training forward
(``ALBEFForRetrieval.online_weight_copies``, ``torchmm_ext.modules.precision``): under bf16
autocast, the same losses and gradients bit for bit as autocast's own casts, over several
optimizer steps (so stale copies would show), with the fp32 Parameters restored and receiving
the gradients; nothing changes without autocast."""

import copy

import pytest
import torch
from torch import nn

from torchmm_ext.models.albef import albef_model_for_pretraining, albef_model_for_retrieval
from torchmm_ext.modules.precision import autocast_weight_copies
from testing_utils import SMALL_ALBEF


def _batch(batch: int = 4, length: int = 7):
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(batch, 3, 32, 32, generator=gen)
    ids = torch.randint(5, 64, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 5:] = 0
    return image, ids.masked_fill(mask == 0, 0), mask


def _model(task: str) -> nn.Module:
    torch.manual_seed(0)
    if task == "retrieval":
        model = albef_model_for_retrieval("tiny", queue_size=8, **SMALL_ALBEF)
    else:
        model = albef_model_for_pretraining("tiny", queue_size=8, mask_token_id=3, cls_token_id=1, **SMALL_ALBEF)
    with torch.no_grad():  # online weights != momentum weights, trained heads
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _steps(model: nn.Module, task: str, steps: int, precision: str = "bf16"):
    """``steps`` training steps (AdamW); the losses, gradients and linear-weight dtypes seen."""
    image, ids, mask = _batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seen: list = []
    fc = model.fusion_encoder.layer[0].feedforward.model[0]
    hook = fc.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    losses, grads = [], []
    for step in range(steps):
        torch.manual_seed(10 + step)  # the same dropout masks, negatives and MLM masks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            if task == "retrieval":
                out = model(image, ids, mask, torch.tensor([0, 1, 2, 1]), alpha=0.4)
            else:
                out = model(image, ids, mask, alpha=0.4)
        out.loss.backward()
        losses.append([t.detach() for t in out])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad(set_to_none=True)
    hook.remove()
    return losses, grads, seen


def _compare(task: str, steps: int):
    model = _model(task)
    plain = copy.deepcopy(model)
    plain.online_weight_copies = False
    params = dict(model.named_parameters())
    losses, grads, seen = _steps(model, task, steps)
    plain_losses, plain_grads, plain_seen = _steps(plain, task, steps)
    assert set(seen) == {torch.bfloat16} and set(plain_seen) == {torch.float32}  # copies used
    for a, b in zip(losses, plain_losses):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    for g, g_plain in zip(grads, plain_grads):
        assert g.keys() == g_plain.keys() and "fusion_encoder.layer.0.feedforward.model.0.weight" in g
        assert all(t.dtype == torch.float32 for t in g.values())
    # The real fp32 Parameters are back in the modules.
    assert all(p is params[n] and isinstance(p, nn.Parameter) for n, p in model.named_parameters())
    return model, plain, grads, plain_grads


def test_retrieval_bf16_steps_with_weight_copies_equal_autocast_casts_bit_for_bit():
    model, plain, grads, plain_grads = _compare("retrieval", steps=3)
    for g, g_plain in zip(grads, plain_grads):
        for name in g:
            assert torch.equal(g[name], g_plain[name]), name
    for (name, p), p_plain in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, p_plain), name  # trained identically (stale copies would differ)


def test_pretraining_bf16_step_with_weight_copies_equals_autocast_casts():
    _, _, (g,), (g_plain,) = _compare("pretraining", steps=1)
    # Bit for bit but where a weight is used both whole and sliced (the last fusion layer's
    # self-attention projection: MLM's full pass and ITM's first-token query slice): autocast
    # casts the slices separately and sums their gradients in fp32, the copy sums them in bf16
    # (as autocast does for any weight used twice whole); and the tied word embeddings /
    # MLM decoder gradient, summed in another order.
    last = f"fusion_encoder.layer.{SMALL_ALBEF['fusion_layers'] - 1}.attention.input_proj."
    rounded = {last + "weight", last + "bias", "text_encoder.embeddings.word_embeddings.weight"}
    for name in g:
        if name in rounded:
            scale = g_plain[name].abs().max()
            assert (g[name] - g_plain[name]).abs().max() <= 2 ** -7 * scale, name
        else:
            assert torch.equal(g[name], g_plain[name]), name


def test_fp32_forward_is_unchanged_and_makes_no_copies():
    model = _model("retrieval")
    losses, _, seen = _steps(model, "retrieval", steps=1, precision="fp32")
    assert set(seen) == {torch.float32} and not model.__dict__.get("_autocast_weight_copies")


def test_copies_follow_the_weights_and_second_pending_forward_is_refused():
    lin = nn.Linear(8, 4)
    owner = nn.Module()
    x = torch.randn(3, 8, requires_grad=True)  # the linear saves its weight for x's gradient
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with autocast_weight_copies(owner, [lin]):
            out = lin(x)
        assert torch.equal(out, nn.functional.linear(x, lin.weight, lin.bias))
        with torch.no_grad():
            lin.weight.mul_(2)
        with autocast_weight_copies(owner, [lin]):  # the first graph still holds the old copy
            out2 = lin(x)
    with pytest.raises(RuntimeError, match="modified inplace|modified by an inplace operation"):
        out.sum().backward()
    lin.zero_grad(set_to_none=True)  # whatever the refused backward left
    out2.sum().backward()
    reference = copy.deepcopy(lin)  # the doubled weights, cast by autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(x)
    expected.sum().backward()
    assert torch.equal(out2, expected) and lin.weight.grad.dtype == torch.float32
    assert torch.equal(lin.weight.grad, reference.weight.grad)
    assert torch.equal(lin.bias.grad, reference.bias.grad)
