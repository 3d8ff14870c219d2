"""Google's JAX / Flax ViT checkpoints (`.npz`): the original release (google-research/
vision_transformer, imagenet21k and fine-tuned) and the AugReg release (`vit_models/augreg/*.npz`).

Names and layouts from `vit_jax/models_vit.py` (the mapping is the one timm's
`vision_transformer._load_weights` applies):
- `embedding/kernel` is HWIO (p, p, C, D) -> OIHW;
- Dense kernels are (in, out) -> transposed; attention kernels keep the head axis,
  query/key/value (D, heads, head_dim) and out (heads, head_dim, D);
- blocks are `Transformer/encoderblock_i` with LayerNorm_0 (before attention),
  MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3/Dense_0|1;
- the ImageNet-21k checkpoints end in `pre_logits` (Dense + tanh) and a 21843-way `head`.
"""

from __future__ import annotations

import torch

FORMAT = "jax"
# timm resamples JAX position embeddings bilinearly without antialiasing (`_load_weights`)
RESAMPLE = {"interpolation": "bilinear", "antialias": False}


def detect(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("embedding/kernel") for k in state)


def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = next((p for p in ("opt/target/", "params/") if f"{p}embedding/kernel" in state), "")
    w = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    out = {
        "patch_embed.proj.weight": w.pop("embedding/kernel").permute(3, 2, 0, 1),
        "patch_embed.proj.bias": w.pop("embedding/bias"),
        "pos_embed": w.pop("Transformer/posembed_input/pos_embedding"),
    }
    if "cls" in w:
        out["cls_token"] = w.pop("cls")
    dense = {"Transformer/encoder_norm": "norm", "pre_logits": "pre_logits.fc", "head": "head"}
    for src, dst in dense.items():
        if f"{src}/bias" in w:
            kernel = w.pop(f"{src}/kernel", None)
            if kernel is not None:
                out[f"{dst}.weight"] = kernel.T
            else:
                out[f"{dst}.weight"] = w.pop(f"{src}/scale")  # LayerNorm
            out[f"{dst}.bias"] = w.pop(f"{src}/bias")
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in w:
        src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        attn = src + "MultiHeadDotProductAttention_1/"
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[f"{dst}{norm}.weight"] = w.pop(f"{src}{ln}/scale")
            out[f"{dst}{norm}.bias"] = w.pop(f"{src}{ln}/bias")
        # (D, heads, head_dim) -> (heads * head_dim, D), stacked q, k, v as timm's fused qkv
        qkv = ("query", "key", "value")
        out[dst + "attn.qkv.weight"] = torch.cat([w.pop(f"{attn}{n}/kernel").flatten(1).T for n in qkv])
        out[dst + "attn.qkv.bias"] = torch.cat([w.pop(f"{attn}{n}/bias").reshape(-1) for n in qkv])
        out[dst + "attn.proj.weight"] = w.pop(attn + "out/kernel").flatten(0, 1).T  # (heads, hd, D) -> (D, D)
        out[dst + "attn.proj.bias"] = w.pop(attn + "out/bias")
        for j, fc in enumerate(("fc1", "fc2")):
            out[f"{dst}mlp.{fc}.weight"] = w.pop(f"{src}MlpBlock_3/Dense_{j}/kernel").T
            out[f"{dst}mlp.{fc}.bias"] = w.pop(f"{src}MlpBlock_3/Dense_{j}/bias")
        i += 1
    out.update(w)  # anything left over is reported as unexpected
    return out
