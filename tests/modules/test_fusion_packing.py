"""ITM scoring on packed text tokens (``FusionLayer.forward_packed``): the same CLS states as
the padded paths, fp32 to 1e-5, with the same weights and inputs."""

import pytest
import torch

from torchmm_ext.modules.low_rank import LowRankLinear
from torchmm_ext.modules.text_encoder import ALBEFFusionEncoder, FusionLayer, pack_text


def _pairs(num_images: int = 3, k: int = 4, length: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, 10, 24, generator=gen)
    text = torch.randn(num_images * k, length, 32, generator=gen)
    lengths = torch.randint(2, length + 1, (num_images * k,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length).view(1, -1) < lengths.view(-1, 1)).long()
    return images, text, mask, torch.arange(num_images).repeat_interleave(k)


def _fusion(**kw) -> ALBEFFusionEncoder:
    torch.manual_seed(0)
    return ALBEFFusionEncoder(width=32, image_width=24, num_layers=3, num_heads=4, ffn_dim=64, **kw).eval()


def test_pack_text_positions():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    packing = pack_text(mask, [2, 2])
    assert packing.index.tolist() == [0, 1, 3, 6, 7, 8, 9, 10]
    assert packing.first.tolist() == [0, 2, 3, 6]
    assert packing.image_rows == [3, 5]
    assert pack_text(mask, [1, 3]).image_rows == [2, 6]


@pytest.mark.parametrize("low_rank_self_attention,uneven", [(False, False), (True, False), (False, True)])
def test_packed_itm_states_equal_padded_and_gathered_paths(low_rank_self_attention, uneven):
    fusion = _fusion()
    if low_rank_self_attention:  # PELA's factorised projection: the other first-token branch
        for layer in fusion.layer:
            dense = layer.attention.input_proj
            low = LowRankLinear(dense.in_features, dense.out_features, rank=8)
            torch.nn.init.normal_(low[0].weight, std=0.2)
            torch.nn.init.normal_(low[1].weight, std=0.2)
            layer.attention.input_proj = low
    images, text, mask, index = _pairs()
    if uneven:  # runs of 5, 4, 3 pairs (a re-rank chunk that cuts an image's candidates)
        index = torch.tensor([0] * 5 + [1] * 4 + [2] * 3)
    assert mask.sum() < 0.9 * mask.numel()  # enough padding for the packed path
    calls = []
    hook = FusionLayer.forward_packed
    FusionLayer.forward_packed = lambda self, *a, **k: calls.append(1) or hook(self, *a, **k)
    try:
        packed = fusion(text, mask, images, image_index=index, cls_only=True).last_hidden_state
    finally:
        FusionLayer.forward_packed = hook
    assert len(calls) == 3  # the packed path ran, once per layer
    fusion.pack_below = 0.0  # never pack: the grouped (or gathered, for uneven runs) padded path
    grouped = fusion(text, mask, images, image_index=index, cls_only=True).last_hidden_state
    gathered = fusion(text, mask, images[index]).last_hidden_state[:, :1]  # per-pair images, full
    assert packed.shape == (12, 1, 32)
    torch.testing.assert_close(packed, grouped, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, gathered, atol=1e-5, rtol=1e-5)


def test_packing_is_not_used_in_training_or_for_full_states():
    fusion = _fusion(dropout=0.0)
    images, text, mask, index = _pairs()
    calls = []
    hook = FusionLayer.forward_packed
    FusionLayer.forward_packed = lambda self, *a, **k: calls.append(1) or hook(self, *a, **k)
    try:
        full = fusion(text, mask, images, image_index=index).last_hidden_state
        fusion.train()
        fusion(text, mask, images, image_index=index, cls_only=True)
    finally:
        FusionLayer.forward_packed = hook
    assert not calls and full.shape == (12, 7, 32)
