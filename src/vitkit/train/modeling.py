"""Models for training: vitkit names or `torchvision:NAME`, and their weight files.

A trained weight file is the vitkit safetensors format; its metadata also records how to feed the
model (`inputs`: size, channels, mean/std, crop, class names), so `eval` and `predict` need nothing else.
Torchvision models are recorded as `model = "torchvision:NAME"` with their constructor arguments.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.data.transforms import ImageSpec
from vitkit.weights.io import read_metadata, save_model

TORCHVISION_PREFIX = "torchvision:"


def is_torchvision(name: str) -> bool:
    return name.startswith(TORCHVISION_PREFIX)


def default_img_size(name: str, model_args: dict[str, Any] | None = None) -> int:
    """The input size a model is built for when the config gives none."""
    if is_torchvision(name):
        return 224
    from vitkit.registry import model_info

    return int(model_info(name, **(model_args or {}))["img_size"][0])


def build_model(
    name: str, *, num_classes: int, in_chans: int, img_size: int, model_args: dict[str, Any] | None = None
) -> nn.Module:
    """A freshly initialised model: a vitkit variant (model_args override its config) or
    `torchvision:NAME` (model_args go to torchvision's builder)."""
    model_args = dict(model_args or {})
    if is_torchvision(name):
        return build_torchvision(name[len(TORCHVISION_PREFIX) :], num_classes=num_classes, in_chans=in_chans,
                                 img_size=img_size, **model_args)
    from vitkit.registry import create_model

    return create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **model_args)


def build_torchvision(name: str, *, num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    """A torchvision classification model with `num_classes` outputs and its first convolution
    taking `in_chans` channels (random weights)."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown torchvision classification model {name!r}{hint}")
    if name.startswith("vit_"):  # torchvision's ViT is built for one input size
        kwargs.setdefault("image_size", img_size)
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ValueError(f"torchvision model {name} rejects the model_args {sorted(kwargs)}: {err}") from None
    if in_chans != 3:
        _adapt_first_conv(model, in_chans)
    model.variant_name = TORCHVISION_PREFIX + name
    model.torchvision_args = {"num_classes": num_classes, "in_chans": in_chans, "img_size": img_size, **kwargs}
    return model


def _adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                conv = nn.Conv2d(
                    in_chans, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, child.groups if child.groups == 1 else in_chans, child.bias is not None,
                    child.padding_mode,
                )
                setattr(parent, child_name, conv)
                return
    raise ValueError(f"cannot find a 3-channel first convolution in {type(model).__name__} to adapt to in_chans")


def save_weights(
    model: nn.Module, path: str | os.PathLike, *, spec: ImageSpec, classes: list[str],
    extra: dict[str, str] | None = None,
) -> None:
    """Write `model` (vitkit safetensors, atomically) with what eval/predict need in its metadata."""
    meta = {
        "inputs": json.dumps(
            {"img_size": spec.img_size, "in_chans": spec.in_chans, "mean": list(spec.mean), "std": list(spec.std),
             "crop_pct": spec.crop_pct, "interpolation": spec.interpolation, "classes": classes}
        ),
        **(extra or {}),
    }
    name = getattr(model, "variant_name", "")
    if is_torchvision(name):
        meta["model"] = name
        meta["torchvision_args"] = json.dumps(getattr(model, "torchvision_args", {}))
    save_model(model, path, metadata=meta)


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, str]]:
    """(model, metadata) of a weight file written by `save_weights` or `vitkit.weights.save_model`."""
    from safetensors.torch import load_file

    from vitkit.weights.io import load_model

    path = Path(path)
    if path.is_dir():  # a Hub folder (`vitkit export --format hub`, or one timm wrote)
        from vitkit.weights.timm_hub import load_timm_folder

        return load_timm_folder(path, device=device)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    meta = read_metadata(path)
    name = meta.get("model", "")
    if is_torchvision(name):
        args = json.loads(meta.get("torchvision_args", "{}"))
        model = build_torchvision(name[len(TORCHVISION_PREFIX) :], **args)
        model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
        return model.to(device), meta
    return load_model(path, device=device), meta


def input_spec(meta: dict[str, str]) -> tuple[ImageSpec, list[str]] | None:
    """The (input spec, class names) recorded by `save_weights`, or None when absent."""
    if "inputs" not in meta:
        return None
    info = json.loads(meta["inputs"])
    spec = ImageSpec(info["img_size"], info["in_chans"], tuple(info["mean"]), tuple(info["std"]), info["crop_pct"],
                     info.get("interpolation", "bilinear"))
    return spec, list(info["classes"])
