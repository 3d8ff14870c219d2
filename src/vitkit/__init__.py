"""vitkit: supervised Vision Transformer backbones (ViT, DeiT, DeiT III, Swin, Swin V2)."""

from vitkit.registry import create_model, list_models, model_info
from vitkit.weights import LoadReport, eval_transform, load_checkpoint, save_checkpoint

from vitkit.core.version import __version__

__all__ = [
    "LoadReport",
    "create_model",
    "eval_transform",
    "list_models",
    "load_checkpoint",
    "model_info",
    "save_checkpoint",
    "__version__",
]
