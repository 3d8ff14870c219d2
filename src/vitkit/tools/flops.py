"""Parameters and multiply-accumulates (MACs) per image, counted by `FlopCounterMode`.

Convention: one MAC is one multiply plus one add, i.e. 2 FLOPs; `FlopCounterMode` counts the FLOPs
of matrix products (linear layers, matmul, bmm), convolutions and attention kernels, and
MACs = FLOPs / 2. Element-wise ops, normalisation, softmax and activations are not counted: the
convention of the published figures (DeiT-S 4.6 G, Swin-T 4.5 G). Counting runs on the `meta`
device by default: exact shapes, no arithmetic, no memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitkit.factory import create_model
from vitkit.layers import kernels
from vitkit.registry import count_parameters, to_2tuple

aten = torch.ops.aten


# -- the CPU attention kernel that FlopCounterMode does not know -------------------------------------
Shape = tuple[int, ...]  # FlopCounterMode passes the shapes of an op's tensors


def _cpu_attention_flops(
    query: Shape, key: Shape, value: Shape, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    # (B, h, Nq, d) @ (B, h, d, Nk) -> scores, then (B, h, Nq, Nk) @ (B, h, Nk, dv)
    b, h, nq, d = query
    nk, dv = key[-2], value[-1]
    return 2 * b * h * nq * nk * (d + dv)


def _cpu_attention_backward_flops(
    grad_out: Shape, query: Shape, key: Shape, value: Shape, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    # recompute the scores (d), then grads of scores (dv), V (dv), Q (d) and K (d): torch's count
    # for the CUDA kernels' backward
    b, h, nq, d = query
    nk, dv = key[-2], value[-1]
    return 2 * b * h * nq * nk * (3 * d + 2 * dv)


def _window_kernel_flops(query: Shape, key: Shape, value: Shape, bias: Shape, *args: Any, **kwargs: Any) -> int:
    # vitkit.layers.kernels.window_attention: q holds every window's N tokens per head (in the window
    # or the map layout), each scored against its window's N keys (bias (G, heads, N, N)) and their values
    return 4 * math.prod(query) * bias[-1]


EXTRA_FORMULAS: dict[Any, Any] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """A silent `FlopCounterMode` that also counts the CPU attention kernel (forward and backward) and
    vitkit's window attention kernel (`vitkit.layers.kernels`, where built)."""
    mapping = dict(EXTRA_FORMULAS)
    if kernels.available():  # the op exists only once its library is loaded
        mapping[torch.ops.vitkit.window_attention] = _window_kernel_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


# -- counting ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MacsReport:
    model: str
    img_size: tuple[int, int]
    params: int
    macs: int  # per image
    # module path -> MACs per image; a partition of `macs` (see `count_macs`)
    breakdown: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "img_size": list(self.img_size),
            "params": self.params,
            "macs": self.macs,
            "breakdown": dict(self.breakdown),
        }


def count_macs(model: nn.Module, x: torch.Tensor, levels: int = 2) -> tuple[int, dict[str, int]]:
    """MACs of one forward pass of `model` on `x` (the whole batch), in total and per module.

    The breakdown partitions the total: modules `levels` below the model (dotted path `blocks.0`
    is level 2), shallower modules with no counted children, and `PATH (self)` for products a
    module computes itself beside its children (e.g. `blocks.0.attn (self)`: the attention
    products inside `scaled_dot_product_attention`). Works on any device.
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1 (module levels in the breakdown), got {levels}")
    with torch.no_grad(), flop_counter() as counter:
        model(x)
    counts = counter.get_flop_counts()
    total = sum(counts.get("Global", {}).values()) // 2
    return total, _partition(counts, total, levels)


def _partition(counts: dict[str, dict[Any, int]], total: int, levels: int) -> dict[str, int]:
    # keys are "<RootClass>.path.to.module" (and "Global"): drop the root's name
    macs: dict[str, int] = {}
    for key, ops in counts.items():
        if key != "Global" and "." in key:
            macs[key.split(".", 1)[1]] = sum(ops.values()) // 2
    # containers that are iterated, never called (`for block in self.blocks`), have no entry: add
    # every ancestor path so the tree is complete, in the order of the forward pass
    order: dict[str, int] = {}
    for key in macs:
        parts = key.split(".")
        for i in range(1, len(parts) + 1):
            order.setdefault(".".join(parts[:i]), len(order))
    paths = set(order)

    def children(path: str) -> list[str]:
        level = path.count(".") + 1 if path else 0
        prefix = f"{path}." if path else ""
        return sorted((k for k in paths if k.startswith(prefix) and k.count(".") == level), key=order.get)

    def value(path: str) -> int:
        return macs[path] if path in macs else sum(value(k) for k in children(path))

    out: dict[str, int] = {}

    def visit(path: str, own: int) -> None:
        kids = children(path)
        level = path.count(".") + 1 if path else 0
        if path and (level >= levels or not kids):
            if own:
                out[path] = own
            return
        rest = own
        for kid in kids:
            kid_value = value(kid)
            visit(kid, kid_value)
            rest -= kid_value
        if rest:
            out[f"{path} (self)" if path else "(self)"] = rest

    visit("", total)
    return out


def _image_input(model: nn.Module, img_size: tuple[int, int], device: str | torch.device) -> torch.Tensor:
    config = getattr(model, "config", None)
    in_chans = getattr(config, "in_chans", 3)
    return torch.empty(1, in_chans, *img_size, device=device)


def macs_report(
    name: str, img_size: int | tuple[int, int] | None = None, levels: int = 2, **overrides: Any
) -> MacsReport:
    """Parameters and MACs per image of a registered model at `img_size` (default: its own),
    counted on the meta device, with a breakdown `levels` deep. `overrides` are config fields,
    as for `create_model` (`depth=6`)."""
    with torch.device("meta"):
        model = create_model(name, img_size=img_size, **overrides).eval()
    size = to_2tuple(tuple(model.config.img_size))
    total, breakdown = count_macs(model, _image_input(model, size, "meta"), levels)
    return MacsReport(name, size, count_parameters(model), total, breakdown)


def model_macs(name: str, img_size: int | tuple[int, int] | None = None, **overrides: Any) -> int:
    """MACs per image of a registered model, fast (equal to `macs_report(...).macs`)."""
    with torch.device("meta"):
        model = create_model(name, img_size=img_size, **overrides).eval()
    return fast_macs(model)


def fast_macs(model: nn.Module) -> int:
    """MACs per image of a model on the meta device at its config's img_size, running each
    distinct repeated block once (see `_run_repeats_once`); `vitkit models` uses it."""
    x = _image_input(model, to_2tuple(tuple(model.config.img_size)), "meta")
    with torch.no_grad(), flop_counter() as counter, _run_repeats_once(model, counter) as skipped:
        model(x)
    return (counter.get_total_flops() + skipped[0]) // 2


# -- fast counting: repeated blocks run once -----------------------------------------------------------
def _signature(module: nn.Module) -> tuple:
    """What can change a block's products on given input shapes: the types, parameter and buffer
    shapes and int / str / tuple attributes (heads, window, shift, ...) of it and its submodules.
    Float attributes (drop rates, scales, eps) never change a shape and would tell apart blocks
    that differ only in their drop-path rate."""
    parts: list[Any] = []
    for path, m in module.named_modules():
        plain = []
        for key, value in sorted(vars(m).items()):
            if key.startswith("_"):
                continue
            if isinstance(value, torch.Tensor):
                plain.append((key, tuple(value.shape)))
            elif isinstance(value, (bool, int, str, type(None))) or (isinstance(value, tuple) and _hashable(value)):
                plain.append((key, value))
        own = list(m._parameters.items()) + list(m._buffers.items())
        tensors = [(k, tuple(t.shape), t.dtype) for k, t in own if t is not None]
        parts.append((path, type(m).__qualname__, tuple(plain), tuple(tensors)))
    return tuple(parts)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_shapes(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _shapes(v)) for k, v in value.items()))
    return value if _hashable(value) else repr(value)


def _like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_like(v) for v in value)
    return value


@contextmanager
def _run_repeats_once(model: nn.Module, counter: FlopCounterMode) -> Iterator[list[int]]:
    """On the meta device, blocks of a stack (Sequential / ModuleList) with the same signature and
    the same input shapes cost the same and return the same shapes: the first runs, the others
    return empty tensors of its output shapes and add its FLOPs to `skipped[0]`."""
    if any(p.device.type != "meta" for p in model.parameters()):
        raise ValueError("repeated blocks can be skipped only on the meta device")
    skipped = [0]
    cache: dict[tuple, tuple[int, Any]] = {}
    patched: list[nn.Module] = []

    def memo(block: nn.Module) -> None:
        if "forward" in vars(block):  # already patched (a block in two stacks)
            return
        signature, forward = _signature(block), block.forward

        def run(*args: Any, **kwargs: Any) -> Any:
            key = (signature, _shapes(args), _shapes(kwargs))
            if key in cache:
                flops, out = cache[key]
                skipped[0] += flops
                return _like(out)
            before = counter.get_total_flops() + skipped[0]
            out = forward(*args, **kwargs)
            cache[key] = (counter.get_total_flops() + skipped[0] - before, out)
            return out

        block.forward = run
        patched.append(block)

    for stack in list(model.modules()):
        if isinstance(stack, (nn.Sequential, nn.ModuleList)) and len(stack) > 1:
            for block in stack:
                memo(block)
    try:
        yield skipped
    finally:
        for block in patched:
            del block.forward  # back to the class's forward
