"""ViLT task models at tiny size: forward/backward, patch sampling, block groups, bad input."""

import pytest
import torch

from torchmm_ext.modules.efficiency import resolve_block_groups
from torchmm_ext.models.vilt import (
    VILT_PRESETS,
    vilt_model,
    vilt_model_for_nlvr,
    vilt_model_for_pretraining,
    vilt_model_for_retrieval,
    vilt_model_for_vqa,
)

VOCAB = 60


def inputs(b=2, length=7, height=64, width=64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, 3, height, width, generator=g), torch.randint(1, VOCAB, (b, length), generator=g),
            torch.ones(b, length, dtype=torch.long))


def assert_trains(model, loss):
    assert torch.isfinite(loss)
    loss.backward()
    block = model.vilt.blocks[0].attention.input_proj.weight
    assert block.grad is not None and block.grad.abs().sum() > 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    return trainable


def test_every_task_model_runs_forward_and_backward_at_tiny_size():
    images, ids, mask = inputs()
    vqa = vilt_model_for_vqa("tiny", num_answers=5, vocab_size=VOCAB)
    out = vqa(images, ids, mask, targets=torch.tensor([[0, 0.3, 1, 0, 0], [0.6, 0, 0, 0, 0.9]]))
    assert out.logits.shape == (2, 5)
    assert assert_trains(vqa, out.loss) == []
    nlvr = vilt_model_for_nlvr("tiny", vocab_size=VOCAB)
    out = nlvr(torch.stack([images, images.flip(0)], 1), ids, mask, labels=torch.tensor([1, 0]))
    assert out.logits.shape == (2, 2) and out.pooled_output.shape == (2, 2 * 192)
    assert assert_trains(nlvr, out.loss) == []
    retrieval = vilt_model_for_retrieval("tiny", vocab_size=VOCAB)
    out = retrieval(images, ids[:, None].repeat(1, 4, 1), mask[:, None].repeat(1, 4, 1))
    assert out.scores.shape == (2, 4)
    assert assert_trains(retrieval, out.loss) == []  # the frozen ITM head needs no gradient
    pre = vilt_model_for_pretraining("tiny", vocab_size=VOCAB)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    out = pre(images, ids, mask, ids.masked_fill(labels != -100, 3), labels, images.flip(0), torch.tensor([0, 0]))
    assert out.mlm_logits.shape == (2, 7, VOCAB) and out.itm_logits.shape == (2, 2)
    torch.testing.assert_close(out.loss, out.itm_loss + out.mlm_loss + out.wpa_loss)  # ViLT's word-patch alignment
    assert assert_trains(pre, out.loss) == []


def test_pretraining_itm_reads_the_unmasked_text_and_the_itm_images_only():
    # ViLT's ITM pass: the unmasked caption with the (possibly swapped) ITM image; the MLM pass's
    # masked ids and own images must not reach the ITM logits, and the ITM weight scales only ITM
    images, ids, mask = inputs(b=3)
    pre = vilt_model_for_pretraining("tiny", vocab_size=VOCAB, itm_weight=4.0).eval()
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    masked = ids.masked_fill(labels != -100, 3)
    itm_images, itm_labels = images.roll(1, 0), torch.tensor([0, 0, 0])
    with torch.no_grad():
        out = pre(images, ids, mask, masked, labels, itm_images, itm_labels)
        other_mlm = pre(torch.randn_like(images), ids, mask, torch.randint(1, VOCAB, ids.shape), labels,
                        itm_images, itm_labels)
        alone = pre.itm_head(pre.vilt(ids, mask, itm_images).pooled_output)
        own = pre(images, ids, mask, masked, labels, images, torch.tensor([1, 1, 1]))
    torch.testing.assert_close(other_mlm.itm_logits, out.itm_logits)
    torch.testing.assert_close(out.itm_logits, alone)
    assert not torch.allclose(own.itm_logits, out.itm_logits)  # the ITM images do reach it
    torch.testing.assert_close(out.itm_loss, torch.nn.functional.cross_entropy(alone, itm_labels))
    torch.testing.assert_close(out.loss, 4.0 * out.itm_loss + out.mlm_loss + out.wpa_loss)


def test_training_samples_at_most_max_image_len_real_patches_and_evaluation_keeps_all():
    model = vilt_model("tiny", vocab_size=VOCAB, max_image_len=20)
    images, ids, mask = inputs(height=64, width=48)  # 8 x 6 = 48 patches
    pixel_mask = torch.ones(2, 64, 48, dtype=torch.long)
    pixel_mask[1, 32:] = 0  # 4 x 6 = 24 real patches
    model.train()
    torch.manual_seed(0)
    out = model(ids, mask, images, pixel_mask)
    assert out.image_features.shape[1] == 1 + 20
    assert out.attention_mask[:, 7:].sum().item() == 2 * 21  # every kept patch is a real one
    index = out.patch_index[0]
    assert len({tuple(p) for p in index.tolist()}) == 20 and index[:, 0].max() < 8 and index[:, 1].max() < 6
    assert (out.patch_index[1][:, 0] < 4).all()
    model.eval()
    out = model(ids, mask, images, pixel_mask)
    assert out.image_features.shape[1] == 1 + 48
    assert out.attention_mask[1, 7:].sum().item() == 1 + 24
    # raster order: real patches first, then padding
    assert out.patch_index[1, :24].tolist() == [[r, c] for r in range(4) for c in range(6)]


def test_block_groups_reach_the_transformer_blocks_and_keys_do_not_depend_on_dropout():
    model = vilt_model_for_vqa("tiny", num_answers=3, vocab_size=VOCAB)
    groups = resolve_block_groups(model)
    assert list(groups) == ["transformer"] and groups["transformer"] is model.vilt.blocks
    assert len(groups["transformer"]) == VILT_PRESETS["tiny"]["depth"]
    no_dropout = vilt_model_for_vqa("tiny", num_answers=3, vocab_size=VOCAB, dropout=0.0)
    assert list(no_dropout.state_dict()) == list(model.state_dict())
    assert all(m.p == 0.0 for m in no_dropout.modules() if isinstance(m, torch.nn.Dropout))


def test_base_preset_is_vilt_b32():
    assert VILT_PRESETS["base"] == dict(width=768, depth=12, num_heads=12, mlp_dim=3072, image_size=384,
                                        patch_size=32, max_text_len=40)


def test_bad_inputs_are_clear_errors():
    model = vilt_model_for_vqa("tiny", num_answers=3, vocab_size=VOCAB)
    images, ids, mask = inputs()
    with pytest.raises(ValueError, match="max_length=40"):
        model(images, torch.ones(2, 41, dtype=torch.long), torch.ones(2, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        model(torch.randn(2, 3, 60, 64), ids, mask)
    with pytest.raises(ValueError, match="pixel_mask has shape"):
        model(images, ids, mask, torch.ones(2, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 2, 3, H, W\]"):
        vilt_model_for_nlvr("tiny", vocab_size=VOCAB)(images, ids, mask)
    with pytest.raises(ValueError, match=r"input_ids \[B, T, L\]"):
        vilt_model_for_retrieval("tiny", vocab_size=VOCAB)(images, ids, mask)
    with pytest.raises(ValueError, match="unknown ViLT preset 'huge'"):
        vilt_model("huge")
