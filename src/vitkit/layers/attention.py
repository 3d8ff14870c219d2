"""Multi-head self-attention: on the CPU vitkit's attention kernel where it is built, else
`scaled_dot_product_attention`, or explicit on the CPU for short sequences and in bf16."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.capture import capturing
from vitkit.layers.linear import kernels_module, linear

# On the CPU the fused attention kernel's fixed cost per call outweighs what it saves on short
# sequences: a training step of the Fashion-MNIST ViT (17 tokens) is ~1.18x faster with the attention
# computed as two matmuls and a softmax, a 37-token one 1.01-1.13x; at 50 tokens the kernel wins.
CPU_EXPLICIT_MAX_TOKENS = 40
# In bf16 (and fp16) the CPU kernel is slower at every ViT length measured: explicit attention took
# 0.53x its time at 197 tokens and 0.91x at 577 (AVX512_BF16, one thread).
_CPU_EXPLICIT_DTYPES = (torch.bfloat16, torch.float16)
# Where vitkit's attention kernel is built (`vitkit.layers.kernels`, written for Swin's windows: one
# window per image here), it replaces both paths up to this length. Forward + backward, 2 threads, AMD
# EPYC Zen 4: 0.42-0.51x the explicit path's time at 17 tokens in bf16 (the Fashion-MNIST ViT, batch 128),
# 0.74x in fp32; at 197 tokens 0.91x the explicit path's in bf16 and 0.68-0.73x SDPA's in fp32; inference
# 0.5-0.77x (docs/PERFORMANCE.md item 19). Longer sequences are not measured.
KERNEL_MAX_TOKENS = 256
# per (heads, tokens): the kernel's zero position bias (1, heads, N, N) and token order (1, N)
_KERNEL_INPUTS: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _kernel_inputs(heads: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    entry = _KERNEL_INPUTS.get((heads, tokens))
    if entry is None:
        with torch.inference_mode(False):  # made under inference_mode, a training step could not save them
            entry = (torch.zeros(1, heads, tokens, tokens), torch.arange(tokens).view(1, tokens))
        _KERNEL_INPUTS[(heads, tokens)] = entry
    return entry


def core_dtype_applies(core_dtype: torch.dtype | None, q: torch.Tensor) -> bool:
    """Whether attention runs in `core_dtype` rather than q's own: CPU inference only (no gradient),
    never while compiling or tracing, and only when the two differ."""
    if core_dtype is None or q.dtype == core_dtype or q.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and q.requires_grad:
        return False
    return not capturing()


def set_attention_dtype(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Run the attention of every layer of `model` that supports it (ViT and Swin attention) in `dtype`
    during CPU inference: scores, softmax and their product with v; None: in the input's dtype.
    The projections around it keep their own dtype. Swin's window attention ignores it where vitkit's
    window kernel runs (`vitkit.layers.kernels`): that computes in fp32 from fp32 inputs, faster than
    the bf16 torch path. Returns the number of layers set."""
    count = 0
    for module in model.modules():
        if hasattr(module, "core_dtype"):
            setattr(module, "core_dtype", dtype)  # noqa: B010  (nn.Module types attributes as Tensor | Module)
            count += 1
    return count


class Attention(nn.Module):
    """Global multi-head self-attention over a token sequence (parameters qkv / proj, as timm).

    Set `record_attn = True` to keep the softmax attention weights of the last forward in
    `last_attn` (B, heads, N, N): the explicit path keeps its own, beside the fused kernel they are
    computed separately; either way the output is unchanged while recording.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.record_attn = False
        self.last_attn: torch.Tensor | None = None
        # inference only: the attention itself (scores, softmax, product) in this dtype, e.g. bfloat16
        # in an int8 model on a CPU with bf16 units; None: in the input's dtype
        self.core_dtype: torch.dtype | None = None

    def _kernel_mode(self, x: torch.Tensor) -> str | None:
        """ "train" or "infer" where vitkit's attention kernel computes this attention (CPU, fp32 or bf16,
        head_dim 16-64 in steps of 16, at most KERNEL_MAX_TOKENS tokens, no attention dropout, no bf16
        core in an fp32 model); None: the torch paths."""
        if x.device.type != "cpu" or x.shape[1] > KERNEL_MAX_TOKENS:
            return None
        if (self.training and self.attn_drop) or self.core_dtype is not None:
            return None
        kernels = kernels_module()
        if kernels.window_attention_applies(x, self.head_dim):
            return "infer"
        return "train" if kernels.window_attention_trains(x, self.head_dim) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        mode = self._kernel_mode(x)
        if mode is not None:  # each image one window of N tokens, a zero bias; out (B, N, heads, head_dim)
            qkv = linear(self.qkv, x).reshape(B, N, 3, self.num_heads, self.head_dim)
            bias, rows = _kernel_inputs(self.num_heads, N)
            if self.record_attn:  # the weights computed beside the kernel, as beside SDPA below
                with torch.no_grad():
                    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
                    self.last_attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            if mode == "train":
                out = kernels_module().window_attention_train(qkv, bias, self.scale, rows)
            else:
                out = kernels_module().window_attention(*qkv.unbind(2), bias, self.scale, rows=rows)
            return self.proj_drop(linear(self.proj, out.view(B, N, C)))
        # (3, B, heads, N, head_dim)
        qkv = linear(self.qkv, x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        dropout_p = self.attn_drop if self.training else 0.0
        core = core_dtype_applies(self.core_dtype, q) and not self.record_attn
        if core:  # one pass each, which also makes them contiguous; bf16 then takes the explicit path
            q, k, v = q.to(self.core_dtype), k.to(self.core_dtype), v.to(self.core_dtype)
        if x.device.type == "cpu" and (N <= CPU_EXPLICIT_MAX_TOKENS or q.dtype in _CPU_EXPLICIT_DTYPES):
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            if self.record_attn:
                self.last_attn = attn.detach()
            x = F.dropout(attn, dropout_p, training=dropout_p > 0) @ v
        else:
            if self.record_attn:
                with torch.no_grad():
                    self.last_attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        out = x.transpose(1, 2)
        if core:
            out = out.to(qkv.dtype, memory_format=torch.contiguous_format)  # back, in the same pass as the transpose
        return self.proj_drop(linear(self.proj, out.reshape(B, N, C)))
