"""Checkpoints: the vitkit format, converters from other libraries, pretrained records."""

from vitkit.weights.checkpoint import LoadReport, load_checkpoint, read_state_dict, save_checkpoint
from vitkit.weights.pretrained import eval_transform, get_record, list_pretrained, load_pretrained
from vitkit.weights.vitkit_format import config_fields, read_metadata, save_model

__all__ = [
    "LoadReport",
    "eval_transform",
    "config_fields",
    "get_record",
    "list_pretrained",
    "load_checkpoint",
    "load_pretrained",
    "read_metadata",
    "read_state_dict",
    "save_checkpoint",
    "save_model",
]
