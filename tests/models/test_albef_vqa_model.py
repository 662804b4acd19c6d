"""ALBEFForVQA at a tiny size: the answer ranking against brute-force scoring of every answer,
the weighted sequence loss against a per-token recomputation, causal masking, gradients, and
the decoder initialisation from the fusion layers."""

import pytest
import torch
import torch.nn.functional as F

from torchmm_ext.models.albef import albef_model_for_vqa, ALBEFAnswerDecoder, ALBEFForVQA

TINY = dict(image_size=32, patch_size=16, vision_width=32, vision_depth=1, vision_heads=2, vision_mlp_dim=64,
            text_width=32, text_layers=1, fusion_layers=2, text_heads=2, text_ffn_dim=64, vocab_size=40)
CLS, SEP, PAD = 2, 3, 0


def _questions(seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(3, 3, 32, 32, generator=g)
    question_ids = torch.randint(5, 40, (3, 6), generator=g)
    question_ids[:, 0] = CLS
    question_mask = torch.ones(3, 6, dtype=torch.long)
    question_mask[1, 4:] = 0  # a padded question
    question_ids[1, 4:] = PAD
    return image, question_ids, question_mask


def _answer_list():
    # "[CLS] answer [SEP] [SEP]" as the tokenizer gives "answer[SEP]"; answers 0-2 share their
    # first token (like "top", "top left", "top right"), so the re-scoring decides between them.
    answers = [[10], [10, 11], [10, 12], [13], [14, 15, 16], [17]]
    length = 2 + max(map(len, answers)) + 1
    ids = torch.full((len(answers), length), PAD)
    for i, a in enumerate(answers):
        ids[i, : len(a) + 3] = torch.tensor([CLS, *a, SEP, SEP])
    return ids, (ids != PAD).long()


def _model(**kwargs):
    torch.manual_seed(0)
    return albef_model_for_vqa("tiny", dropout=0.0, **{**TINY, **kwargs})


def test_builder_names_and_tied_lm_head():
    model = _model()
    assert isinstance(model, ALBEFForVQA) and isinstance(model.answer_decoder, ALBEFAnswerDecoder)
    children = {n for n, _ in model.named_children()}
    assert children == {"vision_encoder", "text_encoder", "fusion_encoder", "answer_decoder",
                        "vision_encoder_m", "text_encoder_m", "fusion_encoder_m", "answer_decoder_m"}
    decoder = model.answer_decoder
    assert {n for n, _ in decoder.named_children()} == {"embeddings", "layers", "lm_head"}
    assert len(decoder.layers.layer) == 2 and decoder.layers.causal  # decoder_layers = fusion_layers
    assert decoder.lm_head.decoder.weight is decoder.embeddings.word_embeddings.weight
    assert model.answer_decoder_m.lm_head.decoder.weight is model.answer_decoder_m.embeddings.word_embeddings.weight
    assert decoder.lm_head.layer_norm.eps == 1e-12
    assert len(albef_model_for_vqa("tiny", decoder_layers=3, distill=False, **TINY).answer_decoder.layers.layer) == 3
    assert not any(n.endswith("_m") for n, _ in albef_model_for_vqa("tiny", distill=False, **TINY).named_children())


def _brute_force_scores(model, image, question_ids, question_mask, answer_ids, answer_mask):
    """ALBEF's answer score for every (question, answer), one unpadded answer at a time, token by
    token from the logits: log p(first) + sum_{t >= 1} log p(token_t | tokens_<t)."""
    states = model.encode_question(image, question_ids, question_mask)
    scores = torch.empty(states.size(0), answer_ids.size(0))
    for q in range(states.size(0)):
        for a in range(answer_ids.size(0)):
            ids = answer_ids[a, : int(answer_mask[a].sum())][None]
            logits = model.answer_decoder(ids, torch.ones_like(ids), states[q : q + 1], question_mask[q : q + 1])
            log_probs = F.log_softmax(logits[0].float(), dim=-1)
            token_lp = [log_probs[t - 1, ids[0, t]] for t in range(1, ids.size(1))]
            scores[q, a] = token_lp[0] + sum(token_lp)
    return scores


def test_rank_answers_equals_brute_force_scoring_of_every_answer():
    model = _model().eval()
    with torch.no_grad():  # sharpen the decoder so that answers' scores are well apart
        model.answer_decoder.lm_head.dense.weight.mul_(8.0)
    image, question_ids, question_mask = _questions()
    answer_ids, answer_mask = _answer_list()
    num_answers = answer_ids.size(0)
    with torch.no_grad():
        expected = _brute_force_scores(model, image, question_ids, question_mask, answer_ids, answer_mask)
        top_ids, scores = model.rank_answers(image, question_ids, question_mask, answer_ids, answer_mask, k=num_answers)
    assert top_ids.shape == scores.shape == (3, num_answers)
    assert sorted(top_ids[0].tolist()) == list(range(num_answers))
    assert torch.equal(top_ids[:, 0], expected.argmax(dim=1))
    torch.testing.assert_close(scores, expected.gather(1, top_ids), rtol=1e-4, atol=1e-4)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    # With a smaller k only the k best first tokens are re-scored: scores of those still match.
    with torch.no_grad():
        top3, scores3 = model.rank_answers(image, question_ids, question_mask, answer_ids, answer_mask, k=3)
    assert top3.shape == (3, 3)
    torch.testing.assert_close(scores3, expected.gather(1, top3), rtol=1e-4, atol=1e-4)


def test_later_answer_tokens_do_not_change_earlier_logits():
    model = _model().eval()
    image, question_ids, question_mask = _questions()
    answer_ids, answer_mask = _answer_list()
    ids = answer_ids[4:5].repeat(3, 1)  # [CLS] 14 15 16 [SEP] [SEP]
    mask = answer_mask[4:5].repeat(3, 1)
    changed = ids.clone()
    changed[:, 3] = 30  # token 3 changes: logits at positions 0..2 must not
    with torch.no_grad():
        states = model.encode_question(image, question_ids, question_mask)
        a = model.answer_decoder(ids, mask, states, question_mask)
        b = model.answer_decoder(changed, mask, states, question_mask)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def _train_batch():
    image, question_ids, question_mask = _questions()
    answer_ids, answer_mask = _answer_list()
    pick = torch.tensor([0, 1, 3, 4, 5])  # question 0: two answers, question 1: one, question 2: two
    weights = torch.tensor([0.7, 0.3, 1.0, 0.5, 0.5])
    question_index = torch.tensor([0, 0, 1, 2, 2])
    return image, question_ids, question_mask, answer_ids[pick], answer_mask[pick], weights, question_index


def _per_token_nll(logits, answer_ids, answer_mask):
    out = []
    for i in range(answer_ids.size(0)):
        n = int(answer_mask[i].sum())
        lp = F.log_softmax(logits[i].float(), dim=-1)
        out.append(-sum(lp[t - 1, answer_ids[i, t]] for t in range(1, n)))
    return torch.stack(out)


def test_loss_is_weighted_sequence_nll_over_batch_size():
    model = _model(distill=False)
    batch = _train_batch()
    out = model(*batch, alpha=0.0)
    nll = _per_token_nll(out.logits, batch[3], batch[4])
    torch.testing.assert_close(out.answer_nll, nll)
    torch.testing.assert_close(out.loss, (batch[5] * nll).sum() / 3)
    # each answer reads its own question's states: the same as a separate forward per answer
    states = model.encode_question(*batch[:3])
    alone = model.answer_decoder(batch[3][3:4], batch[4][3:4], states[2:3], batch[2][2:3])
    torch.testing.assert_close(out.logits[3:4], alone, rtol=1e-5, atol=1e-5)


def test_loss_mixes_nll_and_momentum_soft_targets():
    model = _model(momentum=1.0)  # momentum 1: the copies stay put
    with torch.no_grad():
        for p in model.answer_decoder_m.lm_head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    batch = _train_batch()
    alpha = 0.4
    out = model(*batch, alpha=alpha)
    with torch.no_grad():
        states_m = ALBEFForVQA._question_states(model.vision_encoder_m, model.text_encoder_m,
                                                model.fusion_encoder_m, *batch[:3])
        logits_m = model.answer_decoder_m(batch[3], batch[4], states_m, batch[2], batch[6])
    soft = []
    for i in range(batch[3].size(0)):
        n = int(batch[4][i].sum())
        p_m = F.softmax(logits_m[i, : n - 1], dim=-1)
        soft.append(-(p_m * F.log_softmax(out.logits[i, : n - 1], dim=-1)).sum())
    per_answer = (1 - alpha) * _per_token_nll(out.logits, batch[3], batch[4]) + alpha * torch.stack(soft)
    torch.testing.assert_close(out.loss, (batch[5] * per_answer).sum() / 3)


@pytest.mark.parametrize("distill", [True, False])
def test_forward_backward_reaches_every_trainable_parameter(distill):
    model = _model(distill=distill)
    out = model(*_train_batch(), alpha=0.4)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(not n.split(".")[0].endswith("_m") for n, _ in trainable)
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    assert not missing, missing
    frozen = {n.split(".")[0] for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    assert frozen == ({"vision_encoder_m", "text_encoder_m", "fusion_encoder_m", "answer_decoder_m"} if distill else set())
    assert all(p.grad is None for n, p in model.named_parameters() if n.split(".")[0].endswith("_m"))


def test_decoder_init_copies_fusion_layers_embeddings_and_mlm_head():
    model = _model()
    mlm_head = {k: torch.randn_like(v) for k, v in model.answer_decoder.lm_head.state_dict().items()
                if k not in ("decoder.weight", "decoder.bias")}  # a pre-training head: bias only once
    done = model.init_answer_decoder_from_encoder(mlm_head)
    online = ["embeddings", "layers.layer.0", "layers.layer.1", "lm_head"]
    assert model.distill and done == online + [f"answer_decoder_m.{name}" for name in online]
    decoder = model.answer_decoder
    for key, value in model.text_encoder.embeddings.state_dict().items():
        torch.testing.assert_close(decoder.embeddings.state_dict()[key], value, rtol=0, atol=0)
    for i in range(2):
        source = model.fusion_encoder.layer[i].state_dict()
        target = decoder.layers.layer[i].state_dict()
        assert source.keys() == target.keys()
        for key in source:
            assert torch.equal(target[key], source[key]), (i, key)
    for key in ("dense.weight", "dense.bias", "layer_norm.weight", "layer_norm.bias", "bias"):
        assert torch.equal(decoder.lm_head.state_dict()[key], mlm_head[key]), key
    assert torch.equal(decoder.lm_head.decoder.bias, mlm_head["bias"])
    assert torch.equal(decoder.lm_head.decoder.weight, model.text_encoder.embeddings.word_embeddings.weight)
    for key, value in decoder.state_dict().items():  # the momentum decoder follows
        assert torch.equal(model.answer_decoder_m.state_dict()[key], value), key


def test_decoder_init_leaves_cross_attention_fresh_when_widths_differ():
    model = _model(vision_width=48, distill=False)
    before = model.answer_decoder.layers.layer[0].cross_attention.k_proj.weight.clone()
    done = model.init_answer_decoder_from_encoder()
    assert done[1].startswith("layers.layer.0 (fresh cross_attention.k_proj.weight")
    assert torch.equal(model.answer_decoder.layers.layer[0].cross_attention.k_proj.weight, before)
    assert torch.equal(model.answer_decoder.layers.layer[0].cross_attention.q_proj.weight,
                       model.fusion_encoder.layer[0].cross_attention.q_proj.weight)
    with pytest.raises(ValueError, match="does not fit the LM head"):
        model.init_answer_decoder_from_encoder({"dense.weight": torch.zeros(32, 32), "extra": torch.zeros(1)})
