"""torchvision checkpoints: `vit_*` (torchvision/models/vision_transformer.py) and `swin_*` /
`swin_v2_*` (torchvision/models/swin_transformer.py).

ViT: `nn.MultiheadAttention`'s `in_proj_weight` stacks q, k, v in timm's qkv order; the optional
`heads.pre_logits` (Linear + tanh, `representation_size`) is vitkit's `pre_logits.fc`; older releases
name the MLP layers `linear_1` / `linear_2` instead of `mlp.0` / `mlp.3`.
Swin: `features` alternates [patch embed, stage 1, merge, stage 2, merge, ...]; each merge is moved
to the start of the stage it feeds. V2's fused qkv bias carries a key part that torchvision zeroes
at every forward, so only its query and value thirds are kept (timm's `q_bias` / `v_bias`).
"""

from __future__ import annotations

import re

import torch

FORMAT = "torchvision"


def detect(state: dict[str, torch.Tensor]) -> bool:
    return "conv_proj.weight" in state or "features.0.0.weight" in state


def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "conv_proj.weight" in state:
        return _convert_vit(state)
    return _convert_swin(state)


def _convert_vit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    top = {
        "class_token": "cls_token",
        "conv_proj.weight": "patch_embed.proj.weight",
        "conv_proj.bias": "patch_embed.proj.bias",
        "encoder.pos_embedding": "pos_embed",
        "encoder.ln.weight": "norm.weight",
        "encoder.ln.bias": "norm.bias",
        "heads.pre_logits.weight": "pre_logits.fc.weight",
        "heads.pre_logits.bias": "pre_logits.fc.bias",
        "heads.head.weight": "head.weight",
        "heads.head.bias": "head.bias",
    }
    layer = {
        "ln_1": "norm1",
        "ln_2": "norm2",
        "self_attention.in_proj_weight": "attn.qkv.weight",
        "self_attention.in_proj_bias": "attn.qkv.bias",
        "self_attention.out_proj": "attn.proj",
        "mlp.0": "mlp.fc1",
        "mlp.3": "mlp.fc2",
        "mlp.linear_1": "mlp.fc1",
        "mlp.linear_2": "mlp.fc2",
    }
    pattern = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+?)(\.weight|\.bias)?$")
    out = {}
    for k, v in state.items():
        if k in top:
            out[top[k]] = v
        elif (m := pattern.match(k)) and m.group(2) in layer:
            out[f"blocks.{m.group(1)}.{layer[m.group(2)]}{m.group(3) or ''}"] = v
        else:
            out[k] = v
    return out


def _convert_swin(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    top = {
        "features.0.0.weight": "patch_embed.proj.weight",
        "features.0.0.bias": "patch_embed.proj.bias",
        "features.0.2.weight": "patch_embed.norm.weight",  # features.0 = Conv2d, Permute, LayerNorm
        "features.0.2.bias": "patch_embed.norm.bias",
        "head.weight": "head.fc.weight",
        "head.bias": "head.fc.bias",
    }
    block_sub = {"mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2"}
    block = re.compile(r"^features\.(\d+)\.(\d+)\.(.+)$")
    merge = re.compile(r"^features\.(\d+)\.(reduction|norm)\.(.+)$")
    v2 = any(k.endswith("attn.logit_scale") for k in state)
    out = {}
    for k, v in state.items():
        if k in top:
            out[top[k]] = v
        elif m := merge.match(k):
            # features.2s is the merge feeding stage s (features.2s+1)
            out[f"layers.{int(m.group(1)) // 2}.downsample.{m.group(2)}.{m.group(3)}"] = v
        elif m := block.match(k):
            stage, rest = (int(m.group(1)) - 1) // 2, m.group(3)
            for old, new in block_sub.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
            prefix = f"layers.{stage}.blocks.{m.group(2)}."
            if v2 and rest == "attn.qkv.bias":
                q, _, v_ = v.chunk(3, dim=0)
                out[prefix + "attn.q_bias"], out[prefix + "attn.v_bias"] = q, v_
            else:
                out[prefix + rest] = v
        else:
            out[k] = v
    return out
