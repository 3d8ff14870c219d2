"""The DeiT and DeiT III augmentations beyond crop and flip, per image: torchvision v2 transforms on
uint8 images (image folders, in loader workers). `vitkit.data.batch_augment` has the same steps with
the same parameters for float batches; `vitkit.data.augment_spec` says how RandAugment follows timm.

Order in a train pipeline (as DeiT / DeiT III): crop + flip (`vitkit.data.transforms`), then
RandAugment, or 3-Augment and colour jitter, on pixels in [0, 1]; then normalisation; then random
erasing on the normalised image; Mixup/CutMix on the batch, on the device (`vitkit.data.mixup`).
"""

from __future__ import annotations

from typing import Any

from torchvision.transforms import v2

from vitkit.data.augment_spec import LEVELS, RandAugmentSpec, blur_kernel_size


class RandAugmentNoise(v2.Transform):
    """torchvision's RandAugment with timm's per-op magnitude noise, on one uint8 image."""

    BINS_PER_LEVEL = 10

    def __init__(self, spec: RandAugmentSpec) -> None:
        super().__init__()
        self.spec = spec
        # one op per call, its bin redrawn before each call: level L -> bin 10 L of 101
        self.op = v2.RandAugment(
            num_ops=1,
            magnitude=0,
            num_magnitude_bins=LEVELS * self.BINS_PER_LEVEL + 1,
            interpolation=v2.InterpolationMode.BILINEAR,
        )

    def forward(self, *inputs: Any) -> Any:
        out = inputs if len(inputs) > 1 else inputs[0]
        for level in self.spec.sample_levels(self.spec.num_ops).tolist():
            self.op.magnitude = round(level * self.BINS_PER_LEVEL)
            out = self.op(out)
        return out


def three_augment(img_size: int, in_chans: int) -> v2.RandomChoice:
    """DeiT III's 3-Augment choice on a uint8 image: exactly one of greyscale, solarisation
    (pixels >= 128 inverted) and Gaussian blur (sigma in [0.1, 2]). Colour jitter and flip follow
    separately (`image_augment`). On 1-channel images greyscale leaves the image unchanged."""
    return v2.RandomChoice(
        [
            v2.Grayscale(num_output_channels=in_chans),
            v2.RandomSolarize(threshold=128, p=1.0),
            v2.GaussianBlur(blur_kernel_size(img_size), sigma=(0.1, 2.0)),
        ]
    )


def image_augment(
    img_size: int,
    in_chans: int,
    *,
    auto_augment: str | None = None,
    three_aug: bool = False,
    color_jitter: float = 0.0,
) -> list[v2.Transform]:
    """The per-image steps between crop/flip and normalisation, on uint8 images."""
    if auto_augment and three_aug:
        raise ValueError("choose auto_augment (DeiT) or three_augment (DeiT III), not both")
    steps: list[v2.Transform] = []
    if auto_augment:
        steps.append(RandAugmentNoise(RandAugmentSpec.parse(auto_augment)))
    if three_aug:
        steps.append(three_augment(img_size, in_chans))
    if color_jitter and not auto_augment:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    return steps


def image_random_erasing(prob: float) -> v2.RandomErasing:
    """Random erasing on a normalised image: a box of 2-33% of the area, aspect 0.3-3.3, filled with
    N(0, 1) noise per pixel (timm's `remode='pixel'`, DeiT's setting)."""
    return v2.RandomErasing(p=prob, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value="random")
