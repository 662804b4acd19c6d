"""ALBEFForPretraining at a tiny size: gradients reach every trainable parameter and no momentum
copy, the MLM head is tied to the word embeddings, the MLM loss is what a hand-written pass
computes, identity ITC targets never make queued features positives, the EMA covers every copy."""

import pytest
import torch
import torch.nn.functional as F

from torchmm_ext.models.albef import ALBEFForPretraining, albef_model_for_pretraining, albef_model_for_retrieval
from torchmm_ext.modules.mlm import IGNORE_INDEX, mask_tokens

PAD, CLS, MASK = 0, 1, 3
TINY = dict(image_size=32, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2, vision_mlp_dim=64,
            text_width=32, text_layers=1, fusion_layers=1, text_heads=2, text_ffn_dim=64, vocab_size=50,
            embed_dim=16, pad_token_id=PAD, cls_token_id=CLS, mask_token_id=MASK)
MOMENTUM_COPIES = {"vision_encoder_m", "text_encoder_m", "fusion_encoder_m", "vision_proj_m", "text_proj_m",
                   "mlm_head_m"}


def _batch(batch_size=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch_size, 3, 32, 32, generator=g)
    input_ids = torch.randint(5, 50, (batch_size, length), generator=g)
    input_ids[:, 0] = CLS
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    attention_mask[1, 5:] = 0
    input_ids[1, 5:] = PAD
    return image, input_ids, attention_mask


def test_builder_and_tied_head():
    model = albef_model_for_pretraining("tiny", patch_size=16)
    assert isinstance(model, ALBEFForPretraining)
    assert model.mlm_head.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight
    assert model.mlm_head.layer_norm.eps == 1e-12 and model.mlm_head.decoder.out_features == 512
    assert model.mlm_probability == 0.15 and model.queue.size == 4096
    # The momentum head has its own (equal) weight: one EMA update per step for each tensor.
    assert model.mlm_head_m.decoder.weight is not model.text_encoder_m.embeddings.word_embeddings.weight
    torch.testing.assert_close(model.mlm_head_m.decoder.weight, model.text_encoder_m.embeddings.word_embeddings.weight)
    names = {n for n, _ in model.named_children()}
    assert names >= {"vision_encoder", "text_encoder", "fusion_encoder", "vision_proj", "text_proj", "itm_head",
                     "queue", "mlm_head"} | MOMENTUM_COPIES
    with pytest.raises(ValueError, match="unknown ALBEF preset"):
        albef_model_for_pretraining("huge")


@pytest.mark.parametrize("alpha,queue_size,online", [(0.4, 8, False), (0.0, 0, True)])
def test_forward_backward_reaches_every_trainable_parameter(alpha, queue_size, online):
    torch.manual_seed(0)
    model = albef_model_for_pretraining("tiny", queue_size=queue_size, itc_online_batch=online, **TINY)
    out = model(*_batch(), alpha=alpha)
    assert all(t.dim() == 0 and torch.isfinite(t) for t in out)
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_mlm + out.loss_itm)
    out.loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    assert not missing, missing
    frozen = {n.split(".")[0] for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    assert frozen == MOMENTUM_COPIES
    assert all(p.grad is None for n, p in model.named_parameters() if n.split(".")[0] in MOMENTUM_COPIES)


def test_mlm_loss_matches_a_hand_written_pass():
    torch.manual_seed(0)
    model = albef_model_for_pretraining("tiny", dropout=0.0, queue_size=0, momentum=1.0, **TINY)
    with torch.no_grad():  # make the momentum MLM head differ from the online one
        model.mlm_head_m.dense.weight.add_(torch.randn_like(model.mlm_head_m.dense.weight))
    image, ids, mask = _batch()
    alpha = 0.3
    torch.manual_seed(5)
    out = model(image, ids, mask, alpha=alpha)
    # Replay: the ITC/ITM part draws hard negatives (2 multinomial calls) before the masking.
    torch.manual_seed(5)
    model.itc_itm_losses(image, ids, mask, None, alpha)
    masked = mask_tokens(ids, 50, MASK, PAD, CLS, 0.15)
    with torch.no_grad():
        def logits_of(vision, text, fusion, head):
            image_emb = vision(image).last_hidden_state
            text_emb = text(masked.input_ids, attention_mask=mask.bool()).last_hidden_state
            return head(fusion(text_emb, mask, image_emb).last_hidden_state)  # every position
        logits = logits_of(model.vision_encoder, model.text_encoder, model.fusion_encoder, model.mlm_head)
        logits_m = logits_of(model.vision_encoder_m, model.text_encoder_m, model.fusion_encoder_m, model.mlm_head_m)
    chosen = masked.labels != IGNORE_INDEX
    assert chosen.any()
    ce = F.cross_entropy(logits.reshape(-1, 50), masked.labels.reshape(-1), ignore_index=IGNORE_INDEX)
    soft = -(F.softmax(logits_m, -1) * F.log_softmax(logits, -1)).sum(-1)[chosen].mean()
    assert not torch.allclose(soft, ce)
    torch.testing.assert_close(out.loss_mlm, (1 - alpha) * ce + alpha * soft, rtol=1e-4, atol=1e-5)


def test_identity_targets_never_make_queued_features_positives():
    torch.manual_seed(0)
    model = albef_model_for_pretraining("tiny", queue_size=8, **TINY)
    model(*_batch(), alpha=0.0)
    # Queued with the "nobody's positive" id, not 0..B-1 (which would match the next batch).
    assert model.queue.idx_queue[0, :4].tolist() == [-1, -1, -1, -1]
    assert (model.queue.idx_queue[0, 4:] == model.queue.empty_idx).all()
    idx = torch.tensor([7, 7, 8, 9])
    model(*_batch(), alpha=0.0, idx=idx)
    assert model.queue.idx_queue[0, 4:].tolist() == [7, 7, 8, 9]


def test_momentum_copies_follow_the_ema_and_reset():
    torch.manual_seed(0)
    model = albef_model_for_pretraining("tiny", momentum=0.9, queue_size=0, **TINY)
    online = [model.fusion_encoder.layer[0].cross_attention.q_proj.weight, model.mlm_head.dense.weight,
              model.text_encoder.embeddings.word_embeddings.weight]
    copies = [model.fusion_encoder_m.layer[0].cross_attention.q_proj.weight, model.mlm_head_m.dense.weight,
              model.text_encoder_m.embeddings.word_embeddings.weight]
    before = [c.clone() for c in copies]
    with torch.no_grad():
        for p in online:
            p.add_(1.0)
    model(*_batch(), alpha=0.0)
    for p, p_m, b in zip(online, copies, before):
        torch.testing.assert_close(p_m, 0.9 * b + 0.1 * p)
    # The tied decoder weight of the momentum head followed the same (single) EMA step.
    torch.testing.assert_close(model.mlm_head_m.decoder.weight, copies[2])
    assert model.copy_params_to_momentum(only=["mlm_head_m"]) == ["mlm_head_m"]
    torch.testing.assert_close(model.mlm_head_m.dense.weight, model.mlm_head.dense.weight)
    assert not torch.equal(copies[0], online[0])
    assert model.copy_params_to_momentum() == ["vision_encoder_m", "text_encoder_m", "vision_proj_m",
                                               "text_proj_m", "fusion_encoder_m", "mlm_head_m"]
    for module, module_m in zip(*model._momentum_pairs()):
        for p, p_m in zip(module.parameters(), module_m.parameters()):
            assert torch.equal(p, p_m)


def test_state_dict_loads_into_the_retrieval_model():
    torch.manual_seed(0)
    pre = albef_model_for_pretraining("tiny", queue_size=0, **TINY)
    sizes = {k: v for k, v in TINY.items() if k not in ("cls_token_id", "mask_token_id")}
    retrieval = albef_model_for_retrieval("tiny", queue_size=0, **sizes)
    missing, unexpected = retrieval.load_state_dict(pre.state_dict(), strict=False)
    assert not missing
    assert {k.split(".")[0] for k in unexpected} == {"mlm_head", "mlm_head_m", "fusion_encoder_m"}
    image, ids, mask = _batch()
    torch.testing.assert_close(retrieval.encode_image(image).features, pre.encode_image(image).features)
