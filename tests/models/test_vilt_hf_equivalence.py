"""Our ViLT against Hugging Face's ViLT classes with the same random weights, loaded through our
converters: embeddings, every layer, pooled output, VQA / NLVR2 / ITM / retrieval logits and
the MLM head, in fp32, with a non-square batch and a pixel mask.

Hugging Face reproduces the original ViLT exactly with (reference notes) ViT LayerNorm eps 1e-6
and the text embeddings' LayerNorm at 1e-12, the pixel mask passed explicitly, and its random
patch order fixed (``torch.multinomial`` is replaced by the identity order here: real patches
in raster order, then padding patches, which is what our model keeps)."""

import torch
from transformers import (
    ViltForImageAndTextRetrieval,
    ViltForImagesAndTextClassification,
    ViltForQuestionAnswering,
    ViltModel as HFViltModel,
)

from torchmm_ext.models.vilt import (
    vilt_model_for_nlvr,
    vilt_model_for_pretraining,
    vilt_model_for_retrieval,
    vilt_model_for_vqa,
)
from vilt_testing import ATOL, batch, hf_model, load_ours_into_hf, ordered_patches, randomize, SIZES, VOCAB


def test_embeddings_every_layer_and_pooled_output_match_hf_vilt_model():
    ours = vilt_model_for_vqa(num_answers=7, vocab_size=VOCAB, dropout=0.0, **SIZES).eval()
    randomize(ours)
    hf = hf_model(HFViltModel)
    load_ours_into_hf(ours, hf)
    images, pixel_mask, ids, mask = batch()
    with torch.no_grad(), ordered_patches():
        theirs = hf(input_ids=ids, attention_mask=mask, pixel_values=images, pixel_mask=pixel_mask,
                    output_hidden_states=True)
    with torch.no_grad():
        out = ours.vilt(ids, mask, images, pixel_mask, return_hidden_states=True)
    # sample 1 keeps 6x8 real patches + 48 padding patches: same length as sample 0's 8x12
    assert out.last_hidden_state.shape == theirs.last_hidden_state.shape == (2, 9 + 1 + 96, 32)
    assert len(out.hidden_states) == len(theirs.hidden_states) == 3
    for i, (a, b) in enumerate(zip(out.hidden_states, theirs.hidden_states)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"hidden state {i}")
    torch.testing.assert_close(out.last_hidden_state, theirs.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooled_output, theirs.pooler_output, atol=ATOL, rtol=0)
    assert out.attention_mask[1, 9 + 1 + 48:].sum() == 0 and out.attention_mask[1, : 9 + 1 + 48].sum() == 6 + 1 + 48


def test_vqa_logits_match_hf_question_answering():
    ours = vilt_model_for_vqa(num_answers=7, vocab_size=VOCAB, dropout=0.0, **SIZES).eval()
    randomize(ours, seed=3)
    hf = hf_model(ViltForQuestionAnswering, num_labels=7)
    load_ours_into_hf(ours, hf)
    images, pixel_mask, ids, mask = batch()
    with torch.no_grad(), ordered_patches():
        expected = hf(input_ids=ids, attention_mask=mask, pixel_values=images, pixel_mask=pixel_mask).logits
    with torch.no_grad():
        targets = torch.rand(2, 7)
        out = ours(images, ids, mask, pixel_mask, targets=targets)
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=0)
    # ViLT's loss: mean BCE over every logit, times the number of answers
    bce = torch.nn.functional.binary_cross_entropy_with_logits(expected, targets) * 7
    torch.testing.assert_close(out.loss, bce, atol=1e-5, rtol=0)


def test_nlvr2_two_passes_match_hf_images_and_text_classification():
    ours = vilt_model_for_nlvr(vocab_size=VOCAB, dropout=0.0, **SIZES).eval()
    randomize(ours, seed=4)
    hf = hf_model(ViltForImagesAndTextClassification, num_labels=2, num_images=2, modality_type_vocab_size=3)
    load_ours_into_hf(ours, hf)
    images, pixel_mask, ids, mask = batch(num_images=2)
    with torch.no_grad(), ordered_patches():
        expected = hf(input_ids=ids, attention_mask=mask, pixel_values=images, pixel_mask=pixel_mask).logits
    with torch.no_grad():
        out = ours(images, ids, mask, pixel_mask)
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=0)
    # pairing: each half of the pooled pair is one pass with its own modality id
    with torch.no_grad():
        right = ours.vilt(ids, mask, images[:, 1], pixel_mask[:, 1], image_token_type=2).pooled_output
        swapped_type = ours.vilt(ids, mask, images[:, 1], pixel_mask[:, 1], image_token_type=1).pooled_output
    torch.testing.assert_close(out.pooled_output[:, 32:], right, atol=1e-6, rtol=0)
    assert (out.pooled_output[:, 32:] - swapped_type).abs().max() > 1e-3


def test_retrieval_rank_output_and_itm_logits_match_hf():
    ours = vilt_model_for_retrieval(vocab_size=VOCAB, dropout=0.0, **SIZES).eval()
    randomize(ours, seed=5)
    hf = hf_model(ViltForImageAndTextRetrieval)
    load_ours_into_hf(ours, hf)
    images, pixel_mask, ids, mask = batch()
    with torch.no_grad(), ordered_patches():
        expected = hf(input_ids=ids, attention_mask=mask, pixel_values=images, pixel_mask=pixel_mask).logits[:, 0]
        pooled = hf.vilt(input_ids=ids, attention_mask=mask, pixel_values=images, pixel_mask=pixel_mask).pooler_output
    with torch.no_grad():
        encoding = ours.embed_images(images, pixel_mask)
        scores = ours.score_pairs(encoding, ids, mask)
        itm = ours.itm_head(ours.vilt(ids, mask, images, pixel_mask).pooled_output)
        # the training forward: texts [B, T, L] each scored with its row's image
        forward = ours(images, torch.stack([ids, ids.flip(0)], 1), torch.stack([mask, mask.flip(0)], 1), pixel_mask)
    torch.testing.assert_close(scores, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(forward.scores[:, 0], expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(itm, pooled @ ours.itm_head.weight.T + ours.itm_head.bias, atol=ATOL, rtol=0)


def test_mlm_head_matches_the_published_equations_on_hf_text_features():
    # HF's ViltForMaskedLM ties the decoder to the word embeddings (ViLT's is untied): the head
    # is checked against its equations (dense -> GELU -> LayerNorm 1e-12 -> decoder + bias).
    ours = vilt_model_for_pretraining(vocab_size=VOCAB, dropout=0.0, **SIZES).eval()
    randomize(ours, seed=6)
    hf = hf_model(HFViltModel)
    load_ours_into_hf(ours, hf)
    images, pixel_mask, ids, mask = batch()
    with torch.no_grad(), ordered_patches():
        text = hf(input_ids=ids, attention_mask=mask, pixel_values=images, pixel_mask=pixel_mask).last_hidden_state[:, :9]
    head = ours.mlm_head
    with torch.no_grad():
        h = torch.nn.functional.gelu(text @ head.dense.weight.T + head.dense.bias)
        h = torch.nn.functional.layer_norm(h, (32,), head.layer_norm.weight, head.layer_norm.bias, 1e-12)
        expected = h @ head.decoder.weight.T + head.bias
        labels = torch.full((2, 9), -100)
        labels[0, 2], labels[1, 4] = 5, 7
        out = ours(images, ids, mask, ids, labels, images, torch.tensor([1, 0]), pixel_mask, pixel_mask)
    torch.testing.assert_close(out.mlm_logits, expected, atol=ATOL, rtol=0)
    assert head.decoder.weight.data_ptr() != ours.vilt.text_embeddings.word_embeddings.weight.data_ptr()
