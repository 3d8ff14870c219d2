"""A data set's splits before transforms (`SplitData`, `LoadedData`) and the seeded hold-out and subsets
that every source (Fashion-MNIST, folders, CSV, shards, HF datasets) draws its splits with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

Split = str  # "train" | "val" | "test"


@dataclass
class SplitData:
    """One split before transforms: in-memory tensors or image-folder samples."""

    images: torch.Tensor | None = None  # (N, C, H, W) uint8
    targets: torch.Tensor | None = None  # (N,) int64
    samples: list[tuple[Path, int]] | None = None
    source: Any = None  # hf: HFSplit (random access), wds: ShardSet (streamed); both have len() and select()

    def __len__(self) -> int:
        if self.source is not None:
            return len(self.source)
        return len(self.samples) if self.samples is not None else len(self.targets)

    def select(self, index: torch.Tensor) -> SplitData:
        if self.source is not None:
            return SplitData(source=self.source.select(index))
        if self.samples is not None:
            return SplitData(samples=[self.samples[i] for i in index.tolist()])
        assert self.images is not None and self.targets is not None, "a SplitData holds one of its three forms"
        return SplitData(images=self.images[index], targets=self.targets[index])


@dataclass
class LoadedData:
    """What `--data` holds: the requested splits and the facts the model and transforms need."""

    source: str
    classes: list[str]
    in_chans: int
    native_size: int | None  # Fashion-MNIST: 28; image folders: None (any size)
    mean: list[float]
    std: list[float]
    splits: dict[Split, SplitData]
    skipped: list[Path] = field(default_factory=list)  # corrupt files skipped with skip_corrupt

    @property
    def in_memory(self) -> bool:
        return any(s.images is not None for s in self.splits.values())


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def holdout(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices): a seeded `fraction` of range(n) held out, both sorted."""
    perm = torch.randperm(n, generator=_generator(seed))
    k = round(n * fraction)
    return perm[k:].sort().values, perm[:k].sort().values


def subset(n: int, count: int | None, seed: int) -> torch.Tensor | None:
    """Sorted indices of a seeded subset of `count` items (None: keep all)."""
    if count is None or count >= n:
        return None
    return torch.randperm(n, generator=_generator(seed))[:count].sort().values
