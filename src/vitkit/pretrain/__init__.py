"""Self-supervised pre-training of the backbones (SimMIM masked image modelling).

The names below load on first use (PEP 562): `vitkit.pretrain.settings` is read when the CLI builds its
flags, and importing it must not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitkit.pretrain.simmim import (
        MaskGenerator,
        SimMIM,
        build_simmim,
        load_encoder,
        masked_l1_loss,
        save_encoder,
    )

__all__ = ["MaskGenerator", "SimMIM", "build_simmim", "load_encoder", "masked_l1_loss", "save_encoder"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module("vitkit.pretrain.simmim"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'vitkit.pretrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
