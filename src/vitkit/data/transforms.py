"""Transforms from the config: per-image pipelines (torchvision v2) and batched ones for in-memory data.

Both take uint8 images (C, H, W) or batches (B, C, H, W) and return normalised float tensors.
The eval pipeline is the same object for both (resize, centre crop and normalise act on a whole
batch the same way), so `eval`, `predict` and in-training validation see identical pixels.
The batched train pipeline draws its crop and flip per image in one vectorised step: in-memory
data sets (Fashion-MNIST) skip the per-image Python loop, which dominates on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from vitkit.data.batch_augment import BatchAugment, batch_random_erasing
from vitkit.data.image_augment import image_augment, image_random_erasing
from vitkit.weights import records

# lists of the pretrained records' statistics: configs and run files hold them as lists
IMAGENET_MEAN, IMAGENET_STD = list(records.IMAGENET_MEAN), list(records.IMAGENET_STD)


class ToChannels:
    """Convert uint8 images (..., C, H, W) to `in_chans` channels: grey -> RGB repeats,
    RGB -> grey uses ITU-R 601 luma (as PIL), RGBA drops alpha."""

    def __init__(self, in_chans: int) -> None:
        self.in_chans = in_chans

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-3]
        if c == self.in_chans:
            return x
        if c == 4:
            x, c = x[..., :3, :, :], 3
            if self.in_chans == 3:
                return x
        if c == 1 and self.in_chans == 3:
            return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
        if c == 3 and self.in_chans == 1:
            return TF.rgb_to_grayscale(x)
        raise ValueError(f"cannot convert {c}-channel images to in_chans={self.in_chans}: use in_chans 1 or 3")

    def __repr__(self) -> str:
        return f"ToChannels({self.in_chans})"


def _normalise(mean: Sequence[float], std: Sequence[float], in_chans: int) -> v2.Normalize:
    if len(mean) != in_chans or len(std) != in_chans:
        if len(mean) == 1 and len(std) == 1:
            mean, std = list(mean) * in_chans, list(std) * in_chans
        else:
            raise ValueError(f"mean/std have {len(mean)}/{len(std)} values but the model takes {in_chans} channels")
    return v2.Normalize(list(mean), list(std))


@dataclass(frozen=True)
class ImageSpec:
    """What a model expects as input: size, channels, normalisation, and the eval crop."""

    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"  # "bilinear" | "bicubic" (resizing)

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (mean and std as lists)."""
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class Augment:
    """Training augmentation options (see TrainConfig for their meaning)."""

    crop: str = "rrc"  # "rrc" | "pad" | "random" | "resize"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_padding: int = 4
    pad_mode: str = "reflect"
    hflip: float = 0.5
    auto_augment: str | None = None  # RandAugment spec (vitkit.data.augment_spec)
    three_augment: bool = False
    color_jitter: float = 0.0
    reprob: float = 0.0  # random erasing, after normalisation


def _mode(spec: ImageSpec) -> InterpolationMode:
    return InterpolationMode(spec.interpolation)


def eval_transform(spec: ImageSpec) -> v2.Compose:
    """Resize the short side to img_size / crop_pct, centre-crop img_size, scale to [0, 1], normalise."""
    return v2.Compose(
        [
            ToChannels(spec.in_chans),
            v2.Resize(math.floor(spec.img_size / spec.crop_pct), interpolation=_mode(spec), antialias=True),
            v2.CenterCrop(spec.img_size),
            v2.ToDtype(torch.float32, scale=True),
            _normalise(spec.mean, spec.std, spec.in_chans),
        ]
    )


def train_transform(spec: ImageSpec, aug: Augment) -> v2.Compose:
    """Per-image training pipeline (image folders): crop jitter, flip, scale, normalise."""
    size = spec.img_size
    steps: list = [ToChannels(spec.in_chans)]
    if aug.crop == "rrc":
        steps.append(
            v2.RandomResizedCrop(
                size, scale=aug.crop_scale, ratio=aug.crop_ratio, interpolation=_mode(spec), antialias=True
            )
        )
    elif aug.crop in ("pad", "random"):
        steps += [
            v2.Resize(_jitter_resize(spec, aug), interpolation=_mode(spec), antialias=True),
            v2.RandomCrop(size, padding=aug.crop_padding, padding_mode=aug.pad_mode, pad_if_needed=True),
        ]
    else:
        steps += [v2.Resize(size, interpolation=_mode(spec), antialias=True), v2.CenterCrop(size)]
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    steps += image_augment(
        size, spec.in_chans, auto_augment=aug.auto_augment, three_aug=aug.three_augment, color_jitter=aug.color_jitter
    )
    steps += [v2.ToDtype(torch.float32, scale=True), _normalise(spec.mean, spec.std, spec.in_chans)]
    if aug.reprob > 0:
        steps.append(image_random_erasing(aug.reprob))
    return v2.Compose(steps)


class BatchTrainTransform:
    """`train_transform` for a uint8 batch (B, C, H, W) in one vectorised step,
    each image with its own random crop and flip."""

    def __init__(self, spec: ImageSpec, aug: Augment) -> None:
        self.spec, self.aug = spec, aug
        self.channels = ToChannels(spec.in_chans)
        self.normalise = _normalise(spec.mean, spec.std, spec.in_chans)
        self.extra = BatchAugment(
            auto_augment=aug.auto_augment, three_aug=aug.three_augment, color_jitter=aug.color_jitter
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        size, aug = self.spec.img_size, self.aug
        x = self.channels(x).float().div_(255)  # (B, C, H, W) in [0, 1]
        if aug.crop == "rrc":
            x = random_resized_crop(x, size, aug.crop_scale, aug.crop_ratio)
        else:
            short = _jitter_resize(self.spec, aug) if aug.crop in ("pad", "random") else size
            x = TF.resize(x, short, interpolation=_mode(self.spec), antialias=True) if min(x.shape[-2:]) != short else x
            if aug.crop in ("pad", "random"):
                x = random_pad_crop(x, size, aug.crop_padding, aug.pad_mode)
            else:
                x = TF.center_crop(x, [size, size])
        if aug.hflip > 0:
            flip = torch.rand(x.shape[0]) < aug.hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.extra.active:
            x = self.extra(x)
        x = self.normalise(x)
        return batch_random_erasing(x, aug.reprob) if aug.reprob > 0 else x

    def __repr__(self) -> str:
        return f"BatchTrainTransform({self.spec}, {self.aug})"


def _jitter_resize(spec: ImageSpec, aug: Augment) -> int:
    """Short side before a random crop: img_size for `pad`, the eval resize for `random`."""
    return math.floor(spec.img_size / spec.crop_pct) if aug.crop == "random" else spec.img_size


def random_pad_crop(x: torch.Tensor, size: int, padding: int, mode: str = "reflect") -> torch.Tensor:
    """Pad (B, C, H, W) by `padding` and take a random size x size window per image."""
    if padding:
        x = F.pad(x, (padding,) * 4, mode=mode)
    b, _, h, w = x.shape
    oy = (torch.rand(b) * (h - size + 1)).long()  # per-image window offsets
    ox = (torch.rand(b) * (w - size + 1)).long()
    rows = (oy[:, None] + torch.arange(size))[:, :, None]  # (B, S, 1)
    cols = (ox[:, None] + torch.arange(size))[:, None, :]  # (B, 1, S)
    out = x.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols]  # (B, S, S, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_resized_crop(
    x: torch.Tensor, size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)
) -> torch.Tensor:
    """RandomResizedCrop per image of a float batch (B, C, H, W), resampled with roi_align.

    Area fraction and log aspect ratio are drawn as torchvision draws them; a box that does not
    fit is clamped to the image instead of redrawn (torchvision retries 10 times, then centre-crops).
    """
    b, _, h, w = x.shape
    area = h * w * torch.empty(b).uniform_(scale[0], scale[1])
    aspect = torch.exp(torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    cw = torch.sqrt(area * aspect).round().clamp(1, w)
    ch = torch.sqrt(area / aspect).round().clamp(1, h)
    x0 = (torch.rand(b) * (w - cw + 1)).floor()
    y0 = (torch.rand(b) * (h - ch + 1)).floor()
    boxes = torch.stack([torch.arange(b, dtype=x.dtype), x0, y0, x0 + cw, y0 + ch], dim=1).to(x)
    return roi_align(x, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
