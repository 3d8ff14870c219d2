"""ViT, DeiT (distillation token) and DeiT III (LayerScale) in one family.

Parameter names and shapes are timm's, so timm state dicts load without conversion.
Data flow: image (B, C, H, W) -> patch tokens (B, H/p, W/p, D) -> + position embedding, prefix
tokens -> pre-norm blocks -> LayerNorm -> pooled token -> [tanh pre-logits] -> head.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkit.layers import (
    Attention,
    DropPath,
    LayerNorm,
    LayerScale,
    Mlp,
    PatchEmbed,
    drop_path_rates,
    resample_abs_pos_embed,
    sincos_2d_pos_embed,
    trunc_normal_,
)
from vitkit.layers.features import take_indices
from vitkit.layers.patch_dropout import PatchDropout
from vitkit.layers.patch_embed import check_input_size, check_patch_grid
from vitkit.layers.pos_embed import same_size
from vitkit.layers.slicing import in_slices
from vitkit.registry import register, to_2tuple


@dataclass(frozen=True)
class ViTConfig:
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    distilled: bool = False  # DeiT: a distillation token and a second head
    init_values: float | None = None  # LayerScale init (DeiT III); None = no LayerScale
    no_embed_class: bool = False  # position embedding covers the patches only (DeiT III)
    representation_size: int | None = None  # tanh pre-logits layer (ImageNet-21k ViTs)
    global_pool: Literal["token", "avg"] = "token"
    pos_embed: Literal["learned", "sincos2d"] = "learned"
    dynamic_img_size: bool = False  # accept any size divisible by the patch size
    drop_rate: float = 0.0  # head dropout
    pos_drop_rate: float = 0.0  # dropout after adding the position embedding
    proj_drop_rate: float = 0.0  # dropout after attention projection and in the MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    patch_drop_rate: float = 0.0  # PatchDropout: share of patch tokens dropped per training sample
    norm_eps: float = 1e-6

    def validate(self) -> None:
        _check_positive(self, "patch_size", "in_chans", "embed_dim", "depth", "num_heads")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no head), got {self.num_classes}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads}); "
                f"allowed num_heads: {_divisors(self.embed_dim)}"
            )
        check_patch_grid(self.img_size, self.patch_size)
        _check_choice(self, "global_pool", ("token", "avg"))
        _check_choice(self, "pos_embed", ("learned", "sincos2d"))
        if self.global_pool == "token" and self.pos_embed == "sincos2d" and not self.no_embed_class:
            raise ValueError("pos_embed='sincos2d' covers patches only: set no_embed_class=True")
        if self.distilled and self.global_pool != "token":
            raise ValueError("distilled=True needs global_pool='token' (the heads read the tokens)")
        for name in (
            "drop_rate",
            "pos_drop_rate",
            "proj_drop_rate",
            "attn_drop_rate",
            "drop_path_rate",
            "patch_drop_rate",
        ):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)


def _check_positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_choice(config, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(config, name) not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(config, name)!r}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Block(nn.Module):
    """Pre-norm transformer block; with `init_values` each branch gets a LayerScale (DeiT III)."""

    def __init__(self, config: ViTConfig, drop_path: float) -> None:
        super().__init__()
        dim, eps = config.embed_dim, config.norm_eps

        def scale() -> nn.Module:
            return LayerScale(dim, config.init_values) if config.init_values is not None else nn.Identity()

        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, config.num_heads, config.qkv_bias, config.attn_drop_rate, config.proj_drop_rate)
        self.ls1 = scale()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), config.proj_drop_rate)
        self.ls2 = scale()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class PreLogits(nn.Module):
    """The ImageNet-21k ViTs' representation layer: Linear + tanh (parameters `pre_logits.fc`)."""

    def __init__(self, dim: int, representation_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, representation_size)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class VisionTransformer(nn.Module):
    num_prefix_tokens_extra = 0  # tokens besides the class token (DeiT adds a distillation token)

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.num_prefix_tokens = 1 + self.num_prefix_tokens_extra if config.global_pool == "token" else 0
        self.num_features = self.head_hidden_size = config.representation_size or dim
        self.embed_dim = dim
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if self.num_prefix_tokens else None
        self._add_extra_tokens(dim)
        if config.pos_embed == "learned":
            n_pos = config.grid_size[0] * config.grid_size[1]
            n_pos += 0 if config.no_embed_class else self.num_prefix_tokens
            self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, dim))
        else:  # fixed: a buffer, not saved with the weights
            self.register_buffer("pos_embed", sincos_2d_pos_embed(config.grid_size, dim), persistent=False)
        self.pos_drop = nn.Dropout(config.pos_drop_rate)
        self.patch_drop = PatchDropout(config.patch_drop_rate, self.num_prefix_tokens)
        rates = drop_path_rates(config.drop_path_rate, config.depth)
        self.blocks = nn.Sequential(*[Block(config, rates[i]) for i in range(config.depth)])
        # timm's layout: with average pooling the final norm is applied after pooling (fc_norm)
        avg = config.global_pool == "avg"
        self.norm = nn.Identity() if avg else LayerNorm(dim, eps=config.norm_eps)
        self.fc_norm = LayerNorm(dim, eps=config.norm_eps) if avg else nn.Identity()
        self.pre_logits = PreLogits(dim, config.representation_size) if config.representation_size else nn.Identity()
        self.head_drop = nn.Dropout(config.drop_rate)
        self.head = self._make_head(config.num_classes)
        self.init_weights()

    # -- construction -------------------------------------------------------------------------
    def _add_extra_tokens(self, dim: int) -> None:
        """Hook for prefix tokens besides the class token (DeiT's distillation token)."""

    def _make_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _prefix_tokens(self) -> list[torch.Tensor]:
        return [self.cls_token] if self.cls_token is not None else []

    def init_weights(self) -> None:
        """Truncated-normal init (std 0.02) for linear layers and the position embedding."""
        if isinstance(self.pos_embed, nn.Parameter):
            trunc_normal_(self.pos_embed, 0.02)
        for token in self._prefix_tokens():
            nn.init.normal_(token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that the optimiser should not decay (besides norms and biases)."""
        return {"pos_embed", "cls_token", "dist_token"}

    # -- resolution ---------------------------------------------------------------------------
    def _grid_for(self, x: torch.Tensor) -> tuple[int, int]:
        c = self.config
        h, w = check_input_size(x, c.img_size, c.patch_size, c.dynamic_img_size)
        p = c.patch_size
        return h // p, w // p

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        if self.config.pos_embed == "sincos2d":
            if same_size(grid, self.config.grid_size):
                return self.pos_embed
            return sincos_2d_pos_embed(grid, self.embed_dim).to(self.pos_embed)
        prefix = 0 if self.config.no_embed_class else self.num_prefix_tokens
        return resample_abs_pos_embed(self.pos_embed, grid, self.config.grid_size, prefix)

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Rebuild for a new input size, resampling the position embedding permanently."""
        config = replace(self.config, img_size=to_2tuple(img_size))
        config.validate()
        with torch.no_grad():
            new = self._pos_embed_for(config.grid_size)
        if isinstance(self.pos_embed, nn.Parameter):
            self.pos_embed = nn.Parameter(new.detach().clone())
        else:
            self.register_buffer("pos_embed", new, persistent=False)
        self.config = config

    # -- forward ------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        grid = self._grid_for(x)
        x = self.patch_embed(x).flatten(1, 2)  # (B, N, D)
        pos = self._pos_embed_for(grid)
        prefix = [t.expand(x.shape[0], -1, -1) for t in self._prefix_tokens()]
        if self.config.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return self.patch_drop(self.pos_drop(x))

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, prefix + N, D)."""
        x = self._embed(x)
        recording = any(m.record_attn for m in self.attention_modules())  # last_attn holds the whole batch
        return self.norm(in_slices(self._run_blocks, x, self.training or recording))

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks; CPU inference runs them over cache-sized slices of the batch (`vitkit.layers.slicing`)."""
        for block in self.blocks:
            x = self._run_block(block, x)
        return x

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(self.fc_norm(self._pool(x)))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None) -> list[torch.Tensor]:
        """Outputs of the chosen blocks as (B, D, H/p, W/p) maps, without the final norm.

        `indices`: an int n for the last n blocks, or a list of block indices (negative from the end).
        """
        take = take_indices(len(self.blocks), indices)
        grid = self._grid_for(x)
        x = self._embed(x)
        out = []
        for i, block in enumerate(self.blocks[: max(take) + 1]):
            x = self._run_block(block, x)
            if i in take:
                patches = x[:, self.num_prefix_tokens :]
                out.append(patches.reshape(x.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous())
        return out

    # -- utilities ----------------------------------------------------------------------------
    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head (a fresh linear layer, or none when num_classes is 0)."""
        self.config = replace(self.config, num_classes=num_classes)
        device = self.patch_embed.proj.weight.device
        self.head = self._make_head(num_classes).to(device)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, 0.02)
            nn.init.zeros_(self.head.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass: same gradients, less memory."""
        self.grad_checkpointing = enable

    def attention_modules(self) -> list[Attention]:
        return [block.attn for block in self.blocks]  # type: ignore[misc]  # Module attributes are Tensor | Module to mypy

    def block_types(self) -> tuple[type[nn.Module], ...]:
        """The transformer block classes (what distributed training wraps one by one)."""
        return (Block,)


class DistilledVisionTransformer(VisionTransformer):
    """DeiT with a distillation token: a second prefix token read by a second head.

    `forward` returns the mean of both heads' logits, except in train mode after
    `set_distilled_training(True)`, when it returns (class_logits, distillation_logits).
    """

    num_prefix_tokens_extra = 1

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        self.distilled_training = False

    def _add_extra_tokens(self, dim: int) -> None:
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))

    def _make_head(self, num_classes: int) -> nn.Module:
        self.head_dist = super()._make_head(num_classes)
        return super()._make_head(num_classes)

    def _prefix_tokens(self) -> list[torch.Tensor]:
        return [self.cls_token, self.dist_token]  # type: ignore[list-item]  # both are set in __init__

    def init_weights(self) -> None:
        super().init_weights()
        trunc_normal_(self.dist_token, 0.02)

    def reset_classifier(self, num_classes: int) -> None:
        super().reset_classifier(num_classes)
        device = self.patch_embed.proj.weight.device
        self.head_dist = self.head_dist.to(device)
        if isinstance(self.head_dist, nn.Linear):
            trunc_normal_(self.head_dist.weight, 0.02)
            nn.init.zeros_(self.head_dist.bias)

    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        cls, dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (cls + dist) / 2
        cls, dist = self.head(cls), self.head_dist(dist)
        if self.distilled_training and self.training:
            return cls, dist  # type: ignore[return-value]  # distilled training: (class, distillation) logits
        return (cls + dist) / 2


def build_vit(config: ViTConfig) -> VisionTransformer:
    cls = DistilledVisionTransformer if config.distilled else VisionTransformer
    return cls(config)


# -- variants: (name, family, config fields); defaults equal timm's for the same name ----------
_SIZES = {  # embed_dim, depth, num_heads (ViT paper, DeiT paper, DeiT III's "medium")
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "medium": (512, 12, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


def _cfg(size: str, patch: int, img: int, **extra) -> ViTConfig:
    dim, depth, heads = _SIZES[size]
    return ViTConfig(img_size=(img, img), patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, **extra)


def _variants() -> list[tuple[str, str, ViTConfig]]:
    out = []
    for size in ("tiny", "small", "base", "large"):
        for img in (224, 384):
            out.append((f"vit_{size}_patch16_{img}", "vit", _cfg(size, 16, img)))
    for size in ("small", "base", "large"):
        for img in (224, 384):
            # timm's default weights for vit_large_patch32_224 are ImageNet-21k features: no head
            classes = 0 if (size, img) == ("large", 224) else 1000
            out.append((f"vit_{size}_patch32_{img}", "vit", _cfg(size, 32, img, num_classes=classes)))
    out.append(("vit_huge_patch14_224", "vit", _cfg("huge", 14, 224, num_classes=0)))
    # the original ImageNet-21k ViTs: tanh pre-logits layer of width embed_dim, 21843 classes
    for size, patch in (("base", 16), ("base", 32), ("large", 16), ("large", 32), ("huge", 14)):
        dim = _SIZES[size][0]
        cfg = _cfg(size, patch, 224, num_classes=21843, representation_size=dim)
        out.append((f"vit_{size}_patch{patch}_224_in21k", "vit", cfg))
    for size in ("tiny", "small", "base"):
        out.append((f"deit_{size}_patch16_224", "deit", _cfg(size, 16, 224)))
        out.append((f"deit_{size}_distilled_patch16_224", "deit", _cfg(size, 16, 224, distilled=True)))
    out.append(("deit_base_patch16_384", "deit", _cfg("base", 16, 384)))
    out.append(("deit_base_distilled_patch16_384", "deit", _cfg("base", 16, 384, distilled=True)))
    deit3 = dict(no_embed_class=True, init_values=1e-6)
    for size in ("small", "medium", "base", "large"):
        out.append((f"deit3_{size}_patch16_224", "deit3", _cfg(size, 16, 224, **deit3)))
    for size in ("small", "base", "large"):
        out.append((f"deit3_{size}_patch16_384", "deit3", _cfg(size, 16, 384, **deit3)))
    out.append(("deit3_huge_patch14_224", "deit3", _cfg("huge", 14, 224, **deit3)))
    return out


for _name, _family, _config in _variants():
    register(_name, _family, _config, build_vit)
