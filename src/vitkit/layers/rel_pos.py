"""Relative position bias helpers for windowed attention (Swin): the gather index, and resizing a
learned bias table to another window size."""

from __future__ import annotations

import torch


def relative_position_index(window: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """(N, N) index into a (2*Wh - 1) * (2*Ww - 1) bias table for every token pair of a window, N = Wh * Ww."""
    wh, ww = window
    coords = torch.stack(
        torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
    ).flatten(1)  # (2, N): row and column of each token
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N), offsets in [-(W - 1), W - 1]
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def _stretched_offsets(src: int, dst: int) -> list[float]:
    """Positions of a table's `src` entries along one axis, as offsets on a `dst`-wide axis.

    The spacing grows geometrically (ratio found by bisection) so that the outermost entry lands at
    about dst // 2: near offsets keep their meaning, far ones are stretched (BEiT's rule, as timm).
    """
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            hi = q
        else:
            lo = q
    offsets, cur = [], 1.0
    for i in range(src // 2):
        offsets.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(offsets)] + [0.0] + offsets


def _linear_weights(points: torch.Tensor, targets: torch.Tensor):
    """Left/right neighbour indices and distances for linear interpolation on an uneven grid."""
    right = torch.bucketize(targets, points).clamp(max=len(points) - 1)
    left = (right - 1).clamp(0, len(points) - 1)
    dist_left = (targets - points[left]).clamp(min=0)
    dist_right = (points[right] - targets).clamp(min=0)
    exact = (dist_left == 0) & (dist_right == 0)  # target on a grid point (or beyond the ends)
    dist_left = torch.where(exact, 1.0, dist_left)
    dist_right = torch.where(exact, 1.0, dist_right)
    return left, right, dist_left, dist_right


def resize_rel_pos_bias_table(
    table: torch.Tensor, old_window: tuple[int, int], new_window: tuple[int, int]
) -> torch.Tensor:
    """Resample a ((2*Wh - 1) * (2*Ww - 1), heads) bias table from one window size to another.

    The numbers are timm's `resize_rel_pos_bias_table` without scipy: entries are placed at
    geometrically stretched offsets and read back at integer offsets by linear interpolation.
    """
    src = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    dst = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if src == dst:
        return table
    heads = table.shape[1]
    if table.is_meta:
        return table.new_empty(dst[0] * dst[1], heads)
    values = table.detach().float().cpu().reshape(src[0], src[1], heads)
    axes = []
    for s, d in zip(src, dst):
        points = torch.tensor(_stretched_offsets(s, d), dtype=torch.float32)
        half = d // 2.0
        axes.append(_linear_weights(points, torch.arange(-half, half + 0.1, 1.0)))
    (yl, yr, y_dl, y_dr), (xl, xr, x_dl, x_dr) = axes
    y_dl, y_dr, x_dl, x_dr = y_dl[:, None, None], y_dr[:, None, None], x_dl[None, :, None], x_dr[None, :, None]
    out = (
        values[yl][:, xl] * (y_dr * x_dr)
        + values[yl][:, xr] * (y_dr * x_dl)
        + values[yr][:, xl] * (y_dl * x_dr)
        + values[yr][:, xr] * (y_dl * x_dl)
    ) / ((y_dl + y_dr) * (x_dl + x_dr))
    return out.reshape(-1, heads).to(device=table.device, dtype=table.dtype)
