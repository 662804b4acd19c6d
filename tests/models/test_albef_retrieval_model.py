import pytest
import torch
import torch.nn.functional as F

from torchmm_ext.models.albef import albef_model_for_retrieval, ALBEF_PRESETS


def tiny(**kw):
    args = dict(vocab_size=64, image_size=32, patch_size=8, vision_width=32, vision_depth=2,
                vision_heads=4, vision_mlp_dim=64, text_width=32, text_layers=1, fusion_layers=1,
                text_heads=4, text_ffn_dim=64, embed_dim=16, queue_size=12)
    args.update(kw)
    return albef_model_for_retrieval("tiny", **args)


def batch(b=4, length=7, vocab=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (b, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    return torch.randn(b, 3, 32, 32, generator=g), ids, mask, torch.tensor([0, 0, 1, 2])


def test_presets_and_unknown_preset():
    assert ALBEF_PRESETS["base"]["vision_width"] == 768 and ALBEF_PRESETS["base"]["image_size"] == 384
    with pytest.raises(ValueError, match="unknown ALBEF preset 'huge'.*base.*tiny"):
        albef_model_for_retrieval("huge")


def test_encode_and_score_shapes():
    model = tiny().eval()
    images, ids, mask, _ = batch()
    img = model.encode_image(images)
    txt = model.encode_text(ids, mask)
    assert img.embeddings.shape == (4, 17, 32) and img.features.shape == (4, 16)
    assert txt.embeddings.shape == (4, 7, 32) and txt.features.shape == (4, 16)
    torch.testing.assert_close(img.features.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.features.norm(dim=-1), torch.ones(4))
    # Indexed ITM equals ITM on explicitly gathered images.
    index = torch.tensor([1, 1, 3, 0])
    gathered = model.itm_scores(img.embeddings[index], txt.embeddings, mask)
    indexed = model.itm_scores(img.embeddings, txt.embeddings, mask, image_index=index)
    assert indexed.shape == (4,)
    torch.testing.assert_close(indexed, gathered, atol=1e-5, rtol=1e-5)


def test_momentum_copies_start_equal_and_are_frozen():
    model = tiny()
    for online, copy in zip(*model._momentum_pairs()):
        for p, p_m in zip(online.parameters(), copy.parameters()):
            assert torch.equal(p, p_m) and not p_m.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith("_m") or "_m." in n for n in trainable)
    assert "temp" in trainable


def test_forward_updates_momentum_and_queue():
    torch.manual_seed(0)
    model = tiny(momentum=0.5, dropout=0.0)
    images, ids, mask, idx = batch()
    with torch.no_grad():  # move the online weights away from the momentum copy
        for p in model.vision_proj.parameters():
            p.add_(1.0)
    online_w = model.vision_proj.weight.detach().clone()
    momentum_w = model.vision_proj_m.weight.detach().clone()
    out = model(images, ids, mask, idx, alpha=0.4)
    assert torch.isfinite(out.loss) and out.loss > 0
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_itm)
    torch.testing.assert_close(model.vision_proj_m.weight, 0.5 * momentum_w + 0.5 * online_w)
    assert int(model.queue.ptr) == 4
    assert model.queue.idx_queue[0, :4].tolist() == idx.tolist()
    assert (model.queue.idx_queue[0, 4:] == -100).all()
    # The queued text features are the momentum encoder's, normalised.
    with torch.no_grad():
        text_m = model.text_encoder_m(ids, attention_mask=mask.bool()).last_hidden_state[:, 0]
        expected = F.normalize(model.text_proj_m(text_m), dim=-1)
    torch.testing.assert_close(model.queue.text_queue[:, :4].T, expected, atol=1e-5, rtol=1e-5)


def test_itm_loss_is_cross_entropy_over_positives_and_hard_negatives(monkeypatch):
    # With fixed negatives, the ITM loss equals cross-entropy of the ITM head on the
    # [positive; (text, negative image); (negative text, image)] pairs, computed separately.
    import torchmm_ext.models.albef.retrieval as albef
    from torchmm_ext.modules.losses import HardNegatives

    model = tiny().eval()  # no dropout
    images, ids, mask, idx = batch()
    neg = HardNegatives(image_for_text=torch.tensor([2, 3, 0, 1]), text_for_image=torch.tensor([3, 2, 1, 0]))
    monkeypatch.setattr(albef, "sample_hard_negatives", lambda *a, **kw: neg)
    out = model(images, ids, mask, idx, alpha=0.0)
    with torch.no_grad():
        img = model.encode_image(images).embeddings
        txt = model.encode_text(ids, mask).embeddings
        logits = torch.cat([
            model.itm_logits(img, txt, mask),
            model.itm_logits(img[neg.image_for_text], txt, mask),
            model.itm_logits(img, txt[neg.text_for_image], mask[neg.text_for_image]),
        ])
    labels = torch.tensor([1] * 4 + [0] * 8)
    torch.testing.assert_close(out.loss_itm, F.cross_entropy(logits, labels), atol=1e-5, rtol=1e-5)


def test_temperature_is_clamped():
    model = tiny(temp=0.9)
    images, ids, mask, idx = batch()
    model(images, ids, mask, idx)
    assert float(model.temp) == pytest.approx(0.5)


def test_backward_reaches_every_trainable_parameter():
    model = tiny()
    images, ids, mask, idx = batch()
    model(images, ids, mask, idx, alpha=0.4).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def _in_batch_itc(image_feat, text_cols, text_feat, image_cols, temp):
    targets = torch.eye(image_feat.size(0))
    i2t = -(F.log_softmax(image_feat @ text_cols.T / temp, dim=1) * targets).sum(1).mean()
    t2i = -(F.log_softmax(text_feat @ image_cols.T / temp, dim=1) * targets).sum(1).mean()
    return (i2t + t2i) / 2


def test_empty_queue_slots_are_not_negatives():
    # A fresh queue holds only empty slots: the ITC loss is then the in-batch loss against
    # the momentum features, as if there were no queue at all.
    model = tiny(momentum=0.0, dropout=0.0).eval()
    images, ids, mask, _ = batch()
    idx = torch.arange(4)
    out = model(images, ids, mask, idx, alpha=0.0)
    with torch.no_grad():
        img, txt = model.encode_image(images).features, model.encode_text(ids, mask).features
    # momentum=0: the momentum copies equal the online encoders.
    torch.testing.assert_close(out.loss_itc, _in_batch_itc(img, txt, txt, img, model.temp), atol=1e-5, rtol=1e-5)


def test_no_queue_and_online_batch_columns():
    images, ids, mask, _ = batch()
    idx = torch.arange(4)
    losses = {}
    for online in (True, False):
        torch.manual_seed(0)
        model = tiny(queue_size=0, itc_online_batch=online, dropout=0.0).eval()
        with torch.no_grad():  # online projections move away from their momentum copies
            model.text_proj.weight.add_(torch.randn_like(model.text_proj.weight))
            model.vision_proj.weight.add_(torch.randn_like(model.vision_proj.weight))
        losses[online] = model(images, ids, mask, idx, alpha=0.0).loss_itc
        img, txt = model.encode_image(images).features, model.encode_text(ids, mask).features
        if online:
            expected = _in_batch_itc(img, txt, txt, img, model.temp)
            torch.testing.assert_close(losses[online], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(losses[True], losses[False])


def test_momentum_forward_skipped_only_when_nothing_reads_it():
    # No queue + online batch columns: the momentum encoders run only for distillation
    # (alpha > 0). Skipping them must not change the losses (alpha 1e-9 runs them, and in eval
    # mode they draw no random numbers, so the same hard negatives are sampled) nor the EMA.
    images, ids, mask, idx = batch()
    calls = []
    outputs, momentum_weights = {}, {}
    for alpha in (0.0, 1e-9):
        torch.manual_seed(0)
        model = tiny(queue_size=0, itc_online_batch=True, momentum=0.5, dropout=0.0).eval()
        with torch.no_grad():  # online weights away from their momentum twins
            for p in model.vision_encoder.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model.vision_encoder_m.register_forward_hook(lambda *_: calls.append(alpha))
        model.text_encoder_m.register_forward_hook(lambda *_: calls.append(alpha))
        torch.manual_seed(1)
        outputs[alpha] = model.itc_itm_losses(images, ids, mask, idx, alpha)
        momentum_weights[alpha] = model.vision_encoder_m.blocks[0].attention.input_proj.weight.detach().clone()
    assert calls == [1e-9, 1e-9]
    assert outputs[0.0].image_embeddings_m is None and outputs[1e-9].image_embeddings_m is not None
    torch.testing.assert_close(outputs[0.0].loss_itc, outputs[1e-9].loss_itc, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outputs[0.0].loss_itm, outputs[1e-9].loss_itm)
    torch.testing.assert_close(momentum_weights[0.0], momentum_weights[1e-9])
    online = model.vision_encoder.blocks[0].attention.input_proj.weight
    assert not torch.allclose(momentum_weights[0.0], online)  # the EMA moved half-way, not a copy
    # With a queue the momentum features are enqueued: they run even at alpha 0.
    calls.clear()
    model = tiny(queue_size=8, itc_online_batch=True).eval()
    model.vision_encoder_m.register_forward_hook(lambda *_: calls.append("queue"))
    model.itc_itm_losses(images, ids, mask, idx, 0.0)
    assert calls == ["queue"] and int(model.queue.ptr) == 4


def test_itm_uniform_negatives_reach_the_sampler(monkeypatch):
    import torchmm_ext.models.albef.retrieval as retrieval

    seen = []
    sampler = retrieval.sample_hard_negatives
    monkeypatch.setattr(retrieval, "sample_hard_negatives",
                        lambda *a, **kw: seen.append(kw["uniform_mix"]) or sampler(*a, **kw))
    images, ids, mask, idx = batch()
    tiny(queue_size=0, itc_online_batch=True, itm_uniform_negatives=0.25)(images, ids, mask, idx)
    tiny()(images, ids, mask, idx)
    assert seen == [0.25, 0.0]
    with pytest.raises(ValueError, match="itm_uniform_negatives must be in"):
        tiny(itm_uniform_negatives=-0.1)


def test_itm_weight_scales_only_the_itm_term_of_the_loss():
    # Same weights, same sampled negatives: the parts are unchanged and the total weighs ITM.
    images, ids, mask, idx = batch()
    plain = tiny(queue_size=0, itc_online_batch=True).eval()
    weighted = tiny(queue_size=0, itc_online_batch=True, itm_weight=0.5).eval()
    weighted.load_state_dict(plain.state_dict())
    torch.manual_seed(3)
    a = plain(images, ids, mask, idx)
    torch.manual_seed(3)
    b = weighted(images, ids, mask, idx)
    torch.testing.assert_close(b.loss_itc, a.loss_itc)
    torch.testing.assert_close(b.loss_itm, a.loss_itm)
    torch.testing.assert_close(b.loss, a.loss_itc + 0.5 * a.loss_itm)
    assert not torch.allclose(b.loss, a.loss)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_training_step_on_cuda_matches_cpu_loss():
    torch.manual_seed(0)
    model = tiny(dropout=0.0)
    images, ids, mask, idx = batch()
    cpu_loss = model.eval()(images, ids, mask, idx).loss_itc
    torch.manual_seed(0)
    model = tiny(dropout=0.0).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.eval()(images.cuda(), ids.cuda(), mask.cuda(), idx.cuda())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss_itc.float().cpu(), cpu_loss, atol=5e-2, rtol=5e-2)
