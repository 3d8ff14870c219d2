"""timm's Hub folders (config.json + model.safetensors): the config timm writes and reads, and reading one back.

A timm folder's config.json is nested: `architecture`, `num_classes`, `num_features`, `model_args`
(constructor keywords), `pretrained_cfg` (input size, mean, std, crop) and `label_names`. A transformers
folder's config.json instead has `model_type` / `architectures`; `folder_kind` tells them apart.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal

from torch import nn

from vitkit.core.errors import VitkitError
from vitkit.registry import get_variant
from vitkit.weights.vitkit_format import read_metadata

CONFIG, WEIGHTS = "config.json", "model.safetensors"
# vitkit config fields timm's constructors have no keyword for: a folder that changes them is not timm's
NOT_IN_TIMM = ("distilled", "representation_size", "pos_embed", "norm_eps")


def folder_kind(path: str | os.PathLike) -> Literal["timm", "transformers"] | None:
    """Which library's Hub folder `path` is, by the keys of its config.json (None: neither, or no folder)."""
    file = Path(path) / CONFIG
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise VitkitError(f"{file} is not valid JSON ({err}): re-export the folder") from None
    if not isinstance(config, dict):
        return None
    if "architecture" in config and ("pretrained_cfg" in config or "num_features" in config):
        return "timm"
    if "model_type" in config or "architectures" in config:
        return "transformers"
    return None


def model_args(model: nn.Module) -> dict[str, Any]:
    """The constructor keywords (timm's names) where `model`'s config differs from its variant's defaults."""
    name = getattr(model, "variant_name", None)
    config = getattr(model, "config", None)
    if name is None or not dataclasses.is_dataclass(config):
        raise VitkitError(
            f"{type(model).__name__} is not a vitkit model: timm Hub folders hold vitkit / timm architectures only"
        )
    default = dataclasses.asdict(get_variant(name).config)
    changed = {k: v for k, v in dataclasses.asdict(config).items() if v != default[k]}
    foreign = [k for k in changed if k in NOT_IN_TIMM]
    if foreign:
        raise VitkitError(
            f"{name} with changed {', '.join(foreign)} has no timm equivalent: "
            "share it as a vitkit checkpoint (best.safetensors) instead"
        )
    # JSON has no tuples; timm's constructors take lists where they take tuples
    return json.loads(json.dumps(changed))


def timm_config(
    model: nn.Module,
    *,
    input_size: tuple[int, int, int],
    mean: list[float],
    std: list[float],
    crop_pct: float,
    interpolation: str,
    label_names: list[str],
) -> dict[str, Any]:
    """config.json for `model` in timm's nested Hub form; `input_size` is (C, H, W)."""
    config = model.config
    classifier = ["head", "head_dist"] if getattr(config, "distilled", False) else "head"
    features = getattr(model, "num_features", None) or _num_features(config)
    return {
        "architecture": model.variant_name,
        "num_classes": config.num_classes,
        "num_features": int(features),
        "global_pool": getattr(config, "global_pool", "avg"),
        "model_args": model_args(model),
        "pretrained_cfg": {
            "input_size": list(input_size),
            "fixed_input_size": not getattr(config, "dynamic_img_size", False),
            "interpolation": interpolation,
            "crop_pct": crop_pct,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": config.num_classes,
            "first_conv": "patch_embed.proj",
            "classifier": classifier,
        },
        "label_names": list(label_names),
    }


def _num_features(config: Any) -> int:
    if hasattr(config, "depths"):  # Swin: stage i has embed_dim * 2**i channels
        return config.embed_dim * 2 ** (len(config.depths) - 1)
    return config.embed_dim


def _input_metadata(config: dict[str, Any]) -> dict[str, str]:
    """The "inputs" entry `vitkit.train.modeling.save_weights` writes, from a timm pretrained_cfg."""
    cfg = config.get("pretrained_cfg", {})
    chans, height, _ = cfg.get("input_size", [3, 224, 224])
    classes = config.get("label_names") or [str(i) for i in range(config.get("num_classes", 0))]
    inputs = {
        "img_size": int(height),
        "in_chans": int(chans),
        "mean": cfg.get("mean", [0.5] * chans),
        "std": cfg.get("std", [0.5] * chans),
        "crop_pct": cfg.get("crop_pct", 0.875),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "classes": classes,
    }
    return {"inputs": json.dumps(inputs)}


def read_timm_folder(path: str | os.PathLike) -> tuple[str, dict[str, Any], Path, dict[str, str]]:
    """(architecture, constructor keywords, weight file, metadata) of a timm Hub folder (ours or one
    timm wrote); `vitkit.load_model` builds and loads the model from them.

    The metadata holds vitkit's "inputs" entry (input spec and class names) from the weight file when
    vitkit wrote it, else from `pretrained_cfg` and `label_names`.
    """
    path = Path(path)
    if folder_kind(path) != "timm":
        raise VitkitError(f"{path} is not a timm Hub folder (config.json with architecture and pretrained_cfg)")
    config = json.loads((path / CONFIG).read_text())
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: a timm Hub folder keeps its weights in {WEIGHTS}")
    args = dict(config.get("model_args") or {})
    args.setdefault("num_classes", config.get("num_classes", config.get("pretrained_cfg", {}).get("num_classes")))
    chans = config.get("pretrained_cfg", {}).get("input_size", [None])[0]
    if chans is not None:
        args.setdefault("in_chans", chans)
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if v is not None}
    meta = read_metadata(weights)
    if "inputs" not in meta:
        meta.update(_input_metadata(config))
    return config["architecture"], args, weights, meta
