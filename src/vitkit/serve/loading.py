"""The one place `vitkit serve` loads a model: a run folder or a checkpoint file, with what the
service reports about it.

Built on today's loaders (`load_inference`); at merge this is the only function to switch to
`vitkit.load_model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.data.transforms import ImageSpec
from vitkit.tools.attention_maps import default_method, is_swin
from vitkit.tools.inference import load_inference


@dataclass
class ServedModel:
    """A model ready to serve: how to feed it, its class names, and what `GET /v1/model` reports."""

    model: nn.Module
    spec: ImageSpec
    classes: list[str] | None
    name: str  # the registered variant, or torchvision:NAME
    source: str  # the file the weights came from
    test_top1: float | None  # the run's logged test top-1 (percent), when served from a run
    attention: str | None  # the `vitkit attention` method for this model, None when it has none
    tta: str = "none"  # the run's test-time augmentation, so answers equal `vitkit predict`'s


def load_served_model(
    *, run: str | Path | None = None, checkpoint: str | Path | None = None, device: torch.device | str = "cpu"
) -> ServedModel:
    """Load exactly one of a run folder (its best weights) or a checkpoint file, in eval mode."""
    if (run is None) == (checkpoint is None):
        raise ValueError("give exactly one of --run DIR or --checkpoint FILE")
    if run is not None and not Path(run).is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist: pass a folder written by `vitkit train`")
    inference = load_inference(run=run, checkpoint=checkpoint, device=device)
    model = inference.model.eval()
    config = getattr(model, "config", None)
    name = getattr(model, "variant_name", None) or getattr(config, "name", None) or type(model).__name__
    return ServedModel(
        model,
        inference.spec,
        inference.classes,
        str(name),
        inference.source,
        _test_top1(Path(run)) if run is not None else None,
        attention_method(model),
        inference.settings.tta,
    )


def attention_method(model: nn.Module) -> str | None:
    """The map `vitkit attention` draws for this model by default, or None (torchvision, int8, ...)."""
    if is_swin(model) or hasattr(model, "attention_modules"):
        return default_method(model)
    return None


def _test_top1(run: Path) -> float | None:
    """The last test top-1 a run logged in metrics.jsonl (None for runs without a test split)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        record: dict[str, Any] = json.loads(line) if line.strip() else {}
        if "test_top1" in record:
            found = float(record["test_top1"])
    return found
