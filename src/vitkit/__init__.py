"""vitkit: supervised Vision Transformer backbones (ViT, DeiT, DeiT III, Swin, Swin V2).

The public names load on first use (PEP 562), so `import vitkit` stays fast and imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vitkit.core.lazy import lazy_attributes
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
_SUBMODULES = (
    "core",
    "layers",
    "registry",
    "models",
    "weights",
    "factory",
    "data",
    "train",
    "pretrain",
    "tools",
    "cli",
)

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


__getattr__, __dir__ = lazy_attributes(__name__, _HOMES, _SUBMODULES)
