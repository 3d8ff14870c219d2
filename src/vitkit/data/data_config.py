"""What `vitkit.data` needs to know: where the images are, how they are split, sized, normalised and
augmented one by one. Training configs extend it (`TrainConfig` is a `DataConfig`), so recipes and
run folders keep one flat list of fields, while nothing in `vitkit.data` knows a training setting.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from vitkit.core.errors import UsageError

# rrc: RandomResizedCrop; pad: resize to img_size, pad, random crop (DeiT III); random: resize as eval
# does (img_size / crop_pct), pad, random img_size window (eval takes the centre one); resize: no jitter
CropMode = Literal["rrc", "pad", "random", "resize"]

FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist", "fmnist")  # what --data accepts for Fashion-MNIST


def is_fashion_mnist(data: str) -> bool:
    """Whether a `--data` value names Fashion-MNIST."""
    return data.lower() in FASHION_MNIST_NAMES


@dataclass
class DataConfig:
    # -- source and splits ----------------------------------------------------------------------------------
    data: str = "fashion-mnist"  # "fashion-mnist" or an image folder with train/ val/ [test/]
    val_split: float = 0.1  # fraction of train held out for validation when the data has no val split
    split_seed: int = 0  # seed of the validation hold-out and of the sample subsets (not --seed)
    train_samples: int | None = None
    val_samples: int | None = None
    test_samples: int | None = None
    skip_corrupt: bool = False
    img_size: int | None = None  # None: the data's native size, else the model's default
    in_chans: int | None = None  # None: from the data
    num_classes: int | None = None  # None: from the data
    mean: list[float] | None = None  # None: the data set's statistics (ImageNet's for image folders)
    std: list[float] | None = None
    crop_pct: float = 0.875  # eval: resize the short side to img_size / crop_pct, centre-crop img_size
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # for every resize
    # -- augmentation --------------------------------------------------------------------------
    # rrc: RandomResizedCrop; pad: resize to img_size, pad, random crop (DeiT III); random: resize as eval
    # does (img_size / crop_pct), pad, random img_size window (eval takes the centre one); resize: no jitter
    crop: CropMode = "rrc"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    crop_padding: int = 4
    pad_mode: Literal["reflect", "constant"] = "reflect"
    hflip: float = 0.5
    auto_augment: str | None = None  # RandAugment, e.g. "rand-m9-mstd0.5-inc1" (DeiT); see vitkit.data.augment_spec
    three_augment: bool = False  # DeiT III: one of greyscale, solarisation, Gaussian blur per image
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; off while auto_augment is on
    reprob: float = 0.0  # random erasing probability (N(0, 1) noise boxes)

    def validate(self) -> None:
        if self.split_seed < 0:
            raise UsageError(f"split_seed must be >= 0, got {self.split_seed}")
        for name in ("train_samples", "val_samples", "test_samples", "img_size", "in_chans", "num_classes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"{name} must be a positive integer (or null), got {value}")
        if not 0.0 <= self.val_split < 1.0:
            raise UsageError(f"val_split must be in [0, 1), got {self.val_split}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise UsageError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if not 0.0 <= self.hflip <= 1.0:
            raise UsageError(f"hflip must be a probability in [0, 1], got {self.hflip}")
        if self.color_jitter < 0:
            raise UsageError(f"color_jitter must be >= 0 (0 = off), got {self.color_jitter}")
        if not 0.0 <= self.reprob <= 1.0:
            raise UsageError(f"reprob must be a probability in [0, 1], got {self.reprob}")
        if self.auto_augment:
            from vitkit.data.augment_spec import RandAugmentSpec  # noqa: PLC0415  imports torch: only when used

            RandAugmentSpec.parse(self.auto_augment)
            if self.three_augment:
                raise UsageError("choose auto_augment (DeiT) or three_augment (DeiT III), not both")
        if self.crop_padding < 0:
            raise UsageError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UsageError(f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {self.crop_scale}")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise UsageError(f"crop_ratio must be [min, max] with 0 < min <= max, got {self.crop_ratio}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and (not value or (name == "std" and min(value) <= 0)):
                raise UsageError(f"{name} must be a non-empty list of numbers (std > 0), got {value}")
        # every Literal field, this class's and a subclass's (TrainConfig), holds one of its values
        for name, hint in typing.get_type_hints(type(self)).items():
            if typing.get_origin(hint) is Literal and getattr(self, name) not in typing.get_args(hint):
                allowed = ", ".join(typing.get_args(hint))
                raise UsageError(f"{name} must be one of {allowed}; got {getattr(self, name)!r}")
