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


FOCUS = (7, 11, 13, 17, 19)


def _focus_ids(rows=400, length=64, seed=0):
    # About a third of the tokens are focus ids, so both groups are large.
    ids = _ids(rows, length, seed)
    g = torch.Generator().manual_seed(seed + 100)
    pick = (torch.rand(ids.shape, generator=g) < 0.3) & (ids != PAD) & (ids != CLS)
    focus = torch.tensor(FOCUS)[torch.randint(len(FOCUS), ids.shape, generator=g)]
    return torch.where(pick, focus, ids)


def test_default_masking_is_the_bert_draw_sequence():
    # Recomputed from the generator's stream by hand: choose (rand < p on eligible tokens), then
    # [MASK] (rand < 0.8), then random (rand < 0.5) with a randint id. Focus ids at the same
    # probability as the others give the same result.
    ids = _focus_ids(rows=30)
    out = mask_tokens(ids, VOCAB, MASK, PAD, CLS, 0.15, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    chosen = (torch.rand(ids.shape, generator=g) < 0.15) & (ids != PAD) & (ids != CLS)
    to_mask = chosen & (torch.rand(ids.shape, generator=g) < 0.8)
    to_random = chosen & ~to_mask & (torch.rand(ids.shape, generator=g) < 0.5)
    random_ids = torch.randint(VOCAB, ids.shape, generator=g)
    expected = torch.where(to_random, random_ids, torch.where(to_mask, torch.full_like(ids, MASK), ids))
    assert torch.equal(out.input_ids, expected)
    assert torch.equal(out.labels, torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX)))
    same = mask_tokens(ids, VOCAB, MASK, PAD, CLS, 0.15, generator=torch.Generator().manual_seed(5),
                       focus_ids=FOCUS, focus_probability=0.15)
    assert torch.equal(same.input_ids, out.input_ids) and torch.equal(same.labels, out.labels)
    empty = mask_tokens(ids, VOCAB, MASK, PAD, CLS, 0.15, generator=torch.Generator().manual_seed(5), focus_ids=[])
    assert torch.equal(empty.labels, out.labels)


def test_focused_masking_rates_per_group():
    ids = _focus_ids()
    eligible = (ids != PAD) & (ids != CLS)
    is_focus = torch.isin(ids, torch.tensor(FOCUS))
    # Restricted to the focus words: exactly those, every one of them at probability 1.
    only = mask_tokens(ids, VOCAB, MASK, PAD, CLS, 0.0, focus_ids=FOCUS, focus_probability=1.0)
    assert torch.equal(only.labels != IGNORE_INDEX, is_focus & eligible)
    assert torch.equal(only.labels[is_focus], ids[is_focus])
    # A boost: focus tokens at 0.6, the others at 0.15 (5 binomial sd tolerance per group).
    out = mask_tokens(ids, VOCAB, MASK, PAD, CLS, 0.15, generator=torch.Generator().manual_seed(2),
                      focus_ids=list(FOCUS), focus_probability=0.6)
    chosen = out.labels != IGNORE_INDEX
    assert not (chosen & ~eligible).any()
    for group, p in ((is_focus & eligible, 0.6), (~is_focus & eligible, 0.15)):
        n = int(group.sum())
        assert n > 5_000
        rate = int((chosen & group).sum()) / n
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), (rate, p)
    # Chosen focus tokens are still 80% [MASK].
    m = int((chosen & is_focus).sum())
    frac = int(((out.input_ids == MASK) & chosen & is_focus).sum()) / m
    assert abs(frac - 0.8) < 5 * math.sqrt(0.16 / m), frac


def test_focused_masking_bad_settings():
    ids = _ids(rows=2)
    with pytest.raises(ValueError, match="focus_ids given without focus_probability"):
        mask_tokens(ids, VOCAB, MASK, PAD, CLS, focus_ids=FOCUS)
    with pytest.raises(ValueError, match=r"focus_probability must be in \[0, 1\], got 1.5"):
        mask_tokens(ids, VOCAB, MASK, PAD, CLS, focus_ids=FOCUS, focus_probability=1.5)


def _word_tokenizer(tmp_path):
    from torchmm_ext.data.tokenizer import build_tokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "star", "and", "tri", "##angle"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    return build_tokenizer(str(tmp_path))


def test_collator_masks_only_the_focus_words(tmp_path):
    from torchmm_ext.data.vl_tasks import MLMITMCollator

    tok = _word_tokenizer(tmp_path)
    samples = [(torch.zeros(3, 8, 8), "a red circle and a blue star"), (torch.ones(3, 8, 8), "a blue circle")] * 8
    torch.manual_seed(0)
    batch = MLMITMCollator(tok, mlm_probability=0.0, mlm_focus_words=["Red", "blue"], mlm_focus_probability=1.0)(samples)
    colour_ids = torch.tensor(tok.convert_tokens_to_ids(["red", "blue"]))
    is_colour = torch.isin(batch["input_ids"], colour_ids)
    assert is_colour.sum() == 8 * 3
    assert torch.equal(batch["mlm_labels"] != IGNORE_INDEX, is_colour)
    torch.manual_seed(0)
    plain = MLMITMCollator(tok, mlm_probability=0.5)(samples)
    torch.manual_seed(0)
    same = MLMITMCollator(tok, mlm_probability=0.5, mlm_focus_words=["red"], mlm_focus_probability=0.5)(samples)
    assert torch.equal(plain["mlm_labels"], same["mlm_labels"]) and torch.equal(plain["itm_labels"], same["itm_labels"])
    with pytest.raises(ValueError, match=r"'triangle' is not one token .*'tri', '##angle'"):
        MLMITMCollator(tok, mlm_focus_words=["triangle"], mlm_focus_probability=0.5)
    with pytest.raises(ValueError, match=r"'green' is not one token"):
        MLMITMCollator(tok, mlm_focus_words=["green"], mlm_focus_probability=0.5)
    with pytest.raises(ValueError, match="mlm_focus_probability is not"):
        MLMITMCollator(tok, mlm_focus_words=["red"])


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
