"""``torchmm_ext.modules.attention.scaled_dot_product_attention``: bf16 attention on the CPU keeps
SDPA's flash forward (bit for bit) and runs its backward in fp32. Checked against SDPA's math
backend (an independent implementation) in fp32, against fp32 gradients in bf16, for the
dispatch conditions, and through a whole ALBEF training step."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from torchmultimodal.modules.layers.multi_head_attention import MultiHeadSelfAttention
from torchmultimodal.modules.layers.transformer import TransformerEncoderLayer

from torchmm_ext.models.albef import albef_model_for_retrieval
from torchmm_ext.modules import attention as attention_module
from torchmm_ext.modules.attention import (
    cpu_attention_backward_in_fp32,
    scaled_dot_product_attention,
    SelfAttention,
    use_self_attention,
)
from testing_utils import SMALL_ALBEF

SMALL = SMALL_ALBEF
CASES = [  # batch, query length, key length, padding mask
    (3, 17, 17, False),  # ViT-like self-attention
    (4, 9, 9, True),  # text self-attention with padding
    (4, 7, 21, False),  # cross-attention
    (4, 1, 9, True),  # first-token-only self-attention
]


def _qkv(batch, lq, lk, with_mask, heads=3, head_dim=32, seed=0):
    """Head views of packed projections, as the modules make them (non-contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, lq, 3 * heads * head_dim, generator=gen)
    y = torch.randn(batch, lk, 2 * heads * head_dim, generator=gen)
    q = x[..., : heads * head_dim].view(batch, lq, heads, head_dim).transpose(1, 2)
    k = y[..., : heads * head_dim].view(batch, lk, heads, head_dim).transpose(1, 2)
    v = y[..., heads * head_dim :].view(batch, lk, heads, head_dim).transpose(1, 2)
    mask = None
    if with_mask:
        lengths = torch.randint(1, lk + 1, (batch,), generator=gen)
        lengths[0] = lk
        mask = (torch.arange(lk)[None] < lengths[:, None])[:, None, None, :]
    grad = torch.randn(batch, heads, lq, head_dim, generator=gen)
    return q, k, v, mask, grad


def _run(fn, q, k, v, mask, grad, dtype):
    q, k, v = (t.to(dtype).detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, mask)
    out.backward(grad.to(dtype))
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


def _math(q, k, v, mask):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, mask)


@pytest.mark.parametrize("batch,lq,lk,with_mask", CASES)
def test_fp32_backward_function_equals_math_sdpa_in_fp32(batch, lq, lk, with_mask):
    q, k, v, mask, grad = _qkv(batch, lq, lk, with_mask)

    def fused(q, k, v, mask):
        additive = None if mask is None else torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        return attention_module._CPUFlashAttentionFp32Backward.apply(q, k, v, additive)

    ours = _run(fused, q, k, v, mask, grad, torch.float32)
    reference = _run(_math, q, k, v, mask, grad, torch.float32)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch,lq,lk,with_mask", CASES)
def test_bf16_forward_is_sdpa_bit_for_bit_and_gradients_close_to_fp32(batch, lq, lk, with_mask):
    q, k, v, mask, grad = _qkv(batch, lq, lk, with_mask, seed=1)
    q, k, v, grad = (t.bfloat16() for t in (q, k, v, grad))  # the same bf16 inputs for all
    ours = _run(scaled_dot_product_attention, q, k, v, mask, grad, torch.bfloat16)
    with cpu_attention_backward_in_fp32(False):
        plain = _run(scaled_dot_product_attention, q, k, v, mask, grad, torch.bfloat16)
    sdpa = _run(F.scaled_dot_product_attention, q, k, v, mask, grad, torch.bfloat16)
    fp32 = _run(_math, q, k, v, mask, grad, torch.float32)  # fp32 math on the bf16 inputs
    assert torch.equal(ours[0], sdpa[0])  # the same forward kernel call
    for a, b in zip(plain, sdpa):  # switched off, it is plain SDPA
        assert torch.equal(a, b)
    # Stated tolerance: the gradients are bf16 tensors computed in fp32, so they sit within
    # bf16 rounding (2^-8 relative) of the fp32 ones; 1 % of each tensor's largest entry.
    for a, b in zip(ours[1:], fp32[1:]):
        assert (a - b).abs().max() <= 1e-2 * b.abs().max()


def test_dispatch_only_where_a_bf16_cpu_backward_follows():
    q, k, v, mask, _ = _qkv(2, 5, 5, True)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    fused = "_CPUFlashAttentionFp32BackwardBackward"

    def grad_fn(*args, **kwargs):
        out = scaled_dot_product_attention(*args, **kwargs)
        return type(out.grad_fn).__name__ if out.grad_fn is not None else None

    assert grad_fn(qb, kb, vb, mask) == fused
    assert grad_fn(qb, kb, vb, None) == fused
    assert grad_fn(qb, kb, vb, mask, dropout_p=0.1) != fused  # dropout: SDPA's own kernel
    assert grad_fn(*(t.float().requires_grad_() for t in (q, k, v)), mask) != fused  # fp32
    with torch.no_grad():
        assert grad_fn(qb, kb, vb, mask) is None
    with cpu_attention_backward_in_fp32(False):
        assert grad_fn(qb, kb, vb, mask) != fused
    assert grad_fn(qb, kb, vb, mask) == fused  # the context restores the default


def test_self_attention_keeps_tensors_names_outputs_and_random_state():
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(24, 3, 48, norm_first=True)
    plain = layer.attention
    params = dict(plain.named_parameters())
    rng = torch.get_rng_state()
    use_self_attention(layer)
    assert torch.equal(rng, torch.get_rng_state())  # no new initialisation
    assert isinstance(layer.attention, SelfAttention)
    assert {n: p for n, p in layer.attention.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in layer.attention.named_parameters())
    x = torch.randn(2, 6, 24)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., 4:] = False
    torch.testing.assert_close(layer.attention(x, mask), plain(x, mask), rtol=0, atol=0)
    assert isinstance(plain, MultiHeadSelfAttention) and isinstance(layer.attention, MultiHeadSelfAttention)


def _train_forward(model, batch, seed):
    torch.manual_seed(seed)  # the same dropout masks in every call
    image, ids, mask, idx = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image, ids, mask, idx, alpha=0.4)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def test_albef_bf16_training_step_same_loss_and_gradients_as_plain_attention(monkeypatch):
    torch.manual_seed(0)
    model = albef_model_for_retrieval(**SMALL, queue_size=32).train()
    online, _ = model._momentum_pairs()
    with torch.no_grad():  # momentum weights differ from their online twins
        for module in online:
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(4, 3, 32, 32, generator=gen)
    ids = torch.randint(5, 64, (4, 7), generator=gen)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 5:] = 0
    batch = (image, ids.masked_fill(mask == 0, 0), mask, torch.arange(4))

    calls = []
    apply = attention_module._CPUFlashAttentionFp32Backward.apply
    monkeypatch.setattr(attention_module._CPUFlashAttentionFp32Backward, "apply",
                        lambda *a: calls.append(a[0].shape) or apply(*a))
    snapshot = {n: t.clone() for n, t in model.state_dict().items()}
    loss, grads = _train_forward(model, batch, seed=5)
    # Every attention with a backward takes the fused path: the ViT blocks, the text layer,
    # and each fusion layer's self- and cross-attention (the momentum encoders run no_grad).
    # The cross-attention makes one call per image (ITM's pairs grouped by image), or one for
    # all 4 images when each has as many pairs.
    cross_calls = len(calls) - (SMALL["vision_depth"] + SMALL["text_layers"] + SMALL["fusion_layers"])
    assert cross_calls in (SMALL["fusion_layers"], 4 * SMALL["fusion_layers"])
    model.load_state_dict(snapshot)  # undo the queue / momentum updates of the step
    with cpu_attention_backward_in_fp32(False):
        plain_loss, plain_grads = _train_forward(model, batch, seed=5)
    assert torch.equal(loss, plain_loss)  # the forward is bit for bit the same
    assert grads.keys() == plain_grads.keys()
    # The two backward passes differ only by the rounding inside the attention backward (fp32
    # vs bf16 accumulation), propagated through the bf16 step: stated tolerance 2 % of each
    # gradient's largest entry.
    for name, g in grads.items():
        if name.endswith("cross_attention.k_proj.bias"):
            continue  # exactly zero (softmax ignores a shift shared by all keys): both are noise
        scale = plain_grads[name].abs().max()
        assert (g - plain_grads[name]).abs().max() <= 2e-2 * scale + 1e-8, name


def test_itc_similarities_are_fp32_under_bf16_autocast(monkeypatch):
    # ITC's similarities against the 2 x [E, B + Q] feature matrices run with autocast off:
    # fp32 products (as the model's comment requires), checked on the queue's columns.
    torch.manual_seed(0)
    model = albef_model_for_retrieval(**SMALL, queue_size=32).train()
    with torch.no_grad():
        model.queue.idx_queue.copy_(torch.arange(32).view(1, -1) + 100)  # no empty slot
    text_queue = model.queue.text_queue.clone()
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(4, 3, 32, 32, generator=gen)
    ids = torch.randint(5, 64, (4, 7), generator=gen)
    mask = torch.ones(4, 7, dtype=torch.long)
    seen = {}
    encode_image, itc_loss = model.encode_image, model.itc_loss.forward
    monkeypatch.setattr(model, "encode_image",
                        lambda *a, **k: seen.setdefault("image", encode_image(*a, **k)))
    monkeypatch.setattr(model.itc_loss, "forward", lambda *a: seen.setdefault("sims", a[:4]) and itc_loss(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(image, ids, mask, torch.arange(4), alpha=0.4)
    assert all(s.dtype == torch.float32 for s in seen["sims"])
    image_feat = seen["image"].features.float().detach()
    expected = image_feat @ text_queue / model.temp.detach()
    torch.testing.assert_close(seen["sims"][0][:, 4:].detach(), expected, rtol=1e-5, atol=1e-5)
