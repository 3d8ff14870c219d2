"""Repeated augmentation (DeiT): each image k times per epoch, each copy augmented on its own.

The epoch's order is a seeded permutation with every index repeated k times in a row, padded to
a multiple of the number of processes, then dealt out round-robin: position p goes to rank
p mod world_size. Ranks therefore hold disjoint positions, and with k >= world_size the copies of
one image land on different ranks (DeiT's point: different views of an image in different
processes' batches). On one process the k copies sit side by side in a batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch.utils.data import Sampler


class RepeatedAugSampler(Sampler[int]):
    """This rank's indices for one epoch with each image repeated `repeats` times.

    `epoch_size="repeated"`: the epoch holds every image k times (k x longer epochs);
    `"dataset"`: it is cut to ceil(size / world_size) indices per rank, as DeiT's RASampler does, so
    an epoch costs the same as without repetition and covers about 1/k of the images, k times each.
    Call `set_epoch` before each epoch; the order depends on (seed, epoch) only.
    """

    def __init__(
        self,
        size: int,
        *,
        repeats: int = 3,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch_size: Literal["repeated", "dataset"] = "repeated",
    ) -> None:
        if size < 1:
            raise ValueError(f"RepeatedAugSampler needs a non-empty data set, got size {size}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if epoch_size not in ("repeated", "dataset"):
            raise ValueError(f"epoch_size must be 'repeated' or 'dataset', got {epoch_size!r}")
        self.size, self.repeats, self.shuffle, self.seed = size, repeats, shuffle, seed
        self.rank, self.world_size, self.epoch_size = rank, world_size, epoch_size
        self.epoch = 0
        self.per_rank = math.ceil(size * repeats / world_size)  # before any cut

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        """The whole epoch's padded list, before dealing out to ranks (the same on every rank)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            perm = torch.randperm(self.size, generator=g)
        else:
            perm = torch.arange(self.size)
        order = perm.repeat_interleave(self.repeats).tolist()  # [a, a, a, b, b, b, ...]
        total = self.per_rank * self.world_size  # pad by wrapping around, so every rank gets per_rank
        return (order * math.ceil(total / len(order)))[:total]

    def __iter__(self) -> Iterator[int]:
        mine = self.order()[self.rank :: self.world_size]
        return iter(mine[: len(self)])

    def __len__(self) -> int:
        if self.epoch_size == "dataset":
            return math.ceil(self.size / self.world_size)
        return self.per_rank
