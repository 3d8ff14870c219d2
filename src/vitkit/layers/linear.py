"""Linear layers through oneDNN on the CPU, for inference and training, beside the plain `nn.Linear` path.

On x86 CPUs, `torch.ops.mkldnn._linear_pointwise` (the kernel that torch.compile's CPU backend
uses) ran fp32 linear layers in ~0.5x the time of `F.linear` on an AMD EPYC (whose MKL sgemm path
is slow), and fuses the GELU that follows fc1 (bf16: the GELU pass, ~30% of fc1's time, is gone).
The kernel has no backward, so this inference path runs only where no gradient is needed; it also
stays off under autocast (it would ignore it), while exporting or counting FLOPs, on other devices,
and for any layer that is not a plain, hook-free `nn.Linear` (e.g. after int8 quantisation). `set_onednn_linear(False)`
switches every model back to `F.linear`; the two agree to ~1e-6 relative in fp32 (tests/test_vit.py).
Inference reuses each weight prepacked in oneDNN's layout (`packed_weight`), rebuilt when it changes.

Training (gradients needed) goes through `_OneDNNLinear`, an autograd function whose forward is the
same kernel with the bias added inside it (`F.linear` copies the bias into its output first, a pass
over the output). In fp32 its two backward products go to that kernel (the operands passed transposed, as
strided views) or to `torch.mm`, whichever measured faster on this kind of CPU at that shape
(`fp32_backward_kernels`): on AVX-512 CPUs oneDNN, but grad_weight over a long reduction; on AVX2-only
CPUs mm, but grad_input over many tokens. Under
bf16 autocast the input is cast to bf16 as autocast would, the weight and bias come from the layer's
bf16 copies, kept between steps and refilled each forward (`_bf16_copy`), both backward products are
`torch.mm` (oneDNN through torch), which measured faster than the kernel in bf16, and the bias gradient
is summed in fp32 (vitkit's `column_sums`). fc1 and its GELU train as one `_OneDNNLinear` call: vitkit's
GELU kernel keeps the GELU's slope, so its backward is a product (see `layers/csrc/linear_ops.cpp`).
Gradients match `F.linear`'s to float rounding in fp32 and to bf16 rounding under autocast
(tests/test_linear.py); `set_onednn_linear(False)` turns this path off as well.
"""

from __future__ import annotations

import functools
import threading
import types
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from torch.utils._python_dispatch import _get_current_dispatch_mode

from vitkit.core.hardware import has_avx512, vnni_flags
from vitkit.layers.capture import capturing
from vitkit.layers.weight_key import weight_key

_ENABLED = True
# inference: each layer's weight reordered once into oneDNN's blocked layout, keyed by what identifies
# the weight's values; the dict holds no reference to the layer (deepcopy, pickling and GC unaffected)
_PACKED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple | None, torch.Tensor, weakref.ref]] = (
    weakref.WeakKeyDictionary()
)
_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_INT8_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
# oneDNN's bf16 inner product needs avx512bw/vl/dq or avx_ne_convert: on an AVX2-only CPU it refuses to make
# the primitive, and bf16 goes through F.linear (emulated, as for timm)
_BF16_AVAILABLE = _AVAILABLE and bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
# int8 fc1 + GELU: per torch.ao layer, (its packed params object, oneDNN-packed int8 weight, fp32 scales,
# zero points, bias)
_INT8_PACKED: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
_DTYPES = (torch.float32, torch.bfloat16)


def set_onednn_linear(enabled: bool) -> bool:
    """Use oneDNN for CPU linear layers, inference and training (default True); returns the previous setting."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    return previous


def onednn_linear_enabled() -> bool:
    return _ENABLED and _AVAILABLE


def onednn_linear_supports(dtype: torch.dtype) -> bool:
    """Whether the oneDNN linear path is on and runs `dtype` on this CPU (bf16 needs AVX-512 or AVX-NE-CONVERT)."""
    return onednn_linear_enabled() and (dtype == torch.float32 or (dtype == torch.bfloat16 and _BF16_AVAILABLE))


_LONG_REDUCTION = 50  # fp32 grad_weight: tokens >= this x in_features (and out >= in): torch.mm measured faster
_AVX2_GRAD_INPUT_ROWS = 4  # AVX2 fp32 grad_input: oneDNN where tokens >= this x in_features (`fp32_backward_kernels`)


def _lp(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")  # x @ w.T + b; strided x, w accepted


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ w.T + b for 2-D x, then exact GELU when `gelu` (vitkit's kernel: `gelu_kernel_trains`), with
    the backward products on the kernels that measured fastest.

    `weight` and `bias` are what autograd differentiates (the layer's parameters); the products use
    `wc` and `bc`, the same tensors, or their bf16 copies under autocast (`_bf16_copy`), and the
    gradients come back in the parameters' dtype. With `gelu`, vitkit's GELU kernel goes over the
    product in place and keeps the GELU's slope: the backward multiplies the incoming gradient by it
    and sums the bias gradient in the same pass, where torch's path evaluates erf and exp again
    (`gelu_backward`) and sums in another pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        wc: torch.Tensor,
        bc: torch.Tensor | None,
        gelu: bool,
        slope_buffer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = _lp(x, wc, bc)  # (M, out), this call's own: the GELU may go over it in place
        slope = torch.ops.vitkit.gelu_train_(y, slope_buffer) if gelu else None
        ctx.save_for_backward(x, wc, slope)
        # the parameters themselves only for a second backward: not saved, so that (as under autocast) a
        # graph holding bf16 copies survives an in-place change of the fp32 weight before its backward
        ctx.weight, ctx.bias, ctx.gelu = weight, bias, gelu
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        x, wc, slope = ctx.saved_tensors  # (M, in), (out, in), (M, out) or None
        weight, bias = ctx.weight, ctx.bias
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        if torch.is_grad_enabled():  # create_graph=True: recomputed by differentiable ops, for a second backward
            inputs = [t for t, n in ((x, need_x), (weight, need_w), (bias, need_b)) if n]
            y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))  # casts as autocast's
            y = F.gelu(y) if ctx.gelu else y
            grads = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
            return (*(next(grads) if n else None for n in (need_x, need_w, need_b)), None, None, None, None)
        grad = grad if grad.is_contiguous() else grad.contiguous()  # (M, out); may arrive expanded
        if slope is not None:
            # the product's gradient (into a kept scratch buffer: it is used only here), fp32 sums
            grad, grad_b = torch.ops.vitkit.gelu_backward(grad, slope, need_b, _scratch(slope))
        elif not need_b:
            grad_b = None
        elif grad.dtype == torch.bfloat16 and kernels_available():
            grad_b = torch.ops.vitkit.column_sums(grad)  # summed in fp32, not rounded to bf16
        else:
            grad_b = grad.sum(0)
        grad_b = grad_b.to(bias.dtype) if need_b else None
        if x.dtype == torch.bfloat16:  # torch.mm reaches oneDNN's bf16 matmul, faster here than _lp
            grad_x = torch.mm(grad, wc) if need_x else None
            grad_w = torch.mm(grad.t(), x).to(weight.dtype) if need_w else None
            return grad_x, grad_w, grad_b, None, None, None, None
        x_by_onednn, w_by_onednn = fp32_backward_kernels(x.shape[0], x.shape[1], grad.shape[1], _avx512())
        grad_x = grad_w = None
        if need_x:  # (M, out) @ (out, in)
            grad_x = _lp(grad, wc.t()) if x_by_onednn else torch.mm(grad, wc)
        if need_w:  # (out, M) @ (M, in)
            grad_w = _lp(grad.t(), x.t()) if w_by_onednn else torch.mm(grad.t(), x)
        return grad_x, grad_w, grad_b, None, None, None, None


@functools.lru_cache(maxsize=1)
def _avx512() -> bool:
    """Whether oneDNN runs its AVX-512 kernels here (`has_avx512`); faked by the tests."""
    return has_avx512()


def fp32_backward_kernels(tokens: int, in_f: int, out_f: int, avx512: bool) -> tuple[bool, bool]:
    """Which fp32 backward products of a (tokens, in_f) -> out_f linear run on oneDNN's kernel rather than
    `torch.mm` (MKL): (grad_input, grad_weight), each where it measured faster on that kind of CPU.

    - AVX-512 (AMD EPYC Zen 4 / 5): oneDNN for both, but grad_weight over a long reduction (tokens >=
      50 x in_f, out_f >= in_f: Swin-T's stage 1 at batch 8), where oneDNN took 1.2-1.8x mm's time.
    - AVX2 only (AMD EPYC Zen 1): grad_weight by mm everywhere (oneDNN took 1.1-2.4x its time at every
      Swin-T and DeiT-S shape at batch 8), grad_input by oneDNN only where tokens >= 4 x in_f (0.9-0.95x
      mm's time there; 1.1-1.7x at stage 4 and in fc2 of stage 3 and DeiT-S). docs/PERFORMANCE.md item 21.
    """
    if avx512:
        return True, not (tokens >= _LONG_REDUCTION * in_f and out_f >= in_f)
    return tokens >= _AVX2_GRAD_INPUT_ROWS * in_f, False


# bf16 autocast training: each layer's bf16 copies of its weight and bias, kept between steps and refilled
# in place on every forward. autocast makes a new copy per forward: a fresh allocation the OS maps page by
# page, 4-5x the time of refilling a kept one (a 3072 x 768 weight: 1.6-1.9 ms against 0.36-0.42 ms, 2
# threads, AMD EPYC). Refilled every time, so the copy always holds the weight's current values however
# they were changed; a copy still held by a graph not yet backpropagated (two forwards, then one backward)
# is left to it, and a new one made. The copies cost 2 bytes per parameter.
_BF16_COPIES: weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def _kept(store: dict, key: Any, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """`store[key]` where it has this shape and dtype and nothing else holds it (no graph that has not run
    its backward, no caller: the TensorImpl's reference count is the store's alone); else a new empty
    CPU tensor, kept in its place."""
    kept = store.get(key)
    if kept is None or kept.shape != shape or kept.dtype != dtype or kept._use_count() != 1:  # type: ignore[attr-defined]
        kept = store[key] = torch.empty(shape, dtype=dtype, device="cpu")
    return kept


def _bf16_copy(layer: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """`t` (the layer's parameter `name`) in bf16, as autocast casts it, in the layer's kept buffer."""
    with torch.no_grad():
        return _kept(_BF16_COPIES.setdefault(layer, {}), name, t.shape, torch.bfloat16).copy_(t)


def _slope_buffer(layer: nn.Module, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Where fc1's GELU writes its slope in training: the layer's kept (rows, out_features) buffer, or a
    new one while a graph not yet backpropagated still holds it (saved for its backward)."""
    return _kept(_BF16_COPIES.setdefault(layer, {}), "slope", shape, dtype)


def gelu_kernel_trains(dtype: torch.dtype) -> bool:
    """Whether fc1's GELU in training is vitkit's kernel (`gelu_train_` / `gelu_backward`) for activations
    of `dtype`: bf16 wherever the kernels are built; fp32 on AVX2-only CPUs, where it measured faster
    than torch's GELU and its backward (docs/PERFORMANCE.md item 25; not measured on AVX-512)."""
    if dtype == torch.float32 and _avx512():
        return False
    return dtype in (torch.bfloat16, torch.float32) and kernels_available()


# the GELU backward's product, which lives only inside `_OneDNNLinear.backward` (written, read by its two
# products, dropped before it returns): per thread (autograd may run backward passes on several threads at
# once; a finished thread's entry goes with its Thread object) one flat buffer per dtype, as large as the
# largest product yet, viewed at each shape. One buffer for every shape: per shape, a Swin's four stages and
# a short last batch kept nine.
_SCRATCH: weakref.WeakKeyDictionary[threading.Thread, dict[torch.dtype, torch.Tensor]] = weakref.WeakKeyDictionary()


def _scratch(like: torch.Tensor) -> torch.Tensor:
    buffers, n = _SCRATCH.setdefault(threading.current_thread(), {}), like.numel()
    flat = buffers.get(like.dtype)
    if flat is None or flat.numel() < n:
        flat = buffers[like.dtype] = torch.empty(n, dtype=like.dtype, device="cpu")
    return flat[:n].view(like.shape)


def release_training_buffers(module: nn.Module | None = None) -> None:
    """Drop what the training path keeps between steps: the GELU slopes and bf16 weight copies of the
    linear layers in `module` (every layer's when None) and the backward's scratch. A graph that still
    holds one keeps it; the next training forward makes new ones. `Mlp.train(False)` (so `model.eval()`)
    calls it: fc1's slope is an activation-sized buffer (Swin-T at batch 128: ~2.9 GB in fp32)."""
    layers = list(_BF16_COPIES.keys()) if module is None else list(module.modules())
    for layer in layers:
        _BF16_COPIES.pop(layer, None)
    _SCRATCH.clear()


def kernels_module() -> types.ModuleType:
    """`vitkit.layers.kernels`, imported on first use by the modules `vitkit.layers` imports (this one,
    norm, attention): `python -m vitkit.layers.kernels` (the build) runs with them already loaded."""
    from vitkit.layers import kernels  # noqa: PLC0415

    return kernels


def kernels_available() -> bool:
    """`vitkit.layers.kernels.available()` (see `kernels_module`)."""
    return kernels_module().available()


def _plain_cpu_call(layer: nn.Module, x: torch.Tensor) -> bool:
    """x on the CPU, a hook-free layer, and nothing watching the ops: no export, torch.compile or
    tracing, no dispatch mode (FLOP counting), which are given the plain op they know."""
    if x.device.type != "cpu" or layer._forward_hooks or layer._forward_pre_hooks:
        return False
    return not capturing() and _get_current_dispatch_mode() is None


def _common_checks(layer: nn.Module, x: torch.Tensor) -> bool:
    if not (_ENABLED and _AVAILABLE) or type(layer) is not nn.Linear or layer.weight.device.type != "cpu":
        return False
    return _plain_cpu_call(layer, x)


def _onednn_training_dtype(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype | None:
    """The dtype of the training path where a gradient is needed: fp32 (fp32 input, weight and bias, no
    autocast) or bf16 (bf16 autocast over fp32 weights); None: `F.linear`."""
    if not torch.is_grad_enabled() or not _common_checks(layer, x):  # first: a quantised layer's weight is a method
        return None
    w = layer.weight
    needs_grad = x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad)
    if not needs_grad or x.numel() == 0:
        return None  # an empty batch: oneDNN has no grad_weight primitive for a zero-length reduction
    fp32_params = w.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32 if fp32_params and x.dtype == torch.float32 else None
    # bf16 autocast: the forward with its bias inside oneDNN, the backward on torch.mm, took 0.8-1.0x
    # F.linear's time per layer at Swin-T's shapes (fewest at stage 1: no pass copying the bias)
    bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in _DTYPES
    return torch.bfloat16 if bf16 and fp32_params and onednn_linear_supports(torch.bfloat16) else None


def _use_onednn(layer: nn.Module, x: torch.Tensor) -> bool:
    """The inference path: no gradient needed, no autocast (the kernel would ignore it)."""
    w = layer.weight
    if not _common_checks(layer, x) or not onednn_linear_supports(x.dtype) or w.dtype != x.dtype:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False
    return not torch.is_autocast_enabled("cpu")


def packed_weight(layer: nn.Module, rows: int) -> torch.Tensor:
    """`layer.weight` in oneDNN's blocked layout, made once and reused while the weight is unchanged
    (`vitkit.layers.weight_key`: the same tensor, version and optimiser-step count).

    `_linear_pointwise` reorders a plain weight on every call; prepacked it ran 1.05-1.25x faster per
    layer in bf16 (Swin-T 1.10x, DeiT-S 1.05x per forward at batch 8) and ~1.04x in fp32, with equal
    outputs. `rows` (tokens in this call) only guides oneDNN's choice of layout; any row count works.
    The packed copy costs one more copy of the weights in memory."""
    w = layer.weight
    key = weight_key(w)
    entry = _PACKED.get(layer)
    if entry is None or entry[0] != key or entry[2]() is not w:
        with torch.no_grad():
            entry = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows), weakref.ref(w))
        _PACKED[layer] = entry
    return entry[1]


def _use_int8_gelu(layer: nn.Module, x: torch.Tensor) -> bool:
    """A torch.ao dynamic int8 layer followed by GELU, on a CPU with VNNI, where no gradient is needed."""
    if not (_ENABLED and _INT8_AVAILABLE) or type(layer) is not DynamicQuantizedLinear:
        return False
    if x.dtype != torch.float32 or x.numel() == 0 or not _plain_cpu_call(layer, x):
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False  # the kernel has no backward
    # without VNNI, oneDNN's u8 x s8 products go through 16-bit sums that can saturate (fbgemm's
    # reduce_range exists for that); with it they accumulate in int32
    return layer._packed_params.dtype == torch.qint8 and bool(vnni_flags())


def _int8_weight(layer: nn.Module, rows: int) -> tuple:
    params = layer._packed_params._packed_params
    entry = _INT8_PACKED.get(layer)
    if entry is None or entry[0] is not params:  # set_weight_bias makes a new packed-params object
        weight, bias = layer._weight_bias()
        out = weight.shape[0]
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales, zeros = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
        else:
            scales = torch.full((out,), weight.q_scale(), dtype=torch.float64)
            zeros = torch.full((out,), weight.q_zero_point(), dtype=torch.int64)
        packed = torch.ops.onednn.qlinear_prepack(weight.int_repr(), [rows, weight.shape[1]])
        bias = None if bias is None else bias.detach().float()
        entry = (params, packed, scales.float(), zeros.long(), bias, bool((zeros == 0).all()))
        _INT8_PACKED[layer] = entry
    return entry


def _int8_linear_gelu(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """GELU(layer(x)) for a torch.ao dynamic int8 layer in one oneDNN int8 kernel: the input quantised
    per call to uint8 over its own range (8 bits, where fbgemm's dynamic layer uses 7), the layer's own
    int8 weights and scales, int32 accumulation, GELU applied to the fp32 result. None when the
    weights are not symmetric (zero points other than 0)."""
    x2 = x.reshape(-1, x.shape[-1])
    _, packed, w_scales, w_zeros, bias, symmetric = _int8_weight(layer, x2.shape[0])
    if not symmetric:
        return None
    lo, hi = torch.aminmax(x2)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)  # the range holds 0, so 0 is exact
    scale = ((hi - lo) / 255.0).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    xq = torch.div(x2, scale).round_().add_(zero).clamp_(0, 255).to(torch.uint8)
    y = torch.ops.onednn.qlinear_pointwise.tensor(
        xq, scale, zero.to(torch.int32), packed, w_scales, w_zeros, bias, 1.0, 0, torch.float32, "gelu", [], "none"
    )
    return y.view(*x.shape[:-1], y.shape[-1])


def linear(layer: nn.Module, x: torch.Tensor, gelu: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`layer(x)`, then exact (erf) GELU when `gelu`; through oneDNN where that applies (see module).

    `bias` replaces the layer's own (Swin V2's qkv: q and v biases around a zero k bias)."""
    b = layer.bias if bias is None else bias
    dtype = _onednn_training_dtype(layer, x, b)
    if dtype is not None:
        x2, w = x.reshape(-1, x.shape[-1]), layer.weight
        wc, bc = w, b
        if dtype != w.dtype:  # bf16 autocast over fp32 weights: the input cast as autocast's, the
            x2 = x2.to(dtype)  # parameters' from the layer's kept copies (bias=: one made in this forward)
            wc = _bf16_copy(layer, "weight", w)
            if b is not None:
                bc = _bf16_copy(layer, "bias", b) if b is layer.bias else b.to(dtype)
                b = b if b is layer.bias else bc  # a bias made here: its cast differentiable, as autocast's
        fused = gelu and gelu_kernel_trains(dtype)
        slope = _slope_buffer(layer, (x2.shape[0], int(layer.out_features)), dtype) if fused else None
        y = _OneDNNLinear.apply(x2, w, b, wc, bc, fused, slope)  # autocast does not reach the oneDNN op inside
        y = y.view(*x.shape[:-1], y.shape[-1])  # (..., out_features)
        return F.gelu(y) if gelu and not fused else y
    if _use_onednn(layer, x):
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(
            x2, packed_weight(layer, x2.shape[0]), b, "gelu" if gelu else "none", [], "none" if gelu else ""
        )
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., out_features)
    if gelu and bias is None and _use_int8_gelu(layer, x):
        y = _int8_linear_gelu(layer, x)
        if y is not None:
            return y
    y = layer(x) if bias is None else F.linear(x, layer.weight, b)
    if gelu and y is not x and not y._is_view() and not (torch.is_grad_enabled() and y.requires_grad):
        return torch.ops.aten.gelu_(y)  # y is this call's own new output: in place saves an allocation
    return F.gelu(y) if gelu else y
