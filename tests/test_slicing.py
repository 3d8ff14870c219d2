"""Batch slicing in CPU inference (vitkit.layers.slicing): the sliced forward gives the whole batch's
outputs, in fp32 and bf16, and never runs where it must not (training, gradients, recorded attention)."""

from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit.layers import slicing
from vitkit.layers.precision import cast_for_inference

SWIN = dict(embed_dim=24, depths=(2, 2), num_heads=(2, 4), pretrained_window_sizes=(0, 0))
SMALL = {
    "vit_tiny_patch16_224": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3),
    "swin_tiny_patch4_window7_224": dict(img_size=56, window_size=7, **SWIN),
    "swinv2_tiny_window8_256": dict(img_size=64, window_size=8, **SWIN),
}


@pytest.fixture
def tiny_slices():
    previous = slicing.set_slice_bytes(1)  # one image per slice
    yield
    slicing.set_slice_bytes(previous)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return vitkit.create_model(name, num_classes=7, **SMALL[name]).eval()


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_inference_equals_the_whole_batch(name, dtype):
    model = _model(name)
    if dtype is torch.bfloat16:
        cast_for_inference(model, dtype)
    size = SMALL[name]["img_size"]
    x = torch.randn(5, 3, size, size).to(dtype)
    with torch.inference_mode():
        previous = slicing.set_slice_bytes(None)
        whole = model(x)
        slicing.set_slice_bytes(1)
        sliced = model(x)
        slicing.set_slice_bytes(previous)
    assert sliced.shape == whole.shape == (5, 7)
    tol = 1e-6 if dtype is torch.float32 else 1e-2
    assert (sliced.float() - whole.float()).abs().max() <= tol * whole.float().abs().max()


def test_slice_size_follows_the_byte_budget():
    x = torch.zeros(32, 100, 10)  # 4,000 bytes per image
    previous = slicing.set_slice_bytes(12_000)
    try:
        assert slicing.slice_size(x) == 3
        assert slicing.slice_size(x.bfloat16()) == 6
        slicing.set_slice_bytes(10)
        assert slicing.slice_size(x) == 1
        slicing.set_slice_bytes(1 << 30)
        assert slicing.slice_size(x) == 32
    finally:
        slicing.set_slice_bytes(previous)


def test_no_slicing_in_training_with_gradients_or_while_recording(tiny_slices, monkeypatch):
    model = _model("vit_tiny_patch16_224")
    calls: list[int] = []
    real = model._run_blocks
    monkeypatch.setattr(model, "_run_blocks", lambda x: calls.append(x.shape[0]) or real(x))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model(x)
    assert calls == [1, 1, 1, 1]  # inference: one image per slice
    calls.clear()
    model(x)  # gradients on
    model.train()
    with torch.no_grad():
        model(x)
    assert calls == [4, 4]
    calls.clear()
    model.eval()
    for m in model.attention_modules():
        m.record_attn = True
    with torch.no_grad():
        model(x)
    assert calls == [4] and all(m.last_attn.shape[0] == 4 for m in model.attention_modules())
