"""Supervised fine-tuning from a pre-trained encoder (`vitkit train --finetune RUN`).

The pre-training run's `encoder.safetensors` names the model and holds its config, so the
fine-tuning run takes the model, its overrides, the input size and channels from it unless told
otherwise; only the classifier head starts fresh.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from torch import nn

from vitkit.pretrain.simmim import load_encoder

ENCODER_FILE = "encoder.safetensors"
_DATA_FIELDS = ("img_size", "in_chans", "num_classes")  # set by the fine-tuning data, not model_args


def encoder_file(source: str | os.PathLike) -> Path:
    """The encoder of a pre-training run folder, or `source` itself when it is a file."""
    path = Path(source)
    if path.is_dir():
        path = path / ENCODER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: --finetune takes a `vitkit pretrain` run folder or its {ENCODER_FILE}"
        )
    return path


def finetune_fields(source: str | os.PathLike) -> dict[str, Any]:
    """Training-config fields describing the pre-trained encoder: model, model_args (the
    architecture fields that differ from the variant's defaults), img_size and in_chans."""
    from vitkit.registry import get_variant
    from vitkit.weights.io import config_fields, read_metadata

    path = encoder_file(source)
    meta = read_metadata(path)
    if "model" not in meta or "config" not in meta:
        raise ValueError(f"{path} has no model name and config in its metadata: it was not written by vitkit pretrain")
    name, fields = meta["model"], config_fields(meta)
    defaults = dataclasses.asdict(get_variant(name).config)
    model_args = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in fields.items()
        # regularisation (dropout, stochastic depth) is the fine-tuning recipe's choice
        if k not in _DATA_FIELDS and "drop" not in k and _plain(v) != _plain(defaults.get(k))
    }
    return {"model": name, "model_args": model_args, "img_size": fields["img_size"][0], "in_chans": fields["in_chans"]}


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal after a JSON round trip."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def load_pretrained_encoder(model: nn.Module, source: str | os.PathLike) -> list[str]:
    """Load the encoder of `source` into `model`; returns the head keys left freshly initialised."""
    return load_encoder(model, encoder_file(source))
