"""Position-embedding helpers: resampling a learned grid, and fixed 2-D sin-cos embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true


def same_size(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Sizes known to be equal without a guard: under torch.export with dynamic H/W, a plain `==`
    would pin the exported graph to the example's size (the shortcut then stays untaken there)."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def resample_abs_pos_embed(
    pos_embed: torch.Tensor,
    new_size: tuple[int, int],
    old_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a (1, prefix + H*W, D) position embedding to a new H x W grid.

    The numbers are timm's `resample_abs_pos_embed`: prefix tokens (class, distillation) are
    kept as they are and the grid is resized with antialiased bicubic interpolation in fp32.
    The DeiT reference code uses plain (non-antialiased) bicubic; pass `antialias=False` for that.
    """
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        side = int(round(num_grid**0.5))
        if side * side != num_grid:
            raise ValueError(f"position embedding has {num_grid} grid tokens, not a square: pass old_size=(H, W)")
        old_size = (side, side)
    new_size = (new_size[0], new_size[1])  # no int(): symbolic sizes (torch.export) must stay symbolic
    if same_size(tuple(old_size), new_size):  # resampling to the same size is exact anyway
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    dtype = grid.dtype
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid


def sincos_2d_pos_embed(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (1, H*W, dim), as in "Better plain ViT baselines".

    Channels are [sin(x), cos(x), sin(y), cos(y)], each dim / 4 wide.
    """
    if dim % 4:
        raise ValueError(f"embed_dim ({dim}) must be divisible by 4 for sincos2d position embedding")
    h, w = grid_size
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float32) / max(quarter - 1, 1)
    omega = 1.0 / temperature**omega
    x = x.flatten()[:, None] * omega[None, :]
    y = y.flatten()[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)[None]
