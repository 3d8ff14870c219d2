"""Where `vitkit train --finetune SOURCE` starts from, and loading it into the new model.

SOURCE is a `vitkit pretrain` run (its `encoder.safetensors`), a `vitkit train` run (its
`best.safetensors`, else `last.safetensors`), or a checkpoint file of any format that
`vitkit.weights.load_checkpoint` reads (vitkit, timm, DeiT, Swin, HuggingFace, ...).
Files written by vitkit name their model and config, so the fine-tuning run rebuilds that
architecture unless told otherwise; other files need `--model`. A new `--img-size` resamples
the position embeddings (ViT, DeiT, DeiT III) and the relative-position tables (Swin, Swin V2);
a new number of classes re-initialises the classifier.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from torch import nn

from vitkit.factory import get_variant
from vitkit.weights.checkpoint import load_checkpoint
from vitkit.weights.vitkit_format import config_fields, read_metadata

ENCODER_FILE = "encoder.safetensors"  # written by vitkit pretrain
RUN_WEIGHTS = ("best.safetensors", "last.safetensors")  # written by vitkit train
_DATA_FIELDS = ("img_size", "in_chans", "num_classes")  # set by the fine-tuning data, not model_args


def finetune_file(source: str | os.PathLike) -> Path:
    """The weight file behind SOURCE: a run folder's encoder or best weights, or SOURCE itself."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in (ENCODER_FILE, *RUN_WEIGHTS):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"{path} holds none of {ENCODER_FILE}, {', '.join(RUN_WEIGHTS)}: --finetune takes a `vitkit pretrain` "
            "or `vitkit train` run folder, or a checkpoint file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --finetune takes a run folder or a checkpoint file")
    return path


def is_encoder(path: Path) -> bool:
    """True for a SimMIM encoder file (`vitkit pretrain`): the encoder alone, no classifier."""
    return path.name == ENCODER_FILE or "pretrained_with" in _metadata(path)


def _metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    return read_metadata(path)


def finetune_fields(source: str | os.PathLike) -> dict[str, Any]:
    """Config fields describing the source's model: model, model_args (architecture fields that
    differ from the variant's defaults), img_size and in_chans. Empty for a file without vitkit
    metadata (a timm or official checkpoint): the command line must name the model then."""
    meta = _metadata(finetune_file(source))
    if "model" not in meta or "config" not in meta:
        return {}
    name, fields = meta["model"], config_fields(meta)
    if name.startswith("torchvision:"):
        raise ValueError(f"{source} holds a torchvision model ({name}): --finetune starts vitkit models only")
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


def load_finetune_weights(model: nn.Module, source: str | os.PathLike) -> str:
    """Load SOURCE into `model`; returns one line saying what was loaded, resampled and re-initialised.

    A `vitkit pretrain` encoder has no classifier: `load_checkpoint` loads it into the headed model
    and reports the head as re-initialised (new).
    """
    path = finetune_file(source)
    report = load_checkpoint(model, path)
    what = f"the pre-trained encoder {path}" if is_encoder(path) else str(path)
    parts = [f"fine-tuning from {what} ({report.format}, {report.loaded} tensors)"]
    if report.resampled:
        parts.append("resampled " + ", ".join(f"{k} {v}" for k, v in report.resampled.items()))
    if report.adapted:
        parts.append("adapted " + ", ".join(report.adapted))
    reasons: dict[str, list[str]] = {}
    for key, why in report.reinitialised.items():
        reasons.setdefault(why, []).append(key)
    parts += [f"re-initialised {', '.join(keys)} ({why})" for why, keys in reasons.items()]
    return "; ".join(parts)
