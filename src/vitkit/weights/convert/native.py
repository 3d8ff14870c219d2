"""timm and vitkit checkpoints: vitkit's parameter names are timm's, so nothing is renamed.

Also the official DeiT (v1) release: its models are timm 0.3 `VisionTransformer`s with the same
names (`dist_token`, `head_dist` for the distilled ones).
"""

from __future__ import annotations

import torch

FORMAT = "timm"


def detect(state: dict[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in state


def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(state)
