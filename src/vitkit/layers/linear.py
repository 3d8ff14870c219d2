"""Linear layers through oneDNN for CPU inference, beside the plain `nn.Linear` path.

On x86 CPUs, `torch.ops.mkldnn._linear_pointwise` (the kernel that torch.compile's CPU backend
uses) ran fp32 linear layers in ~0.5x the time of `F.linear` on an AMD EPYC (whose MKL sgemm path
is slow), and fuses the GELU that follows fc1 (bf16: the GELU pass, ~30% of fc1's time, is gone).
It has no backward, so it only runs where no gradient is needed; it also stays off under autocast
(it would ignore it), while exporting or counting FLOPs, on other devices, and for any layer that
is not a plain, hook-free `nn.Linear` (e.g. after int8 quantisation). `set_onednn_linear(False)`
switches every model back to `F.linear`; the two agree to ~1e-6 relative in fp32 (tests/test_vit.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

_ENABLED = True
_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_DTYPES = (torch.float32, torch.bfloat16)


def set_onednn_linear(enabled: bool) -> bool:
    """Use oneDNN for CPU inference linear layers (default True); returns the previous setting."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    return previous


def onednn_linear_enabled() -> bool:
    return _ENABLED and _AVAILABLE


def _use_onednn(layer: nn.Module, x: torch.Tensor) -> bool:
    if not (_ENABLED and _AVAILABLE) or type(layer) is not nn.Linear or x.device.type != "cpu":
        return False
    w = layer.weight
    if x.dtype not in _DTYPES or w.dtype != x.dtype or w.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False
    if layer._forward_hooks or layer._forward_pre_hooks or torch.is_autocast_enabled("cpu"):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
        return False  # export, torch.compile, FLOP counting: the plain op they know
    return True


def linear(layer: nn.Module, x: torch.Tensor, gelu: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`layer(x)`, then exact (erf) GELU when `gelu`; through oneDNN where that applies (see module).

    `bias` replaces the layer's own (Swin V2's qkv: q and v biases around a zero k bias)."""
    b = layer.bias if bias is None else bias
    if _use_onednn(layer, x):
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, x.shape[-1]), layer.weight, b, "gelu" if gelu else "none", [], "none" if gelu else ""
        )
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., out_features)
    y = layer(x) if bias is None else F.linear(x, layer.weight, b)
    return F.gelu(y) if gelu else y
