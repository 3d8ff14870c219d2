"""What identifies a tensor's current values, for the caches the CPU fast paths keep (prepacked linear
weights, Swin's eval-mode attention bias).

A tensor's version counter is bumped by in-place writes (copy_, load_state_dict, foreach optimisers), but
torch's fused optimisers (AdamW, Adam, SGD with fused=True, which vitkit's own `build_optimizer` picks)
update parameters without bumping it. So the key also holds a count of optimiser steps, kept by a hook
on every torch optimiser (`register_optimizer_step_post_hook`): any step invalidates every cached copy.
Writes through `.data` bump neither (PyTorch's caveat for `.data`); write under `torch.no_grad()` instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_STEPS = 0


def _count_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _STEPS
    _STEPS += 1


register_optimizer_step_post_hook(_count_step)


def optimizer_steps() -> int:
    """Optimiser steps taken in this process, by any torch optimiser."""
    return _STEPS


def weight_key(t: torch.Tensor | None) -> tuple | None:
    """Storage, version, optimiser steps so far, dtype, device and shape: equal keys, equal values."""
    if t is None:
        return None
    version = 0 if t.is_inference() else t._version  # inference tensors cannot be written outside inference mode
    return (t.data_ptr(), version, _STEPS, t.dtype, t.device, tuple(t.shape))
