"""Multi-head self-attention: `scaled_dot_product_attention`, or explicit on the CPU for short
sequences and in bf16."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.capture import capturing
from vitkit.layers.linear import linear

# On the CPU the fused attention kernel's fixed cost per call outweighs what it saves on short
# sequences: a training step of the Fashion-MNIST ViT (17 tokens) is ~1.18x faster with the attention
# computed as two matmuls and a softmax, a 37-token one 1.01-1.13x; at 50 tokens the kernel wins.
CPU_EXPLICIT_MAX_TOKENS = 40
# In bf16 (and fp16) the CPU kernel is slower at every ViT length measured: explicit attention took
# 0.53x its time at 197 tokens and 0.91x at 577 (AVX512_BF16, one thread).
_CPU_EXPLICIT_DTYPES = (torch.bfloat16, torch.float16)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
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
