"""Word-patch alignment (ViLT's ITM companion loss): IPOT against a direct transcription of the
published iteration, padding invariance, the marginals of the plan, the exact OT distance of a
permuted copy, and which tokens the loss reads."""

import torch

from torchmm_ext.models.vilt import vilt_model_for_pretraining
from torchmm_ext.modules.word_patch_alignment import (
    cosine_cost,
    ipot_plan,
    optimal_transport_distance,
    word_patch_alignment_loss,
)


def _reference_distance(x: torch.Tensor, y: torch.Tensor, beta: float = 0.5, iterations: int = 50) -> float:
    """One unpadded pair, the IPOT iteration written out as in ViLT's ``ipot`` (plan [N, M],
    image x text; one Sinkhorn step per iteration), in float64."""
    x, y = x.double(), y.double()
    c = 1 - torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(y, dim=-1).T  # [M, N]
    m, n = c.shape
    sigma = torch.full((m,), 1.0 / m, dtype=torch.float64)
    plan = torch.ones(n, m, dtype=torch.float64)
    a = torch.exp(-c.T / beta)
    for _ in range(iterations):
        q = a * plan
        delta = 1 / (n * (q @ sigma))
        sigma = 1 / (m * (delta @ q))
        plan = delta[:, None] * q * sigma[None, :]
    return float(torch.trace(c @ plan))


def test_ipot_matches_the_published_iteration_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 7, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    x_valid = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    y_valid = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    x[1, 4:] = 100.0  # padding content must not matter
    ours = optimal_transport_distance(x, y, x_valid, y_valid)
    for b, (mx, ny) in enumerate([(7, 9), (4, 6)]):
        expected = _reference_distance(x[b, :mx], y[b, :ny])
        assert abs(ours[b].item() - expected) < 1e-5, (b, ours[b].item(), expected)


def test_ipot_plan_has_uniform_marginals_and_finds_the_exact_distance_of_a_permuted_copy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 6, 8, generator=g)
    y = x[:, torch.randperm(6, generator=g)]
    valid = torch.ones(1, 6, dtype=torch.bool)
    plan = ipot_plan(cosine_cost(x, y), valid, valid, iterations=200)
    torch.testing.assert_close(plan.sum(2), torch.full((1, 6), 1 / 6), rtol=0, atol=1e-4)
    torch.testing.assert_close(plan.sum(1), torch.full((1, 6), 1 / 6), rtol=0, atol=1e-4)
    # the optimum transports each token onto its copy: distance 0 (a random plan: ~1)
    assert optimal_transport_distance(x, y, valid, valid, iterations=200).item() < 1e-3


def test_wpa_loss_reads_words_and_patches_only_and_signs_by_label():
    g = torch.Generator().manual_seed(2)
    text = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    image = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    text_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    image_mask = torch.ones(2, 5, dtype=torch.long)
    loss = word_patch_alignment_loss(text, image, text_mask, image_mask, torch.tensor([1, 0]))
    loss.backward()
    # [CLS] (0), [SEP] (last real token: 5 and 3), padding and the image CLS get no gradient
    assert text.grad[0, [0, 5]].abs().sum() == 0 and text.grad[1, [0, 3, 4, 5]].abs().sum() == 0
    assert text.grad[0, 1:5].abs().sum() > 0 and text.grad[1, 1:3].abs().sum() > 0
    assert image.grad[:, 0].abs().sum() == 0 and image.grad[:, 1:].abs().sum() > 0
    words = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    patches = torch.tensor([[0, 1, 1, 1, 1]] * 2, dtype=torch.bool)
    d = optimal_transport_distance(text.detach(), image.detach(), words, patches)
    torch.testing.assert_close(loss.detach(), (d[0] - d[1]) / 2)


def test_vilt_pretraining_adds_the_weighted_wpa_term():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(5, 40, (2, 7))
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    args = (images, ids, mask, ids, labels, images.flip(0), torch.tensor([0, 0]))
    model = vilt_model_for_pretraining("tiny", vocab_size=40, dropout=0.0).eval()
    out = model(*args)
    assert out.wpa_loss is not None and out.wpa_loss.item() < 0  # mismatched pairs: -distance
    torch.testing.assert_close(out.loss, out.itm_loss + out.mlm_loss + out.wpa_loss)
    model.wpa_weight = 0.0
    plain = model(*args)
    assert plain.wpa_loss is None
    torch.testing.assert_close(plain.loss, plain.itm_loss + plain.mlm_loss)
    torch.testing.assert_close(out.wpa_loss, 0.1 * word_patch_alignment_loss(
        *(lambda o: (o.text_features, o.image_features, o.attention_mask[:, :7], o.attention_mask[:, 7:]))(
            model.vilt(ids, mask, images.flip(0))), torch.tensor([0, 0])))
