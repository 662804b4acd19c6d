"""``train.compile``: the blocks of every group and their momentum copies are compiled in place
(same parameter names, same outputs)."""

import copy

import pytest
import torch

from torchmm_ext.engine.fit import compile_blocks, TrainConfig
from torchmm_ext.models.albef import albef_model_for_retrieval
from testing_utils import SMALL_ALBEF

SMALL = dict(SMALL_ALBEF, queue_size=8)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(3, 3, 32, 32, generator=gen)
    ids = torch.randint(5, 64, (3, 6), generator=gen)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 3:] = 0
    return image, ids, mask


def test_compile_is_off_by_default():
    assert TrainConfig().compile is False


def test_compile_blocks_keeps_names_and_outputs():
    torch.manual_seed(0)
    model = albef_model_for_retrieval("tiny", **SMALL).eval()
    with torch.no_grad():  # momentum copies that differ from the online blocks
        for p in model.vision_encoder_m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    plain = copy.deepcopy(model)
    done = compile_blocks(model, backend="eager")  # dynamo capture without code generation
    assert done == ["vision_encoder.blocks", "vision_encoder_m.blocks", "text_encoder.encoder.layer",
                    "text_encoder_m.encoder.layer", "fusion_encoder.layer"]
    assert all(block._compiled_call_impl is not None for block in model.vision_encoder_m.blocks)
    assert list(model.state_dict()) == list(plain.state_dict())
    image, ids, mask = _inputs()
    outs = []
    for m in (model, plain):
        image_enc = m.encode_image(image)
        text_enc = m.encode_text(ids, mask)
        scores = m.itm_scores(image_enc.embeddings, text_enc.embeddings, mask,
                              image_index=torch.tensor([0, 1, 2]))
        momentum_image = m.vision_encoder_m(image).last_hidden_state
        outs.append((image_enc.embeddings, text_enc.embeddings, scores, momentum_image))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Training step: same losses (dropout masks from the same seed; compiled fusion layers keep
    # ITM's gathered cross-attention, so the plain model takes it too for the same masks).
    plain.fusion_encoder.group_pairs = False
    losses = []
    for m in (model, plain):
        m.train()
        torch.manual_seed(2)
        losses.append(m(image, ids, mask, torch.tensor([0, 1, 2]), alpha=0.4))
    for a, b in zip(*losses):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_block_matches_eager():
    torch.manual_seed(0)
    model = albef_model_for_retrieval("tiny", **SMALL).eval()
    block = model.vision_encoder.blocks[0]
    x = torch.randn(2, 17, 48)
    expected = block(x)
    block.compile()
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
