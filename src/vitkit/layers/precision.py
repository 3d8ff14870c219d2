"""Low-precision inference: weights held in bf16 instead of cast on every forward by autocast."""

from __future__ import annotations

import torch
from torch import nn

_HOOK_ATTR = "_vitkit_input_cast"


def _cast_inputs(module: nn.Module, args: tuple) -> tuple:
    dtype = getattr(module, _HOOK_ATTR)[1]
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def cast_for_inference(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Hold `model`'s floating-point parameters and buffers in `dtype` (e.g. torch.bfloat16) and cast
    its floating inputs to it, for inference; None leaves the model in fp32. Returns the model.

    Under autocast each linear layer copies its fp32 weight to bf16 on every forward and layer norms
    run in fp32 between bf16 matmuls; a bf16 model skips both. Outputs come out in `dtype`. Not for
    training (the optimiser needs fp32 weights); calling it again with another dtype re-casts.
    """
    if dtype is None:
        dtype = torch.float32
    if not dtype.is_floating_point:
        raise ValueError(f"inference dtype must be a floating-point dtype, got {dtype}")
    model.to(dtype)
    previous = getattr(model, _HOOK_ATTR, None)
    if previous is not None:
        previous[0].remove()
    if dtype == torch.float32:
        if previous is not None:
            delattr(model, _HOOK_ATTR)
        return model
    handle = model.register_forward_pre_hook(_cast_inputs)
    setattr(model, _HOOK_ATTR, (handle, dtype))
    return model
