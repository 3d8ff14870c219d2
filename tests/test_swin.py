"""Swin / Swin V2: registry defaults, timm parity (native size, other sizes, padding, per-dimension
window clamping, set_input_size), feature API, gradient checkpointing, errors."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models._manipulate import reinit_non_persistent_buffers

import vitkit
from structural import sampled
from vitkit.factory import get_variant
from vitkit.models.swin import SwinTransformer, fit_window, shifted_window_mask

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
    assert isinstance(ours, SwinTransformer)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.init_buffers()
    ref.load_state_dict(ours.state_dict(), strict=True)  # and back: the same keys and shapes
    return ours.eval()


def _pair(name: str, full: bool, **kwargs):
    if not full:
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
    ref, ours = _pair(name, full=slow or _is_full_size(name))
    x = torch.randn(1, 3, *ours.config.img_size)
    with torch.no_grad():
        _assert_close(ref(x), ours(x))

    # set_input_size on both: windows scale with the grid, V1 tables are interpolated
    ref.set_input_size(img_size=(160, 96))
    ours.set_input_size((160, 96))
    x = torch.randn(1, 3, 160, 96)
    with torch.no_grad():
        _assert_close(ref(x), ours(x))

    # both built at another size (reduced depth in `make test`): padding where a map is not a multiple
    # of the window; at (96, 160) the third stage's map (6, 10) clamps the window's height only
    for size in (_other_size(name), (96, 160)):
        ref, ours = _pair(name, full=slow, img_size=size)
        x = torch.randn(1, 3, *ours.config.img_size)
        with torch.no_grad():
            final, a = ref.forward_intermediates(x, indices=[0, 1, 2, 3])
            _assert_close(ref.forward_head(final), ours(x))
            b = ours.forward_intermediates(x, indices=[0, 1, 2, 3])
        for p, q in zip(a, b, strict=True):
            _assert_close(p, q)


@pytest.mark.parametrize("name", sampled(TIMM_NAMED))  # one variant of each kind; all with --run-slow
def test_timm_parity(name):
    _check_parity(name, slow=False)


@pytest.mark.slow("full-size large variant")
@pytest.mark.parametrize("name", TIMM_NAMED)
def test_timm_parity_full_size(name):
    _check_parity(name, slow=True)


# -- registry ---------------------------------------------------------------------------------------
def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", TIMM_NAMED)
def test_defaults_and_parameter_count_match_timm(name):
    with torch.device("meta"):
        ref = timm.create_model(name)
    config = get_variant(name).config
    assert config.num_classes == ref.num_classes
    assert config.img_size == tuple(ref.patch_embed.img_size)
    assert config.stage_window_sizes() == tuple(ref._ref_window_sizes)
    if get_variant(name).family == "swinv2":
        windows = [tuple(layer.blocks[0].attn.pretrained_window_size) for layer in ref.layers]
        assert windows == [(p, p) for p in config.pretrained_window_sizes]
    info = vitkit.model_info(name)
    assert info["params"] == _count(ref)
    assert info["family"] == ("swinv2" if name.startswith("swinv2") else "swin")


def test_swinv2_giant_on_meta():
    info = vitkit.model_info("swinv2_giant_window12_192")
    assert 2.95e9 < info["params"] < 3.05e9  # the V2 paper's 3.0 B
    with torch.device("meta"):
        model = vitkit.create_model("swinv2_giant_window12_192")
    assert model.num_features == 4096
    # extra main-branch LayerNorm after every 6th block of a stage: 7 in the 42-block stage
    extra = [n for n, m in model.named_modules() if n.endswith("norm3") and isinstance(m, torch.nn.LayerNorm)]
    assert extra == [f"layers.2.blocks.{i}.norm3" for i in range(5, 42, 6)]


def test_no_weight_decay_matches_timm():
    for name in ("swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"):
        with torch.device("meta"):
            ref, ours = timm.create_model(name), vitkit.create_model(name)
        assert ours.no_weight_decay() == ref.no_weight_decay()
        assert ours.no_weight_decay()


# -- behaviour on small models -----------------------------------------------------------------------
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 1), num_heads=(1, 2, 4, 8))


def test_dynamic_img_size_matches_timm():
    for name in ("swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"):
        ref = _timm_model(name, dynamic_img_size=True, **SMALL)
        ours = _ours_from(name, ref, dynamic_img_size=True, **SMALL)
        for size in ((160, 96), (100, 64), (160, 96)):
            x = torch.randn(1, 3, *size)
            with torch.no_grad():
                _assert_close(ref(x), ours(x))
        # one mask per padded map size, built on first use
        block = ours.layers[0].blocks[1]
        assert len(block._mask_cache) == 2 and block.attn_mask is None


def test_masks_built_once():
    model = vitkit.create_model("swin_tiny_patch4_window7_224", **SMALL).eval()
    shifted, plain = model.layers[0].blocks[1], model.layers[0].blocks[0]
    assert plain.attn_mask is None
    mask = shifted.attn_mask
    assert mask.shape == (64, 49, 49)  # (56 / 7)^2 windows
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert shifted.attn_mask is mask
    assert "attn_mask" not in model.state_dict() and not any("index" in k for k in model.state_dict())
    # a map no larger than the window (the last stage's 7 x 7): no shift, hence no mask
    assert fit_window((7, 7), (7, 7), shifted=True) == ((7, 7), (0, 0))
    # shift then pad: on a 14 x 14 map, the last window row and column hold three regions each
    m = shifted_window_mask((14, 14), (7, 7), (3, 3))
    assert (m[0] == 0).all() and (m[1] != 0).any() and (m[3] != 0).any()


def test_window_clamped_per_dimension():
    model = vitkit.create_model("swin_tiny_patch4_window7_224", img_size=(96, 160), **SMALL)
    block = model.layers[2].blocks[1]  # map (6, 10): height fits in one window, width does not
    assert block.window_size == (6, 7) and block.shift_size == (0, 3)
    assert block.attn.relative_position_bias_table.shape == (11 * 13, 4)


def test_wrong_input_size():
    model = vitkit.create_model("swin_tiny_patch4_window7_224", **SMALL)
    with pytest.raises(ValueError, match="set_input_size"):
        model(torch.randn(1, 3, 256, 256))
    model = vitkit.create_model("swin_tiny_patch4_window7_224", dynamic_img_size=True, **SMALL)
    with pytest.raises(ValueError, match="patch size"):
        model(torch.randn(1, 3, 98, 98))


def test_set_input_size():
    model = vitkit.create_model("swin_tiny_patch4_window7_224", **SMALL).eval()
    model.set_input_size(256)
    assert model.config.img_size == (256, 256) and model.config.window_size == 8
    attn = model.layers[0].blocks[0].attn
    assert attn.relative_position_bias_table.shape == (15 * 15, 1)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 256, 256)).shape == (2, 1000)
    with pytest.raises(ValueError, match="set_input_size"):
        model(torch.randn(1, 3, 224, 224))
    model.set_input_size(224)  # windows scale from the size the model was built for
    assert model.config.window_size == 7
    model.set_input_size((192, 128), window_size=((6, 4), (6, 4), 3, 2))
    assert model.config.window_size == ((6, 4), (6, 4), (3, 3), (2, 2))
    assert model.layers[3].blocks[0].window_size == (2, 2)
    with pytest.raises(ValueError, match="window_size"):
        model.set_input_size(224, window_size=(7, 7))  # two entries for four stages
    assert model.config.img_size == (192, 128)  # unchanged by the failed call


def test_grad_checkpointing_same_gradients():
    for name in ("swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"):
        model = vitkit.create_model(name, img_size=96, drop_path_rate=0.2, **SMALL).train()
        _randomize(model)
        x = torch.randn(2, 3, 96, 96)
        grads = []
        for enable in (False, True):
            model.set_grad_checkpointing(enable)
            model.zero_grad()
            torch.manual_seed(1)  # the same stochastic-depth draws
            model(x).square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        for n, g in grads[0].items():
            torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_features_head_and_intermediates():
    model = vitkit.create_model("swinv2_tiny_window8_256", img_size=128, **SMALL).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 4, 4, 256)  # NHWC, normalised
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        maps = model.forward_intermediates(x)
        assert [m.shape for m in maps] == [(2, 32, 32, 32), (2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
        assert [m.shape[1] for m in model.forward_intermediates(x, indices=2)] == [128, 256]
        assert model.forward_intermediates(x, indices=[-4])[0].shape == (2, 32, 32, 32)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[4])
    model.reset_classifier(10)
    assert model.config.num_classes == 10 and model(x).shape == (2, 10)
    model.reset_classifier(0)
    assert model(x).shape == (2, 256)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(num_heads=(3, 6, 12)), "num_heads"),
        (dict(num_heads=(5, 6, 12, 24)), "num_heads"),
        (dict(depths=(2, 0, 6, 2)), "depths"),
        (dict(window_size=(7, 7)), "window_size"),
        (dict(window_size=0), "window_size"),
        (dict(img_size=(226, 224)), "patch_size"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(pretrained_window_sizes=(12, 12, 12, 6)), "Swin V2"),
        (dict(extra_norm_every_n_blocks=6), "Swin V2"),
    ],
)
def test_bad_config(fields, match):
    with pytest.raises(ValueError, match=match):
        with torch.device("meta"):
            vitkit.create_model("swin_tiny_patch4_window7_224", **fields)


def test_save_load_round_trip(tmp_path):
    from vitkit.factory import load_model
    from vitkit.weights.vitkit_format import save_model

    model = vitkit.create_model("swin_tiny_patch4_window7_224", **SMALL).eval()
    model.set_input_size((160, 96))  # per-stage (h, w) windows in the config
    path = tmp_path / "swin.safetensors"
    save_model(model, path)
    loaded = load_model(path).eval()
    assert loaded.config == model.config
    x = torch.randn(1, 3, 160, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


# -- per-forward work: cached bias, broadcast mask, one gather for roll + partition -------------------
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_bias_cached_in_eval_and_invalidated_by_weight_changes(name):
    model = vitkit.create_model(name, **SMALL).eval()
    _randomize(model)
    attn = model.layers[0].blocks[1].attn  # a shifted block: bias and mask combined
    size = model.config.img_size
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        first = model(x)
        cached = attn._bias_cache[1]
        assert cached.shape[:2] == (1, attn.num_heads * model.layers[0].blocks[1].attn_mask.shape[0])
        # contiguous: the gathered (heads, N, N) bias is a permuted view, whose broadcast add over the
        # windows took ~10x as long (Swin-T / SwinV2-T bf16 inference 1.07x / 1.14x faster once it was not)
        assert cached.is_contiguous() and model.layers[0].blocks[0].attn._bias_cache[1].is_contiguous()
        assert torch.equal(model(x), first) and attn._bias_cache[1] is cached  # reused, not rebuilt
    # an in-place optimiser step on the tables: the cache follows, the model learns them
    model.train()
    assert attn._bias_cache is None  # train() drops it
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).square().mean().backward()
    table = getattr(attn, "relative_position_bias_table", None)
    table = table if table is not None else attn.cpb_mlp[0].weight
    assert table.grad is not None and table.grad.abs().sum() > 0
    opt.step()
    model.eval()
    with torch.no_grad():
        stepped = model(x)
        model.eval()  # eval() again keeps the cache (eval -> eval is not a weight change)
        uncached = _uncached(model, x)
    torch.testing.assert_close(stepped, uncached, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stepped, first)
    # load_state_dict (an in-place copy) invalidates as well
    fresh = vitkit.create_model(name, **SMALL).eval()
    model.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x), rtol=1e-5, atol=1e-6)


def _uncached(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward with every bias recomputed (gradients on: the cache is bypassed)."""
    with torch.enable_grad():
        return model(x).detach()


def test_batch_broadcast_and_gather_match_the_batch_one_by_one():
    # the shift mask broadcast over the batch and the gathered windows: each image as if alone
    for name in ("swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"):
        model = vitkit.create_model(name, **SMALL).eval()
        _randomize(model)
        x = torch.randn(3, 3, *model.config.img_size)
        with torch.no_grad():
            batch = model(x)
            alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
        _assert_close(batch, alone)
        block = model.layers[0].blocks[1]
        assert block.window_order is not None and block.window_order.shape == (block.resolution[0] ** 2,)


def test_window_gather_has_the_gradients_of_roll_and_partition():
    from vitkit.models.swin import permute_tokens, shifted_window_order, window_partition

    x = torch.randn(2, 14, 14, 5, requires_grad=True)
    index, inverse = shifted_window_order((14, 14), (7, 7), (3, 3))
    ref = window_partition(torch.roll(x, shifts=(-3, -3), dims=(1, 2)), (7, 7))
    out = permute_tokens(x.reshape(2, 196, 5), index, inverse).view(-1, 49, 5)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    (grad_ref,) = torch.autograd.grad(ref, x, g)
    (grad,) = torch.autograd.grad(out, x, g)
    assert torch.equal(grad, grad_ref)
