"""mmpretrain (MMClassification) checkpoints: ViT / DeiT and Swin image classifiers.

Names from mmpretrain's `models/backbones/vision_transformer.py`, `deit.py`, `swin_transformer.py`,
its heads (`VisionTransformerClsHead`: `layers.pre_logits` + tanh, `layers.head`; `DeiTClsHead`:
`layers.head`, `layers.head_dist`; `LinearClsHead`: `fc`) and mmcv's `FFN` (`layers.0.0`, `layers.1`).

Swin's patch merging in mmcv gathers each 2x2 neighbourhood with `nn.Unfold`, which orders the 4C
channels channel-major (c * 4 + offset, offsets row-major), where the official code (and timm)
concatenates the four shifted maps (offset * C + c, offsets (0,0), (1,0), (0,1), (1,1)). The
official -> mm permutation is `correct_unfold_reduction_order` / `correct_unfold_norm_order` in
mmsegmentation's `tools/model_converters/swin2mmseg.py`; `_unfold_to_official` undoes it.
"""

from __future__ import annotations

import re

import torch

FORMAT = "mmpretrain"


def detect(state: dict[str, torch.Tensor]) -> bool:
    return "backbone.patch_embed.projection.weight" in state


def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith("backbone.stages.") for k in state):
        return _convert_swin(state)
    return _convert_vit(state)


def _convert_vit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    top = {
        "backbone.cls_token": "cls_token",
        "backbone.dist_token": "dist_token",
        "backbone.pos_embed": "pos_embed",
        "backbone.patch_embed.projection.weight": "patch_embed.proj.weight",
        "backbone.patch_embed.projection.bias": "patch_embed.proj.bias",
        "backbone.ln1.weight": "norm.weight",  # final norm (`final_norm=True`)
        "backbone.ln1.bias": "norm.bias",
    }
    layer = {"ln1": "norm1", "ln2": "norm2", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj",
             "ffn.layers.0.0": "mlp.fc1", "ffn.layers.1": "mlp.fc2"}  # fmt: skip
    heads = {
        "head.layers.head": "head",
        "head.layers.head_dist": "head_dist",
        "head.layers.pre_logits": "pre_logits.fc",
    }
    pattern = re.compile(r"^backbone\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    out = {}
    for k, v in state.items():
        module, _, param = k.rpartition(".")
        if k in top:
            out[top[k]] = v
        elif module in heads:
            out[f"{heads[module]}.{param}"] = v
        elif (m := pattern.match(k)) and m.group(2) in layer:
            out[f"blocks.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"] = v
        else:
            out[k] = v
    return out


def _unfold_to_official(v: torch.Tensor) -> torch.Tensor:
    """Reorder a merge layer's 4C axis (last axis) from Unfold's order to the official one."""
    c = v.shape[-1] // 4
    # (..., C, 4 offsets in row-major order) -> (..., 4, C), then offsets (0,0), (0,1), (1,0), (1,1)
    # -> (0,0), (1,0), (0,1), (1,1): swapping the middle two (the permutation is its own inverse)
    v = v.reshape(*v.shape[:-1], c, 4).transpose(-1, -2)
    return v[..., [0, 2, 1, 3], :].reshape(*v.shape[:-2], 4 * c)


def _convert_swin(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    top = {
        "backbone.patch_embed.projection.weight": "patch_embed.proj.weight",
        "backbone.patch_embed.projection.bias": "patch_embed.proj.bias",
        "backbone.patch_embed.norm.weight": "patch_embed.norm.weight",
        "backbone.patch_embed.norm.bias": "patch_embed.norm.bias",
        "head.fc.weight": "head.fc.weight",
        "head.fc.bias": "head.fc.bias",
    }
    block = re.compile(r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
    merge = re.compile(r"^backbone\.stages\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)$")
    final_norm = re.compile(r"^backbone\.norm(\d*)\.(weight|bias)$")  # `norm3` (mmpretrain >= 1.0), `norm` before
    block_sub = {"attn.w_msa.": "attn.", "ffn.layers.0.0.": "mlp.fc1.", "ffn.layers.1.": "mlp.fc2."}
    out = {}
    for k, v in state.items():
        if k in top:
            out[top[k]] = v
        elif m := merge.match(k):
            # mm merges at the end of stage i (like the official code), vitkit at the start of i + 1;
            # the norm (before the reduction in Swin V1) and the reduction's input both span 4C
            out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}.{m.group(3)}"] = _unfold_to_official(v)
        elif m := block.match(k):
            rest = m.group(3)
            for old, new in block_sub.items():
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
            out[f"layers.{m.group(1)}.blocks.{m.group(2)}.{rest}"] = v
        elif m := final_norm.match(k):
            out[f"norm.{m.group(2)}"] = v
        else:
            out[k] = v
    return out
