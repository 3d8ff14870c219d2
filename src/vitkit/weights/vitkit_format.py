"""The vitkit checkpoint format: safetensors weights with the model's name and config in metadata.

`vitkit.factory.load_model` rebuilds a model from such a file; `vitkit.load_checkpoint` loads one into
a built model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from vitkit.core.errors import FileFormatError
from vitkit.core.files import atomic_path

FORMAT_NAME = "vitkit"
FORMAT_VERSION = "1"


def save_model(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write `model`'s weights and config to a .safetensors file atomically.

    `metadata` adds string entries (e.g. which weights a "best" file holds).
    """
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    name = getattr(model, "variant_name", None)
    config = getattr(model, "config", None)
    if name is not None and dataclasses.is_dataclass(config):
        meta["model"] = name
        meta["config"] = json.dumps(dataclasses.asdict(config))
    meta.update(metadata or {})
    # safetensors refuses shared or non-contiguous storage: save independent contiguous copies
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a .safetensors file (empty when it has none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise FileFormatError(f"cannot read {path}: not a valid safetensors file ({err})") from None


def config_fields(metadata: dict[str, str]) -> dict[str, Any]:
    """The config stored by `save_model`, with JSON lists turned back into tuples."""
    try:
        fields = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as err:
        raise FileFormatError(
            f"the checkpoint's model config is missing or not JSON ({err!r}): "
            "was it written by vitkit? rebuild the model and use vitkit.load_checkpoint"
        ) from None
    if not isinstance(fields, dict):
        raise FileFormatError("the checkpoint's model config is not a JSON object: was it written by vitkit?")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def recorded_inputs(metadata: dict[str, str]) -> dict[str, Any] | None:
    """How to feed the model, as training recorded it (`inputs`: img_size, in_chans, mean, std,
    crop_pct, interpolation, classes), or None when the file has no such record."""
    return json.loads(metadata["inputs"]) if "inputs" in metadata else None
