"""SimMIM (Xie et al., 2022): pre-train an unchanged encoder by regressing the pixels of masked patches.

Data flow: image (B, C, H, W) and mask (B, H/p, W/p) at the model's patch resolution ->
encoder.patch_embed -> tokens of masked patches replaced by one learnable mask token -> the rest of
the encoder (ViT blocks, or Swin stages) -> final feature map (B, D, H/s, W/s), s = encoder stride
-> 1x1 conv to s*s*C channels -> pixel shuffle -> reconstruction (B, C, H, W) -> L1 on masked pixels.

Masks are drawn per image: a fraction `mask_ratio` of the (mask_patch x mask_patch) cells, each cell
covering (mask_patch / p)^2 model patches. The paper's setting: 60% of 32x32 cells at 192 px.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from vitkit.core.files import save_figure
from vitkit.factory import create_model
from vitkit.layers import trunc_normal_
from vitkit.registry import to_2tuple
from vitkit.train.engine import BatchLoss
from vitkit.train.parallel import all_reduce_sum, unwrap
from vitkit.weights.checkpoint import load_checkpoint
from vitkit.weights.vitkit_format import save_model

HEAD_PREFIXES = ("head.", "head_dist.")  # classifier parameters: absent from a pre-trained encoder


# -- masks --------------------------------------------------------------------------------------
class MaskGenerator:
    """Random masks of mask-patch cells, returned at the model's patch resolution.

    Rules (ValueError otherwise): `mask_patch_size` is a multiple of `model_patch_size`, and divides
    both image sides. Each image gets exactly ceil(mask_ratio * cells) masked cells (SimMIM's count;
    a product within 1e-6 of an integer counts as that integer, so 0.7 x 10 masks 7), chosen
    uniformly without replacement.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int],
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
    ) -> None:
        self.img_size = to_2tuple(img_size)
        if mask_patch_size <= 0 or model_patch_size <= 0:
            raise ValueError(
                f"mask patch size ({mask_patch_size}) and model patch size ({model_patch_size}) must be positive"
            )
        if mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask patch size {mask_patch_size} must be a multiple of the model's patch size "
                f"{model_patch_size}: use e.g. {model_patch_size * max(1, round(mask_patch_size / model_patch_size))}"
            )
        for side in self.img_size:
            if side % mask_patch_size:
                raise ValueError(
                    f"mask patch size {mask_patch_size} must divide the image size {self.img_size}: "
                    f"choose a multiple of {model_patch_size} that divides {side}, or resize the images"
                )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {mask_ratio} (SimMIM uses 0.6)")
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.grid = (self.img_size[0] // mask_patch_size, self.img_size[1] // mask_patch_size)
        self.scale = mask_patch_size // model_patch_size  # model patches per cell side
        self.num_cells = self.grid[0] * self.grid[1]
        self.num_masked = math.ceil(mask_ratio * self.num_cells - 1e-6)

    def __call__(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """A boolean mask (B, H / model_patch, W / model_patch); True = masked."""
        # a random permutation per image: the first num_masked cells are masked
        order = torch.rand(batch_size, self.num_cells, generator=generator).argsort(dim=1)
        cells = torch.zeros(batch_size, self.num_cells, dtype=torch.bool)
        cells.scatter_(1, order[:, : self.num_masked], True)
        cells = cells.view(batch_size, *self.grid)
        mask = cells.repeat_interleave(self.scale, dim=1).repeat_interleave(self.scale, dim=2)
        return mask.to(device) if device is not None else mask

    def __repr__(self) -> str:
        return (
            f"MaskGenerator(img_size={self.img_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio}, "
            f"masked={self.num_masked}/{self.num_cells} cells)"
        )


def upsample_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, h, w) patch mask -> (B, 1, h * p, w * p) pixel mask."""
    return mask.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2).unsqueeze(1)


def masked_l1_loss(
    reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Mean absolute error over the masked pixels only: sum |x - y| over masked pixels and channels,
    divided by (masked pixels x channels), as the paper. Unmasked pixels do not reach the loss or
    its gradient (not even as NaN)."""
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} differ")
    pixels = upsample_mask(mask, patch_size).expand_as(target)  # (B, C, H, W)
    error = torch.where(pixels, (reconstruction - target).abs(), reconstruction.new_zeros(()))
    return error.sum() / pixels.sum().clamp_min(1)


# -- the model ------------------------------------------------------------------------------------
def encoder_geometry(encoder: nn.Module) -> tuple[int, int, int]:
    """(patch size, output stride, output channels) of a vitkit ViT or Swin encoder."""
    config = getattr(encoder, "config", None)
    if config is None or not hasattr(encoder, "patch_embed") or not hasattr(encoder, "forward_features"):
        raise ValueError(f"SimMIM needs a vitkit ViT / DeiT / Swin / Swin V2 encoder; got {type(encoder).__name__}")
    if hasattr(config, "depths"):  # Swin: each stage after the first halves the map
        stride = config.patch_size * 2 ** (len(config.depths) - 1)
        features: int = encoder.num_features  # type: ignore[assignment]  # Module types attributes as Tensor | Module
        return config.patch_size, stride, features
    embed_dim: int = encoder.embed_dim  # type: ignore[assignment]  # Module types attributes as Tensor | Module
    return config.patch_size, config.patch_size, embed_dim


class SimMIM(nn.Module):
    """An unchanged encoder, a learnable mask token and a one-layer pixel decoder.

    `forward(images, mask)` returns the reconstruction (B, C, H, W); `mask` is (B, H/p, W/p) bool
    at the encoder's patch size p (`MaskGenerator` makes it). The mask token replaces the masked
    tokens at the patch-embedding output (after Swin's patch norm), as the paper.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.patch_size, self.stride, features = encoder_geometry(encoder)
        self.in_chans = encoder.config.in_chans
        self.encoder = encoder
        embed_dim: int = encoder.embed_dim  # type: ignore[assignment]  # Module types attributes as Tensor | Module
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))  # NHWC, as patch_embed
        trunc_normal_(self.mask_token, 0.02)
        # (B, D, h, w) -> (B, s*s*C, h, w) -> (B, C, h*s, w*s)
        self.decoder = nn.Sequential(
            nn.Conv2d(features, self.stride**2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.stride),
        )
        for side in encoder.config.img_size:
            if side % self.stride:
                raise ValueError(
                    f"image size {tuple(encoder.config.img_size)} must be a multiple of the encoder's output "
                    f"stride {self.stride} for the reconstruction to cover the image (Swin: patch x 2^(stages-1))"
                )

    def no_weight_decay(self) -> set[str]:
        """Parameter names not to decay besides norms and biases (the encoder's and the mask token)."""
        inner: set[str] = getattr(self.encoder, "no_weight_decay", lambda: set())()
        return {f"encoder.{n}" for n in inner} | {"mask_token"}

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B, H/p, W/p) -> final feature map (B, D, H/s, W/s)."""
        B, _, H, W = images.shape
        grid = (H // self.patch_size, W // self.patch_size)
        if tuple(mask.shape) != (B, *grid):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit images {tuple(images.shape)}: "
                f"expected (B, H/{self.patch_size}, W/{self.patch_size}) = {(B, *grid)}"
            )
        calls = []

        def substitute(module: nn.Module, args: Any, tokens: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            # tokens (B, h, w, D); masked positions take the mask token
            return torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)

        # the encoder runs its own forward_features; the hook lives for this call only
        handle = self.encoder.patch_embed.register_forward_hook(substitute)
        try:
            features = self.encoder.forward_features(images)
        finally:
            handle.remove()
        if len(calls) != 1:
            raise RuntimeError(f"{type(self.encoder).__name__}.forward_features called patch_embed {len(calls)} times")
        if features.dim() == 3:  # ViT tokens (B, prefix + N, D): drop class / distillation tokens
            tokens = features[:, self.encoder.num_prefix_tokens :]
            return tokens.transpose(1, 2).reshape(B, -1, H // self.stride, W // self.stride)
        return features.permute(0, 3, 1, 2)  # Swin map (B, h, w, D) -> (B, D, h, w)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(images, mask))


def build_simmim(name: str, **overrides: Any) -> SimMIM:
    """SimMIM around `create_model(name, num_classes=0, **overrides)` (the encoder has no head)."""
    overrides["num_classes"] = 0
    return SimMIM(create_model(name, **overrides))


# -- saving the encoder ----------------------------------------------------------------------------
def save_encoder(model: SimMIM, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the encoder alone in the vitkit format (name and config in metadata, no head)."""
    save_model(model.encoder, path, {"pretrained_with": "simmim", **(metadata or {})})


def load_encoder(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a pre-trained encoder into `model` (built with `create_model`) through
    `vitkit.load_checkpoint`; return the keys left as initialised (the classifier head). Anything else
    that does not fit exactly is one error and nothing is loaded."""
    report = load_checkpoint(model, path)
    return sorted(report.reinitialised)


# -- what pre-training adds to the engine: the batch loss and the metric ---------------------------
def _images(batch: Any) -> torch.Tensor:
    """Labelled (images, labels) or unlabelled (images) batches: the images."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _masked_l1(
    model: nn.Module, batch: Any, masks: MaskGenerator, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, int]:
    images = _images(batch).to(device, non_blocking=True)
    mask = masks(images.shape[0], generator).to(device, non_blocking=True)  # drawn on the CPU
    reconstruction = model(images, mask)
    return masked_l1_loss(reconstruction.float(), images, mask, unwrap(model).patch_size), images.shape[0]


def masked_image_loss(
    masks: MaskGenerator, generator: torch.Generator | None, device: torch.device | str = "cpu"
) -> BatchLoss:
    """The engine's `BatchLoss` for SimMIM: masks drawn from `generator`, the masked L1 loss of the
    reconstruction. The model is a `SimMIM` (or a DDP wrapper of one); labels in a batch are ignored."""
    device = torch.device(device)
    return lambda model, batch: _masked_l1(model, batch, masks, generator, device)


class MaskedL1Metrics:
    """The engine's `Metrics` for SimMIM: val_loss, the masked L1 loss over the loader (mean over
    images, over all ranks) with masks drawn from `seed`: the same masks every pass."""

    def __init__(self, masks: MaskGenerator, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.masks, self.device = masks, torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # [loss sum, images]

    def update(self, model: nn.Module, batch: Any) -> None:
        loss, n = _masked_l1(model, batch, self.masks, self.generator, self.device)
        self.totals += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=self.device)

    def compute(self, elapsed: float) -> dict[str, Any]:
        totals = all_reduce_sum(self.totals)
        return {"val_loss": float(totals[0] / totals[1].clamp(min=1))}


def save_reconstructions(
    path: str | os.PathLike,
    images: torch.Tensor,
    mask: torch.Tensor,
    reconstruction: torch.Tensor,
    patch_size: int,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> None:
    """A PNG with one row per image: input, masked input, reconstruction, and the reconstruction
    pasted into the masked patches only. `mean` / `std` undo the input normalisation for display."""
    import matplotlib  # noqa: PLC0415  about a second of start-up: only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  after matplotlib.use

    images, reconstruction = images.detach().float().cpu(), reconstruction.detach().float().cpu()
    pixels = upsample_mask(mask.cpu(), patch_size).expand_as(images)
    C = images.shape[1]
    m = torch.tensor(mean if mean is not None else (0.0,) * C).view(1, C, 1, 1)
    s = torch.tensor(std if std is not None else (1.0,) * C).view(1, C, 1, 1)
    shown, rebuilt = (images * s + m).clamp(0, 1), (reconstruction * s + m).clamp(0, 1)
    # shown as RGB (greyscale repeated; extra channels dropped), so masked patches can take a colour
    keep = (lambda t: t[:, :3]) if C >= 3 else (lambda t: t[:, :1].expand(-1, 3, -1, -1))
    shown, rebuilt, pixels = keep(shown), keep(rebuilt), keep(pixels)
    tint = torch.tensor([0.25, 0.45, 0.85]).view(1, 3, 1, 1).expand_as(shown)
    columns = {
        "input": shown,
        "masked": torch.where(pixels, tint, shown),
        "reconstruction": rebuilt,
        "visible + reconstructed": torch.where(pixels, rebuilt, shown),
    }
    n = images.shape[0]
    fig, axes = plt.subplots(n, len(columns), figsize=(2 * len(columns), 2 * n), squeeze=False)
    for col, (title, batch) in enumerate(columns.items()):
        for row in range(n):
            ax = axes[row][col]
            ax.imshow(batch[row].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
