"""`vitkit data shard|stats|bench`: write WebDataset shards from any `--data` source, describe a source, and
time its loader beside timm's.

Every source kind (Fashion-MNIST, image folder, CSV manifest, `wds:` shards, `hf:` dataset) is read through
`vitkit.data.load_data`, so the three tools see the data exactly as training does.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vitkit.core.errors import UsageError, VitkitError
from vitkit.data.data_config import DataConfig
from vitkit.data.datasets import LoadedData, SplitData, build_dataset, load_data, resolve_data_fields
from vitkit.data.folder import load_image
from vitkit.data.hf_dataset import HFSplit
from vitkit.data.samplers import build_loader
from vitkit.data.shards import ShardSet, decode_image, iter_samples, parse_label, write_index, write_split


def _from_tensor(image: torch.Tensor) -> Image.Image:
    # (C, H, W) uint8 -> PIL: "L" for one channel, "RGB" for three
    array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def iter_images(split: SplitData, mode: str | None = None, raw_png: bool = False) -> Iterator[tuple[Any, int]]:
    """(image, label) of every item of a split in order; `mode` converts; `raw_png` passes PNG files as bytes."""
    if split.images is not None:
        for image, label in zip(split.images, split.targets.tolist()):
            yield _from_tensor(image), label
    elif split.samples is not None:
        for path, label in split.samples:
            if raw_png and path.suffix.lower() == ".png":
                yield path.read_bytes(), label
            else:
                yield (load_image(path, mode) if mode else Image.open(path)), label
    elif isinstance(split.source, HFSplit):
        for i in range(len(split.source)):
            image, label = split.source.row(i)
            yield (image.convert(mode) if mode else image), label
    elif isinstance(split.source, ShardSet):
        count = 0
        for shard in split.source.shards:
            for sample in iter_samples(shard):
                if count == len(split.source):
                    return
                yield decode_image(sample, shard, mode), parse_label(sample, shard)
                count += 1
    else:
        raise VitkitError("this split holds no images")


def write_shards(source: str, output: str | Path, shard_size: int = 1000, **fields: Any) -> dict[str, Any]:
    """Write every split of `source` (any `--data` value) as shards in `output`, then index.json.

    `fields` are DataConfig fields (val_split, train_samples, ...). Returns the index summary.
    """
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise VitkitError(f"{output} is not empty: give a new or empty folder for the shards")
    data = load_data(DataConfig(data=source, **fields))
    mode = "L" if data.in_chans == 1 else "RGB"
    output.mkdir(parents=True, exist_ok=True)
    written = {
        name: write_split(iter_images(part, mode, raw_png=True), output, name, shard_size)
        for name, part in data.splits.items()
    }
    write_index(output, data.classes, data.in_chans, written)  # last: a folder with index.json is complete
    return {
        "output": str(output),
        "classes": len(data.classes),
        **{name: {"shards": len(names), "samples": sum(counts)} for name, (names, counts) in written.items()},
    }


def _labels(split: SplitData) -> list[int]:
    if split.targets is not None:
        return split.targets.tolist()
    if split.samples is not None:
        return [label for _, label in split.samples]
    if isinstance(split.source, HFSplit):
        return split.source.labels()[: len(split.source)]
    return list(split.source.labels())[: len(split.source)]


def data_stats(source: str, limit: int = 10_000, **fields: Any) -> dict[str, Any]:
    """Images per class and split, image sizes and modes, splits present, and the train mean / std.

    The mean and std are per channel over at most `limit` train images (spread over the split), in [0, 1].
    """
    data = load_data(DataConfig(data=source, **fields))
    out: dict[str, Any] = {
        "source": data.source,
        "classes": data.classes,
        "splits": {s: s in data.splits for s in ("train", "val", "test")},
        "per_split": {},
    }
    for name, part in data.splits.items():
        counts = Counter(_labels(part))
        sizes: Counter = Counter()
        modes: Counter = Counter()
        if part.images is not None:  # in memory: one size and mode for all
            sizes[f"{part.images.shape[3]}x{part.images.shape[2]}"] = len(part)
            modes["L" if part.images.shape[1] == 1 else "RGB"] = len(part)
        else:
            for image, _ in iter_images(part):
                sizes[f"{image.size[0]}x{image.size[1]}"] += 1
                modes[image.mode] += 1
        out["per_split"][name] = {
            "images": len(part),
            "per_class": {data.classes[k]: counts.get(k, 0) for k in range(len(data.classes))},
            "sizes": dict(sizes.most_common(5)),
            "distinct_sizes": len(sizes),
            "modes": dict(modes),
        }
    if "train" in data.splits:
        out["mean"], out["std"], out["stats_images"] = _mean_std(data, data.splits["train"], limit)
    return out


def _mean_std(data: LoadedData, split: SplitData, limit: int) -> tuple[list[float], list[float], int]:
    step = max(1, len(split) // limit)
    total = torch.zeros(data.in_chans, dtype=torch.float64)
    square = torch.zeros(data.in_chans, dtype=torch.float64)
    pixels, used = 0, 0
    mode = "L" if data.in_chans == 1 else "RGB"
    for i, (image, _) in enumerate(iter_images(split, mode)):
        if i % step or used >= limit:
            continue
        x = torch.as_tensor(_array(image), dtype=torch.float64) / 255  # (H, W[, C])
        x = x.reshape(-1, data.in_chans)  # (pixels, C)
        total += x.sum(0)
        square += (x * x).sum(0)
        pixels += x.shape[0]
        used += 1
    mean = total / max(pixels, 1)
    std = (square / max(pixels, 1) - mean * mean).clamp_min(0).sqrt()
    return [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()], used


def _array(image: Image.Image) -> Any:
    return np.array(image)  # a writable copy


# -- bench ------------------------------------------------------------------------------------------
class _PilItems(Dataset):
    """(PIL image, label) by index, for timm's loader: `create_loader` sets `.transform` itself."""

    def __init__(self, split: SplitData, mode: str) -> None:
        self.split, self.mode, self.transform = split, mode, None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self.split.samples is not None:
            path, label = self.split.samples[index]
            image = load_image(path, self.mode)
        elif isinstance(self.split.source, HFSplit):
            image, label = self.split.source.row(index)
            image = image.convert(self.mode)
        else:
            images, targets = self.split.images, self.split.targets
            assert images is not None and targets is not None, "a SplitData holds one of its three forms"
            image, label = _from_tensor(images[index]), int(targets[index])
        return (self.transform(image) if self.transform else image), label


@dataclass
class BenchRow:
    loader: str  # "vitkit" or "timm"
    workers: int
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def _time(loader: Any) -> tuple[int, float]:
    start = time.perf_counter()  # includes starting the workers: a loader pays it every epoch
    count = 0
    for images, _ in loader:
        count += images.shape[0]
    return count, time.perf_counter() - start


def data_bench(
    source: str,
    *,
    workers: tuple[int, ...] = (0, 1, 2),
    images: int = 1024,
    batch_size: int = 64,
    img_size: int | None = None,
    timm: bool = True,
    rounds: int = 2,
    **fields: Any,
) -> list[BenchRow]:
    """Images per second of the eval-transform loader over the first `images` train images, per worker
    count, for vitkit's loader and (random-access sources) timm's `create_loader` with the same transform;
    the best of `rounds` passes each, in alternating order."""
    config = DataConfig(data=source, **fields)
    data = load_data(config, splits=("train",))
    config = resolve_data_fields(config, data, 224)
    if img_size is not None:
        config = replace(config, img_size=img_size)
    index = torch.arange(min(images, len(data.splits["train"])))
    data.splits["train"] = data.splits["train"].select(index)
    dataset = build_dataset(data, "train", config, train=False)
    rows = []
    for w in workers:
        loaders = {"vitkit": lambda w=w: build_loader(dataset, train=False, batch_size=batch_size, workers=w)}
        if timm and not isinstance(data.splits["train"].source, ShardSet):  # timm's loader needs random access
            loaders["timm"] = lambda w=w: _timm_loader(data, config, batch_size, w)
        best: dict[str, BenchRow] = {}
        for r in range(rounds):  # alternate who goes first; keep each loader's fastest pass (page cache warm)
            for name in list(loaders) if r % 2 == 0 else list(loaders)[::-1]:
                row = BenchRow(name, w, *_time(loaders[name]()))
                if name not in best or row.seconds < best[name].seconds:
                    best[name] = row
        rows += [best[name] for name in loaders]
    return rows


def _timm_loader(data: LoadedData, config: DataConfig, batch_size: int, workers: int) -> Any:
    try:
        from timm.data import create_loader  # noqa: PLC0415  timm is optional (a dev dependency)
    except ImportError:
        raise VitkitError("the timm column needs timm: pip install timm (or pass --no-timm)") from None
    mode = "L" if config.in_chans == 1 else "RGB"
    return create_loader(
        _PilItems(data.splits["train"], mode),
        input_size=(config.in_chans, config.img_size, config.img_size),
        batch_size=batch_size,
        is_training=False,
        use_prefetcher=False,
        interpolation=config.interpolation,
        mean=tuple(config.mean),
        std=tuple(config.std),
        crop_pct=config.crop_pct,
        crop_mode="center",
        num_workers=workers,
        persistent_workers=False,
    )
