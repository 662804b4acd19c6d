"""Process-group setup and collectives that degrade to no-ops in a single process.

Launch many processes with ``torchrun`` (one or many nodes, c10d rendezvous); this module
only reads the environment torchrun sets, it never spawns processes itself.
"""

from __future__ import annotations

import os
import random
from datetime import timedelta
from typing import Any, List, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn, Tensor
from torch.nn.parallel import DistributedDataParallel
from torchmultimodal.utils.distributed import BackpropType, concat_gather_all_gpu


class DistInfo(NamedTuple):
    """Where this process sits in the job.

    Attributes:
        rank (int): global rank.
        world_size (int): number of processes.
        local_rank (int): rank on this node (selects the GPU).
        device (torch.device): the device this process computes on.
        is_distributed (bool): whether a process group was initialised.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_distributed: bool


def is_dist_ready() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group from torchrun's environment, if any.

    With ``WORLD_SIZE > 1`` (and ``RANK``/``LOCAL_RANK`` set) a process group is created
    through ``env://`` (nccl when CUDA is available, else gloo) and the CUDA device is set from
    ``LOCAL_RANK``. Otherwise this is a single process and no group is created.

    Args:
        backend (Optional[str]): force a backend ("gloo", "nccl"). Default: None (auto).
        timeout_s (float): collective timeout in seconds. Default: 1800.

    Returns:
        DistInfo: rank, world size, local rank, device, whether distributed.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if use_cuda and local_rank >= torch.cuda.device_count():
        visible = torch.cuda.device_count()
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but this node has {visible} visible CUDA device(s): start at most "
            f"{visible} process(es) per node (torchrun --nproc_per_node={visible}), or hide the GPUs "
            f"(CUDA_VISIBLE_DEVICES=) to run the processes on CPU with gloo"
        )
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)  # before init: nccl binds communicators to it
    if world_size <= 1 or "RANK" not in os.environ:
        return DistInfo(0, 1, 0, device, False)
    if not is_dist_ready():
        backend = backend or ("nccl" if use_cuda else "gloo")
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            **kwargs,
        )
    return DistInfo(rank, world_size, local_rank, device, True)


def leaves_parameters_unused(model: nn.Module) -> bool:
    """Whether some step of ``model``'s training leaves trainable parameters without gradient:
    a submodule says so with ``ddp_find_unused_parameters = True`` (the DAS search, whose
    skipped candidates' adapters sit out the step)."""
    return any(getattr(m, "ddp_find_unused_parameters", False) for m in model.modules())


def wrap_ddp(model: nn.Module, info: DistInfo, find_unused_parameters: Optional[bool] = None) -> nn.Module:
    """The model the training loop steps: DDP under torchrun, the model itself otherwise.

    Args:
        model (nn.Module): the model, already on ``info.device``.
        info (DistInfo): from :func:`init_distributed`.
        find_unused_parameters (Optional[bool]): DDP's flag (``train.find_unused_parameters``);
            None: on exactly when :func:`leaves_parameters_unused` (it costs a graph
            traversal per step, so it stays off otherwise).

    Returns:
        nn.Module: ``DistributedDataParallel(model, ...)`` or ``model``.
    """
    if not info.is_distributed:
        return model
    if find_unused_parameters is None:
        find_unused_parameters = leaves_parameters_unused(model)
    return DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)


def get_rank() -> int:
    """Global rank (0 when not distributed)."""
    return dist.get_rank() if is_dist_ready() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_dist_ready() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for all ranks; no-op in a single process."""
    if is_dist_ready():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one exists (call at the end of a recipe)."""
    if is_dist_ready():
        dist.destroy_process_group()


destroy = cleanup


def all_gather_no_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, without gradient.

    Args:
        tensor (Tensor): same shape on every rank.

    Returns:
        Tensor: ``(world_size * n, ...)`` in rank order; the input itself when not distributed.
    """
    if not is_dist_ready() or get_world_size() == 1:
        return tensor
    return concat_gather_all_gpu(tensor.detach().contiguous(), BackpropType.NONE)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient back to the slice's owner."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rank = get_rank()
        ctx.n = tensor.shape[0]
        out = [torch.empty_like(tensor) for _ in range(get_world_size())]
        dist.all_gather(out, tensor.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        # each rank's loss depends on every slice: sum the gradients over ranks, keep ours
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, differentiably.

    Used for image-text contrastive losses over the global batch. The local slice receives
    the gradient of every rank's loss with respect to it (summed), so with DDP's gradient
    averaging the update equals that of the mean loss over ranks.

    Args:
        tensor (Tensor): same shape on every rank.

    Returns:
        Tensor: ``(world_size * n, ...)``; the input itself when not distributed.
    """
    if not is_dist_ready() or get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place (no-op in a single process); returns it."""
    if is_dist_ready() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over ranks in place; returns it."""
    all_reduce_sum(tensor)
    world = get_world_size()
    if world > 1:
        tensor.div_(world)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank; returns it (input when single)."""
    if not is_dist_ready() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    """Collect a picklable object from every rank, in rank order (``[obj]`` when single)."""
    if not is_dist_ready() or get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and all CUDA devices) with ``seed + rank``.

    Args:
        seed (int): the run's seed.
        rank (int): offset so that ranks draw different augmentations/dropout. Default: 0.
    """
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def use_deterministic_training() -> None:
    """Make training bitwise reproducible on this machine: the same run twice, or a run killed
    and resumed, gives the same tensors. Call it before the model is built and before any
    matrix product (recipes do, through ``train.deterministic``); use fp32 with it (bf16 CPU
    kernels are not bitwise reproducible).

    Sets PyTorch's deterministic algorithms (an op without one raises instead of running),
    disables cuDNN autotuning and TF32, pins cuBLAS's workspace, and asks MKL for the
    conditional numerical reproducibility mode of this CPU (``MKL_CBWR=AUTO``: results stop
    depending on the memory alignment of the operands), unless the environment already chose one.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("MKL_CBWR", "AUTO")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
