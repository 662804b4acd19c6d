"""BERT/ALBEF token masking (proportions, never [PAD]/[CLS], labels) and the MLM loss with its
momentum soft-target mix, against hand computations."""

import math

import pytest
import torch

from torchmm_ext.modules.mlm import bert_mlm_head, IGNORE_INDEX, mask_tokens, masked_lm_loss

PAD, CLS, MASK, VOCAB = 0, 2, 4, 1000


def _ids(rows=400, length=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (rows, length), generator=g)
    ids[:, 0] = CLS
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=g)
    ids[torch.arange(length)[None, :] >= lengths[:, None]] = PAD
    return ids


def test_masking_proportions_and_labels():
    ids = _ids()
    out = mask_tokens(ids, VOCAB, MASK, PAD, CLS, probability=0.15, generator=torch.Generator().manual_seed(1))
    chosen = out.labels != IGNORE_INDEX
    eligible = (ids != PAD) & (ids != CLS)
    n = int(eligible.sum())
    assert n > 10_000
    # [PAD] and [CLS] are never chosen; labels hold the original id exactly where chosen.
    assert not (chosen & ~eligible).any()
    assert torch.equal(out.labels[chosen], ids[chosen])
    assert (out.labels[~chosen] == IGNORE_INDEX).all()
    # Unchosen tokens are untouched.
    assert torch.equal(out.input_ids[~chosen], ids[~chosen])
    # ~15% of the eligible tokens (binomial sd ~0.2% here; 5 sd tolerance).
    rate = int(chosen.sum()) / n
    assert abs(rate - 0.15) < 5 * math.sqrt(0.15 * 0.85 / n), rate
    # Of the chosen: ~80% [MASK], ~10% another token, ~10% (plus random draws that hit the
    # original id, 0.1% of 10%) kept.
    m = int(chosen.sum())
    masked = (out.input_ids == MASK) & chosen
    kept = (out.input_ids == ids) & chosen
    replaced = chosen & ~masked & ~kept
    for count, p in ((masked, 0.8), (replaced, 0.1 * (1 - 1 / VOCAB)), (kept, 0.1 + 0.1 / VOCAB)):
        frac = int(count.sum()) / m
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / m), (frac, p)
    assert (out.input_ids[replaced] < VOCAB).all() and (out.input_ids[replaced] >= 0).all()
    # The input is not modified.
    assert torch.equal(ids, _ids())


def test_masking_is_reproducible_with_a_generator_and_probability_bounds():
    ids = _ids(rows=20)
    a = mask_tokens(ids, VOCAB, MASK, PAD, CLS, generator=torch.Generator().manual_seed(3))
    b = mask_tokens(ids, VOCAB, MASK, PAD, CLS, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    none = mask_tokens(ids, VOCAB, MASK, PAD, CLS, probability=0.0)
    assert torch.equal(none.input_ids, ids) and (none.labels == IGNORE_INDEX).all()
    every = mask_tokens(ids, VOCAB, MASK, PAD, CLS, probability=1.0)
    assert torch.equal(every.labels != IGNORE_INDEX, (ids != PAD) & (ids != CLS))


def test_mlm_loss_by_hand():
    # Two sequences of three positions; positions (0, 1) and (1, 2) are predicted.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [5.0, 0.0, 0.0]],
                           [[0.0, 3.0, 0.0], [9.0, 9.0, 9.0], [0.0, 0.0, math.log(2.0)]]])
    labels = torch.tensor([[-100, 1, -100], [-100, -100, 2]])
    # CE at (0, 1): -log(e^2 / (e + e^2 + 1)); at (1, 2): -log(2 / 4).
    ce = (-math.log(math.e ** 2 / (math.e + math.e ** 2 + 1)) - math.log(0.5)) / 2
    assert masked_lm_loss(logits, labels).item() == pytest.approx(ce, rel=1e-6)
    # Soft targets: momentum logits giving probabilities (1/2, 1/2, 0)-ish at (0, 1) and
    # uniform at (1, 2); soft CE = -sum(q * log p), averaged over predicted positions.
    logits_m = torch.zeros_like(logits)
    logits_m[0, 1] = torch.tensor([0.0, 0.0, -1e9])
    p01 = torch.tensor([1.0, 2.0, 0.0]).softmax(0)
    p12 = torch.tensor([0.25, 0.25, 0.5])
    soft = (-(0.5 * p01[0].log() + 0.5 * p01[1].log()) - (p12.log().sum() / 3)) / 2
    alpha = 0.4
    got = masked_lm_loss(logits, labels, logits_m, alpha)
    assert got.item() == pytest.approx((1 - alpha) * ce + alpha * soft.item(), rel=1e-6)
    # alpha 0 ignores the soft targets; no predicted position gives 0, not NaN, with a graph.
    assert masked_lm_loss(logits, labels, logits_m, 0.0).item() == pytest.approx(ce, rel=1e-6)
    empty = torch.randn(0, 3, requires_grad=True)
    loss = masked_lm_loss(empty, torch.zeros(0, dtype=torch.long), torch.randn(0, 3), alpha)
    assert loss.item() == 0.0
    loss.backward()
    assert empty.grad is not None


def test_mlm_head_is_tied_to_the_word_embeddings():
    embeddings = torch.nn.Embedding(30, 8)
    head = bert_mlm_head(embeddings)
    assert head.decoder.weight is embeddings.weight
    assert head.layer_norm.eps == 1e-12
    hidden = torch.randn(5, 8)
    expected = head.layer_norm(torch.nn.functional.gelu(head.dense(hidden))) @ embeddings.weight.T + head.bias
    torch.testing.assert_close(head(hidden), expected)
