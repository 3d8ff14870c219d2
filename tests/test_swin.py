"""Swin / Swin V2: registry defaults, timm parity (native size, other sizes, padding, per-dimension
window clamping, set_input_size), feature API, gradient checkpointing, errors."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models._manipulate import reinit_non_persistent_buffers

import vitkit
from vitkit.models.swin import SwinConfig, SwinTransformer, shifted_window_mask
from vitkit.registry import get_variant

SWIN_FAMILY = [n for n in vitkit.list_models() if get_variant(n).family in ("swin", "swinv2")]
TIMM_NAMED = [n for n in SWIN_FAMILY if n in timm.list_models()]
FULL_SIZE = ("tiny", "small")  # full-size parity in `make test`; base / large at reduced depth
# stages 1-3 keep a plain and a shifted block; the last stage's map is no larger than its window in
# every test size, so its blocks never shift
REDUCED = {"depths": (2, 2, 2, 1)}


def _is_full_size(name: str) -> bool:
    return any(f"_{size}_" in name for size in FULL_SIZE)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from the init, so that every parameter shapes the output (V2 starts its
    residual branches at zero), with per-head temperatures on both sides of the clamp at log(100)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("logit_scale"):
                p.copy_(torch.rand(p.shape, generator=gen) * 5 + 1)  # log-temperature in [1, 6)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1 or name.endswith("relative_position_bias_table"):
                p.copy_(0.5 * noise)
            else:  # fan-in scaling keeps activations O(1)
                p.copy_(noise / math.sqrt(p[0].numel()))


def _timm_model(name: str, **kwargs) -> torch.nn.Module:
    """timm's model with random weights, built without its (slow) init."""
    with torch.device("meta"):
        ref = timm.create_model(name, **kwargs)
    ref.to_empty(device="cpu")
    _randomize(ref)
    reinit_non_persistent_buffers(ref)
    return ref.eval()


def _ours_from(name: str, ref: torch.nn.Module, **kwargs) -> SwinTransformer:
    """Our model holding timm's weights: built on meta, timm's state dict assigned, buffers computed."""
    with torch.device("meta"):
        ours = vitkit.create_model(name, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.init_buffers()
    ref.load_state_dict(ours.state_dict(), strict=True)  # and back: the same keys and shapes
    return ours.eval()


def _pair(name: str, slow: bool = False, **kwargs):
    if not slow and not _is_full_size(name):
        kwargs = REDUCED | kwargs
    ref = _timm_model(name, **kwargs)
    return ref, _ours_from(name, ref, **kwargs)


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    scale = a.abs().max().item()
    diff = (a - b).abs().max().item()
    assert diff <= 1e-5 * scale, f"max diff {diff} at scale {scale}"


def _other_size(name: str) -> int:
    return 224 if get_variant(name).config.img_size[0] != 224 else 160


def _check_parity(name: str, slow: bool) -> None:
    ref, ours = _pair(name, slow)
    x = torch.randn(1, 3, *ours.config.img_size)
    with torch.no_grad():
        final, a = ref.forward_intermediates(x, indices=[0, 1, 2, 3])
        _assert_close(ref.forward_head(final), ours(x))
        b = ours.forward_intermediates(x, indices=[0, 1, 2, 3])
    for p, q in zip(a, b, strict=True):
        _assert_close(p, q)

    # set_input_size on both: windows scale with the grid, V1 tables are interpolated
    ref.set_input_size(img_size=(160, 96))
    ours.set_input_size((160, 96))
    x = torch.randn(1, 3, 160, 96)
    with torch.no_grad():
        _assert_close(ref(x), ours(x))

    # both built at another size: padding where the map is not a multiple of the window, the window
    # clamped (and the shift dropped) per dimension where a stage's map is smaller
    for size in (_other_size(name), (96, 160)):
        ref, ours = _pair(name, slow, img_size=size)
        x = torch.randn(1, 3, *ours.config.img_size)
        with torch.no_grad():
            _assert_close(ref(x), ours(x))


@pytest.mark.parametrize("name", TIMM_NAMED)
def test_timm_parity(name):
    _check_parity(name, slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in TIMM_NAMED if not _is_full_size(n)])
def test_timm_parity_full_size(name):
    _check_parity(name, slow=True)
