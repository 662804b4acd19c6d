"""The DAS search: the gate update against a hand computation, sampling without replacement that
follows sigmoid(gates), a planted harmful block found, the rounds driven by the training loop's
step hook, skip.json round trips and a resumed search that continues the same gates and draws."""

import json
import math
from collections import Counter
from typing import NamedTuple

import pytest
import torch
from torch import nn

from torchmm_ext.engine.train_loop import StepContext, StepOutput, train_one_epoch
from torchmm_ext.modules.adapters import apply_das
from torchmm_ext.modules.das_search import DASSearch, DASSearchConfig, gate_update, sample_skip_sets
from torchmm_ext.modules.efficiency import applied_methods
from torchmm_ext.modules.vision_transformer import VisionTransformer


def test_gate_update_matches_a_hand_computation():
    gates = torch.tensor([0.0, 1.0, -0.5, 2.0])
    sets = [[0, 1], [1, 2], [0, 3]]
    losses = [0.5, 1.0, 2.0]
    rewards = [math.exp(-l) for l in losses]
    new = gate_update(gates, sets, rewards, lr=0.7)
    sig = [1 / (1 + math.exp(-g)) for g in gates.tolist()]
    mean = sum(rewards) / 3
    expected = gates.tolist()
    for s, r in zip(sets, rewards):
        for i in s:
            expected[i] += 0.7 * (r - mean) * sig[i] * (1 - sig[i])
    torch.testing.assert_close(new, torch.tensor(expected))
    # block 0 was in the best and the worst set, block 1 in the two best: it rises most
    assert new[1] - gates[1] > new[0] - gates[0] and new[3] < gates[3]


def test_sampling_is_without_replacement_and_follows_sigmoid_gates():
    gen = torch.Generator().manual_seed(0)
    prob = torch.sigmoid(torch.tensor([2.0, 0.0, -2.0, 0.0]))
    counts = Counter()
    for _ in range(10000):
        counts[torch.multinomial(prob, 1, generator=gen).item()] += 1
    expected = (prob / prob.sum()).tolist()  # 0.44, 0.25, 0.06, 0.25
    for i in range(4):  # binomial std <= 0.005
        assert counts[i] / 10000 == pytest.approx(expected[i], abs=0.02)
    sets = sample_skip_sets(prob, 2, 5, gen)
    assert len(sets) == 5 and len({tuple(s) for s in sets}) == 5
    assert all(s == sorted(s) and len(set(s)) == 2 for s in sets)
    inclusion = Counter(i for _ in range(500) for i in sample_skip_sets(prob, 2, 1, gen)[0])
    assert inclusion[0] > inclusion[1] > inclusion[2] and inclusion[3] > inclusion[2]
    with pytest.raises(ValueError, match="cannot draw 7 distinct sets of 2 out of 4"):
        sample_skip_sets(prob, 2, 7, gen)


class Batch(NamedTuple):
    x: torch.Tensor


class PlantedModel(nn.Module):
    """A 4-block ViT-style stack whose block 2 adds a large constant: skipping it is best."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = VisionTransformer(image_size=8, patch_size=4, width=8, depth=4, num_heads=2, mlp_dim=16)
        with torch.no_grad():
            for block in self.encoder.blocks:
                block.feedforward.model[-1].weight.zero_()  # MLP output off: blocks near identity
                block.feedforward.model[-1].bias.zero_()
            self.encoder.blocks[2].feedforward.model[-1].bias.fill_(3.0)
        self.head = nn.Linear(8, 1)

    def block_groups(self):
        return {"vision": self.encoder.blocks}

    def forward(self, x):
        h = x
        for block in self.encoder.blocks:
            h = block(h)
        return (h.pow(2).mean() + self.head(h).mean() * 0)


def step_fn(model, batch, ctx):
    return StepOutput(model(batch.x), {})


def test_the_search_finds_a_planted_harmful_block(tmp_path):
    model = PlantedModel()
    apply_das(model, search={"skip_num": 1, "das_step": 3, "das_turn": 1, "warmup_epochs": 0, "lr": 5.0,
                             "output": str(tmp_path / "skip.json")}, adapter_dim=2)
    search = model.das_search
    hook = search.make_step_hook([torch.randn(5, 8) for _ in range(16)], lambda xs: Batch(torch.stack(xs)), 4, "val")
    run_step = lambda b: step_fn(model, b, None)  # noqa: E731
    for step in range(60):
        hook(model, StepContext(0, step, 60, step), run_step)
    assert search.top_k() == [2]
    assert int(torch.argmax(search.gates)) == 2 and search.gates[2] > 0.5
    assert len(search.gate_history) == 60 and len(search.reward_history) == 60
    saved = json.loads((tmp_path / "skip.json").read_text())
    assert saved["skip"] == {"vision": [2]} and saved["model"] == "PlantedModel"
    assert saved["epochs"][-1]["skip"] == [2] and len(saved["gate_history"]) == 60
    # skip.json round trip: a fresh model skips exactly that block
    fresh = PlantedModel()
    report = apply_das(fresh, skip_from=str(tmp_path / "skip.json"), adapter_dim=2)
    assert report.skipped == {"vision": [2]}
    assert type(fresh.encoder.blocks[2]).__name__ == "SkipAdapter"
    assert applied_methods(fresh)["das"]["skip"] == {"vision": [2]}


def test_scoring_leaves_buffers_momentum_rng_and_train_mode_alone():
    model = PlantedModel()
    model.register_buffer("queue", torch.zeros(3))
    apply_das(model, search={"skip_num": 1, "das_step": 2}, adapter_dim=2)
    model.train()

    def noisy_step(batch):
        model.queue.add_(1.0)  # like ALBEF's enqueue
        assert not model.training  # scored in eval mode
        torch.rand(1)  # draws from the global RNG
        return StepOutput(model(batch.x), {})

    batch = Batch(torch.randn(2, 5, 8))
    state = torch.random.get_rng_state()
    losses = model.das_search.score(model, noisy_step, batch, [[0], [2]])
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(model.queue, torch.zeros(3)) and model.training
    assert losses[1] < losses[0]  # skipping the planted block is better


def tiny_loader(epoch, n=12):
    gen = torch.Generator().manual_seed(epoch)
    data = [Batch(torch.randn(5, 8, generator=gen)) for _ in range(n)]
    return [Batch(torch.stack([b.x for b in data[i:i + 2]])) for i in range(0, n, 2)]


def run_epochs(model, epochs, start_epoch=0, optimizer=None):
    torch.manual_seed(1)
    heldout = [torch.randn(5, 8) for _ in range(10)]
    hooks = [model.das_search.make_step_hook(heldout, lambda xs: Batch(torch.stack(xs)), 3, "val")]
    optimizer = optimizer or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for epoch in range(start_epoch, start_epoch + epochs):
        train_one_epoch(model, tiny_loader(epoch), optimizer, None, step_fn, epoch=epoch, device=torch.device("cpu"),
                        precision="fp32", step_hooks=hooks)
    return optimizer


def test_the_training_loop_drives_the_search_and_a_resumed_search_continues_it():
    settings = {"skip_num": 2, "das_step": 3, "das_turn": 2, "warmup_epochs": 1}
    straight = PlantedModel()
    apply_das(straight, search=settings, adapter_dim=2)
    run_epochs(straight, 3)
    # warm-up epoch 0: no rounds; epochs 1-2: 6 steps each, a round every 2 steps
    assert len(straight.das_search.reward_history) == 6
    assert {r["epoch"] for r in straight.das_search.reward_history} == {1, 2}
    assert [r["epoch"] for r in straight.das_search.epoch_results] == [0, 1, 2]

    first = PlantedModel()
    apply_das(first, search=settings, adapter_dim=2)
    optimizer = run_epochs(first, 2)
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in first.state_dict().items()}
    assert "das_search.gates" in saved and "das_search._extra_state" in saved
    resumed = PlantedModel()
    apply_das(resumed, search=settings, adapter_dim=2)
    resumed.load_state_dict(saved)
    opt2 = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], lr=0.1)
    opt2.load_state_dict(optimizer.state_dict())
    run_epochs(resumed, 1, start_epoch=2, optimizer=opt2)
    torch.testing.assert_close(resumed.das_search.gates, straight.das_search.gates)
    assert resumed.das_search.reward_history == straight.das_search.reward_history
    assert resumed.das_search.current == straight.das_search.current


def test_search_settings_are_checked():
    with pytest.raises(ValueError, match="das.search.das_step=4: there are only 3 distinct sets of 1 among 3"):
        DASSearch([("a", 0), ("a", 1), ("a", 2)], [[], [], []], DASSearchConfig(skip_num=1, das_step=4), "M", {"a": 3})
    with pytest.raises(ValueError, match="das.search.das_turn must be a positive integer"):
        DASSearchConfig.from_mapping({"das_turn": 0})
    model = PlantedModel()
    apply_das(model, search={"skip_num": 1}, adapter_dim=2)
    with pytest.raises(ValueError, match="held-out batches, but data.val_file .* is empty"):
        model.das_search.make_step_hook([], None, 2, "data.val_file ('val.json')")


def test_recipes_without_held_out_data_are_told_so():
    from torchmm_ext.engine import ConfigError
    from torchmm_ext.engine.efficiency import method_step_hooks

    model = PlantedModel()
    assert method_step_hooks(model, lambda: 1 / 0, None, 2, "val") == []  # no method needs data: not built
    apply_das(model, search={"skip_num": 1}, adapter_dim=2)
    with pytest.raises(ConfigError, match=r"das needs held-out batches during training, but the recipe has no "
                                          r"validation split \(data.val_file\)"):
        method_step_hooks(model, lambda: None, None, 2, "data.val_file")
    with pytest.raises(ValueError, match=r"held-out batches, but data.val_file \('v.json'\) is empty"):
        method_step_hooks(model, lambda: [], None, 2, "data.val_file ('v.json')")


def test_scoring_albef_retrieval_leaves_its_momentum_copies_and_queue_as_they_were():
    from torchmm_ext.models.albef import albef_model_for_retrieval

    torch.manual_seed(0)
    model = albef_model_for_retrieval(image_size=32, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2,
                                      vision_mlp_dim=64, text_width=32, text_layers=1, fusion_layers=1, text_heads=2,
                                      text_ffn_dim=64, vocab_size=40, embed_dim=16, queue_size=8)
    with torch.no_grad():  # published momentum weights differ from the online ones
        for p in model.vision_encoder_m.parameters():
            p.add_(0.05)
    apply_das(model, search={"skip_num": 1, "das_step": 2}, adapter_dim=4)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    images, ids = torch.randn(4, 3, 32, 32), torch.randint(5, 40, (4, 6))
    run = lambda b: model(b[0], b[1], torch.ones_like(b[1]), torch.arange(4), 0.4)  # noqa: E731
    losses = model.das_search.score(model, run, (images, ids), [[0], [3]])
    assert len(losses) == 2 and losses[0] != losses[1]
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert changed == []
    # the same pass outside the search does change them (so the check above can fail)
    run((images, ids))
    assert not torch.equal(model.queue.image_queue, before["queue.image_queue"])
    assert not torch.equal(model.vision_encoder_m.blocks[0].block.attention.input_proj.weight,
                           before["vision_encoder_m.blocks.0.block.attention.input_proj.weight"])


def _ddp_search_worker(rank: int, port: int) -> None:
    import os

    from torch.nn.parallel import DistributedDataParallel

    from testing_utils import hide_gpus
    from torchmm_ext.engine import distributed as D

    hide_gpus()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    info = D.init_distributed(backend="gloo")
    try:
        def build():
            model = PlantedModel()
            apply_das(model, search={"skip_num": 1, "das_step": 2, "das_turn": 1, "warmup_epochs": 0, "lr": 5.0},
                      adapter_dim=2)
            return model

        model = build()
        train_model = D.wrap_ddp(model, info)  # train.find_unused_parameters: None (automatic)
        assert isinstance(train_model, DistributedDataParallel) and train_model.find_unused_parameters
        assert D.wrap_ddp(build(), info, find_unused_parameters=False).find_unused_parameters is False
        adapters_only = PlantedModel()
        apply_das(adapters_only, adapter_dim=2)  # a fixed skip list: every adapter trains every step
        assert D.wrap_ddp(adapters_only, info).find_unused_parameters is False

        torch.manual_seed(1)
        heldout = [torch.randn(5, 8) for _ in range(10)]
        hooks = [model.das_search.make_step_hook(heldout, lambda xs: Batch(torch.stack(xs)), 3, "val")]
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        loader = tiny_loader(rank, n=8)  # each rank its own batches
        train_one_epoch(train_model, loader, optimizer, None, step_fn, epoch=0, device=torch.device("cpu"),
                        precision="fp32", step_hooks=hooks)
        search = model.das_search
        assert len(search.reward_history) == 4
        assert len({tuple(r["skip_sets"][0]) for r in search.reward_history} | {(search.current[0],)}) > 1
        # every rank drew the same skip sets and scored the same batch: the gates agree, and
        # DDP kept the trained adapters and heads equal
        gathered = D.all_gather_no_grad(search.gates[None])
        torch.testing.assert_close(gathered[0], gathered[1], rtol=0, atol=0)
        trained = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
        both = D.all_gather_no_grad(trained[None])
        torch.testing.assert_close(both[0], both[1])

        # without the flag DDP refuses the second step (its first skipped candidate's adapters
        # had no gradient): what the automatic flag is for
        bare = build()
        bare_ddp = DistributedDataParallel(bare)
        opt = torch.optim.SGD([p for p in bare.parameters() if p.requires_grad], lr=0.1)
        with pytest.raises(RuntimeError, match="find_unused_parameters"):
            for batch in tiny_loader(rank, n=8):
                bare.das_search.draw_training_set()
                opt.zero_grad()
                bare_ddp(batch.x).backward()
                opt.step()
    finally:
        D.cleanup()


def test_search_under_ddp_finds_unused_parameters_and_keeps_ranks_in_step():
    """Two gloo processes: the recipes' DDP wrapper turns find_unused_parameters on for a DAS
    search (a skipped candidate's parallel adapters get no gradient), gates stay equal on both
    ranks; plain DDP fails on the same run."""
    import torch.multiprocessing as mp

    from testing_utils import free_port

    mp.spawn(_ddp_search_worker, args=(free_port(),), nprocs=2, join=True)


def test_a_search_without_step_hooks_is_an_error(tmp_path):
    """A recipe that does not collect method_step_hooks would train one random skip set and
    never update the gates: fit refuses to start."""
    from torchmm_ext.engine import ConfigError
    from torchmm_ext.engine.fit import fit, TrainConfig

    model = PlantedModel()
    apply_das(model, search={"skip_num": 1}, adapter_dim=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ConfigError, match=r"das_search \(das\) acts after every training step, but this recipe "
                                          r"passes no step_hooks: .*method_step_hooks"):
        fit(model=model, loader=tiny_loader(0), optimizer=optimizer, scheduler=None, step_fn=step_fn,
            train_cfg=TrainConfig(epochs=1), device=torch.device("cpu"), output_dir=tmp_path, config_dict={})
    assert not any(tmp_path.iterdir())  # nothing trained or written
