"""`--data hf:PATH`: a Hugging Face dataset saved with `save_to_disk`, read offline by `datasets.load_from_disk`.

A DatasetDict gives its train / validation (or val) / test splits; a single Dataset is the train split.
The image column is the one of type `Image` (else `image` / `img`); the label column the `ClassLabel`
one (else `label` / `labels`), whose names become the classes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from vitkit.core.errors import VitkitError
from vitkit.data.folder import GREY_MODES
from vitkit.data.splits import LoadedData, SplitData, holdout
from vitkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD

SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "valid": "val", "test": "test"}


def _require_datasets() -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a saved dataset never needs the network
    try:
        import datasets  # noqa: PLC0415  the optional data extra
    except ImportError:
        raise VitkitError("--data hf:PATH needs the datasets package: pip install 'vitkit[data]'") from None
    return datasets


@dataclass
class HFSplit:
    """One split of a saved dataset and the names of its image and label columns."""

    table: Any  # datasets.Dataset
    image_column: str
    label_column: str

    def __len__(self) -> int:
        return len(self.table)

    def select(self, index: torch.Tensor) -> HFSplit:
        return HFSplit(self.table.select(index.tolist()), self.image_column, self.label_column)

    def labels(self) -> list[int]:
        return [int(v) for v in self.table[self.label_column]]

    def row(self, i: int) -> tuple[Image.Image, int]:
        """(decoded image, label) of row `i`."""
        row = self.table[int(i)]
        value = row[self.image_column]
        if not isinstance(value, Image.Image):
            raise VitkitError(
                f"column {self.image_column} holds {type(value).__name__}, not images: cast it to "
                "datasets.Image() before save_to_disk"
            )
        return value, int(row[self.label_column])


def _columns(features: Any, where: str) -> tuple[str, str, list[str] | None]:
    datasets = _require_datasets()
    names = list(features)
    image = next((n for n in names if isinstance(features[n], datasets.Image)), None)
    image = image or next((n for n in ("image", "img") if n in names), None)
    label = next((n for n in names if isinstance(features[n], datasets.ClassLabel)), None)
    label = label or next((n for n in ("label", "labels") if n in names), None)
    if image is None or label is None:
        raise VitkitError(f"{where} needs an image column and a label column; it has {', '.join(names)}")
    classes = list(features[label].names) if isinstance(features[label], datasets.ClassLabel) else None
    return image, label, classes


def open_hf(spec: str) -> tuple[dict[str, HFSplit], list[str]]:
    """({split: HFSplit}, class names) of `hf:PATH`."""
    datasets = _require_datasets()
    path = Path(spec.removeprefix("hf:")).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: give a folder written by datasets' save_to_disk")
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise VitkitError(f"{path} is not a saved Hugging Face dataset ({err}): write it with save_to_disk") from None
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    unknown = [name for name in parts if name not in SPLIT_NAMES]
    if unknown:
        raise VitkitError(f"{path} has split(s) {', '.join(unknown)}: name them train, validation and test")
    splits: dict[str, HFSplit] = {}
    classes: list[str] | None = None
    for name, table in parts.items():
        image, label, names = _columns(table.features, f"{path} ({name})")
        classes = classes or names
        splits[SPLIT_NAMES[name]] = HFSplit(table, image, label)
    if classes is None:  # integer labels: classes 0..K-1
        top = max(max(s.labels(), default=0) for s in splits.values())
        classes = [str(i) for i in range(top + 1)]
    return splits, classes


class HFImageDataset(Dataset):
    """(transform(uint8 image (C, H, W)), label) from one split of a saved dataset."""

    def __init__(self, split: HFSplit, in_chans: int, transform: Callable | None = None) -> None:
        self.split = split
        self.mode = "L" if in_chans == 1 else "RGB"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.split.row(index)
        image = TF.pil_to_tensor(image.convert(self.mode))  # (C, H, W) uint8
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def load(config: Any, splits: tuple[str, ...]) -> Any:
    """`LoadedData` of `hf:PATH` (`config.data`); val is held out of train when the dataset has none."""
    parts, classes = open_hf(config.data)
    if "val" not in parts and "train" in parts:
        if config.val_split <= 0:
            raise VitkitError(
                f"{config.data} has no validation split: add one, or hold out part of train with --val-split 0.1"
            )
        train_idx, val_idx = holdout(len(parts["train"]), config.val_split, config.split_seed)
        parts["train"], parts["val"] = parts["train"].select(train_idx), parts["train"].select(val_idx)
    out = {name: SplitData(source=part) for name, part in parts.items() if name in splits}
    first = next(iter(parts.values()))
    step = max(1, len(first) // 32)
    grey = all(first.row(i)[0].mode in GREY_MODES for i in range(0, min(len(first), 32 * step), step))
    in_chans = 1 if grey else 3
    return LoadedData(
        source=config.data,
        classes=classes,
        in_chans=in_chans,
        native_size=None,
        mean=IMAGENET_MEAN if in_chans == 3 else [0.5],
        std=IMAGENET_STD if in_chans == 3 else [0.5],
        splits=out,
    )
