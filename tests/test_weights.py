"""Checkpoints from timm, the official DeiT / Swin code, torchvision, mmpretrain and Google's JAX
release: each reference model gets random weights, its checkpoint is written the way that
library (or its documented key mapping) writes it, vitkit loads it, and the logits must match.
Also: resampling to other sizes with timm's numbers, head / channel adaptation, strict errors,
refusal of pickled code and of truncated files, the timm round trip."""

from __future__ import annotations

import marshal
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from timm.models.vision_transformer import _load_weights as timm_load_npz

import vitkit
from vitkit.weights.convert import torchvision as tv_convert


def _close(ref: torch.Tensor, ours: torch.Tensor) -> None:
    assert ref.shape == ours.shape
    scale = ref.abs().max().item()
    diff = (ref - ours).abs().max().item()
    assert diff <= 1e-5 * scale, f"max abs diff {diff} at output scale {scale}"


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter: reference inits leave biases at 0 and norms at 1, which would hide
    a swapped bias or norm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# tiny versions of each family; the same overrides build the timm reference and the vitkit model
VIT = dict(depth=2, embed_dim=64, num_heads=2, img_size=64)
SWIN = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, img_size=32)
TIMM_CASES = {
    "vit_small_patch16_224": VIT,
    "deit_tiny_patch16_224": VIT,
    "deit_tiny_distilled_patch16_224": VIT,
    "deit3_small_patch16_224": VIT,
    "swin_tiny_patch4_window7_224": SWIN,
    "swinv2_tiny_window8_256": SWIN,
}


def _vitkit(name: str, **kwargs) -> torch.nn.Module:
    """vitkit's model for timm's kwargs (a Swin with fewer stages needs as many pretrained windows)."""
    if "depths" in kwargs:
        kwargs.setdefault("pretrained_window_sizes", (0,) * len(kwargs["depths"]))
    return vitkit.create_model(name, **kwargs).eval()


def _timm_pair(name: str, **extra):
    kwargs = TIMM_CASES[name] | extra
    ref = _randomise(timm.create_model(name, **kwargs))
    ours = _vitkit(name, **kwargs)
    config: Any = ours.config  # (a ViTConfig or SwinConfig: nn.Module types attributes as Tensor | Module)
    return ref, ours, torch.randn(2, 3, *config.img_size)


# -- timm and the vitkit round trip ------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_checkpoint_parity_and_round_trip(name, tmp_path):
    ref, ours, x = _timm_pair(name)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")  # timm's train.py / hub .bin layout
    report = vitkit.load_checkpoint(ours, tmp_path / "timm.pth")
    assert report.format == "timm" and report.ok and not report.renamed
    _close(_logits(ref, x), _logits(ours, x))

    # vitkit -> timm (pickle and safetensors) -> vitkit gives an identical state dict
    for file in ("out.pth", "out.safetensors"):
        vitkit.save_checkpoint(ours, tmp_path / file, format="timm")
        again = _vitkit(name, **TIMM_CASES[name])
        vitkit.load_checkpoint(again, tmp_path / file)
        a, b = ours.state_dict(), again.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and timm reads vitkit's timm file as its own
    ref2 = timm.create_model(name, **TIMM_CASES[name]).eval()
    ref2.load_state_dict(torch.load(tmp_path / "out.pth", weights_only=True))
    _close(_logits(ref, x), _logits(ref2, x))

    # the vitkit format keeps the config: load_model rebuilds the same model
    vitkit.save_checkpoint(ours, tmp_path / "m.safetensors")
    rebuilt = vitkit.load_model(tmp_path / "m.safetensors")
    _close(_logits(ours, x), _logits(rebuilt, x))
    assert vitkit.load_checkpoint(ours, tmp_path / "m.safetensors").format == "vitkit"


def test_wrapped_and_ddp_checkpoints():
    ref, ours, x = _timm_pair("deit_tiny_distilled_patch16_224")
    # official DeiT release: timm names inside {"model": ...}; DDP adds "module."
    wrapped = {"model": {f"module.{k}": v for k, v in ref.state_dict().items()}, "epoch": 3}
    assert vitkit.load_checkpoint(ours, wrapped).ok
    _close(_logits(ref, x), _logits(ours, x))
    assert vitkit.load_checkpoint(ours, {"state_dict": ref.state_dict(), "optimizer": {}}).ok


# -- official DeiT III and Swin ------------------------------------------------------------------
def test_official_deit3(tmp_path):
    ref, ours, x = _timm_pair("deit3_small_patch16_224")
    # facebookresearch/deit models_v2.py keeps LayerScale as bare block parameters gamma_1 / gamma_2
    official = {re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): v for k, v in ref.state_dict().items()}
    assert any(k.endswith("gamma_1") for k in official)
    torch.save({"model": official}, tmp_path / "deit_3_small_224_1k.pth")
    report = vitkit.load_checkpoint(ours, tmp_path / "deit_3_small_224_1k.pth")
    assert report.format == "deit" and report.renamed["blocks.0.ls1.gamma"] == "blocks.0.gamma_1"
    _close(_logits(ref, x), _logits(ours, x))


def _official_swin(state: dict, stages: int) -> dict:
    """timm names -> microsoft/Swin-Transformer names (the inverse of timm's swin checkpoint_filter_fn):
    merges at the end of the previous stage, a bare `head`, and the buffers the official code saved."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    for i in range(stages):
        out[f"layers.{i}.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
        out[f"layers.{i}.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    return out


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_official_swin(name, tmp_path):
    ref, ours, x = _timm_pair(name)
    torch.save({"model": _official_swin(ref.state_dict(), 2)}, tmp_path / "official.pth")
    report = vitkit.load_checkpoint(ours, tmp_path / "official.pth")
    assert report.format == "swin" and report.ok
    assert report.renamed["layers.1.downsample.reduction.weight"] == "layers.0.downsample.reduction.weight"
    assert report.dropped["layers.0.blocks.1.attn_mask"] == "a buffer the model computes itself"
    _close(_logits(ref, x), _logits(ours, x))


# -- torchvision ---------------------------------------------------------------------------------
TV_VIT = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, num_classes=5)  # the torchvision reference below


def _tv_vit(representation_size: int | None):
    ref = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=128,
        num_classes=5, representation_size=representation_size,
    )  # fmt: skip
    return _randomise(ref)


@pytest.mark.parametrize("representation_size", [None, 24])
def test_torchvision_vit(representation_size, tmp_path):
    # the in21k variants' tanh pre-logits layer is torchvision's heads.pre_logits (representation_size)
    ref = _tv_vit(representation_size)
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    name = "vit_base_patch16_224_in21k" if representation_size else "vit_base_patch16_224"
    ours = vitkit.create_model(name, **TV_VIT, representation_size=representation_size)
    report = vitkit.load_checkpoint(ours, tmp_path / "vit.pth")
    assert report.format == "torchvision" and report.ok
    if representation_size:
        assert report.renamed["pre_logits.fc.weight"] == "heads.pre_logits.weight"
    x = torch.randn(2, 3, 32, 32)
    _close(_logits(ref, x), _logits(ours, x))


@pytest.mark.parametrize("v2", [False, True])
def test_torchvision_swin(v2, tmp_path):
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    extra = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    ref = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=[4, 4],
                          num_classes=5, **extra)  # fmt: skip
    torch.save(_randomise(ref).state_dict(), tmp_path / "swin.pth")
    name = "swinv2_tiny_window8_256" if v2 else "swin_tiny_patch4_window7_224"
    ours = _vitkit(name, **SWIN, num_classes=5)
    report = vitkit.load_checkpoint(ours, tmp_path / "swin.pth")
    assert report.format == "torchvision" and report.ok
    x = torch.randn(2, 3, 32, 32)
    _close(_logits(ref, x), _logits(ours, x))


# -- mmpretrain (checkpoints written by its documented key mapping) -----------------------------------
def _mm_vit(state: dict) -> dict:
    """timm names -> mmpretrain ViT / DeiT classifier names (backbones/vision_transformer.py, deit.py,
    VisionTransformerClsHead / DeiTClsHead, mmcv FFN)."""
    swaps = [
        (r"^cls_token$", "backbone.cls_token"), (r"^dist_token$", "backbone.dist_token"),
        (r"^pos_embed$", "backbone.pos_embed"), (r"^patch_embed\.proj\.", "backbone.patch_embed.projection."),
        (r"^blocks\.(\d+)\.norm(\d)\.", r"backbone.layers.\1.ln\2."),
        (r"^blocks\.(\d+)\.attn\.", r"backbone.layers.\1.attn."),
        (r"^blocks\.(\d+)\.mlp\.fc1\.", r"backbone.layers.\1.ffn.layers.0.0."),
        (r"^blocks\.(\d+)\.mlp\.fc2\.", r"backbone.layers.\1.ffn.layers.1."),
        (r"^norm\.", "backbone.ln1."), (r"^head\.", "head.layers.head."), (r"^head_dist\.", "head.layers.head_dist."),
        (r"^pre_logits\.fc\.", "head.layers.pre_logits."),
    ]  # fmt: skip
    out = {}
    for k, v in state.items():
        for pattern, new in swaps:
            k = re.sub(pattern, new, k)
        out[k] = v
    return out


def _mm_swin(state: dict, stages: int) -> dict:
    """timm names -> mmpretrain Swin classifier names. mmcv's PatchMerging gathers 2x2 neighbours with
    nn.Unfold; the reorder is mmsegmentation's swin2mmseg.py correct_unfold_reduction_order / _norm_order."""

    def unfold_order(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1] // 4
        x = x.reshape(*x.shape[:-1], 4, c)[..., [0, 2, 1, 3], :]
        return x.transpose(-1, -2).reshape(*x.shape[:-2], 4 * c)

    out = {}
    for k, v in state.items():
        if m := re.match(r"^layers\.(\d+)\.downsample\.(.+)$", k):
            out[f"backbone.stages.{int(m.group(1)) - 1}.downsample.{m.group(2)}"] = unfold_order(v)
            continue
        k = re.sub(r"^patch_embed\.proj\.", "backbone.patch_embed.projection.", k)
        k = re.sub(r"^patch_embed\.norm\.", "backbone.patch_embed.norm.", k)
        k = re.sub(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.", r"backbone.stages.\1.blocks.\2.attn.w_msa.", k)
        k = re.sub(r"^layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"backbone.stages.\1.blocks.\2.ffn.layers.0.0.", k)
        k = re.sub(r"^layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"backbone.stages.\1.blocks.\2.ffn.layers.1.", k)
        k = re.sub(r"^layers\.(\d+)\.blocks\.", r"backbone.stages.\1.blocks.", k)
        k = re.sub(r"^norm\.", f"backbone.norm{stages - 1}.", k)
        out[k] = v
    out["backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    return out


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit_tiny_distilled_patch16_224",
                                  "swin_tiny_patch4_window7_224"])  # fmt: skip
def test_mmpretrain(name, tmp_path):
    ref, ours, x = _timm_pair(name)
    state = _mm_swin(ref.state_dict(), 2) if name.startswith("swin") else _mm_vit(ref.state_dict())
    torch.save({"meta": {"epoch": 300}, "state_dict": state}, tmp_path / "mm.pth")
    report = vitkit.load_checkpoint(ours, tmp_path / "mm.pth")
    assert report.format == "mmpretrain" and report.ok
    _close(_logits(ref, x), _logits(ours, x))


def test_mmpretrain_pre_logits_head():
    ref = _tv_vit(representation_size=24)
    timm_names = tv_convert.convert(ref.state_dict())  # verified by the torchvision test above
    ours = vitkit.create_model("vit_base_patch16_224_in21k", **TV_VIT, representation_size=24)
    assert vitkit.load_checkpoint(ours, _mm_vit(timm_names)).ok
    x = torch.randn(2, 3, 32, 32)
    _close(_logits(ref, x), _logits(ours, x))


# -- Google JAX .npz ----------------------------------------------------------------------------
def _to_npz(state: dict, heads: int, path: Path) -> Path:
    """timm names -> the vit_jax checkpoint layout (the inverse of timm's _load_weights): HWIO conv
    kernel, (in, out) dense kernels, attention kernels with a head axis."""
    d = state["pos_embed"].shape[-1]
    w = {
        "embedding/kernel": state["patch_embed.proj.weight"].permute(2, 3, 1, 0),
        "embedding/bias": state["patch_embed.proj.bias"],
        "cls": state["cls_token"],
        "Transformer/posembed_input/pos_embedding": state["pos_embed"],
        "Transformer/encoder_norm/scale": state["norm.weight"],
        "Transformer/encoder_norm/bias": state["norm.bias"],
    }
    for src, dst in (("head", "head"), ("pre_logits.fc", "pre_logits")):
        if f"{src}.weight" in state:
            w[f"{dst}/kernel"], w[f"{dst}/bias"] = state[f"{src}.weight"].T, state[f"{src}.bias"]
    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        b, s = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = b + "MultiHeadDotProductAttention_1/"
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{b}{ln}/scale"], w[f"{b}{ln}/bias"] = state[f"{s}{norm}.weight"], state[f"{s}{norm}.bias"]
        qkv_w, qkv_b = state[s + "attn.qkv.weight"].chunk(3), state[s + "attn.qkv.bias"].chunk(3)
        for n, wt, bs in zip(("query", "key", "value"), qkv_w, qkv_b):
            w[f"{att}{n}/kernel"], w[f"{att}{n}/bias"] = wt.T.reshape(d, heads, -1), bs.reshape(heads, -1)
        w[att + "out/kernel"] = state[s + "attn.proj.weight"].T.reshape(heads, -1, d)
        w[att + "out/bias"] = state[s + "attn.proj.bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            w[f"{b}MlpBlock_3/Dense_{j}/kernel"] = state[f"{s}mlp.{fc}.weight"].T
            w[f"{b}MlpBlock_3/Dense_{j}/bias"] = state[f"{s}mlp.{fc}.bias"]
        i += 1
    np.savez(path, **{k: v.detach().numpy() for k, v in w.items()})
    return path


def test_jax_npz_matches_timm_reader(tmp_path):
    ref, ours, x = _timm_pair("vit_small_patch16_224")
    npz = _to_npz(ref.state_dict(), heads=2, path=tmp_path / "augreg.npz")
    report = vitkit.load_checkpoint(ours, npz)
    assert report.format == "jax" and report.ok and "blocks.0.attn.qkv.weight" in report.merged
    _close(_logits(ref, x), _logits(ours, x))

    # timm's own npz reader agrees (the file is a faithful JAX checkpoint), also at another size,
    # where both resample the position embedding bilinearly without antialiasing
    big = dict(VIT, img_size=96)
    timm_big = timm.create_model("vit_small_patch16_224", **big).eval()
    timm_load_npz(timm_big, str(npz))
    ours_big = vitkit.create_model("vit_small_patch16_224", **big)
    report = vitkit.load_checkpoint(ours_big, npz)
    assert "pos_embed" in report.resampled and "bilinear" in report.resampled["pos_embed"]
    x = torch.randn(2, 3, 96, 96)
    _close(_logits(timm_big, x), _logits(ours_big, x))


def test_jax_npz_in21k_pre_logits(tmp_path):
    # an original ImageNet-21k release: pre_logits (Dense + tanh) and head; reference: torchvision
    ref = _tv_vit(representation_size=24)
    npz = _to_npz(tv_convert.convert(ref.state_dict()), heads=2, path=tmp_path / "ViT-B_16.npz")
    ours = vitkit.create_model("vit_base_patch16_224_in21k", **TV_VIT, representation_size=24)
    assert vitkit.load_checkpoint(ours, npz).ok
    x = torch.randn(2, 3, 32, 32)
    _close(_logits(ref, x), _logits(ours, x))


# -- resampling to another model shape, with timm's numbers ---------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's own table interpolation warns
@pytest.mark.parametrize(
    "name,kwargs,new",
    [
        ("vit_small_patch16_224", dict(depth=2, embed_dim=64, num_heads=2), dict(img_size=384)),
        ("deit3_small_patch16_224", dict(VIT), dict(img_size=96)),  # no class token in the position table
        ("swin_tiny_patch4_window7_224", dict(SWIN), dict(img_size=64, window_size=8)),  # bias tables 7x7 -> 15x15
    ],
)
def test_resample_like_timm(name, kwargs, new, tmp_path):
    ref = _randomise(timm.create_model(name, **kwargs))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "small.safetensors")
    # timm's own loader (its checkpoint_filter_fn) on the same file, into the bigger model
    overlay = dict(file=str(tmp_path / "small.safetensors"))
    timm_big = timm.create_model(name, **kwargs | new, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    ours = _vitkit(name, **kwargs | new)
    report = vitkit.load_checkpoint(ours, tmp_path / "small.safetensors")
    assert report.resampled and report.ok
    x = torch.randn(1, 3, *ours.config.img_size)
    _close(_logits(timm_big, x), _logits(ours, x))


def test_patch_kernel_and_channels_like_timm():
    from timm.layers import resample_patch_embed
    from timm.models import adapt_input_conv

    from vitkit.weights.resample import adapt_input_conv as ours_adapt
    from vitkit.weights.resample import resample_patch_embed as ours_resample

    w = torch.randn(8, 3, 16, 16)
    assert torch.allclose(ours_resample(w, (8, 8)), resample_patch_embed(w, [8, 8]), atol=1e-6)
    assert torch.allclose(ours_resample(w, (14, 14)), resample_patch_embed(w, [14, 14]), atol=1e-6)
    for chans in (1, 2, 4, 7):
        assert torch.equal(ours_adapt(w, chans), adapt_input_conv(chans, w))

    # through the loader: RGB 16-pixel patches into a greyscale 8-pixel-patch model
    ref, _, _ = _timm_pair("vit_small_patch16_224")
    grey = vitkit.create_model("vit_small_patch16_224", **VIT | dict(in_chans=1, patch_size=8, img_size=32))
    report = vitkit.load_checkpoint(grey, ref.state_dict())
    assert "input channels" in report.adapted["patch_embed.proj.weight"]
    assert "patch kernel" in report.resampled["patch_embed.proj.weight"]
    expected = resample_patch_embed(adapt_input_conv(1, ref.patch_embed.proj.weight.detach()), [8, 8])
    assert torch.allclose(grey.patch_embed.proj.weight, expected, atol=1e-6)


def test_new_head_for_other_class_count():
    ref, _, x = _timm_pair("deit_tiny_distilled_patch16_224")
    ours = vitkit.create_model("deit_tiny_distilled_patch16_224", **VIT, num_classes=7)
    fresh = ours.head.weight.clone()
    report = vitkit.load_checkpoint(ours, ref.state_dict())
    assert set(report.reinitialised) == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert torch.equal(ours.head.weight, fresh)  # the model's own init is kept
    _close(ref.forward_features(x), ours.forward_features(x))
    # a model without a classifier drops the checkpoint's
    headless = vitkit.create_model("deit_tiny_distilled_patch16_224", **VIT, num_classes=0)
    assert "head.weight" in vitkit.load_checkpoint(headless, ref.state_dict()).dropped


# -- errors ----------------------------------------------------------------------------------------
def test_strict_error_lists_everything_once():
    ref, _, _ = _timm_pair("vit_small_patch16_224")
    state = ref.state_dict() | {"extra.weight": torch.zeros(3)}
    del state["blocks.1.norm1.weight"]
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(5, 5)
    ours = vitkit.create_model("vit_small_patch16_224", **VIT)
    before = ours.blocks[0].attn.qkv.weight.clone()
    with pytest.raises(ValueError) as err:
        vitkit.load_checkpoint(ours, state)
    message = str(err.value)
    assert "\n" not in message
    for key in ("blocks.1.norm1.weight", "extra.weight", "blocks.0.mlp.fc1.weight", "strict=False"):
        assert key in message
    assert torch.equal(ours.blocks[0].attn.qkv.weight, before)  # nothing loaded
    report = vitkit.load_checkpoint(ours, state, strict=False)
    assert report.missing == ["blocks.1.norm1.weight"] and report.unexpected == ["extra.weight"]
    assert torch.equal(ours.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


def test_bad_sources(tmp_path):
    ours = vitkit.create_model("vit_small_patch16_224", **VIT)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vitkit.load_checkpoint(ours, tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="cannot tell the format"):
        vitkit.load_checkpoint(ours, {"foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        vitkit.load_checkpoint(ours, {}, format="keras")
    with pytest.raises(FileNotFoundError, match="HuggingFace model directory"):
        vitkit.load_checkpoint(ours, tmp_path)


class _Exploit:
    """Unpickles by running code: `exec` of a source string, or `marshal.loads` of a code object."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        source = f"open({str(self.marker)!r}, 'w').write('ran')"
        if self.how == "exec":
            return (exec, (source,))
        return (marshal.loads, (marshal.dumps(compile(source, "payload", "exec")),))


@pytest.mark.parametrize("how,global_name", [("exec", "exec"), ("code", "marshal.loads")])
def test_pickled_code_is_refused(how, global_name, tmp_path):
    marker = tmp_path / "code_ran"
    ref, ours, _ = _timm_pair("vit_small_patch16_224")
    torch.save({"model": ref.state_dict(), "payload": _Exploit(marker, how)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"refuses them because unpickling can run arbitrary code") as err:
        vitkit.load_checkpoint(ours, tmp_path / "evil.pth")
    assert f"it refers to {global_name}" in str(err.value) and not marker.exists()
    np.savez(tmp_path / "evil.npz", a=np.array([_Exploit(marker, how)], dtype=object))
    with pytest.raises(ValueError, match="numpy object array"):
        vitkit.load_checkpoint(ours, tmp_path / "evil.npz")
    assert not marker.exists()


def test_truncated_files(tmp_path):
    ref, ours, _ = _timm_pair("vit_small_patch16_224")
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    torch.save(state, tmp_path / "a.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    save_file(state, tmp_path / "a.safetensors")
    _to_npz(state, 2, tmp_path / "a.npz")
    for name in ("a.pth", "legacy.pth", "a.safetensors", "a.npz"):
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            vitkit.load_checkpoint(ours, cut)
