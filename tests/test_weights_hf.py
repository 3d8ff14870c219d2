"""HuggingFace transformers: ViT, DeiT (distilled), Swin and Swinv2 directories written by
`save_pretrained` load into vitkit with the same logits, and vitkit's hf export loads back into
`AutoModelForImageClassification` with the same logits. HF has no DeiT III (LayerScale)."""

from __future__ import annotations

import pytest
import torch
import transformers as hf

import vitkit


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _close(ref: torch.Tensor, ours: torch.Tensor) -> None:
    assert ref.shape == ours.shape
    scale = ref.abs().max().item()
    diff = (ref - ours).abs().max().item()
    assert diff <= 1e-5 * scale, f"max abs diff {diff} at output scale {scale}"


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
           patch_size=16, num_labels=5, layer_norm_eps=1e-6)  # fmt: skip
SWIN = dict(embed_dim=16, depths=[2, 2], num_heads=[1, 2], image_size=32, patch_size=4, window_size=4, num_labels=5)
VIT_OURS = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, num_classes=5)
SWIN_OURS = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, img_size=32, num_classes=5,
                 pretrained_window_sizes=(0, 0))  # fmt: skip

CASES = {  # HF class, HF config, vitkit name, vitkit overrides
    "vit": (hf.ViTForImageClassification, hf.ViTConfig(**VIT), "vit_base_patch16_224", VIT_OURS),
    "deit_distilled": (
        hf.DeiTForImageClassificationWithTeacher,
        hf.DeiTConfig(**VIT),
        "deit_base_distilled_patch16_224",
        VIT_OURS,
    ),
    "swin": (hf.SwinForImageClassification, hf.SwinConfig(**SWIN), "swin_tiny_patch4_window7_224", SWIN_OURS),
    "swinv2": (hf.Swinv2ForImageClassification, hf.Swinv2Config(**SWIN), "swinv2_tiny_window8_256", SWIN_OURS),
}


def _hf_logits(model, x):
    with torch.no_grad():
        return model.eval()(pixel_values=x).logits


@pytest.mark.parametrize("case", list(CASES))
def test_hf_directory_loads_with_same_logits(case, tmp_path):
    cls, config, name, overrides = CASES[case]
    ref = _randomise(cls(config))
    ref.save_pretrained(tmp_path / "hf")
    ours = vitkit.create_model(name, **overrides).eval()
    report = vitkit.load_checkpoint(ours, tmp_path / "hf")
    assert report.format == "hf" and report.ok and report.merged  # q, k, v fused into qkv
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(_hf_logits(ref, x), ours(x))
    # transformers 5 names the same tensors differently in memory (q_proj, mlp.fc1, ...)
    again = vitkit.create_model(name, **overrides).eval()
    assert vitkit.load_checkpoint(again, ref.state_dict()).ok
    with torch.no_grad():
        _close(_hf_logits(ref, x), again(x))


@pytest.mark.parametrize("case", list(CASES))
def test_hf_export_round_trip(case, tmp_path):
    _, _, name, overrides = CASES[case]
    ours = _randomise(vitkit.create_model(name, **overrides))
    vitkit.save_checkpoint(ours, tmp_path / "export", format="hf")
    loaded = hf.AutoModelForImageClassification.from_pretrained(tmp_path / "export")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(ours(x), _hf_logits(loaded, x))
    # and back: hf -> vitkit is the identity
    back = vitkit.create_model(name, **overrides)
    vitkit.load_checkpoint(back, tmp_path / "export")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())


def test_hf_vit_pooler_is_the_pre_logits_layer():
    # google/vit-*-in21k on the hub are ViTModels whose pooler (Dense + tanh) is the pre-logits layer
    ref = _randomise(hf.ViTModel(hf.ViTConfig(**VIT), add_pooling_layer=True))
    ours = vitkit.create_model("vit_base_patch16_224_in21k", **VIT_OURS | dict(representation_size=32)).eval()
    report = vitkit.load_checkpoint(ours, ref.state_dict())
    assert report.renamed["pre_logits.fc.weight"] == "pooler.dense.weight"
    assert set(report.reinitialised) == {"head.weight", "head.bias"}  # a base model has no classifier
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(ref(pixel_values=x).pooler_output, ours.forward_head(ours.forward_features(x), pre_logits=True))


@pytest.mark.parametrize(
    "name,overrides,needle",
    [
        ("deit3_small_patch16_224", VIT_OURS, "LayerScale"),
        ("vit_base_patch16_224_in21k", VIT_OURS | dict(representation_size=32), "pre-logits"),
        ("vit_small_patch16_224", VIT_OURS | dict(global_pool="avg"), "global_pool"),
        ("vit_small_patch16_224", VIT_OURS | dict(pos_embed="sincos2d", no_embed_class=True), "pos_embed"),
    ],
)
def test_hf_export_refuses_what_hf_lacks(name, overrides, needle, tmp_path):
    model = vitkit.create_model(name, **overrides)
    with pytest.raises(ValueError, match=needle) as err:
        vitkit.save_checkpoint(model, tmp_path / "out", format="hf")
    assert "format='vitkit'" in str(err.value)
    assert not (tmp_path / "out").exists()
