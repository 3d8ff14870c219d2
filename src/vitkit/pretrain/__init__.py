"""Self-supervised pre-training of the backbones (SimMIM masked image modelling).

The names below load on first use (PEP 562): the CLI reads `vitkit.pretrain.settings` to build its
flags, and that must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vitkit.core.lazy import lazy_attributes

if TYPE_CHECKING:
    from vitkit.pretrain.simmim import MaskGenerator, SimMIM, build_simmim, load_encoder, masked_l1_loss, save_encoder

_HOMES = {
    name: "simmim"
    for name in ("MaskGenerator", "SimMIM", "build_simmim", "load_encoder", "masked_l1_loss", "save_encoder")
}

__all__ = ["MaskGenerator", "SimMIM", "build_simmim", "load_encoder", "masked_l1_loss", "save_encoder"]

__getattr__, __dir__ = lazy_attributes(__name__, _HOMES)
