import copy
import math

import pytest
import torch
from torch import nn
from torchmultimodal.modules.losses.albef import ImageTextContrastiveLoss
from torchmultimodal.utils.common import momentum_update as tmm_momentum_update

from torchmm_ext.modules.attention import cross_attention_with_probs, self_attention_with_probs
from torchmm_ext.modules.losses import contrastive_targets, itm_labels, sample_hard_negatives
from torchmm_ext.modules.momentum import FeatureQueue, momentum_update
from torchmm_ext.modules.text_encoder import ALBEFFusionEncoder, albef_text_encoder
from torchmm_ext.modules.vision_transformer import TokenReductionContext, VisionTransformer


def tiny_vit(**kw):
    args = dict(image_size=32, patch_size=8, width=32, depth=3, num_heads=4, mlp_dim=64)
    args.update(kw)
    return VisionTransformer(**args).eval()


def test_vit_base_has_timm_parameter_count():
    # timm's vit_base_patch16_224 (no classifier head): 85,798,656 parameters.
    vit = VisionTransformer(image_size=224, patch_size=16)
    assert sum(p.numel() for p in vit.parameters()) == 85_798_656


def test_vit_output_shapes_and_hidden_states():
    vit = tiny_vit()
    out = vit(torch.randn(2, 3, 32, 32), return_hidden_states=True, return_attention_layer=1)
    assert out.last_hidden_state.shape == (2, 17, 32)
    assert len(out.hidden_states) == 4  # embeddings + 3 blocks
    assert out.attention.shape == (2, 4, 17, 17)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2, 4, 17))


def test_vit_attention_matches_block_forward():
    vit = tiny_vit()
    x = torch.randn(2, 17, 32)
    block = vit.blocks[0]
    normed = block.attention_layernorm(x)
    explicit = self_attention_with_probs(block.attention, normed)
    torch.testing.assert_close(explicit.output, block.attention(normed), atol=1e-5, rtol=1e-5)


def test_vit_skip_block_equals_running_without_it():
    vit = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    ref = vit.embeddings(images).embeddings
    for i in (0, 2):
        ref = vit.blocks[i](ref)
    ref = vit.norm(ref)
    vit.skip_blocks([1])
    torch.testing.assert_close(vit(images).last_hidden_state, ref)


class KeepFirst(nn.Module):
    def __init__(self, keep):
        super().__init__()
        self.keep = keep
        self.calls = []

    def forward(self, tokens, context: TokenReductionContext):
        self.calls.append((context.layer_idx, context.guidance))
        return tokens[:, : self.keep]


def test_vit_token_reducer_runs_after_its_block_with_guidance():
    vit = tiny_vit()
    reducer = KeepFirst(5)
    vit.set_token_reducer(1, reducer)
    guidance = torch.randn(2, 32)
    out = vit(torch.randn(2, 3, 32, 32), guidance=guidance, return_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [17, 17, 5, 5]
    assert reducer.calls[0][0] == 1 and reducer.calls[0][1] is guidance
    vit.set_token_reducer(1, None)
    assert vit(torch.randn(2, 3, 32, 32)).last_hidden_state.shape[1] == 17


def test_text_encoder_ignores_padding():
    enc = albef_text_encoder(vocab_size=50, width=32, num_layers=2, num_heads=4, ffn_dim=64).eval()
    ids = torch.tensor([[2, 7, 9, 11, 3]])
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    short = enc(ids, attention_mask=torch.ones_like(ids).bool()).last_hidden_state
    long = enc(padded, attention_mask=mask.bool()).last_hidden_state
    torch.testing.assert_close(long[:, :5], short, atol=1e-5, rtol=1e-5)


def test_fusion_image_index_equals_gathered_images():
    fusion = ALBEFFusionEncoder(width=32, image_width=24, num_layers=2, num_heads=4, ffn_dim=64).eval()
    images = torch.randn(3, 10, 24)
    text = torch.randn(5, 6, 32)
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[1, 4:] = 0
    index = torch.tensor([0, 2, 2, 1, 0])
    gathered = fusion(text, mask, images[index]).last_hidden_state
    indexed = fusion(text, mask, images, image_index=index).last_hidden_state
    torch.testing.assert_close(indexed, gathered, atol=1e-5, rtol=1e-5)
    # The explicit (Grad-CAM) path gives the same states and normalised probabilities.
    out = fusion(text, mask, images, image_index=index, return_cross_attention_layer=1)
    torch.testing.assert_close(out.last_hidden_state, gathered, atol=1e-5, rtol=1e-5)
    assert out.cross_attention.shape == (5, 4, 6, 10)
    torch.testing.assert_close(out.cross_attention.sum(-1), torch.ones(5, 4, 6))


def test_cross_attention_with_probs_matches_module():
    fusion = ALBEFFusionEncoder(width=32, image_width=24, num_layers=1, num_heads=4, ffn_dim=64)
    attn = fusion.layer[0].cross_attention
    q, kv = torch.randn(2, 6, 32), torch.randn(2, 10, 24)
    torch.testing.assert_close(cross_attention_with_probs(attn, q, kv).output, attn(q, kv, kv), atol=1e-5, rtol=1e-5)


def test_momentum_update_matches_torchmultimodal():
    online = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    ours, theirs = copy.deepcopy(online), copy.deepcopy(online)
    for p in online.parameters():
        p.data.add_(torch.randn_like(p))
    momentum_update([online], [ours], 0.9)
    tmm_momentum_update(online, theirs, 0.9)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b)


def test_feature_queue_wraps_around():
    queue = FeatureQueue(embed_dim=2, size=5)
    assert (queue.idx_queue == -100).all()
    for step in range(3):  # 3 writes of 2 -> slots 0,1 | 2,3 | 4,0
        feats = torch.full((2, 2), float(step))
        queue.enqueue(feats, -feats, torch.tensor([10 * step, 10 * step + 1]))
    assert queue.idx_queue.tolist() == [[21, 1, 10, 11, 20]]
    assert queue.image_queue[0].tolist() == [2, 0, 1, 1, 2]
    assert queue.text_queue[1].tolist() == [-2, 0, -1, -1, -2]
    assert int(queue.ptr) == 1


def test_contrastive_targets_by_hand():
    idx = torch.tensor([7, 8])
    idx_all = torch.tensor([7, 8, 7, -100, 8, 8])
    expected = torch.tensor([[0.5, 0, 0.5, 0, 0, 0], [0, 1 / 3, 0, 0, 1 / 3, 1 / 3]])
    torch.testing.assert_close(contrastive_targets(idx, idx_all), expected)


def test_itc_loss_by_hand():
    # Two samples, no queue, alpha 0: loss = mean of -log softmax at the targets, both directions.
    sim = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    targets = torch.eye(2)
    loss = ImageTextContrastiveLoss()(sim, sim.T, sim_targets=targets)
    e = math.exp
    i2t = -(math.log(e(2.0) / (e(2.0) + 1)) + math.log(e(3.0) / (e(1.0) + e(3.0)))) / 2
    t2i = -(math.log(e(2.0) / (e(2.0) + e(1.0))) + math.log(e(3.0) / (1 + e(3.0)))) / 2
    torch.testing.assert_close(loss, torch.tensor((i2t + t2i) / 2))


def test_hard_negatives_never_share_idx():
    torch.manual_seed(0)
    idx = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])
    for _ in range(200):
        sim = torch.randn(8, 8) * 5
        neg = sample_hard_negatives(sim, sim.T, idx)
        assert (idx[neg.image_for_text] != idx).all()
        assert (idx[neg.text_for_image] != idx).all()


def test_hard_negatives_follow_similarity():
    # Row 0 strongly prefers column 2 among the valid negatives.
    torch.manual_seed(0)
    sim = torch.zeros(4, 4)
    sim[0, 2] = 10.0
    idx = torch.tensor([0, 0, 1, 2])
    picks = [int(sample_hard_negatives(sim, sim, idx).text_for_image[0]) for _ in range(100)]
    assert picks.count(2) > 95 and 1 not in picks


def test_hard_negatives_uniform_mix_frequencies():
    # Row 0: idx 0 is shared with column 1 (never a negative); columns 2, 3 are valid and the
    # similarity puts softmax weight w = e^4 / (e^4 + 1) on column 2. With mix m the weights are
    # (1 - m) * [w, 1 - w] + m * [1/2, 1/2] over columns 2, 3.
    torch.manual_seed(0)
    sim = torch.zeros(4, 4)
    sim[0, 2] = 4.0
    idx = torch.tensor([0, 0, 1, 2])
    w = math.exp(4.0) / (math.exp(4.0) + 1.0)
    for mix in (0.0, 0.5, 1.0):
        picks = torch.stack([sample_hard_negatives(sim, sim, idx, uniform_mix=mix).text_for_image[0]
                             for _ in range(4000)])
        assert not ((picks == 0) | (picks == 1)).any()
        expected = (1 - mix) * w + mix / 2
        assert abs((picks == 2).float().mean().item() - expected) < 0.025, (mix, expected)
    with pytest.raises(ValueError, match="uniform_mix must be in"):
        sample_hard_negatives(sim, sim, idx, uniform_mix=1.5)


def test_hard_negatives_errors_and_fallback():
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([0]))
    neg = sample_hard_negatives(torch.zeros(3, 3), torch.zeros(3, 3), torch.tensor([5, 5, 5]))
    assert (neg.image_for_text != torch.arange(3)).all()


def test_itm_labels():
    assert itm_labels(2, torch.device("cpu")).tolist() == [1, 1, 0, 0, 0, 0]


def test_fusion_cls_only_equals_first_token_of_full_output():
    fusion = ALBEFFusionEncoder(width=32, image_width=24, num_layers=2, num_heads=4, ffn_dim=64).eval()
    images, text = torch.randn(3, 10, 24), torch.randn(4, 6, 32)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[2, 3:] = 0
    index = torch.tensor([0, 2, 1, 1])
    full = fusion(text, mask, images, image_index=index).last_hidden_state
    cls = fusion(text, mask, images, image_index=index, cls_only=True).last_hidden_state
    assert cls.shape == (4, 1, 32)
    torch.testing.assert_close(cls, full[:, :1], atol=1e-5, rtol=1e-5)


def test_feedforward_blocks_have_no_dropout_after_gelu():
    # BERT: dense -> GELU -> dense -> dropout; torchmultimodal's MLP would add one after GELU.
    text = albef_text_encoder(vocab_size=50, width=32, num_layers=1, num_heads=4, ffn_dim=64, dropout=0.1)
    fusion = ALBEFFusionEncoder(width=32, image_width=32, num_layers=1, num_heads=4, ffn_dim=64, dropout=0.1)
    for mlp in (text.encoder.layer[0].feedforward, fusion.layer[0].feedforward):
        assert [type(m).__name__ for m in mlp.model] == ["Linear", "GELU", "Linear"]


def test_fusion_grouped_pairs_equal_gathered_images():
    # image_index = [0,0,0,1,1,1,2,2,2]: the grouped cross-attention path.
    fusion = ALBEFFusionEncoder(width=32, image_width=24, num_layers=2, num_heads=4, ffn_dim=64).eval()
    images, text = torch.randn(3, 10, 24), torch.randn(9, 6, 32)
    mask = torch.ones(9, 6, dtype=torch.long)
    mask[4, 2:] = 0
    index = torch.arange(3).repeat_interleave(3)
    gathered = fusion(text, mask, images[index]).last_hidden_state
    for cls_only in (False, True):
        grouped = fusion(text, mask, images, image_index=index, cls_only=cls_only).last_hidden_state
        torch.testing.assert_close(grouped, gathered[:, : grouped.size(1)], atol=1e-5, rtol=1e-5)


def test_group_by_image():
    from torchmm_ext.modules.text_encoder import _group_by_image

    order, runs = _group_by_image(torch.arange(3).repeat_interleave(4), 3)
    assert order is None and runs == [4, 4, 4]  # already in runs
    order, runs = _group_by_image(torch.tensor([0, 2, 2, 1, 0]), 3)
    assert order.tolist() == [0, 4, 3, 1, 2] and runs == [2, 1, 2]  # stable
    order, runs = _group_by_image(torch.tensor([0, 0, 2]), 4)
    assert order is None and runs == [2, 0, 1, 0]  # unused images: empty runs
