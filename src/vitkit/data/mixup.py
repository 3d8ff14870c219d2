"""Mixup and CutMix on a batch (DeiT), after every per-image augmentation, on the device."""

from __future__ import annotations

import torch
from torchvision.transforms import v2


class MixupCutmix:
    """Mixup or CutMix on a batch (torchvision v2), one of them per batch: `(images, labels (B,))
    -> (mixed images, mixed one-hot targets (B, K))`, rows summing to 1.

    DeiT: mixup_alpha 0.8, cutmix_alpha 1.0, switch_prob 0.5 (the chance of CutMix when both are on).
    Label smoothing is the criterion's job: smoothing is linear, so smoothing the mixed targets
    equals mixing smoothed ones (timm's order).
    """

    def __init__(
        self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= switch_prob <= 1:
            raise ValueError("mixup and cutmix alphas must be >= 0 and switch_prob in [0, 1]")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ValueError("MixupCutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes = num_classes
        choices, probs = [], []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
            probs.append(1 - switch_prob if cutmix_alpha > 0 else 1.0)
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
            probs.append(switch_prob if mixup_alpha > 0 else 1.0)
        self.mix = v2.RandomChoice(choices, p=probs)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if labels.ndim != 1:
            raise ValueError("MixupCutmix takes class indices (B,); apply it before any other label mixing")
        # torchvision pairs each image with its neighbour (roll by 1); repeated augmentation puts the
        # copies of one image side by side, so shuffle first to pair distinct images
        perm = torch.randperm(images.shape[0], device=images.device)
        images, labels = self.mix(images[perm], labels[perm])
        return images, labels
