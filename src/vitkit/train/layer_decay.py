"""Layer-wise learning-rate decay for fine-tuning (BEiT, DeiT III, Swin fine-tuning recipes).

Layer 0 is the input side (patch embedding, tokens, position embedding), layers 1..L the blocks,
layer L + 1 the final norm and head; a parameter in layer i trains at lr x decay^(L + 1 - i), so
the head gets the full rate and the earliest layers the smallest.
"""

from __future__ import annotations

import re

from torch import nn

_INPUT_SIDE = ("patch_embed", "cls_token", "dist_token", "reg_token", "pos_embed", "absolute_pos_embed")


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name: layer id}, number of layers including input and head) for a vitkit ViT or
    Swin; names follow timm's (`blocks.i`, `layers.s.blocks.j`, `layers.s.downsample`)."""
    names = [n for n, _ in model.named_parameters()]
    if any(n.startswith("blocks.") for n in names):  # ViT family
        depth = len(model.blocks)

        def block_of(name: str) -> int | None:
            m = re.match(r"blocks\.(\d+)\.", name)
            return int(m.group(1)) + 1 if m else None

    elif any(n.startswith("layers.") for n in names):  # Swin family: blocks counted across stages
        starts, total = [], 0
        for stage in model.layers:
            starts.append(total)
            total += len(stage.blocks)
        depth = total

        def block_of(name: str) -> int | None:
            m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", name)
            if m:
                return starts[int(m.group(1))] + int(m.group(2)) + 1
            m = re.match(r"layers\.(\d+)\.downsample\.", name)  # merging goes with its stage's first block
            return starts[int(m.group(1))] + 1 if m else None

    else:
        raise ValueError(
            f"layer-wise lr decay knows vitkit ViT and Swin models, not {type(model).__name__}: set layer_decay to null"
        )
    ids = {}
    for name in names:
        block = block_of(name)
        if block is not None:
            ids[name] = block
        elif name.split(".")[0] in _INPUT_SIDE:
            ids[name] = 0
        else:  # final norm, head
            ids[name] = depth + 1
    return ids, depth + 2


def layer_decay_param_groups(
    model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float
) -> list[dict]:
    """Optimiser groups per (layer, decayed or not), each with its `lr` and its `lr_scale`.

    Weight-decay exclusions are the engine's (`vitkit.train.optim.no_decay`).
    """
    from vitkit.train.optim import no_decay

    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    ids, num_layers = layer_ids(model)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    keywords = set(model.no_weight_decay_keywords()) if hasattr(model, "no_weight_decay_keywords") else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = no_decay(name, param, skip, keywords)
        layer = ids[name]
        scale = layer_decay ** (num_layers - 1 - layer)
        group = groups.setdefault(
            (layer, plain),
            {"params": [], "weight_decay": 0.0 if plain else weight_decay, "lr": lr * scale, "lr_scale": scale},
        )
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]
