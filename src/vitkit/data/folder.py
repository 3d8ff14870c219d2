"""Image folders in the ImageNet layout: root/{train,val,test}/<class name>/<image files>."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
SPLITS = ("train", "val", "test")


class ImageReadError(ValueError):
    """An image that cannot be decoded; its message names the file and the fix.

    Raised inside a DataLoader worker it comes back wrapped with the worker's traceback;
    the constructor keeps only the original one-line message.
    """

    def __init__(self, message: str) -> None:
        if "Original Traceback" in message:
            last = message.strip().splitlines()[-1]
            message = last.partition(": ")[2] or last
        super().__init__(message)


def read_error(path: Path, err: Exception) -> ImageReadError:
    return ImageReadError(
        f"cannot read image {path}: {err}; fix or remove the file, or pass --skip-corrupt to skip such files"
    )


def load_image(path: str | Path, mode: str) -> Image.Image:
    """Decode `path` and convert it to `mode` ("L" or "RGB"; an alpha channel is dropped)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I", "I;16") and mode == "L":  # 16-bit greyscale: scale, don't clip
                img = img.point(lambda v: v / 256).convert("L")
            return img.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise read_error(Path(path), err) from None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _check(path: Path, full: bool) -> None:
    """Header check (cheap), or a full decode with `full` (catches truncated files too)."""
    try:
        with Image.open(path) as img:
            if full:
                img.load()
            else:
                img.verify()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise read_error(path, err) from None


@dataclass
class FolderSplit:
    """The files of one split: (path, class index) pairs, and the corrupt files skipped."""

    samples: list[tuple[Path, int]]
    skipped: list[Path] = field(default_factory=list)


def class_names(split_dir: Path) -> list[str]:
    """Sorted class-folder names of one split; a split without class folders is an error."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder split {split_dir} does not exist")
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise ValueError(
            f"{split_dir} has no class folders: expected {split_dir}/<class name>/<images> (ImageNet layout)"
        )
    return names


def scan_split(split_dir: Path, classes: list[str], skip_corrupt: bool = False) -> FolderSplit:
    """Every image of a split, labelled by `classes` (the train split's class names).

    A class folder without images, a class unknown to `classes`, or (without `skip_corrupt`)
    an unreadable image raises a one-line error naming the folder or file.
    """
    found = class_names(split_dir)
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise ValueError(
            f"class folder(s) {', '.join(unknown)} in {split_dir} are not in the train split: "
            "every val/test class must also be a train class (rename or remove them)"
        )
    index = {name: i for i, name in enumerate(classes)}
    out = FolderSplit(samples=[])
    for name in found:
        files = sorted(p for p in (split_dir / name).rglob("*") if _is_image(p))
        if not files:
            raise ValueError(
                f"class folder {split_dir / name} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                "add images or remove the folder"
            )
        for path in files:
            try:
                _check(path, full=skip_corrupt)
            except ImageReadError:
                if not skip_corrupt:
                    raise
                out.skipped.append(path)
                continue
            out.samples.append((path, index[name]))
    if not out.samples:
        raise ValueError(f"{split_dir} has no readable images")
    return out


def detect_channels(samples: list[tuple[Path, int]], limit: int = 32) -> int:
    """1 when the first `limit` images (spread over the list) are all greyscale, else 3."""
    step = max(1, len(samples) // limit)
    for path, _ in samples[::step][:limit]:
        with Image.open(path) as img:
            if img.mode not in GREY_MODES:
                return 3
    return 1


class ImageFolderDataset(Dataset):
    """Decodes one image per item: (transform(uint8 image (C, H, W)), label)."""

    def __init__(self, samples: list[tuple[Path, int]], in_chans: int, transform: Callable | None = None) -> None:
        self.samples = samples
        self.mode = "L" if in_chans == 1 else "RGB"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = TF.pil_to_tensor(load_image(path, self.mode))  # (C, H, W) uint8
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]
