"""Resumable data loaders (torchdata ``StatefulDataLoader``), distributed-aware."""

from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, SequentialSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

__all__ = ["build_dataloader", "build_eval_dataloader", "LengthGroupedSampler"]


def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _LengthGroupedOrder(DistributedSampler):
    """The shard's shuffled order regrouped so that consecutive ``batch_size`` runs hold samples
    of similar length (see :class:`LengthGroupedSampler`)."""

    def __init__(self, dataset: Dataset, lengths: Sequence[int], batch_size: int, group_batches: int,
                 **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        if len(lengths) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"lengths has {len(lengths)} entries for a dataset of {len(dataset)}")  # type: ignore[arg-type]
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"batch_size and group_batches must be >= 1, got {batch_size} and {group_batches}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group_batches = group_batches

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch + 1)  # distinct from the shuffle's own stream
        group = self.batch_size * self.group_batches
        regrouped = []
        for start in range(0, len(order), group):
            chunk = sorted(order[start:start + group], key=lambda i: self.lengths[i], reverse=True)
            batches = [chunk[b:b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
            # shuffle the batches of a group, keeping a partial last batch last (drop_last drops it)
            full = len(chunk) // self.batch_size
            perm = torch.randperm(full, generator=generator).tolist() + list(range(full, len(batches)))
            regrouped.extend(i for b in perm for i in batches[b])
        return iter(regrouped)


class LengthGroupedSampler(StatefulDistributedSampler, _LengthGroupedOrder):
    """A resumable, rank-sharded sampler whose batches hold texts of similar length.

    Each epoch's shuffled shard (as :class:`StatefulDistributedSampler` draws it) is cut into
    groups of ``group_batches * batch_size`` samples; each group is sorted by length and cut into
    batches, and the batches of a group are shuffled. Padding to the longest text of a batch then
    wastes little compute (Hugging Face ``Trainer``'s ``group_by_length`` does the same; its
    sampler is not resumable mid-epoch nor tied to torchdata's loader, hence this one). The order
    depends only on ``seed``, the epoch and ``lengths``, so mid-epoch resume stays exact.

    Args:
        dataset (Dataset): map-style dataset.
        lengths (Sequence[int]): a length per sample (e.g. words per caption).
        batch_size (int): the loader's per-rank batch size.
        group_batches (int): batches per length-sorted group: larger groups pad less but make
            batches less random.
        num_replicas, rank, shuffle, seed, drop_last: as for ``StatefulDistributedSampler``.
    """

    def __init__(self, dataset: Dataset, lengths: Sequence[int], batch_size: int, group_batches: int = 16,
                 **kwargs: Any) -> None:
        # StatefulDistributedSampler.__init__ takes no lengths: initialise the regrouping parent,
        # then the resume counters
        _LengthGroupedOrder.__init__(self, dataset, lengths, batch_size, group_batches, **kwargs)
        self.yielded = 0
        self.next_yielded = None


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    collate_fn: Optional[Callable[[Any], Any]] = None,
    drop_last: bool = False,
    seed: int = 0,
    lengths: Optional[Sequence[int]] = None,
    group_batches: int = 16,
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
        lengths (Optional[Sequence[int]]): a text length per sample: batches then hold samples
            of similar length (:class:`LengthGroupedSampler`), so padding to a batch's longest
            text costs little. ``None``: plain shuffled batches.
        group_batches (int): with ``lengths``, batches per length-sorted group.

    Returns:
        StatefulDataLoader: the loader; ``loader.sampler`` has ``set_epoch``.
    """
    rank, world_size = _world()
    shard = dict(num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
    sampler = (
        StatefulDistributedSampler(dataset, **shard) if lengths is None
        else LengthGroupedSampler(dataset, lengths, batch_size, group_batches, **shard)
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
