"""Checkpoint converters: one module per source format, each a pure `convert(state) -> state` to
vitkit's (= timm's) parameter names plus a `detect(state)` on the keys.

Formats: timm (and vitkit, and the official DeiT release), deit (official DeiT III), swin (official
Swin / Swin V2), hf, torchvision, mmpretrain, jax (Google's .npz). Shape adaptation to a particular
model (position embeddings, window tables, patch kernels, heads) happens afterwards, in
`vitkit.weights.checkpoint`, the same way for every format.
"""

from __future__ import annotations

from types import ModuleType

import torch

from vitkit.weights.convert import deit, hf, jax, mmpretrain, native, swin, torchvision

# detection order: the specific layouts first, plain timm names last
_MODULES: tuple[ModuleType, ...] = (jax, hf, torchvision, mmpretrain, swin, deit, native)
FORMATS: dict[str, ModuleType] = {m.FORMAT: m for m in _MODULES} | {"vitkit": native}
DEFAULT_RESAMPLE = {"interpolation": "bicubic", "antialias": True}  # timm's checkpoint_filter_fn


def detect_format(state: dict[str, torch.Tensor]) -> str | None:
    """The format whose keys `state` has, or None."""
    for module in _MODULES:
        if module.detect(state):
            return module.FORMAT
    return None


def convert(state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """`state` with vitkit's names; `fmt` is a key of FORMATS."""
    return FORMATS[fmt].convert(state)


def resample_options(fmt: str) -> dict:
    """Interpolation settings timm uses for position embeddings and patch kernels of this format."""
    return getattr(FORMATS[fmt], "RESAMPLE", DEFAULT_RESAMPLE)
