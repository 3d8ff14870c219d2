"""Self-supervised pre-training of the backbones (SimMIM masked image modelling)."""

from vitkit.pretrain.simmim import (
    MaskGenerator,
    SimMIM,
    build_simmim,
    load_encoder,
    masked_l1_loss,
    save_encoder,
)

__all__ = ["MaskGenerator", "SimMIM", "build_simmim", "load_encoder", "masked_l1_loss", "save_encoder"]
