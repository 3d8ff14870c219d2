"""HuggingFace transformers checkpoints: ViT, DeiT (incl. distilled), Swin, Swinv2.

Key names are those `save_pretrained` writes (`modeling_vit.py`, `modeling_deit.py`,
`modeling_swin.py`, `modeling_swinv2.py`, the same in transformers 4 and 5); the in-memory names of
transformers 5 (`layers.N.attention.q_proj`, `mlp.fc1`, ..., see its `conversion_mapping.py`) are
accepted too. `export` goes the other way and writes the `config.json` fields those classes read.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from vitkit.models.vit import ViTConfig

FORMAT = "hf"

# sub-keys of one transformer layer -> vitkit block sub-keys (legacy name, transformers-5 name)
_COMMON_LAYER = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_QKV_T5 = {"attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}  # transformers 5
_VIT_LAYER = _COMMON_LAYER
_VIT_QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2, **_QKV_T5}
_SWIN_BLOCK = {
    **_COMMON_LAYER,
    "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.self.logit_scale": "attn.logit_scale",
    "attention.self.continuous_position_bias_mlp.0": "attn.cpb_mlp.0",
    "attention.self.continuous_position_bias_mlp.2": "attn.cpb_mlp.2",
    # buffers, recomputed by the model (dropped by the loader)
    "attention.self.relative_position_index": "attn.relative_position_index",
    "attention.self.relative_coords_table": "attn.relative_coords_table",
}
_SWIN_QKV = {"attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2, **_QKV_T5}
_PREFIXES = ("vit.", "deit.", "swin.", "swinv2.")


def detect(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the backbone prefix (`vit.`, `swin.`, ...); base models (ViTModel) have none."""
    for p in _PREFIXES:
        if f"{p}embeddings.patch_embeddings.projection.weight" in state:
            return {(k[len(p) :] if k.startswith(p) else k): v for k, v in state.items()}
    return dict(state)


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = _strip_prefix(state)
    if any(k.startswith("encoder.layers.") and ".blocks." in k for k in state):
        return _convert_swin(state)
    return _convert_vit(state)


def _convert_vit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    top = {
        "embeddings.cls_token": "cls_token",
        "embeddings.distillation_token": "dist_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
        # ViTModel's pooler is Dense + tanh on the class token: the in21k pre-logits layer
        "pooler.dense.weight": "pre_logits.fc.weight",
        "pooler.dense.bias": "pre_logits.fc.bias",
        "classifier.weight": "head.weight",
        "classifier.bias": "head.bias",
        # DeiTForImageClassificationWithTeacher: one head per token
        "cls_classifier.weight": "head.weight",
        "cls_classifier.bias": "head.bias",
        "distillation_classifier.weight": "head_dist.weight",
        "distillation_classifier.bias": "head_dist.bias",
    }
    layer = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], list] = {}
    for k, v in state.items():
        if k in top:
            out[top[k]] = v
            continue
        m = layer.match(k)
        if m is None:
            out[k] = v  # unknown: reported as unexpected
            continue
        i, (sub, param) = int(m.group(1)), _split_param(m.group(2))
        if sub in _VIT_QKV:
            qkv.setdefault((i, param), [None] * 3)[_VIT_QKV[sub]] = v
        elif sub in _VIT_LAYER:
            out[f"blocks.{i}.{_VIT_LAYER[sub]}.{param}"] = v
        else:
            out[k] = v
    # HF keeps query, key and value apart; timm's fused qkv stacks them in that order
    for (i, param), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat(parts, dim=0)
    return out


def _convert_swin(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    top = {
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "embeddings.norm.weight": "patch_embed.norm.weight",
        "embeddings.norm.bias": "patch_embed.norm.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
        "classifier.weight": "head.fc.weight",
        "classifier.bias": "head.fc.bias",
    }
    block = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
    merge = re.compile(r"^encoder\.layers\.(\d+)\.downsample\.(.+)$")
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, int, str], list] = {}
    for k, v in state.items():
        if k in top:
            out[top[k]] = v
        elif m := merge.match(k):
            # HF merges at the end of stage i, timm / vitkit at the start of stage i + 1
            out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"] = v
        elif m := block.match(k):
            i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            sub, param = _split_param(rest)
            if rest in _SWIN_BLOCK:  # parameters without a module (logit_scale, tables)
                out[f"layers.{i}.blocks.{j}.{_SWIN_BLOCK[rest]}"] = v
            elif sub in _SWIN_QKV:
                qkv.setdefault((i, j, param), [None] * 3)[_SWIN_QKV[sub]] = v
            elif sub in _SWIN_BLOCK:
                out[f"layers.{i}.blocks.{j}.{_SWIN_BLOCK[sub]}.{param}"] = v
            else:
                out[k] = v
        else:
            out[k] = v
    for (i, j, param), (q, k_, v) in qkv.items():
        prefix = f"layers.{i}.blocks.{j}.attn."
        if param == "weight":
            out[prefix + "qkv.weight"] = torch.cat([q, k_, v], dim=0)
        elif k_ is None:
            # Swin V2 has query and value biases only (a key bias cancels in the softmax)
            out[prefix + "q_bias"], out[prefix + "v_bias"] = q, v
        else:
            out[prefix + "qkv.bias"] = torch.cat([q, k_, v], dim=0)
    return out


# -- export -------------------------------------------------------------------------------------
def unsupported(model: nn.Module) -> list[str]:
    """What `model` has that transformers' ViT / DeiT / Swin / Swinv2 classes cannot express."""
    config = model.config
    missing = []
    if isinstance(config, ViTConfig):
        if config.init_values is not None:
            missing.append("LayerScale (DeiT III's init_values)")
        if config.no_embed_class:
            missing.append("a position embedding without the class token (no_embed_class)")
        if config.representation_size:
            missing.append("the tanh pre-logits layer (representation_size)")
        if config.global_pool != "token":
            missing.append(f"global_pool={config.global_pool!r} (HF pools the class token)")
        if config.pos_embed != "learned":
            missing.append(f"pos_embed={config.pos_embed!r} (HF learns the position embedding)")
    else:  # Swin family
        windows = set(config.stage_window_sizes())
        if len(windows) > 1 or next(iter(windows))[0] != next(iter(windows))[1]:
            missing.append(f"per-stage or non-square windows ({config.window_size!r}; HF has one square window)")
        if config.extra_norm_every_n_blocks:
            missing.append("SwinV2-G's extra LayerNorm every n blocks (extra_norm_every_n_blocks)")
        if config.norm_eps != 1e-5:
            missing.append(f"norm_eps={config.norm_eps} (HF's patch-embedding LayerNorm uses 1e-5)")
    return missing


def _labels(num_classes: int) -> dict[str, Any]:
    names = {str(i): f"LABEL_{i}" for i in range(num_classes)}
    return {"id2label": names, "label2id": {n: int(i) for i, n in names.items()}}


def _image_size(size: tuple[int, int]) -> int | list[int]:
    return size[0] if size[0] == size[1] else list(size)


def export(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json dict, state dict with HF names) for `model`; call `unsupported` first."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if isinstance(model.config, ViTConfig):
        return _export_vit(model.config, state)
    return _export_swin(model, state)


def _export_vit(config: ViTConfig, state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    distilled = config.distilled
    p = "deit." if distilled else "vit."
    # non-distilled DeiTs are published on the hub as plain ViTForImageClassification
    hf_config = {
        "model_type": "deit" if distilled else "vit",
        "architectures": ["DeiTForImageClassificationWithTeacher" if distilled else "ViTForImageClassification"],
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": int(config.embed_dim * config.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": config.norm_eps,
        "image_size": _image_size(config.img_size),
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": config.qkv_bias,
        **_labels(config.num_classes),
    }
    top = {
        "cls_token": "embeddings.cls_token",
        "dist_token": "embeddings.distillation_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    heads = {"head": "cls_classifier" if distilled else "classifier", "head_dist": "distillation_classifier"}
    layer_names = {v: k for k, v in _VIT_LAYER.items() if not k.startswith(("mlp.", "attention.o_proj"))}
    block = re.compile(r"^blocks\.(\d+)\.(.+)$")
    out = {}
    for k, v in state.items():
        if k in top:
            out[p + top[k]] = v
        elif k.split(".")[0] in heads:
            out[heads[k.split(".")[0]] + k[k.index(".") :]] = v
        elif m := block.match(k):
            i, (sub, param) = m.group(1), _split_param(m.group(2))
            base = f"{p}encoder.layer.{i}."
            if sub == "attn.qkv":
                for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                    out[f"{base}attention.attention.{name}.{param}"] = part
            else:
                out[f"{base}{layer_names[sub]}.{param}"] = v
        else:
            raise ValueError(f"no HF name for parameter {k!r}")
    return hf_config, out


def _export_swin(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    v2 = any(k.endswith("attn.logit_scale") for k in state)
    return _swin_hf_config(model.config, v2), _swin_hf_state(state, "swinv2." if v2 else "swin.")


def _swin_hf_config(config: Any, v2: bool) -> dict[str, Any]:
    hf_config = {
        "model_type": "swinv2" if v2 else "swin",
        "architectures": ["Swinv2ForImageClassification" if v2 else "SwinForImageClassification"],
        "image_size": _image_size(config.img_size),
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "embed_dim": config.embed_dim,
        "depths": list(config.depths),
        "num_heads": list(config.num_heads),
        "window_size": config.stage_window_sizes()[0][0],
        "mlp_ratio": config.mlp_ratio,
        "qkv_bias": config.qkv_bias,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "use_absolute_embeddings": False,
        "layer_norm_eps": config.norm_eps,
        **_labels(config.num_classes),
    }
    if v2:
        hf_config["pretrained_window_sizes"] = list(config.pretrained_window_sizes)
    return hf_config


def _swin_hf_state(state: dict[str, torch.Tensor], p: str) -> dict[str, torch.Tensor]:
    top = {
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "patch_embed.norm.weight": "embeddings.norm.weight",
        "patch_embed.norm.bias": "embeddings.norm.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    block_names = {
        v: k for k, v in _SWIN_BLOCK.items()
        if not k.startswith(("mlp.", "attention.o_proj", "attention.relative_position_bias."))
    }  # fmt: skip
    block = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
    merge = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")
    out = {}
    for k, v in state.items():
        if k in top:
            out[p + top[k]] = v
        elif k.startswith("head.fc."):
            out["classifier." + k[len("head.fc.") :]] = v
        elif m := merge.match(k):
            out[f"{p}encoder.layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"] = v
        elif m := block.match(k):
            base = f"{p}encoder.layers.{m.group(1)}.blocks.{m.group(2)}."
            sub, param = _split_param(m.group(3))
            if sub == "attn.qkv":
                for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                    out[f"{base}attention.self.{name}.{param}"] = part
            elif m.group(3) in ("attn.q_bias", "attn.v_bias"):
                name = "query" if m.group(3) == "attn.q_bias" else "value"
                out[f"{base}attention.self.{name}.bias"] = v
            elif sub in block_names:
                out[f"{base}{block_names[sub]}.{param}"] = v
            elif m.group(3) in block_names:  # parameters without a module (logit_scale, tables)
                out[base + block_names[m.group(3)]] = v
            else:
                raise ValueError(f"no HF name for parameter {k!r}")
        else:
            raise ValueError(f"no HF name for parameter {k!r}")
    return out
