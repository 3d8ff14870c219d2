"""Weight initialisation."""

from __future__ import annotations

import torch
from torch import nn


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Normal(0, std) truncated at two standard deviations (the ViT / DeiT init).

    `nn.init.trunc_normal_`'s default bounds are absolute (+-2), which for std 0.02 truncate nothing.
    """
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)
