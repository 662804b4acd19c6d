"""ViLT checkpoint layouts: the original (dandelin/ViLT ``state_dict`` key names and shapes as
published), Hugging Face's, and ours; detection, load reports, exact round trips, ViLT's task
starting points (NLVR2's third modality row, IRTR's rank_output) and other architectures."""

import pytest
import torch
from transformers import ViltForImagesAndTextClassification, ViltForQuestionAnswering

from torchmm_ext.checkpoints import detect_layout, load_pretrained
from torchmm_ext.checkpoints.loading import CheckpointArchitectureError, CheckpointShapeError
from torchmm_ext.checkpoints.vilt import (
    hf_vilt_to_torchmm_ext,
    torchmm_ext_to_hf_vilt,
    torchmm_ext_to_vilt,
    vilt_checkpoint,
    vilt_nlvr_checkpoint,
    vilt_retrieval_checkpoint,
    vilt_to_torchmm_ext,
)
from torchmm_ext.models.albef import albef_model_for_retrieval
from torchmm_ext.models.vilt import (
    vilt_model_for_nlvr,
    vilt_model_for_pretraining,
    vilt_model_for_retrieval,
    vilt_model_for_vqa,
)

from vilt_testing import ATOL, batch, hf_model, ordered_patches, randomize, SIZES, VOCAB

D, L, G, MLP = 32, 12, 8, 64  # width, text positions, position grid, MLP size of SIZES


def published_keys(depth: int, heads: tuple) -> dict:
    """Original ViLT key -> shape (``vilt/modules``; reference notes), for our SIZES."""
    keys = {
        "text_embeddings.word_embeddings.weight": (VOCAB, D),
        "text_embeddings.position_embeddings.weight": (L, D),
        "text_embeddings.token_type_embeddings.weight": (2, D),
        "text_embeddings.LayerNorm.weight": (D,), "text_embeddings.LayerNorm.bias": (D,),
        "text_embeddings.position_ids": (1, L),
        "token_type_embeddings.weight": (2, D),
        "transformer.cls_token": (1, 1, D), "transformer.pos_embed": (1, G * G + 1, D),
        "transformer.patch_embed.proj.weight": (D, 3, 8, 8), "transformer.patch_embed.proj.bias": (D,),
        "transformer.norm.weight": (D,), "transformer.norm.bias": (D,),
        "pooler.dense.weight": (D, D), "pooler.dense.bias": (D,),
    }
    for i in range(depth):
        b = f"transformer.blocks.{i}."
        keys.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                     b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                     b + "norm2.weight": (D,), b + "norm2.bias": (D,), b + "mlp.fc1.weight": (MLP, D),
                     b + "mlp.fc1.bias": (MLP,), b + "mlp.fc2.weight": (D, MLP), b + "mlp.fc2.bias": (D,)})
    for head in heads:
        keys.update(head)
    return keys


MLM = {"mlm_score.transform.dense.weight": (D, D), "mlm_score.transform.dense.bias": (D,),
       "mlm_score.transform.LayerNorm.weight": (D,), "mlm_score.transform.LayerNorm.bias": (D,),
       "mlm_score.decoder.weight": (VOCAB, D), "mlm_score.bias": (VOCAB,)}
ITM = {"itm_score.fc.weight": (2, D), "itm_score.fc.bias": (2,)}
VQA = {"vqa_classifier.0.weight": (2 * D, D), "vqa_classifier.0.bias": (2 * D,), "vqa_classifier.1.weight": (2 * D,),
       "vqa_classifier.1.bias": (2 * D,), "vqa_classifier.3.weight": (7, 2 * D), "vqa_classifier.3.bias": (7,)}
NLVR = {"nlvr2_classifier.0.weight": (2 * D, 2 * D), "nlvr2_classifier.0.bias": (2 * D,),
        "nlvr2_classifier.1.weight": (2 * D,), "nlvr2_classifier.1.bias": (2 * D,),
        "nlvr2_classifier.3.weight": (2, 2 * D), "nlvr2_classifier.3.bias": (2,),
        "token_type_embeddings.weight": (3, D)}
IRTR = {"rank_output.weight": (1, D), "rank_output.bias": (1,), **ITM}

TASKS = [
    ("pretrain (vilt_200k_mlm_itm)", lambda: vilt_model_for_pretraining(vocab_size=VOCAB, **SIZES), (MLM, ITM)),
    ("vqa (vilt_vqa)", lambda: vilt_model_for_vqa(num_answers=7, vocab_size=VOCAB, **SIZES), (VQA,)),
    ("nlvr2 (vilt_nlvr2)", lambda: vilt_model_for_nlvr(vocab_size=VOCAB, **SIZES), (NLVR,)),
    ("irtr (vilt_irtr_f30k)", lambda: vilt_model_for_retrieval(vocab_size=VOCAB, **SIZES), (IRTR,)),
]


@pytest.mark.parametrize("name,build,heads", TASKS, ids=[t[0] for t in TASKS])
def test_original_layout_has_the_published_keys_loads_clean_and_round_trips_exactly(name, build, heads):
    model = build()
    randomize(model, seed=11)
    ours = model.state_dict()
    original = torchmm_ext_to_vilt(ours)
    expected = published_keys(SIZES["depth"], heads)
    assert {k: tuple(v.shape) for k, v in original.items()} == expected
    assert detect_layout(original) == "vilt"
    fresh = build()
    report = load_pretrained(fresh, original)
    assert report.layout == "vilt" and report.missing == {} and report.unexpected == {}
    assert report.ignored == ["text_embeddings.position_ids"]
    back = vilt_to_torchmm_ext(original)
    assert set(back) == set(ours)
    for key, value in ours.items():
        assert torch.equal(back[key], value), key
        assert torch.equal(fresh.state_dict()[key], value), key


def hf_from_original(original: dict) -> dict:
    """The Hugging Face conversion script's renames (``convert_vilt_original_to_pytorch.py``, as
    the reference notes tabulate them), written independently of our converters."""
    out = {}
    for key, value in original.items():
        if key == "text_embeddings.position_ids":
            continue
        new = key
        for a, b in (("transformer.blocks.", "vilt.encoder.layer."), (".norm1.", ".layernorm_before."),
                     (".norm2.", ".layernorm_after."), (".attn.proj.", ".attention.output.dense."),
                     (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense."),
                     ("text_embeddings.", "vilt.embeddings.text_embeddings."),
                     ("transformer.cls_token", "vilt.embeddings.cls_token"),
                     ("transformer.patch_embed.proj", "vilt.embeddings.patch_embeddings.projection"),
                     ("transformer.pos_embed", "vilt.embeddings.position_embeddings"),
                     ("token_type_embeddings.", "vilt.embeddings.token_type_embeddings."),
                     ("transformer.norm.", "vilt.layernorm."), ("pooler.", "vilt.pooler."),
                     ("vqa_classifier.", "classifier."), ("nlvr2_classifier.", "classifier.")):
            if new.startswith(a) or (a.startswith(".") and a in new):
                new = new.replace(a, b, 1)
        if new.startswith("vilt.vilt."):
            new = new[5:]
        if ".attn.qkv." in new:
            q, k, v = value.chunk(3, dim=0)
            for part, tensor in zip(("query", "key", "value"), (q, k, v)):
                out[new.replace("attn.qkv", f"attention.attention.{part}")] = tensor
        else:
            out[new] = value
    return out


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_original_checkpoint_gives_the_hf_outputs_of_the_hf_converted_one(task):
    if task == "vqa":
        model = vilt_model_for_vqa(num_answers=7, vocab_size=VOCAB, dropout=0.0, **SIZES)
        hf = hf_model(ViltForQuestionAnswering, num_labels=7)
        images, pixel_mask, ids, mask = batch()
    else:
        model = vilt_model_for_nlvr(vocab_size=VOCAB, dropout=0.0, **SIZES)
        hf = hf_model(ViltForImagesAndTextClassification, num_labels=2, num_images=2, modality_type_vocab_size=3)
        images, pixel_mask, ids, mask = batch(num_images=2)
    randomize(model, seed=12)
    original = torchmm_ext_to_vilt(model.state_dict())
    missing, unexpected = hf.load_state_dict(hf_from_original(original), strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k]
    fresh = {"vqa": lambda: vilt_model_for_vqa(num_answers=7, vocab_size=VOCAB, dropout=0.0, **SIZES),
             "nlvr2": lambda: vilt_model_for_nlvr(vocab_size=VOCAB, dropout=0.0, **SIZES)}[task]().eval()
    load_pretrained(fresh, {"state_dict": original, "epoch": 9})  # a Lightning file's dict
    with torch.no_grad(), ordered_patches():
        expected = hf(input_ids=ids, attention_mask=mask, pixel_values=images, pixel_mask=pixel_mask).logits
    with torch.no_grad():
        got = fresh(images, ids, mask, pixel_mask).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_hf_weights_load_through_load_pretrained_with_a_clean_report_and_round_trip(tmp_path):
    hf = hf_model(ViltForQuestionAnswering, num_labels=7)
    randomize(hf, seed=13)
    ours = vilt_model_for_vqa(num_answers=7, vocab_size=VOCAB, dropout=0.0, **SIZES).eval()
    report = load_pretrained(ours, hf.state_dict())
    assert report.layout == "hf_vilt" and report.missing == {} and report.unexpected == {}
    images, pixel_mask, ids, mask = batch()
    with torch.no_grad(), ordered_patches():
        expected = hf(input_ids=ids, attention_mask=mask, pixel_values=images, pixel_mask=pixel_mask).logits
    with torch.no_grad():
        torch.testing.assert_close(ours(images, ids, mask, pixel_mask).logits, expected, atol=ATOL, rtol=0)
    exported = torchmm_ext_to_hf_vilt(ours.state_dict())
    for key, value in hf.state_dict().items():
        if "position_ids" not in key:
            assert torch.equal(exported[key], value), key
    assert set(hf_vilt_to_torchmm_ext(exported)) == set(ours.state_dict())
    # a saved Hugging Face directory (dandelin/vilt-b32-finetuned-vqa style)
    hf.save_pretrained(tmp_path / "hf")
    again = vilt_model_for_vqa(num_answers=7, vocab_size=VOCAB, dropout=0.0, **SIZES).eval()
    load_pretrained(again, vilt_checkpoint(tmp_path / "hf"))
    with torch.no_grad():
        torch.testing.assert_close(again(images, ids, mask, pixel_mask).logits, expected, atol=ATOL, rtol=0)


def test_nlvr2_start_copies_the_image_modality_row_and_retrieval_start_copies_the_itm_match_row(tmp_path):
    pre = vilt_model_for_pretraining(vocab_size=VOCAB, **SIZES)
    randomize(pre, seed=14)
    path = tmp_path / "pre.ckpt"
    torch.save({"state_dict": torchmm_ext_to_vilt(pre.state_dict())}, path)  # Lightning layout
    nlvr = vilt_model_for_nlvr(vocab_size=VOCAB, **SIZES)
    report = load_pretrained(nlvr, vilt_nlvr_checkpoint(path))
    rows = nlvr.vilt.modality_embeddings.weight
    old = pre.vilt.modality_embeddings.weight
    assert torch.equal(rows[0], old[0]) and torch.equal(rows[1], old[1]) and torch.equal(rows[2], old[1])
    assert set(report.missing) == {"classifier.0", "classifier.1", "classifier.3"}
    retrieval = vilt_model_for_retrieval(vocab_size=VOCAB, **SIZES)
    report = load_pretrained(retrieval, vilt_retrieval_checkpoint(path))
    assert report.missing == {}
    assert torch.equal(retrieval.rank_output.weight, pre.itm_head.weight[1:])
    assert torch.equal(retrieval.rank_output.bias, pre.itm_head.bias[1:])
    assert not any(p.requires_grad for p in retrieval.itm_head.parameters())
    # an NLVR2 checkpoint is loaded as it is
    assert vilt_nlvr_checkpoint(_saved(nlvr, tmp_path / "nlvr.pth")) == str(tmp_path / "nlvr.pth")


def _saved(model, path):
    torch.save({"model": model.state_dict()}, path)
    return path


def test_checkpoints_of_other_architectures_or_sizes_are_clear_errors():
    vilt = vilt_model_for_vqa(num_answers=7, vocab_size=VOCAB, **SIZES)
    albef = albef_model_for_retrieval("tiny", vocab_size=VOCAB, queue_size=8)
    with pytest.raises(CheckpointArchitectureError, match="another architecture"):
        load_pretrained(vilt, albef.state_dict())
    with pytest.raises(CheckpointArchitectureError, match="another architecture"):
        load_pretrained(albef, torchmm_ext_to_vilt(vilt.state_dict()))
    wider = vilt_model_for_vqa(num_answers=7, vocab_size=VOCAB, **{**SIZES, "width": 48, "num_heads": 4})
    with pytest.raises(CheckpointShapeError, match="vilt.blocks.0.attention.input_proj.weight"):
        load_pretrained(vilt, torchmm_ext_to_vilt(wider.state_dict()))
    with pytest.raises(ValueError, match="no place in the original ViLT layout"):
        torchmm_ext_to_vilt({**vilt.state_dict(), "extra.weight": torch.zeros(1)})
