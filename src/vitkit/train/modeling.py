"""Models for training: vitkit names or `torchvision:NAME`, and their weight files.

A trained weight file is the vitkit safetensors format; its metadata also records how to feed the
model (`inputs`: size, channels, mean/std, crop, class names), so `eval` and `predict` need nothing else.
Building and loading live in `vitkit.factory`; this module adds what training records beside them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from vitkit.data.transforms import ImageSpec
from vitkit.factory import (
    TORCHVISION_PREFIX,
    build_torchvision,
    create_model,
    default_img_size,
    is_torchvision,
    load_model,
    model_metadata,
)
from vitkit.weights.vitkit_format import recorded_inputs, save_model

__all__ = [
    "build_model",
    "build_torchvision",
    "default_img_size",
    "input_spec",
    "is_torchvision",
    "load_weights",
    "save_weights",
]


def build_model(
    name: str, *, num_classes: int, in_chans: int, img_size: int, model_args: dict[str, Any] | None = None
) -> nn.Module:
    """A freshly initialised model: a vitkit variant (model_args override its config) or
    `torchvision:NAME` (model_args go to torchvision's builder)."""
    model_args = dict(model_args or {})
    if is_torchvision(name):
        return build_torchvision(
            name[len(TORCHVISION_PREFIX) :], num_classes=num_classes, in_chans=in_chans, img_size=img_size, **model_args
        )
    return create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **model_args)


def save_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    spec: ImageSpec,
    classes: list[str],
    extra: dict[str, str] | None = None,
) -> None:
    """Write `model` (vitkit safetensors, atomically) with what eval/predict need in its metadata."""
    meta = {
        "inputs": json.dumps({**spec.as_dict(), "classes": classes}),
        **(extra or {}),
    }
    name = getattr(model, "variant_name", "")
    if is_torchvision(name):
        meta["model"] = name
        meta["torchvision_args"] = json.dumps(getattr(model, "torchvision_args", {}))
    save_model(model, path, metadata=meta)


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, str]]:
    """(model, metadata) of a weight file written by `save_weights` or `vitkit.weights.save_model`."""
    model = load_model(path, device=device)  # a weight file, or a timm Hub folder (`vitkit export --format hub`)
    return model, model_metadata(path)


def input_spec(meta: dict[str, str]) -> tuple[ImageSpec, list[str]] | None:
    """The (input spec, class names) recorded by `save_weights`, or None when absent."""
    info = recorded_inputs(meta)
    if info is None:
        return None
    spec = ImageSpec(
        info["img_size"],
        info["in_chans"],
        tuple(info["mean"]),
        tuple(info["std"]),
        info["crop_pct"],
        info.get("interpolation", "bilinear"),
    )
    return spec, list(info["classes"])
