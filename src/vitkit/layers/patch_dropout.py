"""PatchDropout (Liu et al., 2022): train on a random subset of the patch tokens.

Each training sample keeps its prefix tokens (class, distillation) and a random
`1 - p` share of its patch tokens; attention and MLP costs shrink with the token count, so
training is faster per image, and it regularises like other dropouts. Evaluation sees every
token (the module is the identity outside training).
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDropout(nn.Module):
    """Keep `prefix` leading tokens and a random `1 - p` share (at least one) of the others."""

    def __init__(self, p: float = 0.0, prefix: int = 1) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"patch_drop_rate must be in [0, 1), got {p}")
        self.p, self.prefix = p, prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        b, n, d = x.shape
        patches = n - self.prefix
        keep = max(1, int(patches * (1.0 - self.p)))
        # a random subset per sample, kept in grid order (B, keep)
        index = torch.rand(b, patches, device=x.device).argsort(dim=1)[:, :keep].sort(dim=1).values
        kept = x[:, self.prefix :].gather(1, index[..., None].expand(-1, -1, d))
        return torch.cat([x[:, : self.prefix], kept], dim=1)

    def extra_repr(self) -> str:
        return f"p={self.p}, prefix={self.prefix}"
