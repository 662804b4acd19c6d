"""ELIP on the ALBEF models: the text CLS guides the ViT, fusion and ITM read the reduced tokens,
the momentum ViT keeps every token unless asked, keep ratio 1.0 changes nothing, retrieval
evaluation with pruning equals a per-pair computation, and the pieces that need the patch grid
refuse."""

from types import SimpleNamespace

import pytest
import torch

from torchmm_ext.engine.efficiency import MethodsConfig, prepare_model
from torchmm_ext.evaluation.grounding import itm_gradcam
from torchmm_ext.evaluation.retrieval import evaluate_retrieval
from torchmm_ext.models.albef import albef_model_for_pretraining, albef_model_for_retrieval, albef_model_for_ve
from torchmm_ext.modules.efficiency import applied_methods
from torchmm_ext.modules.token_pruning import apply_token_pruning

SIZES = dict(vocab_size=64, image_size=32, patch_size=8, vision_width=32, vision_depth=4, vision_heads=4,
             vision_mlp_dim=64, text_width=32, text_layers=1, fusion_layers=1, text_heads=4,
             text_ffn_dim=64, embed_dim=16, queue_size=12)
SCHEDULE = dict(begin_layers=[1, 2, 3], keep_ratios=[0.75, 0.5, 0.25])  # 16 patches: 17, 14, 10, 6


def build(builder=albef_model_for_retrieval, seed=0, **kw):
    torch.manual_seed(seed)
    model = builder("tiny", **{**SIZES, **kw})
    with torch.no_grad():  # momentum weights that differ from their online twins
        for p in model.vision_encoder_m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def batch(b=4, length=7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (b, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 5:], ids[1, 5:] = 0, 0
    return torch.randn(b, 3, 32, 32, generator=g), ids, mask, torch.tensor([0, 0, 1, 2])


def output_lengths(module):
    lengths = []
    module.register_forward_hook(lambda m, a, out: lengths.append(out.last_hidden_state.shape[1]))
    return lengths


@pytest.mark.parametrize("prune_momentum", [False, True])
def test_momentum_vit_keeps_every_token_by_default_and_is_pruned_on_request(prune_momentum):
    model = build(dropout=0.0)
    report = apply_token_pruning(model, **SCHEDULE, prune_momentum=prune_momentum)
    assert report.encoders == ["vision_encoder"] + (["vision_encoder_m"] if prune_momentum else [])
    online, momentum = output_lengths(model.vision_encoder), output_lengths(model.vision_encoder_m)
    guidance = []
    model.vision_encoder_m.register_forward_pre_hook(
        lambda m, a, kw: guidance.append(kw["guidance"]), with_kwargs=True)
    out = model.itc_itm_losses(*batch(), alpha=0.4)
    assert online == [6] and out.image_embeddings.shape[1] == 6
    assert momentum == [6 if prune_momentum else 17] and out.image_embeddings_m.shape[1] == momentum[0]
    # The momentum ViT gets the momentum text CLS as its guidance (as published).
    text_m = model.text_encoder_m(batch()[1], attention_mask=batch()[2].bool()).last_hidden_state[:, 0]
    torch.testing.assert_close(guidance[0], text_m)


def test_text_cls_guides_the_online_vit_and_itm_reads_the_reduced_tokens(monkeypatch):
    model = build(dropout=0.0)
    apply_token_pruning(model, **SCHEDULE)
    seen = {}
    calls = model.vision_encoder.forward

    def spy_vit(image, guidance=None, **kw):
        seen["guidance"] = guidance
        return calls(image, guidance=guidance, **kw)

    monkeypatch.setattr(model.vision_encoder, "forward", spy_vit)
    fusion = model.fusion_encoder.forward

    def spy_fusion(text, mask, image_embeddings, **kw):
        seen.setdefault("fusion", []).append(image_embeddings.shape)
        return fusion(text, mask, image_embeddings, **kw)

    monkeypatch.setattr(model.fusion_encoder, "forward", spy_fusion)
    image, ids, mask, idx = batch()
    out = model(image, ids, mask, idx, alpha=0.4)
    text_cls = model.text_encoder(ids, attention_mask=mask.bool()).last_hidden_state[:, 0]
    torch.testing.assert_close(seen["guidance"], text_cls)
    # One ITM pass over 3B pairs reads the 4 images' 6 reduced tokens.
    assert seen["fusion"] == [torch.Size([4, 6, 32])]
    out.loss.backward()
    vit = model.vision_encoder
    for name, p in vit.named_parameters():  # every ViT weight is reached through kept + merged tokens
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_pretraining_step_with_pruning_runs_forward_and_backward():
    model = build(albef_model_for_pretraining, mask_token_id=3, cls_token_id=2, pad_token_id=0)
    apply_token_pruning(model, **SCHEDULE)
    online, momentum = output_lengths(model.vision_encoder), output_lengths(model.vision_encoder_m)
    image, ids, mask, _ = batch()
    out = model(image, ids, mask, alpha=0.4)
    assert torch.isfinite(out.loss) and online == [6] and momentum == [17]
    out.loss.backward()
    assert model.vision_encoder.blocks[3].attention.input_proj.weight.grad.abs().sum() > 0


def test_keep_ratio_one_everywhere_reproduces_the_unpruned_model_exactly():
    plain, pruned = build(), build()
    apply_token_pruning(pruned, [1, 2, 3], [1.0, 1.0, 1.0], prune_momentum=True)
    for model in (plain, pruned):
        torch.manual_seed(1)
        model.out = model(*batch(), alpha=0.4)
    assert torch.equal(plain.out.loss_itc, pruned.out.loss_itc)
    assert torch.equal(plain.out.loss_itm, pruned.out.loss_itm)


def test_models_that_do_not_pass_text_guidance_need_guidance_weight_zero():
    model = albef_model_for_ve("tiny", **{k: v for k, v in SIZES.items() if k not in ("embed_dim", "queue_size")})
    with pytest.raises(ValueError, match=r"token_pruning.guidance_weight=0.2: ALBEFForVE does not pass text"):
        apply_token_pruning(model, **SCHEDULE)
    report = apply_token_pruning(model, **SCHEDULE, guidance_weight=0.0)
    assert report.encoders == ["vision_encoder"]


def test_a_pruned_checkpoint_record_does_not_force_pruning_downstream(tmp_path):
    source = build()
    apply_token_pruning(source, **SCHEDULE)
    path = tmp_path / "pruned.pth"
    torch.save({"model": source.state_dict(), "methods": applied_methods(source)}, path)
    logs = []
    plain = build(seed=1)
    prepare_model(plain, MethodsConfig(), str(path), log=logs.append)
    assert not len(plain.vision_encoder.token_reducers) and "changes no weights" in logs[0]
    torch.testing.assert_close(plain.vision_encoder.blocks[0].attention.input_proj.weight,
                               source.vision_encoder.blocks[0].attention.input_proj.weight)
    # A config section with other settings than the record is fine: the config decides.
    pruned = build(seed=1)
    prepare_model(pruned, MethodsConfig(token_pruning=dict(begin_layers=[2], keep_ratios=[0.5])), str(path))
    assert list(pruned.vision_encoder.token_reducers) == ["1"]


class WordTokenizer:
    def __call__(self, texts, padding="longest", truncation=True, max_length=30, return_tensors="pt"):
        ids = [[2] + [5 + (sum(map(ord, w)) % 50) for w in t.split()][: max_length - 1] for t in texts]
        length = max(map(len, ids))
        input_ids = torch.zeros(len(ids), length, dtype=torch.long)
        mask = torch.zeros(len(ids), length, dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, : len(x)], mask[r, : len(x)] = torch.tensor(x), 1
        return {"input_ids": input_ids, "attention_mask": mask}


def test_retrieval_evaluation_with_pruning_matches_a_per_pair_computation():
    model = build()
    apply_token_pruning(model, **SCHEDULE)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(5, 3, 32, 32, generator=g)
    words = "red blue green circle square left right small big the a".split()
    text = [" ".join(words[int(j)] for j in torch.randint(0, len(words), (int(n),), generator=g))
            for n in torch.randint(2, 7, (10,), generator=g)]
    dataset = SimpleNamespace(text=text, txt2img=[i // 2 for i in range(10)], img2txt=[[2 * i, 2 * i + 1] for i in range(5)])
    loader = [(images[s:s + 2], torch.arange(s, min(s + 2, 5))) for s in range(0, 5, 2)]
    tokenizer = WordTokenizer()
    out = evaluate_retrieval(model, loader, dataset, tokenizer, device="cpu", k_test=3, text_batch_size=4,
                             itm_batch_size=5, show_progress=False)
    assert model.training  # restored
    # Brute force: every image alone through the pruned ViT (eval: scored by its own CLS), every
    # text alone, every pair through the fusion encoder.
    model.eval()
    with torch.no_grad():
        img = [model.encode_image(images[i:i + 1]) for i in range(5)]
        assert img[0].embeddings.shape[1] == 6
        itm, sims = torch.zeros(5, 10), torch.zeros(5, 10)
        for t, caption in enumerate(text):
            tok = tokenizer([caption])
            enc = model.encode_text(tok["input_ids"], tok["attention_mask"])
            for i in range(5):
                itm[i, t] = model.itm_scores(img[i].embeddings, enc.embeddings, tok["attention_mask"])[0]
                sims[i, t] = img[i].features[0] @ enc.features[0]
    torch.testing.assert_close(out.sims, sims, atol=1e-5, rtol=1e-5)
    top = out.sims.topk(3, dim=1).indices
    torch.testing.assert_close(out.scores_i2t.gather(1, top), itm.gather(1, top), atol=1e-5, rtol=1e-5)
    top = out.sims.t().topk(3, dim=1).indices
    torch.testing.assert_close(out.scores_t2i.gather(1, top), itm.t().gather(1, top), atol=1e-5, rtol=1e-5)
    assert ((out.scores_i2t != -100).sum(1) == 3).all()


def test_grounding_gradcam_refuses_a_pruned_grid_unless_evaluation_keeps_every_token():
    image, ids, mask, _ = batch()
    model = build()
    apply_token_pruning(model, **SCHEDULE)
    model.eval()
    with pytest.raises(ValueError, match="full patch grid.*token_pruning"):
        itm_gradcam(model, image, ids, mask, layer=0)
    model = build()
    apply_token_pruning(model, **SCHEDULE, eval_pruning=False)
    model.eval()
    assert itm_gradcam(model, image, ids, mask, layer=0).maps.shape == (4, 4, 4)
