"""vitkit: supervised Vision Transformer backbones (ViT, DeiT, DeiT III, Swin, Swin V2).

The public names load on first use (PEP 562), so `import vitkit` stays fast and imports no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vitkit.core.version import __version__

if TYPE_CHECKING:
    from vitkit.factory import create_model, list_models, load_model, model_info
    from vitkit.weights import LoadReport, eval_transform, load_checkpoint, save_checkpoint

_HOMES = {
    "create_model": "vitkit.factory",
    "list_models": "vitkit.factory",
    "load_model": "vitkit.factory",
    "model_info": "vitkit.factory",
    "LoadReport": "vitkit.weights",
    "eval_transform": "vitkit.weights",
    "load_checkpoint": "vitkit.weights",
    "save_checkpoint": "vitkit.weights",
}

# subpackages reachable as attributes (`vitkit.weights.read_metadata`) without importing them first
_SUBMODULES = ("core", "layers", "registry", "models", "weights", "factory", "data", "train", "pretrain", "tools",
               "cli")

__all__ = [
    "LoadReport",
    "create_model",
    "eval_transform",
    "list_models",
    "load_checkpoint",
    "load_model",
    "model_info",
    "save_checkpoint",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"vitkit.{name}")
    raise AttributeError(f"module 'vitkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES) | set(_SUBMODULES))
