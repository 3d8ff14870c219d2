"""Checkpoints: the vitkit format, converters from other libraries, pretrained records."""

from vitkit.weights.io import load_model, read_metadata, save_model

__all__ = ["load_model", "read_metadata", "save_model"]
