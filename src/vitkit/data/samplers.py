"""Samplers and loaders, chosen in one place (`build_loader`), ready for several processes.

Every sampler shards by (rank, world_size) and reshuffles per epoch from (seed, epoch) alone, so a
resumed or re-sharded run draws the same order; workers are seeded from the same pair.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vitkit.data.datasets import TensorImageDataset, collate_batch
from vitkit.data.repeated_aug import RepeatedAugSampler
from vitkit.data.shards import ShardStream


class ShardedSampler(Sampler[int]):
    """Indices of this rank's shard, reshuffled each epoch (`set_epoch`) from `seed`.

    Training pads the index list so every rank gets the same count (DDP needs equal steps);
    evaluation does not pad, so each image is counted exactly once across ranks.
    """

    def __init__(
        self, size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, pad: bool = True
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.world_size > 1:
            total = math.ceil(self.size / self.world_size) * self.world_size
            order += order[: total - len(order)]
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.rank :: self.world_size])

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.size / self.world_size)
        return len(range(self.rank, self.size, self.world_size))


class ResumableSampler(Sampler[int]):
    """`sampler` from position `start` on (`set_start`): a run stopped mid-epoch continues where it
    stopped, without loading the samples it already trained on. `set_epoch` goes back to position 0."""

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler, self.start = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.start = 0
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def set_start(self, start: int) -> None:
        if not 0 <= start <= len(self.sampler):  # type: ignore[arg-type]
            raise ValueError(f"a sampler of {len(self.sampler)} indices cannot start at {start}")  # type: ignore[arg-type]
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.start, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.start  # type: ignore[arg-type]


def build_sampler(
    dataset: Dataset,
    *,
    train: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    repeats: int = 1,
    repeat_epoch: str = "repeated",
) -> Sampler[int]:
    """The sampler for a split: shuffled and padded for training (each image `repeats` times with
    repeated augmentation), in order for evaluation."""
    if train and repeats > 1:
        return RepeatedAugSampler(
            len(dataset), repeats=repeats, seed=seed, rank=rank, world_size=world_size, epoch_size=repeat_epoch
        )
    return ShardedSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size, pad=train)


def default_workers(dataset: Dataset) -> int:
    """0 for in-memory data (a batch is one indexing op), else up to 4 decoding processes."""
    if isinstance(dataset, TensorImageDataset):
        return 0
    return min(4, os.cpu_count() or 1)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; Python's and NumPy's RNGs follow it
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(
    dataset: Dataset,
    *,
    train: bool,
    batch_size: int,
    seed: int = 0,
    workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    repeats: int = 1,
    repeat_epoch: str = "repeated",
) -> DataLoader:
    """A DataLoader over `dataset` with `build_sampler`'s sampler; call `set_loader_epoch` per epoch.

    Training drops a last partial batch unless it would be the only one.
    """
    if isinstance(dataset, ShardStream):  # shards: the stream splits itself over ranks and workers
        return _stream_loader(
            dataset,
            train=train,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            pin_memory=pin_memory,
            workers=default_workers(dataset) if workers is None else workers,
        )
    sampler = build_sampler(
        dataset, train=train, seed=seed, rank=rank, world_size=world_size, repeats=repeats, repeat_epoch=repeat_epoch
    )
    if train:  # a run stopped mid-epoch resumes at its position in the epoch (`set_loader_position`)
        sampler = ResumableSampler(sampler)
    workers = default_workers(dataset) if workers is None else workers
    batched = isinstance(dataset, TensorImageDataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_batch if batched else None,
        drop_last=train and len(sampler) >= batch_size,
        pin_memory=pin_memory,
        worker_init_fn=_seed_worker if workers else None,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def _stream_loader(
    dataset: ShardStream,
    *,
    train: bool,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    pin_memory: bool,
    workers: int,
) -> DataLoader:
    # training: shuffled, a defined count per rank, whole batches; evaluation: each sample once overall
    dataset.configure(shuffle=train, seed=seed, rank=rank, world_size=world_size, pad=train, batch_size=batch_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=train and len(dataset) >= batch_size,
        worker_init_fn=_seed_worker if workers else None,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def set_loader_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    """Reshuffle for `epoch` and reseed the workers, from (seed, epoch) alone."""
    for owner in (loader.sampler, loader.dataset):  # a sampler, or a stream that shuffles itself
        if hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(seed * 100_003 + epoch)


def set_loader_position(loader: DataLoader, batches: int) -> bool:
    """Start the current epoch of `loader` after its first `batches` batches (call after
    `set_loader_epoch`). False when the loader cannot skip by itself (a stream): the caller then
    draws and drops those batches."""
    sampler = loader.sampler
    if batches == 0:
        return True
    if not isinstance(sampler, ResumableSampler):
        return False
    sampler.set_start(batches * loader.batch_size)  # type: ignore[operator]
    return True


class EvenBatchSampler(Sampler[list[int]]):
    """One rank's evaluation share in exactly as many batches as the largest share needs.

    FSDP runs collectives in every forward pass, so every rank must run the same number of batches;
    a rank with one image fewer may otherwise run one batch fewer and the run hangs. The share is
    split into `num_batches` nearly equal batches (no image repeated, none dropped), where
    num_batches = ceil(ceil(total / world) / batch_size) is the same on every rank.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, total: int, world_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self.num_batches = math.ceil(math.ceil(total / world_size) / batch_size)
        if len(sampler) < self.num_batches:  # type: ignore[arg-type]
            raise ValueError(
                f"an evaluation set of {total} images cannot give each of {world_size} processes "
                f"{self.num_batches} batch(es): use more images or fewer processes"
            )

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self.sampler)
        n, m = len(indices), self.num_batches
        bounds = [i * n // m for i in range(m + 1)]  # sizes floor(n/m) or ceil(n/m) <= batch_size
        return iter([indices[a:b] for a, b in zip(bounds, bounds[1:])])

    def __len__(self) -> int:
        return self.num_batches


def even_batches(loader: DataLoader, world_size: int) -> DataLoader:
    """`loader` (over this rank's unpadded share of `world_size`) re-batched so all ranks run the same
    number of batches."""
    if world_size == 1:
        return loader
    batches = EvenBatchSampler(loader.sampler, loader.batch_size, len(loader.dataset), world_size)
    return DataLoader(
        loader.dataset,
        batch_sampler=batches,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
    )
