"""ELIP token pruning on the ViT: selection and merging against hand-computed values, the
sequence lengths of the published schedule, a second (published-style) implementation of the
pruned forward, guidance on a planted case, and the bad-input errors."""

import pytest
import torch
from torch import nn

from torchmm_ext.modules.efficiency import applied_methods
from torchmm_ext.modules.token_pruning import (
    apply_token_pruning,
    keep_count,
    keep_ratio_at,
    merge_tokens,
    pruned_sequence_lengths,
    select_tokens,
    TextGuidedTokenMerger,
)
from torchmm_ext.modules.vision_transformer import TokenReductionContext, VisionTransformer


def vit(image_size=32, patch_size=8, width=16, depth=4, heads=2, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(image_size=image_size, patch_size=patch_size, width=width, depth=depth,
                             num_heads=heads, mlp_dim=2 * width)


def record_lengths(encoder):
    """Sequence length entering each block in the real (gradient-enabled) forward; the
    look-ahead runs under no_grad."""
    lengths = []
    for block in encoder.blocks:
        block.register_forward_pre_hook(
            lambda m, args: lengths.append(args[0].shape[1]) if torch.is_grad_enabled() else None)
    return lengths


def test_planted_scores_keep_top_k_in_original_order_and_merge_the_rest_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05], [0.4, 0.0, 0.2, 0.1, 0.3]], requires_grad=True)
    tokens = torch.randn(2, 6, 3, requires_grad=True)  # CLS + 5
    sel = select_tokens(scores, num_keep=2)
    assert sel.keep_index.tolist() == [[1, 3], [0, 4]]  # top-2, ascending
    out = merge_tokens(tokens, sel)
    assert out.shape == (2, 4, 3)
    torch.testing.assert_close(out[:, 0], tokens[:, 0])
    torch.testing.assert_close(out[0, 1:3], tokens[0, [2, 4]])
    torch.testing.assert_close(out[1, 1:3], tokens[1, [1, 5]])
    # Dropped of sample 0: patches 0, 2, 4 with scores 0.1, 0.05, 0.05 -> weights / (0.2 + 1e-6).
    d = 0.2 + 1e-6
    merged0 = (0.1 * tokens[0, 1] + 0.05 * tokens[0, 3] + 0.05 * tokens[0, 5]) / d
    merged1 = (0.2 * tokens[1, 3] + 0.1 * tokens[1, 4] + 0.0 * tokens[1, 2]) / (0.3 + 1e-6)
    torch.testing.assert_close(out[0, 3], merged0)
    torch.testing.assert_close(out[1, 3], merged1)
    # Gradient reaches the features with the merge weights, never the scores.
    out.sum().backward()
    assert scores.grad is None
    torch.testing.assert_close(tokens.grad[0, :, 0], torch.tensor([1, 0.1 / d, 1, 0.05 / d, 1, 0.05 / d]))


def test_keep_counts_and_published_lengths():
    assert [keep_count(256, r) for r in (0.9, 0.65, 0.4)] == [230, 166, 102]
    assert keep_count(100, 0.29) == 29
    assert pruned_sequence_lengths(256, 12, [2, 4, 10], [230, 166, 102]) == [257] * 2 + [232] * 2 + [168] * 6 + [104] * 2


@pytest.mark.parametrize("lookahead", [True, False])
def test_sequence_length_per_stage_at_256_px_with_the_published_schedule(lookahead):
    # A narrow ViT with 16 px patches at 256 px has ViT-B/16's token counts.
    encoder = vit(image_size=256, patch_size=16, width=8, depth=12, heads=1)
    report = apply_token_pruning(encoder, [2, 4, 10], [0.9, 0.65, 0.4], lookahead=lookahead)
    assert report.tokens_per_layer == [257] * 2 + [232] * 2 + [168] * 6 + [104] * 2
    assert 0.70 < report.token_fraction < 0.72 and "[2, 4, 10]" in report.format()
    lengths = record_lengths(encoder)
    out = encoder(torch.randn(1, 3, 256, 256), guidance=torch.randn(1, 8))
    assert lengths == report.tokens_per_layer and out.last_hidden_state.shape == (1, 104, 8)
    assert applied_methods(encoder)["token_pruning"] == dict(
        begin_layers=[2, 4, 10], keep_ratios=[0.9, 0.65, 0.4], guidance_weight=0.2, lookahead=lookahead,
        prune_momentum=False, eval_pruning=True)


def elip_reference(encoder, images, guidance, begin_layers, keep_counts, lookahead, weight=0.2):
    """ELIP's ViT forward written after the published loop (guoyang9/ELIP ALBEF/models/vit.py):
    prune *before* block i, one sample at a time, descending sort."""
    x = encoder.embeddings(images).embeddings
    depth = len(encoder.blocks)
    previous_input = None
    for i, blk in enumerate(encoder.blocks):
        if i in begin_layers:
            n_keep = keep_counts[begin_layers.index(i)]
            end = (begin_layers + [depth])[begin_layers.index(i) + 1]
            with torch.no_grad():
                tmp = (x if lookahead else previous_input).clone()
                tmp[:, 0] = weight * guidance + (1 - weight) * tmp[:, 0]
                first, last = (i, end - 1) if lookahead else (i - 1, i - 1)
                for j in range(first, last):
                    tmp = encoder.blocks[j](tmp)
                attn = encoder.block_attention(last, tmp).mean(dim=1)[:, 0, 1:]
                value, order = attn.sort(dim=-1, descending=True)
            rows = []
            for b in range(x.size(0)):
                keep = order[b, :n_keep].sort().values + 1
                drop, w = order[b, n_keep:] + 1, value[b, n_keep:]
                w = w / (w.sum() + 1e-6)
                merged = (x[b, drop] * w[:, None]).sum(0, keepdim=True)
                rows.append(torch.cat([x[b, :1], x[b, keep], merged]))
            x = torch.stack(rows)
        previous_input = x
        x = blk(x)
    return encoder.norm(x)


@pytest.mark.parametrize("lookahead", [True, False])
def test_pruned_forward_matches_a_published_style_reference(lookahead):
    encoder = vit(image_size=48, patch_size=8, width=16, depth=6)  # 36 patches
    images, guidance = torch.randn(3, 3, 48, 48), torch.randn(3, 16)
    report = apply_token_pruning(encoder, [1, 2, 4], [0.75, 0.5, 0.25], lookahead=lookahead)
    assert report.keep_counts == [27, 18, 9]
    out = encoder(images, guidance=guidance).last_hidden_state
    ref = elip_reference(encoder, images, guidance, [1, 2, 4], [27, 18, 9], lookahead)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # Gradient flows through the kept and merged features to the patch embedding.
    out.sum().backward()
    assert encoder.embeddings.conv_projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("lookahead", [True, False])
def test_keep_ratio_one_everywhere_reproduces_the_unpruned_outputs_exactly(lookahead):
    plain = vit(depth=4)
    pruned = vit(depth=4)
    apply_token_pruning(pruned, [1, 2, 3], [1.0, 1.0, 1.0], lookahead=lookahead)
    images, guidance = torch.randn(2, 3, 32, 32), torch.randn(2, 16)
    for mode in (True, False):
        plain.train(mode), pruned.train(mode)
        assert torch.equal(plain(images).last_hidden_state, pruned(images, guidance=guidance).last_hidden_state)


def planted_merger_case():
    """One block whose CLS query attends to the patch most aligned with the CLS: patches are
    distinct basis directions, the CLS is zero, so only the guidance decides."""
    encoder = vit(image_size=16, patch_size=8, width=8, depth=2, heads=1)  # 4 patches
    block = encoder.blocks[1]
    with torch.no_grad():
        w = torch.zeros(24, 8)
        w[:8] = 20 * torch.eye(8)  # q
        w[8:16] = torch.eye(8)  # k
        block.attention.input_proj.weight.copy_(w)
        block.attention.input_proj.bias.zero_()
    tokens = torch.zeros(2, 5, 8)
    for p in range(4):
        tokens[:, 1 + p, p] = 3.0
    return encoder, tokens


def test_guidance_decides_which_tokens_are_kept_on_a_planted_case():
    encoder, tokens = planted_merger_case()
    text = torch.zeros(2, 8)
    text[0, 1], text[1, 3] = 5.0, 5.0  # two "texts" on the same image: patch 1 vs patch 3
    merger = TextGuidedTokenMerger(num_keep=1, stage_end=2, guidance_weight=0.2)
    out = merger(tokens, TokenReductionContext(encoder, 0, text))
    assert torch.equal(out[0, 1], tokens[0, 2]) and torch.equal(out[1, 1], tokens[1, 4])
    # Control: without the text's weight both keep the same token.
    blind = TextGuidedTokenMerger(num_keep=1, stage_end=2, guidance_weight=0.0)
    out = blind(tokens, TokenReductionContext(encoder, 0, text))
    assert torch.equal(out[0, 1], out[1, 1])


def test_eval_scores_with_the_image_cls_and_eval_pruning_off_keeps_every_token():
    encoder = vit(depth=4)
    images = torch.randn(2, 3, 32, 32)
    apply_token_pruning(encoder, [2], [0.5])
    unguided = vit(depth=4)
    apply_token_pruning(unguided, [2], [0.5], guidance_weight=0.0)
    encoder.eval(), unguided.eval()
    # Without guidance (evaluation) the scores come from the image CLS alone.
    assert torch.equal(encoder(images).last_hidden_state, unguided(images).last_hidden_state)
    assert encoder(images).last_hidden_state.shape[1] == 1 + 8 + 1
    # Training without guidance is a bug the reducer names.
    encoder.train()
    with pytest.raises(ValueError, match=r"guidance_weight=0.2 .*without guidance"):
        encoder(images)
    full = vit(depth=4)
    apply_token_pruning(full, [2], [0.5], eval_pruning=False)
    full.eval()
    assert full(images).last_hidden_state.shape[1] == 17


class Wrapper(nn.Module):
    """A user's model holding a ViT and no text guidance."""

    def __init__(self):
        super().__init__()
        self.backbone = vit(depth=4)
        self.head = nn.Linear(16, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(begin_layers=[1, 2], keep_ratios=[0.5]), r"begin_layers=\[1, 2\] and token_pruning.keep_ratios=\[0.5\]"),
    (dict(begin_layers=[], keep_ratios=[]), r"non-empty"),
    (dict(begin_layers=[0], keep_ratios=[0.5]), r"begin_layers=\[0\]: prune point 0 is outside the ViT's 4 blocks"),
    (dict(begin_layers=[1, 4], keep_ratios=[0.5, 0.25]), r"prune point 4 is outside.*1\.\.3"),
    (dict(begin_layers=[2, 2], keep_ratios=[0.5, 0.25]), r"begin_layers=\[2, 2\] must be strictly increasing"),
    (dict(begin_layers=[3, 1], keep_ratios=[0.5, 0.25]), r"begin_layers=\[3, 1\] must be strictly increasing"),
    (dict(begin_layers=[1], keep_ratios=[0.0]), r"keep_ratios=\[0.0\]: 0.0 is outside \(0, 1\]"),
    (dict(begin_layers=[1], keep_ratios=[1.5]), r"keep_ratios=\[1.5\]: 1.5 is outside"),
    (dict(begin_layers=[1, 2], keep_ratios=[0.5, 0.75]), r"keep_ratios=\[0.5, 0.75\] must not increase"),
    (dict(begin_layers=[1], keep_ratios=[0.05]), r"keep_ratios=\[0.05\]: 0.05 of the ViT's 16 patches keeps 0"),
    (dict(begin_layers=[1], keep_ratios=[0.5], guidance_weight=1.5), r"guidance_weight=1.5 must be"),
    (dict(begin_layers=[1], keep_ratios=[0.5], keep_warmup=[3, 1]), r"keep_warmup=\[3, 1\] must be \[start, end\]"),
    (dict(begin_layers=[1], keep_ratios=[0.5], keep_warmup=[1]), r"keep_warmup=\[1\] must be"),
    (dict(begin_layers=[1], keep_ratios=[0.5], keep_warmup=2), r"keep_warmup=2 must be"),
])
def test_bad_schedules_name_the_key_and_value(kwargs, message):
    encoder = vit(depth=4)
    with pytest.raises(ValueError, match=message):
        apply_token_pruning(encoder, **kwargs)
    assert not len(encoder.token_reducers) and not applied_methods(encoder)


def test_models_without_text_guidance_and_momentum_need_the_right_settings():
    model = Wrapper()
    with pytest.raises(ValueError, match=r"guidance_weight=0.2: Wrapper does not pass text guidance"):
        apply_token_pruning(model, [1], [0.5])
    with pytest.raises(ValueError, match=r"prune_momentum=True but Wrapper has no momentum copy"):
        apply_token_pruning(model, [1], [0.5], guidance_weight=0.0, prune_momentum=True)
    # Image-CLS pruning works on any model holding one ViT, found without block_groups().
    report = apply_token_pruning(model, [1], [0.5], guidance_weight=0.0)
    assert report.encoders == ["backbone"] and list(model.backbone.token_reducers) == ["0"]
    assert model.backbone(torch.randn(1, 3, 32, 32)).last_hidden_state.shape == (1, 10, 16)
    with pytest.raises(ValueError, match="already has token reducers"):
        apply_token_pruning(model, [1], [0.5], guidance_weight=0.0)


def test_keep_ratio_warmup_follows_evits_cosine():
    assert keep_ratio_at(0.4, 0.99, (1, 3)) == 1.0
    assert keep_ratio_at(0.4, 1.0, (1, 3)) == pytest.approx(1.0)
    assert keep_ratio_at(0.4, 2.0, (1, 3)) == pytest.approx(0.7)  # half-way: cos(pi / 2) = 0
    assert keep_ratio_at(0.4, 1.5, (1, 3)) == pytest.approx(0.4 + 0.6 * (1 + 2 ** -0.5) / 2)
    assert keep_ratio_at(0.4, 3.0, (1, 3)) == keep_ratio_at(0.4, 9.0, (1, 3)) == 0.4
    assert keep_ratio_at(0.4, 0.0, None) == 0.4


def test_keep_warmup_keeps_every_token_then_reaches_the_schedule():
    from torchmm_ext.engine import StepContext

    plain, pruned = vit(depth=4), vit(depth=4)
    apply_token_pruning(pruned, [1, 2, 3], [0.9, 0.65, 0.4], keep_warmup=[1, 3])
    assert applied_methods(pruned)["token_pruning"]["keep_warmup"] == [1.0, 3.0]
    reducers = [pruned.token_reducers[k] for k in sorted(pruned.token_reducers, key=int)]
    assert [r.num_keep for r in reducers] == [14, 10, 6]  # outside training: the schedule's
    images, guidance = torch.randn(2, 3, 32, 32), torch.randn(2, 16)

    def step(epoch, step_in_epoch, steps=10):
        for r in reducers:
            r.before_train_step(StepContext(epoch, step_in_epoch, steps, epoch * steps + step_in_epoch))
        return [r.num_keep for r in reducers]

    plain.train(), pruned.train()
    assert step(0, 5) == [16, 16, 16]  # before the warm-up: the unpruned model exactly
    assert torch.equal(plain(images).last_hidden_state, pruned(images, guidance=guidance).last_hidden_state)
    # Half-way (epoch 2.0): ratios 0.95, 0.825, 0.7 of 16 patches.
    assert step(2, 0) == [keep_count(16, 0.95), keep_count(16, 0.825), keep_count(16, 0.7)] == [15, 13, 11]
    assert pruned(images, guidance=guidance).last_hidden_state.shape[1] == 1 + 11 + 1
    assert step(3, 0) == [14, 10, 6]
    assert pruned(images, guidance=guidance).last_hidden_state.shape[1] == 1 + 6 + 1


def test_training_loop_sets_the_schedule_before_every_step():
    """``train_one_epoch`` calls ``before_train_step`` of every submodule before the step runs."""
    from torch.utils.data import TensorDataset
    from torchdata.stateful_dataloader import StatefulDataLoader

    from torchmm_ext.engine import build_optimizer, StepOutput, train_one_epoch

    encoder = vit(depth=4)
    apply_token_pruning(encoder, [2], [0.5], guidance_weight=0.0, keep_warmup=[0, 1])
    model = nn.Sequential(encoder)
    seen = []

    def step_fn(m, batch, ctx):
        seen.append((ctx.step_in_epoch, encoder.token_reducers["1"].num_keep))
        return StepOutput(m(batch[0]).last_hidden_state.mean(), {})

    loader = StatefulDataLoader(TensorDataset(torch.randn(8, 3, 32, 32)), batch_size=2)
    train_one_epoch(model, loader, build_optimizer(model, lr=1e-3, weight_decay=0.0), None, step_fn,
                    epoch=0, device=torch.device("cpu"), precision="fp32", grad_clip=None, log_every=10,
                    metric_logger=None, global_step=0)
    # 4 steps: epochs 0, 0.25, 0.5, 0.75 of the [0, 1] warm-up, ratio 0.5 + 0.5 (1 + cos(pi t)) / 2.
    assert seen == [(i, keep_count(16, keep_ratio_at(0.5, i / 4, (0, 1)))) for i in range(4)]
    assert [k for _, k in seen] == [16, 14, 12, 9]  # 16 x 0.927, 0.75, 0.573
