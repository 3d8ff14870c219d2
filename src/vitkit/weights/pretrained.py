"""Pretrained weights: look up a variant's record, download it into the cache, load it; and the
record's evaluation preprocessing.

The cache is `$VITKIT_CACHE` (default ~/.cache/vitkit); a file already there is used as is (after a
hash check when the record knows the hash), so offline machines can be served by copying files in.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

if TYPE_CHECKING:
    from torchvision.transforms import v2

import vitkit.models  # noqa: F401  (fills the variant table that get_variant reads)
from vitkit.core.files import atomic_path, cache_root
from vitkit.registry import get_variant
from vitkit.weights.checkpoint import LoadReport, load_checkpoint
from vitkit.weights.records import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, RECORDS, WeightRecord

log = logging.getLogger("vitkit")
_BY_MODEL = {r.model: r for r in RECORDS}
DOWNLOAD_TIMEOUT_S = 30


def list_pretrained() -> list[str]:
    """Variant names that have a default weight record, sorted."""
    return sorted(_BY_MODEL)


def get_record(name: str) -> WeightRecord:
    """The default weight record of variant `name` (timm's default weights for that name)."""
    get_variant(name)  # unknown names get the registry's error with suggestions
    if name not in _BY_MODEL:
        raise ValueError(
            f"no pretrained weights are recorded for {name}: `vitkit models --pretrained` lists the variants "
            "that have them; pass pretrained='path/to/checkpoint' for your own"
        )
    return _BY_MODEL[name]


def cache_dir() -> Path:
    return cache_root()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_hash(path: Path, record: WeightRecord, shown: Path) -> None:
    if record.sha256 and not _sha256(path).startswith(record.sha256):
        raise ValueError(
            f"{shown} does not have the sha256 of {record.name} (expected {record.sha256}...): it is corrupt "
            f"or another file; delete it and try again, or fetch {record.url} by hand"
        )


def _download(record: WeightRecord, dest: Path) -> None:
    with urllib.request.urlopen(record.url, timeout=DOWNLOAD_TIMEOUT_S) as response, atomic_path(dest) as tmp:
        total = int(response.headers.get("Content-Length") or 0) or None
        with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
                bar.update(len(chunk))
        _check_hash(tmp, record, shown=dest)  # a bad download never reaches the cache


def fetch(record: WeightRecord) -> Path:
    """The record's file in the cache, downloaded if absent; checked against the record's hash when known."""
    dest = cache_dir() / record.filename
    if dest.is_file():
        _check_hash(dest, record, shown=dest)
        return dest
    try:
        _download(record, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise RuntimeError(
            f"cannot download the {record.name} weights ({reason}): fetch {record.url} and save it as "
            f"{dest} ($VITKIT_CACHE sets the folder), or pass pretrained='path/to/file'"
        ) from None
    return dest


def load_pretrained(model: nn.Module, name: str, pretrained: bool | str | os.PathLike) -> LoadReport:
    """Load `name`'s default weights (`pretrained=True`) or a local file / HF directory into `model`.

    A model built with another class count or input size gets a new head / resampled position
    tables; everything else must fit (see `load_checkpoint`).
    """
    if pretrained is True:
        record = get_record(name)
        report = load_checkpoint(model, fetch(record), format=record.format)
        model.pretrained_record = record  # type: ignore[assignment]  # Module types attributes as Tensor | Module
    else:
        report = load_checkpoint(model, pretrained)
    log.info("%s", report)
    return report


_INTERPOLATION = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}


def eval_transform(model_or_name: nn.Module | str) -> v2.Compose:
    """The evaluation preprocessing of a variant's default weights, as a torchvision v2 transform.

    Resize the short side to floor(size / crop_pct) with the record's interpolation, centre-crop
    `size`, scale to [0, 1] floats, normalise with the record's mean / std: the tensor timm's
    `create_transform(**resolve_data_config({}, model=...))` gives. For a model, `size` is the model's
    own input size; variants without a record get timm's defaults for their family.
    """
    from torchvision.transforms import InterpolationMode, v2  # noqa: PLC0415  start-up cost: only when used

    if isinstance(model_or_name, str):
        name, size = model_or_name, tuple(get_variant(model_or_name).config.img_size)
    else:
        variant = getattr(model_or_name, "variant_name", None)
        config = getattr(model_or_name, "config", None)
        if variant is None or config is None:
            raise ValueError(f"{type(model_or_name).__name__} is not a vitkit model: pass a model name instead")
        name, size = variant, tuple(config.img_size)
    record = _BY_MODEL.get(name)
    if record is not None:
        crop, interpolation, mean, std = record.crop_pct, record.interpolation, record.mean, record.std
    else:
        google = name.startswith("vit_") and get_variant(name).family == "vit"
        crop, interpolation = 0.9, "bicubic"
        mean, std = (INCEPTION_MEAN, INCEPTION_STD) if google else (IMAGENET_MEAN, IMAGENET_STD)
    mode = getattr(InterpolationMode, _INTERPOLATION[interpolation])
    # square: the short side goes to size / crop_pct (aspect kept); otherwise the short side is scaled
    # to cover the larger of the two scaled sides, then the centre crop takes (H, W)
    scale = max(math.floor(s / crop) for s in size)
    return v2.Compose(
        [
            v2.Resize(scale, interpolation=mode),
            v2.CenterCrop(size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
