"""Image folders in the ImageNet layout: root/{train,val,test}/<class name>/<image files>."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from vitkit.core.errors import FileFormatError, VitkitError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
SPLITS = ("train", "val", "test")


class ImageReadError(FileFormatError):
    """An image that cannot be decoded; its message names the file and the fix.

    Raised inside a DataLoader worker it comes back wrapped with the worker's traceback;
    the constructor keeps only the original one-line message.
    """

    def __init__(self, message: str) -> None:
        if "Original Traceback" in message:
            last = message.strip().splitlines()[-1]
            message = last.partition(": ")[2] or last
        super().__init__(message)


def read_error(path: Path, err: Exception | str) -> ImageReadError:
    """The one-line error for an unreadable image: its path, the reason and the fix."""
    return ImageReadError(
        f"cannot read image {path}: {err}; fix or remove the file, or pass --skip-corrupt to skip such files"
    )


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """`img` in `mode` ("L" or "RGB"): 16-bit scaled to 8 (not clipped), palette and CMYK converted, alpha dropped."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        img = img.point(lambda v: v / 256).convert("L")  # 16-bit greyscale: 0..65535 -> 0..255
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # a palette with transparency converts through RGBA (PIL's advice)
    return img if img.mode == mode else img.convert(mode)


def load_image(path: str | Path, mode: str) -> Image.Image:
    """Decode `path` and convert it to `mode` ("L" or "RGB"; an alpha channel is dropped)."""
    try:
        with Image.open(path) as img:
            img.load()
            return _to_mode(img, mode)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise read_error(Path(path), err) from None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def check_header(path: Path) -> None:
    """Raise `ImageReadError` unless `path` has an image header PIL knows (no pixels are decoded).

    Catches empty, non-image and unknown-format files at scan time; a truncated file passes and
    fails when decoded.
    """
    try:
        empty = path.stat().st_size == 0
    except OSError as err:  # vanished or unreadable since the folder was listed
        raise read_error(path, err) from None
    if empty:
        raise read_error(path, "the file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - the header is parsed by open(); size and mode come from it
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
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
        raise VitkitError(
            f"{split_dir} has no class folders: expected {split_dir}/<class name>/<images> (ImageNet layout)"
        )
    return names


def scan_split(split_dir: Path, classes: list[str], skip_corrupt: bool = False) -> FolderSplit:
    """Every image of a split, labelled by `classes` (the train split's class names).

    A class folder without images, a class unknown to `classes`, or (without `skip_corrupt`)
    an image whose header is unreadable raises a one-line error naming the folder or file. Only
    headers are read: files that fail to decode are found (and with `skip_corrupt` skipped) by
    `ImageFolderDataset` when it meets them, so no image is decoded twice.
    """
    found = class_names(split_dir)
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise VitkitError(
            f"class folder(s) {', '.join(unknown)} in {split_dir} are not in the train split: "
            "every val/test class must also be a train class (rename or remove them)"
        )
    index = {name: i for i, name in enumerate(classes)}
    out = FolderSplit(samples=[])
    for name in found:
        files = sorted(p for p in (split_dir / name).rglob("*") if _is_image(p))
        if not files:
            raise VitkitError(
                f"class folder {split_dir / name} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                "add images or remove the folder"
            )
        for path in files:
            try:
                check_header(path)
            except ImageReadError:
                if not skip_corrupt:
                    raise
                out.skipped.append(path)
                continue
            out.samples.append((path, index[name]))
    if not out.samples:
        raise FileFormatError(f"{split_dir} has no readable images ({len(out.skipped)} skipped as corrupt)")
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
    """Decodes one image per item: (transform(uint8 image (C, H, W)), label).

    With `skip_corrupt`, an image that fails to decode is replaced by the next one that decodes
    (the same one every epoch, so runs stay reproducible) and recorded in a flag per sample that
    DataLoader workers share with the main process: `skipped` lists the files met so far, and a
    file found bad is never decoded again. Without it, the first such file raises `ImageReadError`.
    """

    def __init__(
        self,
        samples: list[tuple[Path, int]],
        in_chans: int,
        transform: Callable | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        self.samples = samples
        self.mode = "L" if in_chans == 1 else "RGB"
        self.transform = transform
        # (N,) bool in shared memory: workers mark the files they could not decode
        self.bad = torch.zeros(len(samples), dtype=torch.bool).share_memory_() if skip_corrupt else None

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, index: int) -> tuple[Image.Image, int]:
        for step in range(len(self.samples)):
            i = (index + step) % len(self.samples)
            if self.bad is not None and self.bad[i]:
                continue
            path, label = self.samples[i]
            try:
                return load_image(path, self.mode), label
            except ImageReadError:
                if self.bad is None:
                    raise
                self.bad[i] = True
        raise FileFormatError(f"none of the {len(self.samples)} images could be decoded (e.g. {self.samples[0][0]})")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self._decode(index)
        image = TF.pil_to_tensor(image)  # (C, H, W) uint8
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    @property
    def skipped(self) -> list[Path]:
        """The files that failed to decode so far (with `skip_corrupt`), in sample order."""
        if self.bad is None:
            return []
        return [self.samples[i][0] for i in self.bad.nonzero().flatten().tolist()]

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]
