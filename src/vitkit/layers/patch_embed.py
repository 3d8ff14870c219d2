"""Image to patch tokens: a strided convolution (and an optional LayerNorm, as Swin)."""

from __future__ import annotations

import torch
from torch import nn

from vitkit.layers.norm import LayerNorm


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H / p, W / p, D) with a p x p convolution of stride p."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool = False) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H', W', D)


MAX_PATCHES = 2**22  # 4 M patch tokens (8192 px at patch 4): beyond it a position table alone overflows memory


def check_patch_grid(img_size: tuple[int, int], patch_size: int) -> None:
    """A config's img_size is a positive multiple of its patch size, at most MAX_PATCHES patches."""
    for side in img_size:
        if side <= 0 or side % patch_size:
            raise ValueError(f"img_size {img_size} must be a positive multiple of patch_size ({patch_size})")
    patches = (img_size[0] // patch_size) * (img_size[1] // patch_size)
    if patches > MAX_PATCHES:
        raise ValueError(
            f"img_size {img_size} at patch_size {patch_size} makes {patches} patches: at most "
            f"{MAX_PATCHES}; use a smaller img_size or a larger patch_size"
        )


def check_input_size(x: torch.Tensor, img_size: tuple[int, int], patch_size: int, dynamic: bool) -> tuple[int, int]:
    """The (H, W) of `x` if the model accepts it, else a ValueError naming the fixes.

    A model built for one size takes that size only; with `dynamic` it takes any multiple of the patch.
    """
    h, w = x.shape[-2:]
    if dynamic:
        if h % patch_size or w % patch_size:
            raise ValueError(
                f"input {h}x{w} is not divisible by the patch size {patch_size}: "
                f"resize or pad it to a multiple of {patch_size}"
            )
    elif (h, w) != tuple(img_size):
        raise ValueError(
            f"input {h}x{w} does not match the model's img_size {img_size}: build it with "
            f"img_size=({h}, {w}), call set_input_size(), or pass dynamic_img_size=True"
        )
    return h, w
