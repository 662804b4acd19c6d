"""Resumable data loaders (torchdata ``StatefulDataLoader``), distributed-aware."""

from typing import Any, Callable, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, SequentialSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

__all__ = ["build_dataloader", "build_eval_dataloader"]


def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    collate_fn: Optional[Callable[[Any], Any]] = None,
    drop_last: bool = False,
    seed: int = 0,
) -> StatefulDataLoader:
    """A training loader whose position can be checkpointed and resumed mid-epoch.

    The sampler is always a :class:`StatefulDistributedSampler`: sharded by rank when
    ``torch.distributed`` is initialised, a single shard otherwise. Its order depends only on
    ``seed`` and the epoch, so call ``loader.sampler.set_epoch(epoch)`` at the start of each
    epoch (also after resuming; the loader state does not hold the epoch).
    ``loader.state_dict()`` / ``load_state_dict()`` restore the position within the epoch,
    including the state of worker processes.

    Args:
        dataset (Dataset): map-style dataset.
        batch_size (int): per-rank batch size.
        shuffle (bool): shuffle each epoch.
        num_workers (int): loader worker processes (persistent when > 0).
        collate_fn (Optional[Callable]): batch collation; default torch's.
        drop_last (bool): drop the last incomplete batch (and, distributed, the tail that does
            not divide evenly across ranks).
        seed (int): shuffling seed, identical on all ranks; also seeds the worker RNGs
            (offset by rank) so augmentations are reproducible.

    Returns:
        StatefulDataLoader: the loader; ``loader.sampler`` has ``set_epoch``.
    """
    rank, world_size = _world()
    sampler = StatefulDistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    generator = torch.Generator()
    generator.manual_seed(seed + rank)  # base seed of the worker processes' RNGs
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        generator=generator,
    )


def build_eval_dataloader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    collate_fn: Optional[Callable[[Any], Any]] = None,
) -> StatefulDataLoader:
    """A plain, ordered, unsharded loader for evaluation.

    Every rank iterates the whole dataset (evaluation encodes everything everywhere and shards
    only the ITM re-ranking), so outputs line up with dataset indices.

    Args:
        dataset (Dataset): map-style dataset.
        batch_size (int): batch size.
        num_workers (int): loader worker processes.
        collate_fn (Optional[Callable]): batch collation; default torch's.

    Returns:
        StatefulDataLoader: the loader, in dataset order, keeping the last partial batch.
    """
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SequentialSampler(dataset),  # type: ignore[arg-type]
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )
