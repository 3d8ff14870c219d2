"""Swin Transformer V1 and V2 in one family.

Parameter names and shapes are timm's, so timm state dicts load without conversion.
Data flow: image (B, C, H, W) -> patch tokens + LayerNorm (B, H/4, W/4, C) -> four stages, each
[patch merging: (B, H, W, C) -> (B, H/2, W/2, 2C)] then blocks of (shifted) window attention and MLP
-> LayerNorm (B, h, w, 8C) -> average over h, w -> head.

V2 is the same `SwinTransformer` given `SwinBlockV2` (residual post-norm, scaled cosine attention,
log-spaced continuous position bias) and `PatchMergingV2` (reduction, then norm).
Where the reference implementations disagree, this follows timm: a block shifts its map, then pads
it to a multiple of the window; a map smaller than the window shrinks the window to it per dimension
and drops the shift in that dimension.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils.checkpoint import checkpoint

from vitkit.layers import DropPath, LayerNorm, Mlp, PatchEmbed, drop_path_rates, kernels
from vitkit.layers.attention import core_dtype_applies
from vitkit.layers.capture import capturing
from vitkit.layers.features import take_indices
from vitkit.layers.linear import linear
from vitkit.layers.patch_embed import check_input_size, check_patch_grid
from vitkit.layers.rel_pos import relative_position_index, resize_rel_pos_bias_table
from vitkit.layers.slicing import in_slices
from vitkit.layers.weight_key import weight_key
from vitkit.registry import register, to_2tuple

Window = tuple[int, int]
WindowSpec = int | tuple[int | Window, ...]


@dataclass(frozen=True)
class SwinConfig:
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96  # channels of stage 1; stage i has embed_dim * 2**i
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    # an int for square windows in every stage, or one int / (h, w) per stage
    window_size: WindowSpec = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dynamic_img_size: bool = False  # accept any size divisible by the patch size
    drop_rate: float = 0.0  # head dropout
    proj_drop_rate: float = 0.0  # dropout after attention projection and in the MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1  # timm's default for Swin
    norm_eps: float = 1e-5
    # Swin V2 only
    pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)  # per stage; 0 = the window itself
    extra_norm_every_n_blocks: int = 0  # SwinV2-H/G: LayerNorm on the main branch every n blocks

    def __post_init__(self) -> None:
        # JSON round trips turn nested tuples into lists
        if isinstance(self.window_size, (list, tuple)):
            spec = tuple(tuple(w) if isinstance(w, list) else w for w in self.window_size)
            object.__setattr__(self, "window_size", spec)

    def validate(self) -> None:
        for name in ("patch_size", "in_chans", "embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no head), got {self.num_classes}")
        stages = len(self.depths)
        if stages == 0 or any(not isinstance(d, int) or d <= 0 for d in self.depths):
            raise ValueError(f"depths must be a tuple of positive ints (blocks per stage), got {self.depths!r}")
        for name in ("num_heads", "pretrained_window_sizes"):
            if len(getattr(self, name)) != stages:
                raise ValueError(
                    f"{name} {getattr(self, name)!r} needs one entry per stage: depths {self.depths} has {stages}"
                )
        for i, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**i
            if heads <= 0 or dim % heads:
                raise ValueError(
                    f"num_heads[{i}]={heads} must divide stage {i}'s width {dim}; "
                    f"allowed: {[d for d in range(1, dim + 1) if dim % d == 0]}"
                )
        if any(p < 0 for p in self.pretrained_window_sizes):
            raise ValueError(f"pretrained_window_sizes must be >= 0, got {self.pretrained_window_sizes}")
        self.stage_window_sizes()  # raises on a malformed window_size
        check_patch_grid(self.img_size, self.patch_size)
        if self.extra_norm_every_n_blocks < 0:
            raise ValueError(f"extra_norm_every_n_blocks must be >= 0 (0 = none), got {self.extra_norm_every_n_blocks}")
        for name in ("drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def stage_window_sizes(self) -> tuple[Window, ...]:
        """The target (h, w) window of every stage (before clamping to the stage's map)."""
        stages = len(self.depths)
        spec = self.window_size
        per_stage = (spec,) * stages if isinstance(spec, int) else spec
        if len(per_stage) != stages:
            raise ValueError(f"window_size {spec!r} must be an int or have one int / (h, w) entry per stage ({stages})")
        out = []
        for w in per_stage:
            pair = (w, w) if isinstance(w, int) else tuple(w)
            if len(pair) != 2 or any(not isinstance(v, int) or v <= 0 for v in pair):
                raise ValueError(f"window_size entries must be positive ints or (h, w) pairs, got {w!r}")
            out.append(pair)
        return tuple(out)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)


# -- window helpers ---------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, window: Window) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, Wh * Ww, C); H and W must be multiples of the window."""
    B, H, W, C = x.shape
    wh, ww = window
    nh, nw = H // wh, W // ww
    x = x.view(B, nh, wh, nw, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B * nh * nw, wh * ww, C)  # explicit sizes, no -1: torch.export solves them


def window_reverse(windows: torch.Tensor, window: Window, H: int, W: int) -> torch.Tensor:
    """(B * nW, Wh * Ww, C) -> (B, H, W, C)."""
    wh, ww = window
    C = windows.shape[-1]
    nh, nw = H // wh, W // ww
    B = windows.shape[0] // (nh * nw)
    x = windows.view(B, nh, nw, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def fit_window(resolution: Window, window: Window, shifted: bool) -> tuple[Window, Window]:
    """Per dimension: a map no larger than the window becomes the window, unshifted; else shift W // 2."""
    sizes, shifts = [], []
    for r, w in zip(resolution, window):
        sizes.append(min(r, w))
        shifts.append(w // 2 if shifted and r > w else 0)
    return (sizes[0], sizes[1]), (shifts[0], shifts[1])


def shifted_window_mask(
    padded: Window, window: Window, shift: Window, device: torch.device | str | None = None
) -> torch.Tensor:
    """(nW, N, N) additive mask (0 / -100) keeping attention within the regions a cyclic shift joined.

    The map is rolled by -shift and then padded to `padded`, so regions are counted from the padded
    end, as timm does: [0, P - W), [P - W, P - s), [P - s, P) along each shifted dimension.
    """
    ids = []
    for size, w, s in zip(padded, window, shift):
        pos = torch.arange(size, device=device)
        ids.append((pos >= size - w).long() + (pos >= size - s).long() if s else torch.zeros_like(pos))
    region = (ids[0][:, None] * 3 + ids[1][None, :]).float()  # (Hp, Wp)
    region = window_partition(region[None, :, :, None], window).squeeze(-1)  # (nW, N)
    differs = region[:, :, None] != region[:, None, :]
    return torch.zeros(differs.shape, device=device).masked_fill(differs, -100.0)


def attention_bias(bias: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask for SDPA: (1, heads, N, N) from the position bias (heads, N, N), or
    with a shift mask (nW, N, N) the sum laid out as (1, nW * heads, N, N).

    The mask is 4-D (a 3-D one sends CPU SDPA to its slow math kernel) and broadcasts over the
    batch: attention views its windows (B * nW, heads) as (B, nW * heads) instead of repeating the mask.
    """
    if mask is None:
        return bias.to(dtype).contiguous()[None]
    return (bias[None] + mask[:, None]).to(dtype).contiguous().flatten(0, 1)[None]


def window_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, dropout: float, scale: float | None
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v over 4-D inputs; `bias` broadcasts over the batch.

    On the CPU, in bf16 and wherever a gradient is needed, two matmuls and a softmax run explicitly: at
    window sizes (N = 49-144 tokens) torch's fused kernel took ~1.4x their time in bf16 (AVX-512), and
    with a gradient SDPA takes its math path, the same products plus a pass that guards fully masked rows
    (a Swin-T fp32 training step: 1.04x faster without it, AVX2). fp32 inference keeps the fused kernel:
    it ties on AVX-512 and, on an AVX2-only CPU, took 1.04-1.22x the explicit path's time at batch 8 but
    0.56-0.84x at batch 32, whose scores leave the cache. Elsewhere (CUDA; export, whose graphs keep one
    attention op) SDPA.
    """
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or bias.requires_grad)
    if q.device.type != "cpu" or capturing() or not (grad or q.dtype in (torch.bfloat16, torch.float16)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q * scale if scale != 1.0 else q) @ k.transpose(-2, -1)  # (B, heads', N, N)
    attn = (attn + bias if attn.requires_grad else attn.add_(bias)).softmax(dim=-1)
    return F.dropout(attn, dropout, training=dropout > 0).to(v.dtype) @ v


class _Permute(torch.autograd.Function):
    """x.index_select(1, index) for a permutation `index`; the gradient is the gather by its inverse
    (index_select's own backward scatters with atomic adds)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def permute_tokens(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> (B, L, C) with token i = x[:, index[i]]; one copy."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Permute.apply(x, index, inverse)
    return x.index_select(1, index)


def shifted_window_order(resolution: Window, window: Window, shift: Window) -> tuple[torch.Tensor, torch.Tensor]:
    """For a map that needs no padding: (index, inverse), each (H * W,), such that a flat map's tokens
    gathered by `index` are its roll by -shift cut into windows (window-major, as window_partition),
    and window tokens gathered by `inverse` are the map rolled back. One gather replaces roll (a copy
    per dimension) plus partition (another copy)."""
    H, W = resolution
    pos = torch.arange(H * W).view(1, H, W, 1)
    index = window_partition(torch.roll(pos, shifts=(-shift[0], -shift[1]), dims=(1, 2)), window).flatten()
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(H * W)
    return index, inverse


# -- attention --------------------------------------------------------------------------------------
class _WindowAttentionBase(nn.Module):
    """Multi-head attention within windows: (B * nW, N, C) -> (B * nW, N, C), plus a position bias.

    Subclasses give the qkv projection, the logits' scaling (`_scaled`) and the position bias
    (heads, N, N), which is cached in eval mode.
    """

    def __init__(self, dim: int, num_heads: int, window: Window, config: SwinConfig) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window
        self.attn_drop = config.attn_drop_rate
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(config.proj_drop_rate)
        # eval-mode cache of the attention bias: (key of its inputs, bias); see `cached_bias`
        self._bias_cache: tuple[tuple, torch.Tensor] | None = None
        # inference only: the window attention in this dtype (e.g. bfloat16 in an int8 model on a CPU
        # with bf16 units; `vitkit.layers.attention.set_attention_dtype`); None: in the input's dtype
        self.core_dtype: torch.dtype | None = None

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.qkv, x)

    def _bias_inputs(self) -> tuple[torch.Tensor, ...]:
        """The tensors `position_bias` reads: a change to any of them invalidates the cache."""
        raise NotImplementedError

    def _cosine_scale(self) -> torch.Tensor | None:
        """Swin V2: the per-head multiplier of cosine similarities, (heads,) fp32; None: dot products."""
        return None

    def train(self, mode: bool = True) -> _WindowAttentionBase:
        self._bias_cache = None
        return super().train(mode)

    def cached_bias(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """`attention_bias` of this window's position bias and `mask`, computed once in eval mode.

        Recomputed in training or whenever gradients are on (the tables are learned), while
        exporting, and after any change to the tables (load_state_dict, an optimiser step, .to()).
        """
        if self.training or torch.is_grad_enabled() or capturing():
            return attention_bias(self.position_bias(), mask, dtype)
        key = (tuple(weight_key(t) for t in self._bias_inputs()), weight_key(mask), dtype)
        if self._bias_cache is None or self._bias_cache[0] != key:
            self._bias_cache = (key, attention_bias(self.position_bias(), mask, dtype))
        return self._bias_cache[1]

    def kernel_applies(self, x: torch.Tensor) -> bool:
        """Whether vitkit's window kernel computes this attention (`vitkit.layers.kernels`): CPU inference."""
        if self.training and self.attn_drop:
            return False
        return kernels.window_attention_applies(x, self.proj.in_features // self.num_heads)

    def _kernel_inputs(self, mask: torch.Tensor | None) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        """The kernel's bias (G, heads, N, N) fp32, scale and Swin V2 cosine multiplier (None for V1)."""
        N = self.window_size[0] * self.window_size[1]
        bias = self.cached_bias(mask, torch.float32).view(-1, self.num_heads, N, N)
        cosine = self._cosine_scale()
        scale = 1.0 if cosine is not None else (self.proj.in_features // self.num_heads) ** -0.5
        return bias, scale, cosine

    def _kernel_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bias, scale, cosine = self._kernel_inputs(mask)
        return kernels.window_attention(q, k, v, bias, scale, cosine, rows)

    def kernel_trains(self, x: torch.Tensor) -> bool:
        """Whether vitkit's window kernel with its backward computes this attention where gradients may be
        needed (`kernels.window_attention_trains`): on the CPU, without attention dropout."""
        if self.training and self.attn_drop:
            return False
        return kernels.window_attention_trains(x, self.proj.in_features // self.num_heads)

    def _kernel_train(self, qkv: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, heads, head_dim) -> (B, T, heads, head_dim) by `kernels.window_attention_train`; Swin
        V2's cosine normalisation and logit scale inside it, their gradients included."""
        bias, scale, cosine = self._kernel_inputs(mask)
        return kernels.window_attention_train(qkv, bias, scale, rows, cosine)

    def forward_map(self, x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Window attention on a whole map, (B, T, C) -> (B, T, C), through vitkit's kernel (`kernel_applies`
        or `kernel_trains`): the projections run per token on the map and the kernel gathers each window's
        tokens by `rows` (nW, N) and writes them back in place, so no partition, shift or their inverses
        are copied, in the forward or the backward."""
        B, T, C = x.shape
        qkv = self._qkv(x).view(B, T, 3, self.num_heads, -1)
        if self.kernel_applies(x):
            q, k, v = qkv.unbind(2)  # each (B, T, heads, head_dim)
            x = self._kernel_attention(q, k, v, mask, rows).view(B, T, C)
        else:
            x = self._kernel_train(qkv, mask, rows).view(B, T, C)
        return self.proj_drop(linear(self.proj, x))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, C = x.shape
        heads = self.num_heads
        qkv = self._qkv(x).reshape(B_, N, 3, heads, -1)
        applies = self.kernel_applies(x)
        if not applies and self.kernel_trains(x):  # each window as an image of N tokens, in order
            rows = torch.arange(N, device=x.device).view(1, N)
            x = self._kernel_train(qkv, mask, rows).view(B_, N, C)
            return self.proj_drop(linear(self.proj, x))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B * nW, heads, N, head_dim)
        dropout = self.attn_drop if self.training else 0.0
        if applies:  # CPU inference: one pass, no copies in or out
            x = self._kernel_attention(q, k, v, mask).view(B_, N, C)
            return self.proj_drop(linear(self.proj, x))
        q, k, scale = self._scaled(q, k)
        dtype = x.dtype
        core = core_dtype_applies(self.core_dtype, q)
        if core:  # one pass each, which also makes them contiguous
            q, k, v = q.to(self.core_dtype), k.to(self.core_dtype), v.to(self.core_dtype)
        bias = self.cached_bias(mask, q.dtype)
        if mask is not None:
            # windows are batch-major, (B, nW): as (B, nW * heads) the bias (1, nW * heads, N, N)
            # broadcasts over the batch and every input stays 4-D (as ONNX's attention needs)
            nw = mask.shape[0]
            q, k, v = (t.reshape(B_ // nw, nw * heads, N, -1) for t in (q, k, v))
        x = window_sdpa(q, k, v, bias, dropout, scale)
        x = x.reshape(B_, heads, N, -1).transpose(1, 2)
        if core:
            x = x.to(dtype, memory_format=torch.contiguous_format)  # back, in the same pass as the transpose
        x = x.reshape(B_, N, C)
        return self.proj_drop(linear(self.proj, x))


class WindowAttention(_WindowAttentionBase):
    """Swin V1: scaled dot-product attention plus a learned relative position bias table,
    ((2*Wh - 1) * (2*Ww - 1), heads), gathered by a precomputed index."""

    def __init__(self, dim: int, num_heads: int, window: Window, config: SwinConfig, stage: int) -> None:
        super().__init__(dim, num_heads, window, config)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), num_heads)
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=config.qkv_bias)
        self.init_buffers()

    def init_buffers(self) -> None:
        index = relative_position_index(self.window_size, self.relative_position_bias_table.device)
        self.register_buffer("relative_position_index", index, persistent=False)

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def set_window_size(self, window: Window) -> None:
        """Resize the bias table (timm's interpolation) and the index for a new window."""
        if window == self.window_size:
            return
        old = self.relative_position_bias_table
        with torch.no_grad():
            table = resize_rel_pos_bias_table(old, self.window_size, window)
        self.relative_position_bias_table = nn.Parameter(table, requires_grad=old.requires_grad)
        self.window_size = window
        self.init_buffers()

    def position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)  # (heads, N, N)

    def _bias_inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.relative_position_bias_table, self.relative_position_index)  # type: ignore[return-value]

    def _scaled(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        return q, k, None  # SDPA's default scale, head_dim ** -0.5


def log_spaced_coords(window: Window, pretrained_window: Window) -> torch.Tensor:
    """Swin V2's CPB input (1, 2Wh - 1, 2Ww - 1, 2): relative offsets scaled to [-8, 8] by the
    (pretrained) window, then sign(t) * log2(1 + |t|) / 3."""
    axes = [torch.arange(-(w - 1), w, dtype=torch.float32) for w in window]
    table = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)[None]
    norm = pretrained_window if pretrained_window[0] > 0 else window
    table[..., 0] /= max(norm[0] - 1, 1)  # a window of 1 has only the offset 0: avoid 0 / 0
    table[..., 1] /= max(norm[1] - 1, 1)
    table *= 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


class WindowAttentionV2(_WindowAttentionBase):
    """Swin V2: cosine attention with a learned per-head temperature (clamped at 100), and a position
    bias 16 * sigmoid(MLP(log-spaced offsets)) that transfers across window sizes."""

    def __init__(self, dim: int, num_heads: int, window: Window, config: SwinConfig, stage: int) -> None:
        super().__init__(dim, num_heads, window, config)
        self.pretrained_window_size = to_2tuple(config.pretrained_window_sizes[stage])
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        # q and v get biases, k none (a key bias cancels in the softmax)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if config.qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if config.qkv_bias else None
        self.init_buffers()

    def init_buffers(self) -> None:
        device = self.logit_scale.device
        coords = log_spaced_coords(self.window_size, self.pretrained_window_size).to(device)
        self.register_buffer("relative_coords_table", coords, persistent=False)
        index = relative_position_index(self.window_size, device)
        self.register_buffer("relative_position_index", index, persistent=False)

    def init_weights(self) -> None:
        nn.init.constant_(self.logit_scale, math.log(10.0))
        if self.q_bias is not None:
            nn.init.zeros_(self.q_bias)
            nn.init.zeros_(self.v_bias)

    def set_window_size(self, window: Window) -> None:
        """Only the coordinates change: the CPB MLP is defined for any window."""
        if window != self.window_size:
            self.window_size = window
            self.init_buffers()

    def position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        coords = self.relative_coords_table.to(self.logit_scale.dtype)
        table = self.cpb_mlp(coords).view(-1, self.num_heads)  # ((2Wh - 1) * (2Ww - 1), heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias)  # (heads, N, N)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_bias is None:
            return self.qkv(x)
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        return linear(self.qkv, x, bias=bias)

    def _bias_inputs(self) -> tuple[torch.Tensor, ...]:
        return (*self.cpb_mlp.parameters(), self.relative_coords_table, self.relative_position_index)

    def _temperature(self) -> torch.Tensor:
        """The per-head multiplier of cosine similarities, (heads, 1, 1): exp(logit_scale), at most 100."""
        return torch.clamp(self.logit_scale, max=math.log(100.0)).exp()

    def _cosine_scale(self) -> torch.Tensor:
        return self._temperature().float().flatten()

    def _scaled(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        # cosine attention: the temperature is folded into q, so SDPA's scale is 1
        temperature = self._temperature()
        # in q's dtype: under bf16 autocast an fp32 temperature would promote q to fp32 and send the
        # attention to the mixed-dtype SDPA path (Swin V2 bf16 training ran at 0.8x timm's speed)
        return F.normalize(q, dim=-1) * temperature.to(q.dtype), F.normalize(k, dim=-1), 1.0


# -- blocks -----------------------------------------------------------------------------------------
class SwinBlock(nn.Module):
    """Swin V1 block (pre-norm): x + attn(norm1(x)), then x + mlp(norm2(x)); on (B, H, W, C) maps.

    Odd blocks of a stage shift their windows by half a window. The window, shift and mask are set
    for one map size (`resolution`) and rebuilt by `set_input_size`; with `dynamic_img_size` masks
    for other sizes are built on first use and cached.
    """

    attention_cls: type[_WindowAttentionBase] = WindowAttention

    def __init__(
        self, config: SwinConfig, stage: int, index: int, dim: int, resolution: Window, window: Window, drop_path: float
    ) -> None:
        super().__init__()
        # timm: a block whose first window has no half-window shift (window 1) never shifts
        self.shifted = index % 2 == 1 and any(w // 2 for w in window)
        self.dynamic = config.dynamic_img_size
        self.resolution = resolution
        self.window_size, self.shift_size = fit_window(resolution, window, self.shifted)
        num_heads = config.num_heads[stage]
        self.norm1 = LayerNorm(dim, eps=config.norm_eps)
        self.attn = self.attention_cls(dim, num_heads, self.window_size, config, stage)  # type: ignore[call-arg]  # V1 / V2 subclasses take these
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), config.proj_drop_rate)
        self.drop_path2 = DropPath(drop_path)
        self._mask_cache: dict[tuple, torch.Tensor] = {}
        self.init_buffers()

    def _padded(self, resolution: Window) -> Window:
        return (
            math.ceil(resolution[0] / self.window_size[0]) * self.window_size[0],
            math.ceil(resolution[1] / self.window_size[1]) * self.window_size[1],
        )

    def init_buffers(self) -> None:
        """(Re)compute the non-persistent buffers (mask, position index) on the parameters' device."""
        self.attn.init_buffers()
        self._mask_cache, self._order_cache = {}, {}  # type: ignore[var-annotated]  # typed in __init__ / _order_for
        self._rows_cache: dict[tuple, torch.Tensor] = {}  # see _rows_for
        mask, order = None, (None, None)
        if any(self.shift_size) and not self.dynamic:
            device = self.norm1.weight.device
            padded = self._padded(self.resolution)
            mask = shifted_window_mask(padded, self.window_size, self.shift_size, device)
            if padded == self.resolution:
                order = tuple(t.to(device) for t in shifted_window_order(padded, self.window_size, self.shift_size))  # type: ignore[assignment]
        self.register_buffer("attn_mask", mask, persistent=False)
        self.register_buffer("window_order", order[0], persistent=False)  # (H * W,), see shifted_window_order
        self.register_buffer("window_order_inverse", order[1], persistent=False)

    def set_input_size(self, resolution: Window, window: Window) -> None:
        self.resolution = resolution
        self.window_size, self.shift_size = fit_window(resolution, window, self.shifted)
        self.attn.set_window_size(self.window_size)
        self.init_buffers()

    def _mask_for(self, padded: Window, device: torch.device) -> torch.Tensor | None:
        if not any(self.shift_size):
            return None
        if not self.dynamic:
            return self.attn_mask  # type: ignore[return-value]  # a buffer (Tensor or None)
        if not all(isinstance(s, int) for s in padded):  # symbolic sizes (torch.export): no cache
            return shifted_window_mask(padded, self.window_size, self.shift_size, device)
        key = (padded, device)
        if key not in self._mask_cache:
            self._mask_cache[key] = shifted_window_mask(padded, self.window_size, self.shift_size, device)
        return self._mask_cache[key]

    def _order_for(self, resolution: Window, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The shifted-window gather for an unpadded map (None for unshifted blocks)."""
        if not any(self.shift_size):
            return None
        if not self.dynamic:
            return self.window_order, self.window_order_inverse  # type: ignore[return-value]  # buffers
        key = (resolution, device)
        if key not in self._order_cache:
            order = shifted_window_order(resolution, self.window_size, self.shift_size)
            self._order_cache[key] = tuple(t.to(device) for t in order)
        return self._order_cache[key]

    def _rows_for(self, resolution: Window, device: torch.device) -> torch.Tensor:
        """Each window's token indices in an unpadded (H * W) map, (nW, N), shift included: the kernel's gather."""
        key = (resolution, device)
        if key not in self._rows_cache:
            index, _ = shifted_window_order(resolution, self.window_size, self.shift_size)
            self._rows_cache[key] = index.view(-1, self.window_size[0] * self.window_size[1]).to(device)
        return self._rows_cache[key]

    def windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): roll, pad to whole windows, attend per window, undo."""
        B, H, W, C = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        kernel = self.attn.kernel_applies(x) or self.attn.kernel_trains(x)
        if kernel and H % wh == 0 and W % ww == 0:  # no copies: the kernel gathers
            rows = self._rows_for((H, W), x.device)
            out = self.attn.forward_map(x.reshape(B, H * W, C), rows, self._mask_for((H, W), x.device))
            return out.view(B, H, W, C)
        order = None
        if (sh or sw) and not capturing() and H % wh == 0 and W % ww == 0:
            order = self._order_for((H, W), x.device)
        if order is not None:  # roll + partition as one gather, and back
            windows = permute_tokens(x.reshape(B, H * W, C), *order).view(-1, wh * ww, C)
            windows = self.attn(windows, self._mask_for((H, W), x.device))
            return permute_tokens(windows.reshape(B, H * W, C), order[1], order[0]).view(B, H, W, C)
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        # padded sizes as whole windows (ceil division) and the crop as a negative pad (a copy, not a
        # strided view): both keep torch.export from pinning the graph to the example's size
        Hp, Wp = (H + wh - 1) // wh * wh, (W + ww - 1) // ww * ww
        padded = not (statically_known_true(Hp == H) and statically_known_true(Wp == W))
        if padded:
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        windows = self.attn(window_partition(x, self.window_size), self._mask_for((Hp, Wp), x.device))
        x = window_reverse(windows, self.window_size, Hp, Wp)
        if padded:
            x = F.pad(x, (0, 0, 0, W - Wp, 0, H - Hp))
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.windowed_attention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def init_weights(self) -> None:
        self.attn.init_weights()


class SwinBlockV2(SwinBlock):
    """Swin V2 block (residual post-norm): x + norm1(attn(x)), then x + norm2(mlp(x)); in the
    giant configuration every n-th block of a stage adds a LayerNorm on the main branch (`norm3`)."""

    attention_cls = WindowAttentionV2

    def __init__(
        self, config: SwinConfig, stage: int, index: int, dim: int, resolution: Window, window: Window, drop_path: float
    ) -> None:
        super().__init__(config, stage, index, dim, resolution, window, drop_path)
        n = config.extra_norm_every_n_blocks
        self.norm3 = LayerNorm(dim, eps=config.norm_eps) if n and (index + 1) % n == 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.norm1(self.windowed_attention(x)))
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return self.norm3(x)

    def init_weights(self) -> None:
        super().init_weights()
        # the residual branches start at zero (timm / official init)
        for norm in (self.norm1, self.norm2):
            nn.init.zeros_(norm.weight)
            nn.init.zeros_(norm.bias)


def merge_2x2(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C): each 2x2 neighbourhood's channels side by side.

    Odd sides are zero-padded; the order is (row, col) offsets (0,0), (1,0), (0,1), (1,1), as the
    reference weights expect.
    """
    B, H, W, C = x.shape
    h, w = (H + 1) // 2, (W + 1) // 2  # ceil division: simple symbolic sizes for torch.export
    x = F.pad(x, (0, 0, 0, 2 * w - W, 0, 2 * h - H))
    return x.reshape(B, h, 2, w, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)


class PatchMerging(nn.Module):
    """Swin V1 merging: 2x2 neighbours concatenated, LayerNorm(4C), linear 4C -> out."""

    def __init__(self, dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.norm = LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.reduction, self.norm(merge_2x2(x)))


class PatchMergingV2(nn.Module):
    """Swin V2 merging: 2x2 neighbours concatenated, linear 4C -> out, then LayerNorm(out)."""

    def __init__(self, dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(linear(self.reduction, merge_2x2(x)))


class SwinStage(nn.Module):
    """[patch merging (stages after the first)] then `depth` blocks, alternating plain and shifted windows."""

    def __init__(
        self,
        config: SwinConfig,
        stage: int,
        in_dim: int,
        resolution: Window,
        window: Window,
        drop_paths: list[float],
        block: type[SwinBlock],
        merge: type[nn.Module],
    ) -> None:
        super().__init__()
        dim = config.embed_dim * 2**stage
        self.downsample = merge(in_dim, dim, config.norm_eps) if stage > 0 else nn.Identity()
        self.blocks = nn.ModuleList(
            block(config, stage, j, dim, resolution, window, drop_paths[j]) for j in range(config.depths[stage])
        )
        self.grad_checkpointing = False

    def set_input_size(self, resolution: Window, window: Window) -> None:
        for block in self.blocks:
            block.set_input_size(resolution, window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class ClassifierHead(nn.Module):
    """Average over the map, dropout, linear (parameters `head.fc`, as timm)."""

    def __init__(self, dim: int, num_classes: int, drop: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(1, 2)))  # (B, H, W, C) -> (B, C)
        return x if pre_logits else self.fc(x)


def _stage_resolutions(grid: Window, stages: int) -> list[Window]:
    """Map size of every stage: the patch grid, then halved (rounding up) by each merging."""
    out = [grid]
    for _ in range(stages - 1):
        out.append(tuple((r + 1) // 2 for r in out[-1]))
    return out


def _window_spec(windows: tuple[Window, ...]) -> WindowSpec:
    """The compact config form: one int when every stage has the same square window."""
    if len(set(windows)) == 1 and windows[0][0] == windows[0][1]:
        return windows[0][0]
    return windows


class SwinTransformer(nn.Module):
    """Swin Transformer; pass `block=SwinBlockV2, merge=PatchMergingV2` for Swin V2."""

    def __init__(
        self, config: SwinConfig, block: type[SwinBlock] = SwinBlock, merge: type[nn.Module] = PatchMerging
    ) -> None:
        super().__init__()
        config.validate()
        self.config = config
        stages = len(config.depths)
        self.embed_dim = config.embed_dim
        self.num_features = self.head_hidden_size = config.embed_dim * 2 ** (stages - 1)
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim, norm=True)
        self.patch_embed.norm.eps = config.norm_eps
        windows = config.stage_window_sizes()
        # set_input_size scales these with the patch grid, as timm (keeps each stage's window / map ratio)
        self._ref_window_sizes, self._ref_grid_size = windows, config.grid_size
        rates = drop_path_rates(config.drop_path_rate, sum(config.depths))
        starts = [sum(config.depths[:i]) for i in range(stages)]
        resolutions = _stage_resolutions(config.grid_size, stages)
        self.layers = nn.Sequential(
            *[
                SwinStage(
                    config,
                    i,
                    config.embed_dim * 2 ** max(i - 1, 0),
                    resolutions[i],
                    windows[i],
                    rates[starts[i] : starts[i] + config.depths[i]],
                    block,
                    merge,
                )
                for i in range(stages)
            ]
        )
        self.norm = LayerNorm(self.num_features, eps=config.norm_eps)
        self.head = ClassifierHead(self.num_features, config.num_classes, config.drop_rate)
        self.init_weights()

    # -- construction -------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Truncated-normal init (std 0.02) for linear layers, then each block's own rules."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, SwinBlock):
                m.init_weights()

    def init_buffers(self) -> None:
        """Recompute masks and position indices, e.g. after building on `meta` and loading with assign=True."""
        for m in self.modules():
            if isinstance(m, SwinBlock):
                m.init_buffers()

    def no_weight_decay(self) -> set[str]:
        """Parameter names that the optimiser should not decay (besides norms and biases)."""
        keys = ("relative_position_bias_table", "cpb_mlp", "logit_scale")
        return {n for n, _ in self.named_parameters() if any(k in n for k in keys)}

    # -- resolution ---------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        c = self.config
        check_input_size(x, c.img_size, c.patch_size, c.dynamic_img_size)

    def set_input_size(self, img_size: int | tuple[int, int], window_size: WindowSpec | None = None) -> None:
        """Rebuild windows, masks and position indices for a new input size.

        Without `window_size` each stage's window scales with the patch grid (timm's rule, from the
        size the model was built for); V1 bias tables are resized by interpolation when a window
        changes. Parameters may be replaced: create the optimiser afterwards.
        """
        config = dataclasses.replace(self.config, img_size=to_2tuple(img_size))
        grid = config.grid_size
        if window_size is None:
            windows = tuple(
                tuple(max(1, w * g // r) for w, g, r in zip(ws, grid, self._ref_grid_size))
                for ws in self._ref_window_sizes
            )
        else:
            windows = dataclasses.replace(config, window_size=window_size).stage_window_sizes()
        config = dataclasses.replace(config, window_size=_window_spec(windows))
        config.validate()
        if window_size is not None:  # explicit windows become the reference for later resizes
            self._ref_window_sizes, self._ref_grid_size = windows, grid  # type: ignore[assignment]  # validated pairs
        for stage, resolution, window in zip(self.layers, _stage_resolutions(grid, len(self.layers)), windows):
            stage.set_input_size(resolution, window)
        self.config = config

    # -- forward ------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised last-stage map (B, H/32, W/32, num_features), channels last.

        CPU inference runs each stage over cache-sized slices of the batch (`vitkit.layers.slicing`).
        """
        self._check_input(x)
        x = self.patch_embed(x)
        for stage in self.layers:
            x = in_slices(stage, x, self.training)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None) -> list[torch.Tensor]:
        """Outputs of the chosen stages as (B, C_i, H_i, W_i) maps (the feature pyramid), without the final norm.

        `indices`: an int n for the last n stages, or a list of stage indices (negative from the end).
        """
        take = take_indices(len(self.layers), indices)
        self._check_input(x)
        x = self.patch_embed(x)
        out = []
        for i, stage in enumerate(self.layers[: max(take) + 1]):
            x = stage(x)
            if i in take:
                out.append(x.permute(0, 3, 1, 2).contiguous())
        return out

    # -- utilities ----------------------------------------------------------------------------
    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head's linear layer (a fresh one, or none when num_classes is 0)."""
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        device = self.norm.weight.device
        fc = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if isinstance(fc, nn.Linear):
            nn.init.trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)
        self.head.fc = fc

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass: same gradients, less memory."""
        for stage in self.layers:
            stage.grad_checkpointing = enable  # type: ignore[assignment]  # a SwinStage attribute

    def block_types(self) -> tuple[type[nn.Module], ...]:
        """The transformer block classes (what distributed training wraps one by one)."""
        return (SwinBlock,)


def build_swin(config: SwinConfig) -> SwinTransformer:
    if any(config.pretrained_window_sizes) or config.extra_norm_every_n_blocks:
        raise ValueError(
            "pretrained_window_sizes and extra_norm_every_n_blocks are Swin V2 settings: use a swinv2_* model"
        )
    return SwinTransformer(config)


def build_swinv2(config: SwinConfig) -> SwinTransformer:
    return SwinTransformer(config, block=SwinBlockV2, merge=PatchMergingV2)


# -- variants: defaults equal timm's for the same name ---------------------------------------------
_SIZES = {  # embed_dim, depths, num_heads (Swin paper; SwinV2-G from the V2 paper)
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
    "giant": (512, (2, 2, 42, 4), (16, 32, 64, 128)),
}


def _cfg(size: str, window: int, img: int, **extra) -> SwinConfig:
    dim, depths, heads = _SIZES[size]
    return SwinConfig(img_size=(img, img), embed_dim=dim, depths=depths, num_heads=heads, window_size=window, **extra)


def _variants() -> list[tuple[str, str, SwinConfig]]:
    out = []
    for size in ("tiny", "small", "base", "large"):
        out.append((f"swin_{size}_patch4_window7_224", "swin", _cfg(size, 7, 224)))
    for size in ("base", "large"):
        out.append((f"swin_{size}_patch4_window12_384", "swin", _cfg(size, 12, 384)))
    for size in ("tiny", "small", "base"):
        for window in (8, 16):
            out.append((f"swinv2_{size}_window{window}_256", "swinv2", _cfg(size, window, 256)))
    # ImageNet-22k pre-training at 192 px (21841 classes), and its fine-tunes at larger windows, whose
    # position-bias coordinates keep the pre-training scale (the last stage's map was 6 wide)
    fine_tuned = dict(pretrained_window_sizes=(12, 12, 12, 6))
    for size in ("base", "large"):
        out.append((f"swinv2_{size}_window12_192", "swinv2", _cfg(size, 12, 192, num_classes=21841)))
        out.append((f"swinv2_{size}_window12to16_192to256", "swinv2", _cfg(size, 16, 256, **fine_tuned)))
        out.append((f"swinv2_{size}_window12to24_192to384", "swinv2", _cfg(size, 24, 384, **fine_tuned)))
    # SwinV2-G (V2 paper; not in timm): an extra LayerNorm on the main branch every 6 blocks.
    # With a 1000-class head it has 3.00 B parameters, the paper's figure.
    giant = _cfg("giant", 12, 192, extra_norm_every_n_blocks=6)
    out.append(("swinv2_giant_window12_192", "swinv2", giant))
    return out


_BUILDERS = {"swin": build_swin, "swinv2": build_swinv2}

for _name, _family, _config in _variants():
    register(_name, _family, _config, _BUILDERS[_family])
