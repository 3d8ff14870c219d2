"""Shape adaptation of checkpoint tensors to a model: patch-embedding kernels for another patch size
or channel count. Position embeddings and relative-position tables use the helpers in
`vitkit.layers` (`resample_abs_pos_embed`, `rel_pos.resize_rel_pos_bias_table`).

The numbers are timm's (`resample_patch_embed`, `adapt_input_conv`), so a checkpoint adapted here
gives the same model as timm's loader.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resample_patch_embed(
    weight: torch.Tensor,
    new_size: tuple[int, int],
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a (D, C, p, p) patch-embedding kernel to (D, C, p', p').

    FlexiViT's pseudo-inverse resize: with R the matrix that resizes a p x p patch to p' x p',
    the new kernel w' solves <R x, w'> = <x, w> in the least-squares sense, w' = pinv(R)^T w,
    so a p'-patch model on resized images sees what the p-patch model saw.
    """
    old_size = (int(weight.shape[-2]), int(weight.shape[-1]))
    new_size = (int(new_size[0]), int(new_size[1]))  # a list from YAML compares equal to no tuple
    if old_size == new_size:
        return weight
    n_old = old_size[0] * old_size[1]
    # column i of R: basis patch i resized, (p'^2, p^2)
    basis = torch.eye(n_old, dtype=torch.float32, device=weight.device).reshape(n_old, 1, *old_size)
    resized = F.interpolate(basis, size=new_size, mode=interpolation, antialias=antialias, align_corners=False)
    resize_mat = resized.squeeze(1).permute(1, 2, 0).reshape(-1, n_old)
    pinv = torch.linalg.pinv(resize_mat)  # (p^2, p'^2)
    d, c = weight.shape[:2]
    out = weight.reshape(d, c, n_old).float() @ pinv
    return out.reshape(d, c, *new_size).to(weight.dtype)


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a (D, C, k, k) input kernel to `in_chans` channels.

    One channel: the sum over the checkpoint's channels (a grey image is R = G = B, so the response
    is unchanged). Otherwise the channels are repeated cyclically and scaled by C / in_chans, which
    keeps the response to an input with equal channels.
    """
    c = weight.shape[1]
    if in_chans == c:
        return weight
    dtype = weight.dtype
    weight = weight.float()
    if in_chans == 1:
        out = weight.sum(dim=1, keepdim=True)
    else:
        repeat = math.ceil(in_chans / c)
        out = weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (c / in_chans)
    return out.to(dtype)
