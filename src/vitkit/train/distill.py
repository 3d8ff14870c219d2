"""DeiT III's binary cross-entropy and DeiT's knowledge distillation, as training criteria.

Every criterion is called as `criterion(outputs, targets, images)` (the engine's convention):
`targets` are class indices (B,) or class probabilities (B, K) from Mixup/CutMix, `images` the
batch the student saw, which the distillation criterion feeds to its teacher.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.train.teacher import FrozenTeacher

DistillationMode = Literal["none", "soft", "hard"]


def _probabilities(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) indices or (B, K) probabilities -> smoothed (B, K) probabilities in fp32."""
    if targets.ndim == 1:
        targets = F.one_hot(targets.long(), num_classes)
    targets = targets.float()
    if smoothing:
        targets = targets * (1 - smoothing) + smoothing / num_classes
    return targets


class BinaryCrossEntropy(nn.Module):
    """Per-class sigmoid BCE on hard or (mixed) soft targets, as DeiT III trains.

    `threshold`: targets above it become 1, the rest 0, after smoothing; DeiT III uses 0.0, so
    every class present in a Mixup/CutMix pair counts as a full positive (use it with smoothing 0).
    """

    def __init__(self, label_smoothing: float = 0.0, threshold: float | None = None) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing, self.threshold = label_smoothing, threshold

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(outputs, (tuple, list)):
            raise ValueError(
                "the model returned several outputs (a distilled model in distilled training): "
                "use a distillation criterion (--distillation) or turn distilled training off"
            )
        logits = outputs.float()  # fp32: sigmoid of bf16 logits loses precision
        target = _probabilities(targets, logits.shape[-1], self.label_smoothing)
        if self.threshold is not None:
            target = (target > self.threshold).float()
        return F.binary_cross_entropy_with_logits(logits, target)


def soft_distillation(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-`tau` softmaxes, x tau^2, averaged over the logits'
    elements (B x K), as DeiT."""
    log_s = F.log_softmax(student.float() / tau, dim=-1)
    log_t = F.log_softmax(teacher.float() / tau, dim=-1)
    return F.kl_div(log_s, log_t, reduction="sum", log_target=True) * (tau * tau) / student.numel()


def hard_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's argmax (DeiT's hard distillation)."""
    return F.cross_entropy(student.float(), teacher.argmax(dim=-1))


class DistillationLoss(nn.Module):
    """(1 - alpha) x base(class output, targets) + alpha x distillation(distillation output, teacher).

    A distilled model in distilled training returns (class logits, distillation logits): the class
    head learns from the targets, the distillation head from the teacher. A plain model's single
    output learns from both. The teacher runs in eval mode without gradients on the same images.
    """

    def __init__(
        self,
        base: nn.Module,
        teacher: nn.Module,
        mode: Literal["soft", "hard"],
        alpha: float = 0.5,
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        if mode not in ("soft", "hard"):
            raise ValueError(f"distillation must be 'soft' or 'hard' here (got {mode!r}); 'none' needs no teacher")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {alpha}")
        if tau <= 0:
            raise ValueError(f"distill_tau must be > 0, got {tau}")
        self.base = base
        self.teacher = teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)
        self.mode, self.alpha, self.tau = mode, alpha, tau

    def forward(
        self, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(outputs, (tuple, list)):
            cls_out, dist_out = outputs
        else:
            cls_out = dist_out = outputs
        base = self.base(cls_out, targets, images)
        teacher_out = self.teacher(images)
        if teacher_out.shape != dist_out.shape:
            raise ValueError(
                f"teacher outputs {tuple(teacher_out.shape)} but the student {tuple(dist_out.shape)}: "
                "the teacher must predict the same classes"
            )
        if self.mode == "soft":
            distill = soft_distillation(dist_out, teacher_out, self.tau)
        else:
            distill = hard_distillation(dist_out, teacher_out)
        return base * (1 - self.alpha) + distill * self.alpha


def build_distillation(
    base: nn.Module,
    teacher: nn.Module | None,
    mode: DistillationMode,
    alpha: float = 0.5,
    tau: float = 1.0,
) -> nn.Module:
    """`base` itself for mode "none", else a `DistillationLoss` around it (a teacher is required)."""
    if mode == "none":
        return base
    if teacher is None:
        raise ValueError(f"--distillation {mode} needs a teacher: pass --teacher NAME|torchvision:NAME|RUN_DIR|FILE")
    return DistillationLoss(base, teacher, mode, alpha, tau)
