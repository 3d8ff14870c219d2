"""From `--data` to datasets: Fashion-MNIST (in memory) or an image folder, with seeded splits and subsets.

Two steps, because the transforms need what the data says (channels, classes, native size):
`load_data(config)` reads the splits (no transforms), `build_dataset(data, split, transform)` wraps one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch.utils.data import Dataset

from vitkit.data import fashion_mnist, hf_dataset, manifest, shards
from vitkit.data.data_config import DataConfig, is_fashion_mnist
from vitkit.data.folder import SPLITS, ImageFolderDataset, class_names, detect_channels, scan_split
from vitkit.data.hf_dataset import HFImageDataset, HFSplit
from vitkit.data.shards import ShardStream
from vitkit.data.splits import LoadedData, Split, SplitData, holdout, subset
from vitkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    BatchTrainTransform,
    ImageSpec,
    eval_transform,
    train_transform,
)

ConfigT = TypeVar("ConfigT", bound=DataConfig)  # a DataConfig, or a TrainConfig that extends it


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W).

    The DataLoader fetches whole batches through `__getitems__`, and the transform runs once per
    batch (it must accept (B, C, H, W)); pair it with `collate_batch`.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: Callable | None = None) -> None:
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, targets = self.__getitems__([index])
        return images[0], int(targets[0])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[idx]  # (B, C, H, W) uint8
        if self.transform is not None:
            images = self.transform(images)
        return images, self.targets[idx]


def collate_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`TensorImageDataset.__getitems__` already returns a collated batch."""
    return batch


# each split's subset draws from its own stream of the split seed
_SUBSET_STREAM = {"train": 1, "val": 2, "test": 3}


def load_data(config: DataConfig, splits: Sequence[Split] = SPLITS) -> LoadedData:
    """The splits of `config.data` named in `splits` (those the data has), after hold-out and subsets."""
    if is_fashion_mnist(config.data):
        data = _load_fashion_mnist(config, splits)
    elif config.data.startswith(("wds:", "hf:")) or config.data.lower().endswith(".csv"):
        kind = shards if config.data.startswith("wds:") else hf_dataset if config.data.startswith("hf:") else manifest
        data = kind.load(config, tuple(splits))
    else:
        data = _load_folder(config, splits)
    counts = {"train": config.train_samples, "val": config.val_samples, "test": config.test_samples}
    for name, split in data.splits.items():
        index = subset(len(split), counts[name], config.split_seed * 1000 + _SUBSET_STREAM[name])
        if index is not None:
            data.splits[name] = split.select(index)
    return data


def _load_fashion_mnist(config: DataConfig, splits: Sequence[Split]) -> LoadedData:
    root = fashion_mnist.find_fashion_mnist()
    out: dict[Split, SplitData] = {}
    if "train" in splits or "val" in splits:
        images, targets = fashion_mnist.load_fashion_mnist(train=True, root=root)
        pool = SplitData(images=images, targets=targets)
        if config.val_split > 0:
            train_idx, val_idx = holdout(len(pool), config.val_split, config.split_seed)
            parts = {"train": pool.select(train_idx), "val": pool.select(val_idx)}
        else:  # no validation split: validation would be the test set, which we never use for choices
            raise ValueError("Fashion-MNIST has no validation split: use --val-split > 0 (default 0.1)")
        out.update({k: v for k, v in parts.items() if k in splits})
    if "test" in splits:
        images, targets = fashion_mnist.load_fashion_mnist(train=False, root=root)
        out["test"] = SplitData(images=images, targets=targets)
    return LoadedData(
        source=fashion_mnist.NAME,
        classes=list(fashion_mnist.CLASSES),
        in_chans=1,
        native_size=fashion_mnist.NATIVE_SIZE,
        mean=list(fashion_mnist.MEAN),
        std=list(fashion_mnist.STD),
        splits=out,
    )


def _load_folder(config: DataConfig, splits: Sequence[Split]) -> LoadedData:
    root = Path(config.data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {root} does not exist: give an image folder with train/ and val/ "
            "(one sub-folder per class) or --data fashion-mnist"
        )
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"{root} has no train/ folder: expected {root}/train/<class>/<images> and val/")
    classes = class_names(root / "train")
    has_val = (root / "val").is_dir()
    if not has_val and config.val_split <= 0:
        raise FileNotFoundError(f"{root} has no val/ folder: add one, or hold out part of train/ with --val-split 0.1")
    out: dict[Split, SplitData] = {}
    skipped: list[Path] = []

    def scan(name: Split) -> SplitData:
        found = scan_split(root / name, classes, config.skip_corrupt)
        skipped.extend(found.skipped)
        return SplitData(samples=found.samples)

    if "train" in splits or ("val" in splits and not has_val):
        pool = scan("train")
        if has_val:
            out["train"] = pool
        else:
            train_idx, val_idx = holdout(len(pool), config.val_split, config.split_seed)
            out["train"], out["val"] = pool.select(train_idx), pool.select(val_idx)
        out = {k: v for k, v in out.items() if k in splits}
    if "val" in splits and has_val:
        out["val"] = scan("val")
    if "test" in splits and (root / "test").is_dir():
        out["test"] = scan("test")
    first = next(iter(out.values()), None)
    in_chans = detect_channels(first.samples) if first is not None else 3
    return LoadedData(
        source=str(root),
        classes=classes,
        in_chans=in_chans,
        native_size=None,
        mean=IMAGENET_MEAN if in_chans == 3 else [0.5],
        std=IMAGENET_STD if in_chans == 3 else [0.5],
        splits=out,
        skipped=skipped,
    )


def resolve_data_fields(config: ConfigT, data: LoadedData, default_img_size: int) -> ConfigT:
    """Fill the config fields the data decides (channels, classes, size, statistics)."""
    num_classes = config.num_classes or len(data.classes)
    if num_classes < len(data.classes):
        raise ValueError(f"num_classes={num_classes} but the data has {len(data.classes)} classes")
    in_chans = config.in_chans or data.in_chans
    mean, std = config.mean or data.mean, config.std or data.std
    if in_chans != data.in_chans and config.mean is None:  # the data's statistics, per model channel
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    return dataclasses.replace(
        config,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=config.img_size or data.native_size or default_img_size,
        mean=[float(m) for m in mean],
        std=[float(s) for s in std],
    )


def image_spec(config: DataConfig) -> ImageSpec:
    """The input spec of a resolved config (img_size, in_chans, mean and std set)."""
    return ImageSpec(
        config.img_size, config.in_chans, tuple(config.mean), tuple(config.std), config.crop_pct, config.interpolation
    )


def augment(config: DataConfig) -> Augment:
    return Augment(
        crop=config.crop,
        crop_scale=tuple(config.crop_scale),
        crop_ratio=tuple(config.crop_ratio),
        crop_padding=config.crop_padding,
        pad_mode=config.pad_mode,
        hflip=config.hflip,
        auto_augment=config.auto_augment,
        three_augment=config.three_augment,
        color_jitter=config.color_jitter,
        reprob=config.reprob,
    )


def build_dataset(data: LoadedData, split: Split, config: DataConfig, train: bool | None = None) -> Dataset:
    """Dataset of one split with the config's train (for "train") or eval transform."""
    if split not in data.splits:
        have = ", ".join(data.splits) or "none"
        raise ValueError(f"{data.source} has no {split} split (it has: {have})")
    part = data.splits[split]
    spec = image_spec(config)
    train = split == "train" if train is None else train
    if part.source is not None:  # hf: random access; wds: a stream the loader configures
        transform = train_transform(spec, augment(config)) if train else eval_transform(spec)
        kind = HFImageDataset if isinstance(part.source, HFSplit) else ShardStream
        return kind(part.source, spec.in_chans, transform)
    if part.images is not None:
        transform = BatchTrainTransform(spec, augment(config)) if train else eval_transform(spec)
        return TensorImageDataset(part.images, part.targets, transform)
    transform = train_transform(spec, augment(config)) if train else eval_transform(spec)
    if spec.in_chans not in (1, 3):
        raise ValueError(f"image folders load as greyscale or RGB: in_chans must be 1 or 3, got {spec.in_chans}")
    return ImageFolderDataset(part.samples, spec.in_chans, transform, skip_corrupt=config.skip_corrupt)
