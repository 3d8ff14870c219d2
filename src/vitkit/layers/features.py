"""Choosing which blocks or stages `forward_intermediates` returns."""

from __future__ import annotations


def take_indices(num: int, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """timm's rule for `forward_intermediates`: an int n takes the last n, a list takes those."""
    if indices is None:
        indices = num
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise ValueError(f"indices={indices} is out of range: choose 1 to {num} (the last n)")
        return list(range(num - indices, num))
    out = []
    for i in indices:
        j = num + i if i < 0 else i
        if not 0 <= j < num:
            raise ValueError(f"index {i} is out of range: choose -{num} to {num - 1}")
        out.append(j)
    return out
