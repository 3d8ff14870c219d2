"""Training criteria. Every criterion is called as `criterion(outputs, targets, images)`:

`targets` are class indices (B,) or class probabilities (B, K) (mixed or smoothed), and `images`
is the batch the model saw, so a distillation criterion can run its teacher on the same pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.train.config import TrainConfig
from vitkit.train.distill import BinaryCrossEntropy


class CrossEntropy(nn.Module):
    """Cross-entropy with label smoothing, on hard or soft targets."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(outputs, (tuple, list)):
            raise ValueError(
                "the model returned several outputs (a distilled model in distilled training): "
                "use a distillation criterion (--distillation) or turn distilled training off"
            )
        # logits in fp32: under autocast the softmax of bf16 logits loses precision
        return F.cross_entropy(outputs.float(), targets, label_smoothing=self.label_smoothing)


def build_criterion(config: TrainConfig) -> nn.Module:
    """The training criterion the config asks for: cross-entropy, or BCE on (mixed) targets (DeiT III)."""
    if config.loss == "bce":
        return BinaryCrossEntropy(config.label_smoothing, config.bce_threshold)
    return CrossEntropy(config.label_smoothing)
