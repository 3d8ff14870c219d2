"""AdamW without weight decay on norms, biases, tokens and position embeddings; warm-up then cosine."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


def no_decay(name: str, param: nn.Parameter, skip: set[str], keywords: set[str]) -> bool:
    """Norm weights, biases (ndim <= 1) and the model's named tokens/embeddings get no weight decay."""
    return param.ndim <= 1 or name in skip or name.rsplit(".", 1)[-1] in skip or any(k in name for k in keywords)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights and the rest (see `no_decay`)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    keywords = set(model.no_weight_decay_keywords()) if hasattr(model, "no_weight_decay_keywords") else set()
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if no_decay(name, param, skip, keywords) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: Sequence[float] = (0.9, 0.999), name: str = "adamw"
) -> torch.optim.Optimizer:
    """AdamW, or LAMB (DeiT III; `vitkit.train.lamb`), over `param_groups`."""
    if name == "lamb":
        from vitkit.train.lamb import Lamb

        return Lamb(param_groups(model, weight_decay), lr=lr, betas=tuple(betas))
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float
) -> LRScheduler:
    """Linear warm-up from `warmup_lr` over `warmup_steps`, then cosine to `min_lr`; step once per
    optimiser step."""
    base_lr = optimizer.param_groups[0]["lr"]
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    cosine = CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup_steps, 1), eta_min=min_lr)
    if warmup_steps == 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=min(warmup_lr / base_lr, 1.0), end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
