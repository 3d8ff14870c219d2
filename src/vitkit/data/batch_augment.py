"""The DeiT and DeiT III augmentations beyond crop and flip, per batch: `BatchAugment` and
`batch_random_erasing` act on a float batch (B, C, H, W) in [0, 1] (in-memory data such as
Fashion-MNIST), each image with its own random draw, vectorised: no Python loop over images, which is
what makes augmentation cheap on a 2-core CPU. Same steps and parameters as `vitkit.data.image_augment`.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from vitkit.data.augment_spec import LEVELS, RA_OPS, SIGNED_OPS, RandAugmentSpec, blur_kernel_size


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) luma (ITU-R 601, as PIL and torchvision)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor x + (1 - factor) other, clamped to [0, 1]; factor is per image (B,)."""
    f = _per_image(factor)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _warp(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Resample (B, C, H, W) with per-image affine maps (B, 3, 3) from output to input pixel
    coordinates (continuous, origin at the top-left corner); uncovered pixels become 0."""
    h, w = x.shape[-2:]
    to_norm = x.new_tensor([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]])
    theta = to_norm @ inverse @ torch.linalg.inv(to_norm)  # in grid_sample's [-1, 1] coordinates
    grid = F.affine_grid(theta[:, :2], list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _affine(n: int, x: torch.Tensor) -> torch.Tensor:
    return torch.eye(3, dtype=x.dtype, device=x.device).repeat(n, 1, 1)


def _sharpen(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # PIL's SMOOTH kernel on the interior, border pixels kept (as torchvision's adjust_sharpness)
    c = x.shape[1]
    kernel = x.new_tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13
    smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(x, degenerate, factor)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    flat = hi <= lo  # a constant channel stays as it is
    scale = torch.where(flat, torch.ones_like(hi), 1 / (hi - lo).clamp_min(1e-12))
    return ((x - torch.where(flat, torch.zeros_like(lo), lo)) * scale).clamp_(0, 1)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round_().clamp_(0, 255).to(torch.uint8)


def apply_rand_op(x: torch.Tensor, op: str, level: torch.Tensor) -> torch.Tensor:
    """One RandAugment op on a float batch (n, C, H, W), each image at its own level (n,) in [0, 10]
    (signed ops get a random sign per image); torchvision's value ranges."""
    n, _, h, w = x.shape
    f = level.to(x) / LEVELS
    if op in SIGNED_OPS:
        f = torch.where(torch.rand(n, device=x.device) < 0.5, -f, f)
    if op == "Identity":
        return x
    if op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        m = _affine(n, x)
        if op == "ShearX":  # about the top-left corner, as torchvision's RandAugment
            m[:, 0, 1] = -0.3 * f
        elif op == "ShearY":
            m[:, 1, 0] = -0.3 * f
        elif op == "TranslateX":  # whole pixels, as torchvision
            m[:, 0, 2] = -(150 / 331 * w * f).trunc()
        elif op == "TranslateY":
            m[:, 1, 2] = -(150 / 331 * h * f).trunc()
        else:  # rotation about the centre
            a = torch.deg2rad(30 * f)
            cos, sin = torch.cos(a), torch.sin(a)
            cx, cy = w / 2, h / 2
            m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
            m[:, 0, 2] = cx - cos * cx + sin * cy
            m[:, 1, 2] = cy - sin * cx - cos * cy
        return _warp(x, m)
    if op == "Brightness":
        return _blend(x, torch.zeros_like(x), 1 + 0.9 * f)
    if op == "Color":
        return _blend(x, _grey(x).expand_as(x), 1 + 0.9 * f)
    if op == "Contrast":
        return _blend(x, _grey(x).mean(dim=(-3, -2, -1), keepdim=True).expand_as(x), 1 + 0.9 * f)
    if op == "Sharpness":
        return _sharpen(x, 1 + 0.9 * f)
    if op == "Posterize":
        bits = 8 - (4 * f).round().long()  # (n,) bits kept
        mask = (255 - (2 ** (8 - bits) - 1)).to(torch.uint8)
        return (_to_uint8(x) & _per_image(mask)).float().div_(255).to(x.dtype)
    if op == "Solarize":
        threshold = _per_image(1 - f)
        return torch.where(x >= threshold, 1 - x, x)
    if op == "AutoContrast":
        return _autocontrast(x)
    if op == "Equalize":  # torchvision's kernel equalises each image of a uint8 batch on its own
        return TF.equalize(_to_uint8(x)).float().div_(255).to(x.dtype)
    raise ValueError(f"unknown RandAugment op {op!r}; known: {', '.join(RA_OPS)}")


def batch_rand_augment(x: torch.Tensor, spec: RandAugmentSpec) -> torch.Tensor:
    """RandAugment on a float batch (B, C, H, W) in [0, 1]: per image `num_ops` ops drawn from
    torchvision's 14, each at its own noisy level."""
    x = x.clone()
    for _ in range(spec.num_ops):
        ops = torch.randint(len(RA_OPS), (x.shape[0],))
        levels = spec.sample_levels(x.shape[0])
        for k in ops.unique().tolist():
            idx = (ops == k).nonzero().squeeze(1)
            x[idx] = apply_rand_op(x[idx], RA_OPS[k], levels[idx])
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of (B, C, H, W) with its own sigma (B,), separable, reflect padding."""
    b, c, h, w = x.shape
    size = blur_kernel_size(min(h, w), float(sigma.max()))
    r = size // 2
    t = torch.arange(size, dtype=x.dtype, device=x.device) - r
    k = torch.exp(-(t**2) / (2 * _per_image(sigma).view(-1, 1) ** 2))  # (B, size)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, size)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k.view(b * c, 1, 1, size), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(b * c, 1, size, 1), groups=b * c)
    return y.view(b, c, h, w)


@overload
def batch_three_augment(x: torch.Tensor, return_choice: Literal[False] = False) -> torch.Tensor: ...
@overload
def batch_three_augment(x: torch.Tensor, return_choice: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...
def batch_three_augment(
    x: torch.Tensor, return_choice: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """3-Augment on a float batch (B, C, H, W) in [0, 1]: each image gets exactly one of
    greyscale (0), solarisation (1: values >= 128/255 inverted) and Gaussian blur (2: sigma in
    [0.1, 2]). With `return_choice`, also the (B,) op indices drawn."""
    b = x.shape[0]
    choice = torch.randint(3, (b,), device=x.device)
    grey = _grey(x).expand_as(x)
    solar = torch.where(x >= 0.5, 1 - x, x)  # 0.5 lies between 127/255 and 128/255
    blurred = gaussian_blur(x, torch.empty(b, device=x.device).uniform_(0.1, 2.0))
    c = _per_image(choice)
    out = torch.where(c == 0, grey, torch.where(c == 1, solar, blurred))
    return (out, choice) if return_choice else out


def batch_color_jitter(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation factors each uniform in [1 - s, 1 + s] per image, applied in
    a random order per batch (torchvision's ColorJitter draws the order per image); no hue, as DeiT."""
    b = x.shape[0]

    def factors() -> torch.Tensor:
        return torch.empty(b, device=x.device).uniform_(max(0.0, 1 - strength), 1 + strength)

    for i in torch.randperm(3).tolist():
        if i == 0:
            x = _blend(x, torch.zeros_like(x), factors())
        elif i == 1:
            x = _blend(x, _grey(x).mean(dim=(-3, -2, -1), keepdim=True).expand_as(x), factors())
        else:
            x = _blend(x, _grey(x).expand_as(x), factors())
    return x


def batch_random_erasing(x: torch.Tensor, prob: float, attempts: int = 10) -> torch.Tensor:
    """Random erasing on a normalised batch (B, C, H, W), as `image_random_erasing` per image: with
    probability `prob` a box (2-33% of the area, aspect 0.3-3.3, first of `attempts` draws that fits)
    becomes N(0, 1) noise."""
    b, _, h, w = x.shape
    dev = x.device
    area = h * w * torch.empty(b, attempts, device=dev).uniform_(0.02, 1 / 3)
    aspect = torch.exp(torch.empty(b, attempts, device=dev).uniform_(math.log(0.3), math.log(3.3)))
    bh = torch.sqrt(area * aspect).round().long()
    bw = torch.sqrt(area / aspect).round().long()
    fits = (bh < h) & (bw < w)
    first = fits.float().argmax(dim=1)  # first attempt that fits (0 when none does)
    rows = torch.arange(b, device=dev)
    bh, bw = bh[rows, first], bw[rows, first]
    erase = (torch.rand(b, device=dev) < prob) & fits.any(dim=1)
    top = (torch.rand(b, device=dev) * (h - bh + 1)).long()
    left = (torch.rand(b, device=dev) * (w - bw + 1)).long()
    ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_rows = (ys[None] >= top[:, None]) & (ys[None] < (top + bh)[:, None])  # (B, H)
    in_cols = (xs[None] >= left[:, None]) & (xs[None] < (left + bw)[:, None])  # (B, W)
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]).unsqueeze(1)  # (B, 1, H, W)
    return torch.where(mask, torch.randn_like(x), x)


class BatchAugment:
    """The steps between crop/flip and normalisation for a float batch (B, C, H, W) in [0, 1]:
    RandAugment, or 3-Augment, then colour jitter (off while RandAugment is on, as timm)."""

    def __init__(self, *, auto_augment: str | None = None, three_aug: bool = False, color_jitter: float = 0.0) -> None:
        if auto_augment and three_aug:
            raise ValueError("choose auto_augment (DeiT) or three_augment (DeiT III), not both")
        if color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
        self.rand_augment = RandAugmentSpec.parse(auto_augment) if auto_augment else None
        self.three_aug = three_aug
        self.color_jitter = 0.0 if auto_augment else color_jitter

    @property
    def active(self) -> bool:
        return self.rand_augment is not None or self.three_aug or self.color_jitter > 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rand_augment is not None:
            x = batch_rand_augment(x, self.rand_augment)
        if self.three_aug:
            x = batch_three_augment(x)
        if self.color_jitter > 0:
            x = batch_color_jitter(x, self.color_jitter)
        return x

    def __repr__(self) -> str:
        return (
            f"BatchAugment(rand_augment={self.rand_augment}, three_aug={self.three_aug}, "
            f"color_jitter={self.color_jitter})"
        )
