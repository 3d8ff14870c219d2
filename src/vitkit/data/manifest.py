"""`--data PATH.csv`: a manifest with a `path,label[,split]` header, one image per line.

Paths are relative to the CSV's folder (absolute ones are kept). Labels are class names (sorted, as an
image folder's are) or integers 0..K-1. Without a split column every line is train; val is then held
out of train as for an image folder without val/.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitkit.core.errors import VitkitError
from vitkit.data.folder import detect_channels
from vitkit.data.splits import LoadedData, SplitData, holdout
from vitkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD

SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}


@dataclass
class Manifest:
    """The lines of a manifest: per split, (path, class index) pairs in file order, and the class names."""

    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]]


def _labels_to_classes(labels: list[str], where: Path) -> tuple[list[str], dict[str, int]]:
    if all(label.strip().lstrip("-").isdigit() for label in labels):
        values = sorted({int(label) for label in labels})
        if values[0] < 0:
            raise VitkitError(f"{where}: integer labels must be >= 0, found {values[0]}; use 0..K-1 or class names")
        classes = [str(i) for i in range(values[-1] + 1)]
        return classes, {label: int(label) for label in set(labels)}
    if any(label.strip().isdigit() for label in labels):
        raise VitkitError(f"{where}: labels mix integers and names; use one kind for every line")
    classes = sorted(set(labels))
    index = {name: i for i, name in enumerate(classes)}
    return classes, index


def read_manifest(path: str | Path) -> Manifest:
    """Parse and check a manifest: header, known splits, labels, and that every image file exists."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist: give a CSV with a path,label[,split] header")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "path" not in header or "label" not in header:
            raise VitkitError(
                f"{path} needs a header line with path and label columns (and optionally split), "
                f"found: {', '.join(header) or 'none'}"
            )
        rows = [({k.strip(): (v or "").strip() for k, v in row.items() if k}, n) for n, row in enumerate(reader, 2)]
    if not rows:
        raise VitkitError(f"{path} lists no images: add path,label lines below the header")
    classes, index = _labels_to_classes([row["label"] for row, _ in rows], path)
    splits: dict[str, list[tuple[Path, int]]] = {}
    base = path.parent
    for row, line in rows:
        split = SPLIT_NAMES.get(row.get("split", "").lower() or "train")
        if split is None:
            raise VitkitError(f"{path} line {line}: split {row['split']!r} is not train, val or test")
        if not row["path"] or not row["label"]:
            raise VitkitError(f"{path} line {line}: empty path or label")
        file = base / row["path"]
        if not file.is_file():
            raise FileNotFoundError(f"{path} line {line}: image {file} does not exist (paths are relative to the CSV)")
        splits.setdefault(split, []).append((file, index[row["label"]]))
    return Manifest(classes, splits)


def load(config: Any, splits: tuple[str, ...]) -> Any:
    """`LoadedData` of a manifest (`config.data`); val is held out of train when no line is val."""
    manifest = read_manifest(config.data)
    parts = {name: SplitData(samples=samples) for name, samples in manifest.splits.items()}
    if "train" not in parts:
        raise VitkitError(f"{config.data} has no train lines: give train lines (split column empty or train)")
    if "val" not in parts:
        if config.val_split <= 0:
            raise VitkitError(
                f"{config.data} has no val lines: add some, or hold out part of train with --val-split 0.1"
            )
        train_idx, val_idx = holdout(len(parts["train"]), config.val_split, config.split_seed)
        parts["train"], parts["val"] = parts["train"].select(train_idx), parts["train"].select(val_idx)
    in_chans = detect_channels(parts["train"].samples)
    return LoadedData(
        source=str(config.data),
        classes=manifest.classes,
        in_chans=in_chans,
        native_size=None,
        mean=IMAGENET_MEAN if in_chans == 3 else [0.5],
        std=IMAGENET_STD if in_chans == 3 else [0.5],
        splits={k: v for k, v in parts.items() if k in splits},
    )
