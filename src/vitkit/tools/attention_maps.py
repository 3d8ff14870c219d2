"""Where a model looks: attention rollout and last-layer attention for ViT / DeiT, class activation
maps for Swin; maps upsampled and overlaid on the image as a PNG.

- rollout (Abnar & Zuidema, 2020): per layer, average the heads, add the identity for the residual
  path and renormalise the rows; multiply the layers together. The map is the row of the token(s)
  the head reads (class token; class and distillation tokens for DeiT; every patch for average
  pooling), over the patch columns (prefix tokens dropped).
- last: the same rows of the last layer's head-averaged attention.
- cam (Swin): the head is a linear layer on average-pooled features, so the logit of class c is the
  mean over positions of W_c . f(h, w) + b_c; the map is W_c . f(h, w) of the last stage (after the
  final norm), clipped at zero: class activation mapping, exact for this head, no gradients.

Attention weights are computed beside the fused kernel (`Attention.record_attn`): logits are
unchanged while they are recorded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.core.files import save_figure
from vitkit.models.swin import SwinTransformer

Method = Literal["rollout", "last", "cam"]


@dataclass(frozen=True)
class AttentionMap:
    heat: torch.Tensor  # (h, w) on the token grid, non-negative, summing to 1
    method: str
    class_index: int  # the predicted class (or the class asked for, with cam)
    logits: torch.Tensor  # (num_classes,)


def is_swin(model: nn.Module) -> bool:
    return isinstance(model, SwinTransformer)


def default_method(model: nn.Module) -> Method:
    # last: on trained Fashion-MNIST ViTs it is the sharper map (docs/RESULTS.md: 64% of its mass on the
    # garment vs 54% for rollout); rollout stays one flag away
    return "cam" if is_swin(model) else "last"


# -- ViT / DeiT: recorded attention ----------------------------------------------------------------
def record_attention(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and every block's attention weights (B, heads, N, N) for one forward pass."""
    modules = model.attention_modules()
    for m in modules:
        m.record_attn = True
    try:
        with torch.no_grad():
            logits = model(x)
        attns = [m.last_attn for m in modules]
    finally:
        for m in modules:
            m.record_attn, m.last_attn = False, None
    return logits, attns


def _reader_rows(model: nn.Module, num_tokens: int) -> list[int]:
    """The tokens whose final state the head reads."""
    prefix = model.num_prefix_tokens
    if model.config.global_pool == "avg":
        return list(range(prefix, num_tokens))
    return [0, 1] if getattr(model.config, "distilled", False) else [0]  # DeiT averages both heads


def rollout(attns: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (B, N, N): the product over layers of (mean over heads + I), row-normalised."""
    b, _, n, _ = attns[0].shape
    eye = torch.eye(n, dtype=attns[0].dtype, device=attns[0].device)
    joint = eye.expand(b, n, n)
    for a in attns:
        a = a.mean(dim=1) + eye  # the residual path keeps half of each token
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a @ joint
    return joint


def vit_attention_map(
    model: nn.Module, x: torch.Tensor, method: Literal["rollout", "last"] = "rollout"
) -> list[AttentionMap]:
    """One map per image of `x` (B, C, H, W) on the (H/p, W/p) patch grid."""
    if method not in ("rollout", "last"):
        raise ValueError(f"method for ViT / DeiT must be rollout or last, got {method!r}")
    logits, attns = record_attention(model, x)
    if isinstance(logits, tuple):  # distilled training mode: both heads
        logits = (logits[0] + logits[1]) / 2
    joint = rollout(attns) if method == "rollout" else attns[-1].mean(dim=1)  # (B, N, N)
    n = joint.shape[-1]
    rows = _reader_rows(model, n)
    heat = joint[:, rows, model.num_prefix_tokens :].mean(dim=1)  # (B, patches)
    p = model.config.patch_size
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    heat = heat.reshape(-1, *grid)
    return [_make(h, method, lg) for h, lg in zip(heat, logits)]


# -- Swin: class activation map --------------------------------------------------------------------
def class_activation_maps(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, K) and every class's activation map (B, K, h, w) on the last stage; the maps'
    means plus the head's bias are the logits."""
    fc = model.head.fc
    if not isinstance(fc, nn.Linear):
        raise ValueError("cam needs a classification head (the model was built with num_classes=0)")
    with torch.no_grad():
        feats = model.forward_features(x)  # (B, h, w, C) after the final norm
        logits = model.forward_head(feats)
        cams = torch.einsum("bhwc,kc->bkhw", feats, fc.weight)
    return logits, cams


def class_activation_map(model: nn.Module, x: torch.Tensor, class_index: int | None = None) -> list[AttentionMap]:
    """One CAM per image, for `class_index` or else the predicted class, clipped at zero."""
    logits, cams = class_activation_maps(model, x)
    out = []
    for b in range(x.shape[0]):
        k = int(logits[b].argmax()) if class_index is None else class_index
        if not 0 <= k < cams.shape[1]:
            raise ValueError(f"class index {k} is out of range: the model has {cams.shape[1]} classes")
        out.append(_make(cams[b, k], "cam", logits[b], k))
    return out


def _make(heat: torch.Tensor, method: str, logits: torch.Tensor, k: int | None = None) -> AttentionMap:
    heat = heat.float().clamp(min=0)
    total = heat.sum()
    heat = heat / total if total > 0 else torch.full_like(heat, 1 / heat.numel())
    k = int(logits.argmax()) if k is None else k
    return AttentionMap(heat.cpu(), method, k, logits.detach().float().cpu())


def attention_map(
    model: nn.Module, x: torch.Tensor, method: Method | None = None, class_index: int | None = None
) -> list[AttentionMap]:
    """Maps for a batch (B, C, H, W): rollout / last for ViT and DeiT, cam for Swin (the default
    per family when `method` is None). `class_index` picks the class for cam (default: predicted)."""
    model = model.eval()
    method = method or default_method(model)
    if is_swin(model):
        if method != "cam":
            raise ValueError(
                f"Swin attends within windows and has no class token: {method} is for ViT / DeiT, use --method cam"
            )
        return class_activation_map(model, x, class_index)
    if method == "cam":
        raise ValueError("cam is for Swin (average pooling into a linear head): use rollout or last for ViT / DeiT")
    if class_index is not None:
        raise ValueError("--class-index applies to cam only: rollout and last maps do not depend on the class")
    if not hasattr(model, "attention_modules"):
        raise ValueError(f"{type(model).__name__} has no recordable attention: rollout needs a ViT / DeiT")
    return vit_attention_map(model, x, method)


def upsample(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) -> (H, W), bilinear, still summing to 1."""
    up = F.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].clamp(min=0)
    return up / up.sum()


# -- the picture -----------------------------------------------------------------------------------
def save_overlay(image: torch.Tensor, amap: AttentionMap, path: str | os.PathLike, title: str | None = None) -> None:
    """Write a PNG: the image (C, H, W in [0, 1]) beside it with the upsampled map overlaid."""
    import matplotlib  # noqa: PLC0415  about a second of start-up: only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  after matplotlib.use

    h, w = image.shape[-2:]
    heat = upsample(amap.heat, (h, w))
    heat_image = (heat / heat.max()).numpy()
    pixels = image.permute(1, 2, 0).clamp(0, 1).numpy()
    grey = pixels.shape[-1] == 1
    pixels = pixels[..., 0] if grey else pixels
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    for ax in axes:
        ax.imshow(pixels, cmap="gray" if grey else None, vmin=0, vmax=1)
        ax.axis("off")
    axes[1].imshow(heat_image, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[0].set_title("input")
    axes[1].set_title(title or f"{amap.method} (class {amap.class_index})")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
