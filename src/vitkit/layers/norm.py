"""LayerNorm: `nn.LayerNorm` with vitkit's CPU kernel for bf16 activations beside torch's path.

Where the input is bf16 on the CPU (bf16 autocast training, `--amp bf16` inference with the weights cast)
and vitkit's kernels are built, the forward and backward run in `torch.ops.vitkit.layer_norm_forward` /
`layer_norm_backward` (`layers/csrc/layer_norm.cpp`): statistics in fp32, the result rounded once to
bf16, as torch's kernel computes it. torch's CPU LayerNorm spends most of its time per row, and Swin's
rows are 96-768 wide: at Swin-T's stage 1 (8 x 3136 x 96, 2 threads) the kernel took 0.48 ms for the
forward against torch's 1.04 ms. The weight and bias gradients are summed in fp32 (torch's bf16 backward
gave them ~3% relative error against float64 there, the kernel ~2e-7).

fp32 inputs keep torch's kernel, so fp32 results stay bit-identical to timm's. Everything else falls back
to `nn.LayerNorm.forward` too: other devices, normalised shapes over more than one dimension, export,
torch.compile and tracing, dispatch modes (FLOP counting), `vitkit.layers.kernels.set_kernels(False)`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from vitkit.layers.capture import capturing
from vitkit.layers.linear import kernels_available


class _LayerNormKernel(torch.autograd.Function):
    """LayerNorm over the last dim of a contiguous x through vitkit's kernel, with its backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
    ) -> torch.Tensor:
        w = None if weight is None else weight.float()
        b = None if bias is None else bias.float()
        y, mean, rstd = torch.ops.vitkit.layer_norm_forward(x, w, b, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        x, mean, rstd, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops, for a second backward
            wanted = [n and t is not None for t, n in zip((x, weight, bias), (need_x, need_w, need_b))]
            inputs = [t for t, n in zip((x, weight, bias), wanted) if n]
            y = F.layer_norm(x, x.shape[-1:], weight, bias, ctx.eps)
            grads = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
            return (*(next(grads) if n else None for n in wanted), None)
        params = (need_w or need_b) and weight is not None
        w = None if weight is None else weight.float()
        grad_x, sums = torch.ops.vitkit.layer_norm_backward(grad.contiguous(), x, mean, rstd, w, params)
        C = x.shape[-1]
        grad_w = sums[:C].to(weight.dtype) if params and need_w else None
        grad_b = sums[C:].to(bias.dtype) if params and need_b else None
        return grad_x, grad_w, grad_b, None


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters, state-dict keys and results) whose bf16 CPU path is vitkit's kernel."""

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        if x.dtype != torch.bfloat16 or x.device.type != "cpu" or len(self.normalized_shape) != 1:
            return False
        if (self.weight is None) != (self.bias is None) or x.numel() == 0:
            return False  # the kernel takes both parameters or neither
        return not capturing() and _get_current_dispatch_mode() is None and kernels_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._kernel_applies(x):
            return super().forward(x)
        x = x.contiguous()
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, self.weight, self.bias)
        )
        if needs_grad:
            return _LayerNormKernel.apply(x, self.weight, self.bias, self.eps)
        w = None if self.weight is None else self.weight.detach().float()
        b = None if self.bias is None else self.bias.detach().float()
        return torch.ops.vitkit.layer_norm_forward(x, w, b, self.eps)[0]
