"""Checkpoints: the vitkit format, converters from other libraries, pretrained records."""

from vitkit.weights.checkpoint import LoadReport, load_checkpoint, read_state_dict, save_checkpoint
from vitkit.weights.io import load_model, read_metadata, save_model
from vitkit.weights.pretrained import eval_transform, get_record, list_pretrained, load_pretrained

__all__ = [
    "LoadReport",
    "eval_transform",
    "get_record",
    "list_pretrained",
    "load_checkpoint",
    "load_model",
    "load_pretrained",
    "read_metadata",
    "read_state_dict",
    "save_checkpoint",
    "save_model",
]
