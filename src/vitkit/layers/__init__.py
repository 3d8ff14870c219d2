"""Building blocks shared by the model families."""

from vitkit.layers.attention import Attention
from vitkit.layers.drop_path import DropPath, drop_path_rates
from vitkit.layers.init import trunc_normal_
from vitkit.layers.layer_scale import LayerScale
from vitkit.layers.mlp import Mlp
from vitkit.layers.norm import LayerNorm
from vitkit.layers.patch_dropout import PatchDropout
from vitkit.layers.patch_embed import PatchEmbed
from vitkit.layers.pos_embed import resample_abs_pos_embed, sincos_2d_pos_embed

__all__ = [
    "Attention",
    "DropPath",
    "LayerNorm",
    "LayerScale",
    "Mlp",
    "PatchDropout",
    "PatchEmbed",
    "drop_path_rates",
    "resample_abs_pos_embed",
    "sincos_2d_pos_embed",
    "trunc_normal_",
]
