"""Official Swin / Swin V2 checkpoints (microsoft/Swin-Transformer `models/swin_transformer*.py`).

Same block names as timm; two differences (timm's swin `checkpoint_filter_fn` makes the same ones):
- the official code merges patches at the end of a stage (`layers.i.downsample`), timm and vitkit at
  the start of the next one (`layers.{i+1}.downsample`);
- the classifier is a bare `head`, timm's is `head.fc` (inside its ClassifierHead).
Buffers the model recomputes (`relative_position_index`, `attn_mask`, V2's `relative_coords_table`)
are left for the loader to drop.
"""

from __future__ import annotations

import re

import torch

FORMAT = "swin"
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def detect(state: dict[str, torch.Tensor]) -> bool:
    # stage 0 merges at its end only in the official layout (the head is absent from headless checkpoints)
    return "layers.0.downsample.reduction.weight" in state


def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        k = _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
        if k.startswith("head."):
            k = "head.fc." + k[len("head.") :]
        out[k] = v
    return out
