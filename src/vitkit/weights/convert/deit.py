"""Official DeiT III checkpoints (facebookresearch/deit `models_v2.py`, `Layer_scale_init_Block`).

The blocks keep LayerScale as bare parameters `gamma_1` / `gamma_2`; timm (and vitkit) hold them in
`ls1.gamma` / `ls2.gamma` modules (timm's `checkpoint_filter_fn(adapt_layer_scale=True)` does the
same rename). Everything else already has timm's names: the position embedding covers the patches
only, which the model's `no_embed_class=True` expects.
"""

from __future__ import annotations

import re

import torch

FORMAT = "deit"
_GAMMA = re.compile(r"^(blocks\.\d+\.)gamma_([12])$")


def detect(state: dict[str, torch.Tensor]) -> bool:
    return any(_GAMMA.match(k) for k in state)


def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_GAMMA.sub(r"\1ls\2.gamma", k): v for k, v in state.items()}
