"""Images without labels: a folder of images in any nesting, split into train and val by a held-out
fraction. `load_images` also takes Fashion-MNIST and labelled folders, whose labels the caller may
ignore (self-supervised pre-training reads all three)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vitkit.data.data_config import DataConfig, is_fashion_mnist
from vitkit.data.datasets import load_data
from vitkit.data.folder import IMAGE_EXTENSIONS, detect_channels
from vitkit.data.splits import LoadedData, SplitData, holdout, subset
from vitkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def load_images(config: DataConfig) -> LoadedData:
    """Train and val splits of `config.data`: Fashion-MNIST, a labelled image folder (train/ and
    val/, or train/ with a held-out fraction), or an unlabelled folder of images (any nesting),
    from which `val_split` is held out. Labels are loaded where they exist (0 otherwise)."""
    root = Path(config.data).expanduser()
    if is_fashion_mnist(config.data) or (root / "train").is_dir():
        return load_data(config, ("train", "val"))
    return load_unlabelled(config, root)


def _readable(path: Path, skip_corrupt: bool) -> bool:
    """Whether `path` decodes; an unreadable file is an error unless `skip_corrupt`."""
    try:
        with Image.open(path) as img:
            if skip_corrupt:
                img.load()  # a full decode also catches truncated files
            else:
                img.verify()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        if not skip_corrupt:
            raise ValueError(
                f"cannot read image {path}: {err}; fix or remove the file, or pass --skip-corrupt to skip such files"
            ) from None
        return False
    return True


def load_unlabelled(config: DataConfig, root: Path) -> LoadedData:
    """Every image under `root` (label 0), split into train and a held-out val of `val_split`."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {root} does not exist: give a folder of images (labels not needed) or --data fashion-mnist"
        )
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    samples, skipped = [], []
    for path in files:
        if _readable(path, config.skip_corrupt):
            samples.append((path, 0))
        else:
            skipped.append(path)
    if not samples:
        raise ValueError(f"{root} holds no readable images ({', '.join(IMAGE_EXTENSIONS)})")
    if config.val_split <= 0:
        raise ValueError("an unlabelled folder has no val split: hold out part of it with --val-split 0.1")
    pool = SplitData(samples=samples)
    train_idx, val_idx = holdout(len(pool), config.val_split, config.split_seed)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise ValueError(f"{root} has {len(samples)} images: too few to hold out a val split of {config.val_split}")
    splits = {"train": pool.select(train_idx), "val": pool.select(val_idx)}
    counts = {"train": config.train_samples, "val": config.val_samples}
    for name, stream in (("train", 1), ("val", 2)):
        index = subset(len(splits[name]), counts[name], config.split_seed * 1000 + stream)
        if index is not None:
            splits[name] = splits[name].select(index)
    in_chans = detect_channels(samples)
    return LoadedData(
        source=str(root),
        classes=[],
        in_chans=in_chans,
        native_size=None,
        mean=IMAGENET_MEAN if in_chans == 3 else [0.5],
        std=IMAGENET_STD if in_chans == 3 else [0.5],
        splits=splits,
        skipped=skipped,
    )
