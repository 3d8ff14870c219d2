"""Image to patch tokens: a strided convolution (and an optional LayerNorm, as Swin)."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H / p, W / p, D) with a p x p convolution of stride p."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool = False) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H', W', D)
