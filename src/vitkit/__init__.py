"""vitkit: supervised Vision Transformer backbones (ViT, DeiT, DeiT III, Swin, Swin V2)."""

from vitkit.registry import create_model, list_models, model_info

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "model_info", "__version__"]
