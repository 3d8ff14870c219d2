"""What the per-image and the batched augmentations share: the RandAugment spec and its ops, the
3-Augment blur kernel.

RandAugment ("rand-m9-mstd0.5", DeiT's `rand-m9-mstd0.5-inc1` from timm) as torchvision allows:
- ops: torchvision's 14 (Identity, ShearX/Y, TranslateX/Y, Rotate, Brightness, Color, Contrast,
  Sharpness, Posterize, Solarize, AutoContrast, Equalize), two per image, each always applied;
  timm's increasing set has 15 (no Identity; Invert and SolarizeAdd besides) and applies each
  op with probability 0.5, so timm leaves a slot unchanged half the time, torchvision 1/14.
- magnitude: level 9 of 10 with Gaussian noise (std 0.5) drawn per op, clipped to [0, 10], as timm;
  per image it is quantised to 0.1 (torchvision's bins: `num_magnitude_bins=101`, bin 10 x level),
  per batch it is continuous. Same maxima as timm for shear (0.3), rotation (30 deg), the enhance
  ops (factor 1 +- 0.9 x level/10) and solarize (threshold 255 x (1 - level/10));
  translation reaches 150/331 = 0.453 of the side (timm 0.45); posterize keeps
  8 - round(4 x level/10) bits (4 at m9), where timm's increasing posterize keeps 4 - int(...) (1).
- fill 0 (black) where the geometry uncovers pixels (timm: the data set's mean colour);
  bilinear resampling (timm: bilinear or bicubic at random).
- colour jitter is off while RandAugment is on, as in timm's (and so DeiT's) pipeline.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

RA_OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
SIGNED_OPS = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
LEVELS = 10  # timm's magnitude scale: m9 = 9 of 10


@dataclass(frozen=True)
class RandAugmentSpec:
    """`rand-m9-mstd0.5-n2`: two ops per image at level 9 of 10, level noise std 0.5."""

    magnitude: float = 9.0
    magnitude_std: float = 0.5
    num_ops: int = 2

    @classmethod
    def parse(cls, text: str) -> RandAugmentSpec:
        """timm's `rand-...` grammar: `mM` level, `nN` ops, `mstdS` level noise; `incN` is accepted
        (torchvision's enhance ops already grow with the level)."""
        parts = text.split("-")
        if parts[0] != "rand":
            raise ValueError(f"auto_augment {text!r} is not a RandAugment spec: use e.g. 'rand-m9-mstd0.5'")
        fields: dict[str, float] = {}
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|m|n|inc)(\d+(?:\.\d+)?)", part)
            if match is None:
                raise ValueError(
                    f"auto_augment {text!r}: unknown part {part!r}; allowed: mLEVEL, nOPS, mstdSTD, incN "
                    "(e.g. 'rand-m9-mstd0.5')"
                )
            key, value = match.group(1), float(match.group(2))
            fields[{"m": "magnitude", "mstd": "magnitude_std", "n": "num_ops", "inc": "inc"}[key]] = value
        fields.pop("inc", None)
        if "num_ops" in fields:
            fields["num_ops"] = int(fields["num_ops"])
        spec = cls(**fields)
        if not 0 <= spec.magnitude <= LEVELS or spec.magnitude_std < 0 or spec.num_ops < 1:
            raise ValueError(f"auto_augment {text!r}: need 0 <= m <= 10, mstd >= 0, n >= 1")
        return spec

    def sample_levels(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """(n,) levels in [0, 10]: magnitude plus Gaussian noise, as timm draws them per op."""
        noise = torch.randn(n, device=device) * self.magnitude_std
        return (self.magnitude + noise).clamp(0, LEVELS)


def blur_kernel_size(img_size: int, sigma_max: float = 2.0) -> int:
    """Odd Gaussian kernel covering +-3 sigma_max, no wider than the image (reflect padding needs that)."""
    size = 2 * math.ceil(3 * sigma_max) + 1
    largest = img_size if img_size % 2 else img_size - 1
    return max(1, min(size, largest))
