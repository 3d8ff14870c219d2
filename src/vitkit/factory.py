"""Building models: vitkit variants by name (with pretrained weights), torchvision classifiers, and
models rebuilt from their weight files.

Importing this module imports `vitkit.models`, which fills the variant table (`vitkit.registry`).
A torchvision model is named `torchvision:NAME`; its files record that name and the constructor
arguments, so `load_model` rebuilds it like a vitkit variant.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

import vitkit.models  # noqa: F401  (registers the families)
from vitkit.core.errors import FileFormatError, VitkitError
from vitkit.registry import count_parameters, get_variant, resolve_config, variant_names
from vitkit.weights.checkpoint import load_checkpoint
from vitkit.weights.pretrained import load_pretrained
from vitkit.weights.quantized import is_quantized_file, load_quantized
from vitkit.weights.timm_hub import folder_kind, read_timm_folder
from vitkit.weights.vitkit_format import FORMAT_NAME, config_fields, read_metadata

TORCHVISION_PREFIX = "torchvision:"

__all__ = [
    "TORCHVISION_PREFIX",
    "build_torchvision",
    "count_parameters",
    "create_model",
    "default_img_size",
    "get_variant",
    "is_torchvision",
    "list_models",
    "load_model",
    "model_info",
    "resolve_config",
]


# -- vitkit variants -------------------------------------------------------------------------------
def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered variants matching an fnmatch pattern, sorted."""
    return sorted(n for n in variant_names() if fnmatch.fnmatchcase(n, pattern))


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    in_chans: int | None = None,
    pretrained: bool | str = False,
    **overrides: Any,
) -> nn.Module:
    """Build a model by its (timm) name; every default equals timm's for that name.

    `overrides` replace any field of the variant's config (`depth`, `drop_path_rate`,
    `dynamic_img_size`, ...). `pretrained=True` loads the variant's default weight record,
    `pretrained="path"` a local checkpoint in any supported format.
    """
    given = {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans}
    fields = {k: v for k, v in given.items() if v is not None} | overrides
    config = resolve_config(name, **fields)
    model = get_variant(name).build(config)
    model.variant_name = name  # type: ignore[assignment]  # Module types attributes as Tensor | Module
    if pretrained:
        load_pretrained(model, name, pretrained)
    return model


def model_info(name: str, **fields: Any) -> dict[str, Any]:
    """Family, resolved config, parameter count and native input size, built on the meta device."""
    variant = get_variant(name)
    config = resolve_config(name, **fields)
    with torch.device("meta"):
        model = variant.build(config)
    return {
        "name": name,
        "family": variant.family,
        "config": dataclasses.asdict(config),
        "params": count_parameters(model),
        "img_size": tuple(config.img_size),
        "num_classes": config.num_classes,
    }


def default_img_size(name: str, model_args: dict[str, Any] | None = None) -> int:
    """The input size a model (vitkit or `torchvision:NAME`) is built for when the config gives none."""
    if is_torchvision(name):
        return 224
    return int(model_info(name, **(model_args or {}))["img_size"][0])


# -- torchvision classifiers -----------------------------------------------------------------------
def is_torchvision(name: str) -> bool:
    """Whether `name` is a `torchvision:NAME` model."""
    return name.startswith(TORCHVISION_PREFIX)


def build_torchvision(name: str, *, num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    """A torchvision classification model with `num_classes` outputs and its first convolution
    taking `in_chans` channels (random weights). `name` is torchvision's, without the prefix."""
    import torchvision  # noqa: PLC0415  a second of start-up: only when a torchvision model is asked for

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
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
                    in_chans,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    child.groups if child.groups == 1 else in_chans,
                    child.bias is not None,
                    child.padding_mode,
                )
                setattr(parent, child_name, conv)
                return
    raise ValueError(f"cannot find a 3-channel first convolution in {type(model).__name__} to adapt to in_chans")


# -- model files -----------------------------------------------------------------------------------
def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a vitkit weight file describes and load its weights (exactly, nothing resampled).

    The file's metadata names the model: a vitkit variant with its config (an encoder saved with
    num_classes=0 comes back without a head), or `torchvision:NAME` with its constructor arguments.
    Files without that metadata (timm, official releases) need the model built first:
    `vitkit.load_checkpoint(vitkit.create_model(NAME), path)`.
    """
    path = Path(path)
    if path.is_dir() and folder_kind(path) == "timm":  # a Hub folder (`vitkit export --format hub`, or timm's)
        arch, args, weights, _ = read_timm_folder(path)
        if arch not in variant_names():
            raise VitkitError(
                f"{path} holds timm's {arch}, which vitkit does not build: load it with timm.create_model"
            )
        model = create_model(arch, **args)
        load_checkpoint(model, weights, strict=True)
        return model.to(device)
    if path.is_dir():
        kind = "a transformers folder" if folder_kind(path) == "transformers" else "a folder"
        raise VitkitError(
            f"{path} is not a timm Hub folder but {kind}: build the model with vitkit.create_model(NAME) and "
            "load it with vitkit.load_checkpoint(model, path)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if is_quantized_file(path):  # `vitkit quantize`: torch.ao int8 layers, CPU only
        if torch.device(device).type != "cpu":
            raise VitkitError(f"{path} is an int8 model, which runs on the CPU only: use --device cpu")
        return load_quantized(path, create_model)
    meta = read_metadata(path)
    name = meta.get("model", "")
    if is_torchvision(name):
        try:
            args = json.loads(meta.get("torchvision_args", "{}"))
        except json.JSONDecodeError as err:
            raise FileFormatError(
                f"{path}: its torchvision_args metadata is not JSON ({err}): the file is damaged"
            ) from None
        model = build_torchvision(name[len(TORCHVISION_PREFIX) :], **args)
    elif meta.get("format") == FORMAT_NAME and name:
        model = create_model(name, **config_fields(meta))  # a missing or damaged config: FileFormatError
    else:
        raise FileFormatError(
            f"{path} is not a vitkit checkpoint (no model name in its metadata): "
            "build the model with vitkit.create_model(NAME) and use vitkit.load_checkpoint(model, path)"
        )
    try:
        model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    except (RuntimeError, SafetensorError) as err:  # keys or shapes other than its own metadata's model
        detail = " ".join(str(err).split())[:300]
        raise FileFormatError(f"{path} does not hold the weights of the {name} it names ({detail})") from None
    return model.to(device)


def model_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata `load_model` reads: a weight file's, or a timm Hub folder's (its "inputs" entry included)."""
    path = Path(path)
    if path.is_dir() and folder_kind(path) == "timm":
        return read_timm_folder(path)[3]
    return read_metadata(path)
