"""int8 models for CPU inference, written only when they keep the fp32 model's accuracy.

The Linear layers (attention, MLP, patch merging, head: nearly all the MACs) become torch.ao dynamic
int8 layers: int8 weights with a scale per output channel, activations quantised per batch at run
time. The gate measures top-1 of the fp32 and the int8 model on the run's validation split, rebuilt
exactly as `vitkit eval --run DIR --split val` does, and refuses to write a model that drops more
than `max_drop` points.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

from vitkit.core.errors import VitkitError
from vitkit.tools.inference import Inference, evaluate_split, load_inference
from vitkit.weights.quantized import quantized_tensor_warnings_off, save_quantized, use_int8_attention_dtype
from vitkit.weights.vitkit_format import read_metadata

Scheme = Literal["per-channel", "per-tensor"]
SCHEMES: tuple[str, ...] = ("per-channel", "per-tensor")


def int8_layer_names(model: nn.Module) -> list[str]:
    """The Linear layers to quantise: all of them except those whose weight the model reads directly.

    Swin V2's attention feeds `qkv.weight` to F.linear with its separate q/v biases, and its
    continuous position-bias MLP (`cpb_mlp`) makes the bias table from coordinates, where int8 buys
    nothing and costs accuracy; both stay fp32.
    """
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or ".cpb_mlp." in f".{name}.":
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if child == "qkv" and hasattr(parent, "q_bias"):
            continue
        names.append(name)
    return names


def quantize_model(model: nn.Module, scheme: Scheme = "per-channel") -> nn.Module:
    """A copy of `model` in eval mode with its Linear layers (see `int8_layer_names`) as dynamic int8."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")
    qconfig = per_channel_dynamic_qconfig if scheme == "per-channel" else default_dynamic_qconfig
    source = copy.deepcopy(model).float().cpu().eval()
    names = int8_layer_names(source)
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear layer to quantise")
    with quantized_tensor_warnings_off():
        int8 = quantize_dynamic(source, {name: qconfig for name in names}, dtype=torch.qint8, inplace=True)
    return use_int8_attention_dtype(int8)


@dataclass
class GateResult:
    """The figures of one `quantize` call (percent top-1; drop in points)."""

    fp32_top1: float
    int8_top1: float
    samples: int
    split: str
    max_drop: float
    written: Path | None
    test: dict[str, float] | None = None  # fp32_top1, int8_top1 on the test split when asked

    @property
    def drop(self) -> float:
        return self.fp32_top1 - self.int8_top1


def _fp32(inference: Inference, model: nn.Module) -> Inference:
    # the gate compares plain fp32 with int8: no autocast on either side
    settings = dataclasses.replace(inference.settings, amp="off")
    return dataclasses.replace(inference, model=model, settings=settings)


def _top1(inference: Inference, split: str, **options: Any) -> tuple[float, int]:
    result = evaluate_split(inference, split=split, device="cpu", **options)
    return float(result["top1"]), int(result["samples"])


def default_output(run: str | Path | None, checkpoint: str | Path | None) -> Path:
    """Where `quantize` writes by default: RUN/int8.safetensors, or NAME.int8.safetensors beside FILE."""
    if run is not None:
        return Path(run) / "int8.safetensors"
    path = Path(checkpoint)
    return path.with_name(f"{path.name.removesuffix('.safetensors')}.int8.safetensors")


def quantize(
    *,
    run: str | Path | None = None,
    checkpoint: str | Path | None = None,
    data: str | None = None,
    out: str | os.PathLike | None = None,
    max_drop: float = 0.5,
    scheme: Scheme = "per-channel",
    val_samples: int | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    test: bool = False,
) -> GateResult:
    """Quantise a run's best weights (or a checkpoint, with `data`) to int8 behind the accuracy gate.

    Raises VitkitError, naming both top-1 figures, when int8 loses more than `max_drop` points of
    val top-1; nothing is written then. With `test`, also measures both models on the test split.
    """
    if (run is None) == (checkpoint is None):
        raise ValueError("give exactly one of --run DIR or --checkpoint FILE")
    if checkpoint is not None and data is None:
        raise ValueError("--checkpoint needs --data (fashion-mnist or an image folder) for the accuracy gate")
    inference = load_inference(run=run, checkpoint=checkpoint, device="cpu")
    fp32 = inference.model.float().eval()
    if not dataclasses.is_dataclass(getattr(fp32, "config", None)) or not hasattr(fp32, "variant_name"):
        raise ValueError(
            f"{inference.source} holds a {getattr(fp32, 'variant_name', type(fp32).__name__)} model: "
            "only vitkit models can be quantised"
        )
    int8 = quantize_model(fp32, scheme)
    options = {"data": data, "batch_size": batch_size, "workers": workers}
    fp32_top1, samples = _top1(_fp32(inference, fp32), "val", samples=val_samples, **options)
    int8_top1, _ = _top1(_fp32(inference, int8), "val", samples=val_samples, **options)
    result = GateResult(fp32_top1, int8_top1, samples, "val", max_drop, None)
    if result.drop > max_drop:
        raise VitkitError(
            f"int8 top-1 {int8_top1:.2f}% is {result.drop:.2f} points below fp32 {fp32_top1:.2f}% on the val split "
            f"({samples} images), more than --max-drop {max_drop:g}: nothing written (keep the fp32 model, "
            "or accept the loss with a larger --max-drop)"
        )
    if test:
        result.test = {
            "fp32_top1": _top1(_fp32(inference, fp32), "test", **options)[0],
            "int8_top1": _top1(_fp32(inference, int8), "test", **options)[0],
        }
    source_meta = read_metadata(inference.source)
    gate = {
        "split": "val",
        "samples": samples,
        "fp32_top1": fp32_top1,
        "int8_top1": int8_top1,
        "max_drop": max_drop,
        **({"test": result.test} if result.test else {}),
    }
    meta = {"scheme": scheme, "source": str(inference.source), "gate": json.dumps(gate)}
    if "inputs" in source_meta:
        meta["inputs"] = source_meta["inputs"]
    result.written = Path(out) if out is not None else default_output(run, checkpoint)
    save_quantized(int8, result.written, metadata=meta)
    return result
