"""The transformer feed-forward block."""

from __future__ import annotations

import torch
from torch import nn

from vitkit.layers.linear import linear, release_training_buffers


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout (parameter names fc1 / fc2, as timm)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def train(self, mode: bool = True) -> Mlp:
        if not mode:  # eval: fc1's GELU slope (activation-sized) and the layers' bf16 copies are not needed
            release_training_buffers(self)
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.act
        if type(act) is nn.GELU and act.approximate == "none" and not (act._forward_hooks or act._forward_pre_hooks):
            # fc1 and its GELU in one call: fused where `linear` has a kernel for it (inference; training where
            # `gelu_kernel_trains`)
            h = linear(self.fc1, x, gelu=True)
        else:
            h = act(linear(self.fc1, x))
        if not self.training:
            return linear(self.fc2, h)  # dropout is the identity in eval
        return self.drop2(linear(self.fc2, self.drop1(h)))
