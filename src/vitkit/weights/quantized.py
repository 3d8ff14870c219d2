"""The int8 file format: a model whose Linear layers hold int8 weights, for CPU inference.

A safetensors file, so loading executes nothing. For every quantised Linear `NAME` it holds
`NAME.weight_int8` (int8, (out, in)), `NAME.weight_scale` (float64, (out,) per channel or (1,) per tensor),
`NAME.weight_zero_point` (int64, same shape) and `NAME.bias` when the layer has one; every other tensor is
the float state-dict entry. The metadata names the format, the variant and its config (as `save_model`
writes them), the quantised layers, and carries the `inputs` record of the weights it came from, so
eval and predict need nothing else. Loading rebuilds the float model and swaps in torch.ao dynamic
int8 Linear layers holding exactly the stored integers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from vitkit.core.errors import VitkitError
from vitkit.core.files import atomic_path
from vitkit.core.hardware import resolve_amp
from vitkit.layers.attention import set_attention_dtype
from vitkit.weights.vitkit_format import config_fields

FORMAT_NAME = "vitkit-int8"
FORMAT_VERSION = "1"
_SUFFIXES = ("weight_int8", "weight_scale", "weight_zero_point")
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


@contextmanager
def quantized_tensor_warnings_off() -> Iterator[None]:
    """Silence torch's notice that quantised tensors are deprecated (torch.ao still ships and runs them;
    docs/PERFORMANCE.md says what replaces them): users of `vitkit quantize` cannot act on it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        yield


def int8_attention_dtype() -> torch.dtype | None:
    """The dtype int8 models compute attention in: what `amp: auto` picks on the CPU, bf16 where it has
    bf16 units (AVX512_BF16 or AMX; there it took ~0.5x fp32's time), None (fp32) elsewhere."""
    return resolve_amp("auto", "cpu")[0]


def use_int8_attention_dtype(model: nn.Module) -> nn.Module:
    """Set the attention layers of `model` to `int8_attention_dtype()` (`layers.attention.set_attention_dtype`)."""
    set_attention_dtype(model, int8_attention_dtype())
    return model


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The torch.ao dynamic int8 Linear layers of `model`, by module name."""
    return {name: m for name, m in model.named_modules() if type(m) is DynamicQuantizedLinear}


def _weight_tensors(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    weight, bias = module._weight_bias()  # (quantised weight (out, in), float bias or None)
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        if weight.q_per_channel_axis() != 0:
            raise ValueError(f"{name}: per-channel int8 weights must be quantised along the output axis")
        scale = weight.q_per_channel_scales().double()
        zero_point = weight.q_per_channel_zero_points().long()
    else:
        scale = torch.tensor([weight.q_scale()], dtype=torch.float64)
        zero_point = torch.tensor([weight.q_zero_point()], dtype=torch.int64)
    out = {
        f"{name}.weight_int8": weight.int_repr().contiguous(),
        f"{name}.weight_scale": scale,
        f"{name}.weight_zero_point": zero_point,
    }
    if bias is not None:
        out[f"{name}.bias"] = bias.detach().float().contiguous()
    return out


def save_quantized(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a dynamically quantised vitkit model (see `vitkit.tools.quantize`) atomically.

    `metadata` adds string entries (e.g. the `inputs` record and the accuracy figures of the gate).
    """
    name = getattr(model, "variant_name", None)
    config = getattr(model, "config", None)
    if name is None or not dataclasses.is_dataclass(config):
        raise ValueError("only vitkit models (built by vitkit.create_model) can be saved in the int8 format")
    linears = quantized_linears(model)
    if not linears:
        raise ValueError("the model has no int8 Linear layers: quantise it first (vitkit.tools.quantize)")
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if not any(key.startswith(f"{q}.") for q in linears) and isinstance(value, torch.Tensor):
            state[key] = value.detach().contiguous().clone()
    for q, module in linears.items():
        state.update(_weight_tensors(q, module))
    meta = {
        **(metadata or {}),
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": name,
        "config": json.dumps(dataclasses.asdict(config)),
        "quantized": json.dumps(sorted(linears)),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def _header_metadata(path: Path) -> dict[str, str] | None:
    """The `__metadata__` of a safetensors header, read as JSON without torch; None when not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (size,) = struct.unpack("<Q", head)
            if size > _MAX_HEADER:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def is_quantized_file(path: str | os.PathLike) -> bool:
    """True when `path` is a vitkit int8 file (reads only the header; never raises for a bad file)."""
    path = Path(path)
    if not path.is_file():
        return False
    meta = _header_metadata(path)
    return meta is not None and meta.get("format") == FORMAT_NAME


def read_quantized_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a vitkit int8 file; a one-line VitkitError when `path` is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"int8 model {path} does not exist")
    meta = _header_metadata(path)
    if meta is None:
        raise VitkitError(f"cannot read {path}: not a valid safetensors file; write it with `vitkit quantize`")
    if meta.get("format") != FORMAT_NAME:
        raise VitkitError(
            f"{path} is not a vitkit int8 model (format {meta.get('format')!r}): make one with `vitkit quantize`"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise VitkitError(
            f"{path} is int8 format version {meta.get('format_version')!r}; this vitkit reads "
            f"version {FORMAT_VERSION}: quantise the model again with this version"
        )
    return {k: str(v) for k, v in meta.items()}


def _json(meta: dict[str, str], key: str, path: Path) -> object:
    try:
        return json.loads(meta[key])
    except (KeyError, ValueError):
        raise VitkitError(f"{path}: its metadata lacks a readable {key!r} entry; quantise the model again") from None


def _qweight(name: str, tensors: dict[str, torch.Tensor], linear: nn.Linear, path: Path) -> torch.Tensor:
    """The quantised weight of layer `name`, checked against the float layer it replaces."""
    try:
        ints, scale, zero = (tensors.pop(f"{name}.{s}") for s in _SUFFIXES)
    except KeyError:
        raise VitkitError(f"{path}: layer {name} lacks its int8 weight, scale or zero point") from None
    channels = linear.out_features
    if ints.dtype != torch.int8 or tuple(ints.shape) != (channels, linear.in_features):
        raise VitkitError(
            f"{path}: {name}.weight_int8 is {ints.dtype} {tuple(ints.shape)}, expected int8 "
            f"{(channels, linear.in_features)}"
        )
    if (
        scale.dtype != torch.float64
        or zero.dtype != torch.int64
        or scale.shape != zero.shape
        or tuple(scale.shape) not in ((channels,), (1,))
    ):
        raise VitkitError(
            f"{path}: {name} has scales {scale.dtype} {tuple(scale.shape)} and zero points "
            f"{zero.dtype} {tuple(zero.shape)}; expected float64 and int64 of ({channels},) or (1,)"
        )
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()) or bool(((zero < -128) | (zero > 127)).any()):
        raise VitkitError(f"{path}: {name} has a non-positive or non-finite scale, or a zero point outside int8")
    if scale.numel() == 1:
        return torch._make_per_tensor_quantized_tensor(ints, float(scale[0]), int(zero[0]))
    return torch._make_per_channel_quantized_tensor(ints, scale, zero, 0)


def _bias(name: str, tensors: dict[str, torch.Tensor], linear: nn.Linear, path: Path) -> torch.Tensor | None:
    bias = tensors.pop(f"{name}.bias", None)
    if (bias is None) != (linear.bias is None):
        raise VitkitError(
            f"{path}: layer {name} {'lacks' if bias is None else 'has'} a bias the model "
            f"{'has' if bias is None else 'lacks'}"
        )
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (linear.out_features,)):
        raise VitkitError(
            f"{path}: {name}.bias is {bias.dtype} {tuple(bias.shape)}, expected float ({linear.out_features},)"
        )
    return None if bias is None else bias.float()


def _linear(model: nn.Module, name: str, path: Path) -> nn.Linear:
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        linear = None
    if type(linear) is not nn.Linear:
        raise VitkitError(f"{path}: {name!r} is not a Linear layer of {model.variant_name}; quantise the model again")
    return linear


def _swap_in_int8(model: nn.Module, names: list[str], tensors: dict[str, torch.Tensor], path: Path) -> None:
    kind = DynamicQuantizedLinear
    with quantized_tensor_warnings_off():  # the quantised tensors made here
        for name in names:
            linear = _linear(model, name, path)
            qweight = _qweight(name, tensors, linear, path)
            layer = kind(linear.in_features, linear.out_features, bias_=linear.bias is not None, dtype=torch.qint8)
            layer.set_weight_bias(qweight, _bias(name, tensors, linear, path))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)


def _under(key: str, names: list[str]) -> bool:
    return any(key.startswith(f"{n}.") for n in names)


def load_quantized(path: str | os.PathLike, build: Callable[..., nn.Module]) -> nn.Module:
    """Rebuild the int8 model in `path` (written by `vitkit quantize`) for CPU inference, in eval mode;
    `build(name, **config)` makes the fp32 skeleton (`vitkit.create_model`: `vitkit.load_model` passes it).

    Loading executes nothing from the file; a file that is not a valid vitkit int8 model gives a
    one-line VitkitError. The model carries `variant_name`, `config` and `int8_metadata` (the file's).
    """
    path = Path(path)
    meta = read_quantized_metadata(path)
    names = _json(meta, "quantized", path)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise VitkitError(f"{path}: its 'quantized' entry is not a list of layer names; quantise the model again")
    if not isinstance(_json(meta, "config", path), dict):
        raise VitkitError(f"{path}: its 'config' entry is not a JSON object; quantise the model again")
    try:
        model = build(meta.get("model", ""), **config_fields(meta))
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, TypeError) as err:
        raise VitkitError(f"cannot load {path}: {str(err).splitlines()[0]}") from None
    for name in names:
        _linear(model, name, path)
    expected = {k for k in model.state_dict() if not _under(k, names)}
    int8_tensors = {k: tensors.pop(k) for k in list(tensors) if _under(k, names)}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise VitkitError(
            f"{path}: its tensors do not match {meta['model']} ({len(odd)} differ, e.g. "
            f"{', '.join(odd[:3])}); quantise the model again"
        )
    try:  # the float part first: an int8 layer cannot load a state without its packed weights
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:
        raise VitkitError(
            f"{path}: a tensor has the wrong shape for {meta['model']} ({str(err).splitlines()[-1].strip()})"
        ) from None
    _swap_in_int8(model, names, int8_tensors, path)
    if int8_tensors:
        raise VitkitError(f"{path}: unexpected tensors {', '.join(sorted(int8_tensors)[:3])}; quantise the model again")
    model.int8_metadata = meta  # type: ignore[assignment]  # Module types attributes as Tensor | Module
    return use_int8_attention_dtype(model).eval()
