import os

import pytest
import torch
import torch.multiprocessing as mp

from torchmm_ext.engine import distributed as D
from torchmm_ext.engine.checkpoint import build_train_state
from torchmm_ext.engine.train_loop import StepOutput, train_one_epoch
from testing_utils import free_port, hide_gpus

WORLD = 2


def _worker(rank: int, port: int) -> None:
    hide_gpus()  # gloo on the CPU, also on a GPU machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    info = D.init_distributed(backend="gloo")
    try:
        assert info == D.DistInfo(rank, WORLD, rank, torch.device("cpu"), True)
        assert D.get_rank() == rank and D.get_world_size() == WORLD
        assert D.is_main_process() == (rank == 0)

        # gather without grad: rank order along dim 0
        local = torch.full((2, 3), float(rank))
        gathered = D.all_gather_no_grad(local)
        assert torch.equal(gathered, torch.tensor([0.0, 0, 1, 1])[:, None].expand(4, 3))

        # gather with grad: loss_r = sum(w_r * gathered), so d(sum_r loss_r)/d local_k
        # = (w_0 + w_1)[slice k]; the local slice must receive exactly that
        x = torch.full((2,), float(rank + 1), requires_grad=True)
        g = D.all_gather_with_grad(x)
        assert torch.equal(g.detach(), torch.tensor([1.0, 1, 2, 2]))
        weights = torch.arange(4, dtype=torch.float32) * (rank + 1)  # differs per rank
        (g * weights).sum().backward()
        expected = (torch.arange(4.0) * 1 + torch.arange(4.0) * 2)[2 * rank: 2 * rank + 2]
        assert torch.equal(x.grad, expected), (x.grad, expected)

        total = D.all_reduce_sum(torch.tensor([rank + 1.0]))
        assert total.item() == 3.0
        assert D.all_reduce_mean(torch.tensor([rank + 1.0])).item() == 1.5
        assert D.broadcast_object({"from": rank} if rank == 0 else None) == {"from": 0}
        assert D.all_gather_object(rank * 10) == [0, 10]

        # per-rank RNG in train state; epoch metrics averaged over both ranks
        D.seed_everything(0, rank)
        model = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        state = build_train_state(model, opt, None, None, 0, 0, 0)
        assert len(state["rng_per_rank"]) == WORLD
        assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])

        batches = [torch.ones(1, 1)] * 2

        def step_fn(m, batch, ctx):
            return StepOutput(m(batch).sum() * 0, {"r": float(rank)})

        result = train_one_epoch(model, batches, opt, None, step_fn, epoch=0,
                                 device=torch.device("cpu"), precision="fp32")
        assert result.metrics["r"] == 0.5
        D.barrier()
    finally:
        D.cleanup()


def test_two_process_gloo():
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    # torchrun --nproc_per_node=2 on a one-GPU node: rank 1 has no device of its own.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=1 but this node has 1 visible CUDA device.*"
                                           r"--nproc_per_node=1.*CUDA_VISIBLE_DEVICES="):
        D.init_distributed()


def test_single_process_fallbacks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    info = D.init_distributed()
    assert not info.is_distributed and info.world_size == 1 and info.rank == 0
    t = torch.arange(3.0)
    assert D.all_gather_no_grad(t) is t and D.all_gather_with_grad(t) is t
    assert D.all_reduce_sum(t.clone()).tolist() == [0.0, 1.0, 2.0]
    assert D.broadcast_object(5) == 5 and D.is_main_process()
