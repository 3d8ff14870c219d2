"""LAMB (You et al., 2019), the optimiser of DeiT III's pre-training, as NVIDIA apex's FusedLAMB
computes it (DeiT III's `--opt fusedlamb`); torch.optim has no LAMB.

Per step: gradients are scaled down together when their global norm exceeds `max_grad_norm`;
Adam moments with bias correction give the update m / (sqrt(v) + eps), weight decay is added to it,
and for parameters with weight decay the update is rescaled by the trust ratio ||w|| / ||update||.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import overload

import torch


class Lamb(torch.optim.Optimizer):
    """LAMB with apex FusedLAMB's defaults (eps 1e-6, global gradient-norm clip 1.0, no trust ratio
    for parameters without weight decay)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError("Lamb needs lr > 0, eps > 0, weight_decay >= 0 and betas in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm

    def _grad_scale(self) -> torch.Tensor | float:
        """Divisor for every gradient: global norm / max_grad_norm when above 1."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.max_grad_norm is None or not grads:
            return 1.0
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return (norm / self.max_grad_norm).clamp(min=1.0)

    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = self._grad_scale()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad / scale
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
                if wd:
                    update.add_(p, alpha=wd)
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                    update.mul_(trust)
                p.add_(update, alpha=-lr)
        return loss
