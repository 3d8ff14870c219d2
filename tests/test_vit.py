"""ViT / DeiT / DeiT III: registry defaults, timm parity, resolution handling, feature API, errors."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import vitkit
from structural import sampled
from vitkit.factory import get_variant

VIT_FAMILY = [n for n in vitkit.list_models() if get_variant(n).family in ("vit", "deit", "deit3")]
TIMM_NAMED = [n for n in VIT_FAMILY if not n.endswith("_in21k")]
FULL_SIZE = ("tiny", "small", "medium")  # full-size parity in `make test`; larger ones at reduced depth


def _is_full_size(name: str) -> bool:
    return any(f"_{size}_" in name for size in FULL_SIZE)


def _pair(name: str, slow: bool = False, **kwargs):
    """timm's model (random weights) and ours holding the same weights, both in eval mode."""
    if not slow and not _is_full_size(name):
        kwargs.setdefault("depth", 2)
    ref = timm.create_model(name, **kwargs).eval()
    with torch.device("meta"):
        ours = vitkit.create_model(name, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    scale = a.abs().max().item()
    assert (a - b).abs().max().item() <= 1e-5 * scale, f"max diff {(a - b).abs().max().item()} at scale {scale}"


def _other_size(name: str) -> int:
    native = get_variant(name).config.img_size[0]
    patch = get_variant(name).config.patch_size
    return 224 if native != 224 else (168 if patch == 14 else 160)


def _check_parity(name: str, slow: bool) -> None:
    patch = get_variant(name).config.patch_size
    ref, ours = _pair(name, slow)
    x = torch.randn(2, 3, *ours.config.img_size)
    with torch.no_grad():
        _assert_close(ref(x), ours(x))

    # dynamic size at a non-square input
    ref, ours = _pair(name, slow, dynamic_img_size=True)
    x = torch.randn(1, 3, (168 if patch == 14 else 160), 224)
    with torch.no_grad():
        _assert_close(ref(x), ours(x))
        a = ref.forward_intermediates(x, indices=2, intermediates_only=True)
        b = ours.forward_intermediates(x, indices=2)
    for p, q in zip(a, b, strict=True):
        _assert_close(p, q)

    # both built at another size
    size = _other_size(name)
    ref, ours = _pair(name, slow, img_size=size)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        _assert_close(ref(x), ours(x))


@pytest.mark.parametrize("name", sampled(TIMM_NAMED))  # one variant of each kind; all with --run-slow
def test_timm_parity(name):
    _check_parity(name, slow=False)


@pytest.mark.slow("full-size large variant")
@pytest.mark.parametrize("name", [n for n in TIMM_NAMED if not _is_full_size(n)])
def test_timm_parity_full_size(name):
    _check_parity(name, slow=True)


@pytest.mark.parametrize("name", TIMM_NAMED)
def test_defaults_and_parameter_count_match_timm(name):
    with torch.device("meta"):
        ref = timm.create_model(name)
    info = vitkit.model_info(name)
    assert info["num_classes"] == ref.num_classes
    assert info["img_size"] == tuple(ref.patch_embed.img_size)
    assert info["params"] == sum(p.numel() for p in ref.parameters())
    with torch.device("meta"):
        ours = vitkit.create_model(name)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize(
    "name, millions",
    [
        ("vit_tiny_patch16_224", 5.7),
        ("vit_small_patch16_224", 22),
        ("vit_base_patch16_224", 86),
        ("vit_large_patch16_224", 304),
        ("vit_huge_patch14_224", 632),
    ],
)
def test_seed_table_parameter_counts(name, millions):
    # the ViT / DeiT papers' sizes, counted with a 1000-class head
    params = vitkit.model_info(name, num_classes=1000)["params"] / 1e6
    assert abs(params - millions) / millions < 0.01


@pytest.mark.parametrize("name", [n for n in VIT_FAMILY if n.endswith("_in21k")])
def test_in21k_variants_have_tanh_pre_logits(name):
    info = vitkit.model_info(name)
    assert info["num_classes"] == 21843
    with torch.device("meta"):
        model = vitkit.create_model(name)
    keys = model.state_dict().keys()
    assert "pre_logits.fc.weight" in keys and "pre_logits.fc.bias" in keys
    dim = info["config"]["embed_dim"]
    assert model.pre_logits.fc.weight.shape == (dim, dim)
    assert model.head.weight.shape == (21843, dim)


def test_in21k_forward_applies_tanh_before_head():
    model = vitkit.create_model("vit_base_patch16_224_in21k", depth=1).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.abs().max() <= 1.0  # tanh range
        expected = model.head(torch.tanh(model.pre_logits.fc(feats[:, 0])))
        _assert_close(expected, model(x))


def test_distilled_training_returns_both_heads():
    model = vitkit.create_model("deit_tiny_distilled_patch16_224", depth=1, num_classes=10)
    x = torch.randn(2, 3, 224, 224)
    model.train()
    assert model(x).shape == (2, 10)
    model.set_distilled_training(True)
    cls, dist = model(x)
    assert cls.shape == dist.shape == (2, 10)
    model.eval()
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        _assert_close((model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2, out)


def test_avg_pool_without_class_token_matches_timm():
    kwargs = dict(depth=2, global_pool="avg")
    ref = timm.create_model("vit_small_patch16_224", class_token=False, **kwargs).eval()
    ours = vitkit.create_model("vit_small_patch16_224", **kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        _assert_close(ref(x), ours(x))


def test_sincos_position_embedding_is_fixed_and_not_saved():
    model = vitkit.create_model(
        "vit_small_patch16_224",
        depth=1,
        global_pool="avg",
        pos_embed="sincos2d",
        no_embed_class=True,
        dynamic_img_size=True,
    )
    assert "pos_embed" not in model.state_dict()
    assert not any(n == "pos_embed" for n, _ in model.named_parameters())
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    assert model(torch.randn(1, 3, 160, 96)).shape == (1, 1000)


def test_set_input_size_matches_timm():
    ref, ours = _pair("deit3_small_patch16_224", dynamic_img_size=False)
    ref.set_input_size(img_size=(256, 192))
    ours.set_input_size((256, 192))
    assert ours.config.img_size == (256, 192)
    x = torch.randn(1, 3, 256, 192)
    with torch.no_grad():
        _assert_close(ref(x), ours(x))
    with pytest.raises(ValueError, match="does not match"):
        ours(torch.randn(1, 3, 224, 224))


def test_forward_intermediates_list_indices_match_timm():
    ref, ours = _pair("deit_small_distilled_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a = ref.forward_intermediates(x, indices=[0, 5, -1], intermediates_only=True)
        b = ours.forward_intermediates(x, indices=[0, 5, -1])
    assert [t.shape for t in b] == [(1, 384, 14, 14)] * 3
    for p, q in zip(a, b, strict=True):
        _assert_close(p, q)
    with pytest.raises(ValueError, match="out of range"):
        ours.forward_intermediates(x, indices=[12])


def test_forward_features_and_head_match_timm():
    ref, ours = _pair("vit_tiny_patch16_224")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        _assert_close(ref.forward_features(x), ours.forward_features(x))
        f = ours.forward_features(x)
        _assert_close(ref.forward_head(f, pre_logits=True), ours.forward_head(f, pre_logits=True))


def test_gradient_checkpointing_gives_same_gradients():
    model = vitkit.create_model("deit3_small_patch16_224", depth=3, num_classes=5, img_size=64).train()
    x = torch.randn(2, 3, 64, 64)

    def grads():
        model.zero_grad()
        torch.manual_seed(1)
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_reset_classifier():
    model = vitkit.create_model("deit_tiny_distilled_patch16_224", depth=1)
    model.reset_classifier(7)
    assert model.head.out_features == model.head_dist.out_features == 7
    assert model.config.num_classes == 7
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 192)


def test_stochastic_depth_follows_linear_rule():
    model = vitkit.create_model("deit_small_patch16_224", drop_path_rate=0.1)
    rates = [b.drop_path1.p for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates == pytest.approx([0.1 * i / 11 for i in range(12)])


def test_init_is_truncated_normal():
    model = vitkit.create_model("vit_small_patch16_224")
    w = model.blocks[0].attn.qkv.weight
    assert w.abs().max() <= 0.04 + 1e-6  # truncated at 2 std
    assert abs(w.std().item() - 0.02) < 0.003
    assert model.pos_embed.std().item() == pytest.approx(0.02, abs=0.003)


def test_meta_device_builds_huge():
    info = vitkit.model_info("deit3_huge_patch14_224")
    assert 630e6 < info["params"] < 635e6


def test_in_chans_override():
    model = vitkit.create_model("deit_tiny_patch16_224", in_chans=1, img_size=32, patch_size=4, num_classes=10, depth=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embed_dim=100), "embed_dim .*divisible by num_heads"),
        (dict(img_size=230), "img_size .*multiple of patch_size"),
        (dict(global_pool="max"), "global_pool must be one of"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(depths=3), "unknown option depths.*allowed:.*depth"),
        (dict(img_size="big"), "img_size must be an int"),
    ],
)
def test_invalid_overrides(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vitkit.create_model("deit_tiny_patch16_224", **kwargs)


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean deit_tiny_patch16_224"):
        vitkit.create_model("deit_tiny_patch16_22")


def test_wrong_input_size_errors():
    model = vitkit.create_model("deit_tiny_patch16_224", depth=1)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        model(torch.randn(1, 3, 160, 160))
    model = vitkit.create_model("deit_tiny_patch16_224", depth=1, dynamic_img_size=True)
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        model(torch.randn(1, 3, 150, 160))


def test_list_models_pattern():
    assert vitkit.list_models("deit3_*_384") == [
        "deit3_base_patch16_384",
        "deit3_large_patch16_384",
        "deit3_small_patch16_384",
    ]


def test_patch_dropout_keeps_prefix_and_a_random_ordered_subset():
    from vitkit.layers import PatchDropout

    torch.manual_seed(0)
    drop = PatchDropout(0.5, prefix=2).train()
    x = torch.randn(4, 2 + 49, 8)
    y = drop(x)
    assert y.shape == (4, 2 + 24, 8)
    assert torch.equal(y[:, :2], x[:, :2])
    picked = []
    for b in range(4):  # every kept token is an input patch token, in grid order
        rows = [int((x[b, 2:] == t).all(dim=1).nonzero()) for t in y[b, 2:]]
        assert rows == sorted(rows) and len(set(rows)) == 24
        picked.append(tuple(rows))
    assert len(set(picked)) > 1  # each sample draws its own subset
    assert drop.eval()(x) is x
    with pytest.raises(ValueError, match="patch_drop_rate"):
        vitkit.create_model("vit_tiny_patch16_224", patch_drop_rate=1.0)


def test_patch_dropout_in_the_model_trains_on_fewer_tokens_and_evaluates_on_all():
    model = vitkit.create_model(
        "vit_tiny_patch16_224",
        img_size=28,
        in_chans=1,
        num_classes=10,
        patch_size=4,
        embed_dim=32,
        num_heads=2,
        depth=1,
        patch_drop_rate=0.75,
    )
    x = torch.randn(2, 1, 28, 28)
    assert model.train().forward_features(x).shape == (2, 1 + 12, 32)
    assert model.eval().forward_features(x).shape == (2, 1 + 49, 32)
    plain = vitkit.create_model(
        "vit_tiny_patch16_224",
        img_size=28,
        in_chans=1,
        num_classes=10,
        patch_size=4,
        embed_dim=32,
        num_heads=2,
        depth=1,
    )
    plain.load_state_dict(model.state_dict())  # no parameters of its own: same keys as timm's
    torch.testing.assert_close(plain.eval()(x), model(x), rtol=0, atol=0)


def test_short_sequences_on_the_cpu_take_the_explicit_attention_path_with_the_same_result(monkeypatch):
    from vitkit.layers import attention

    torch.manual_seed(0)
    model = vitkit.create_model("deit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, depth=2)
    x = torch.randn(4, 1, 28, 28)
    assert 17 <= attention.CPU_EXPLICIT_MAX_TOKENS

    def run(m: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.zero_grad()
        out = m(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in m.parameters()]

    reference, reference_grads = run(copy.deepcopy(model).double(), x.double())  # float64: the truth
    explicit, explicit_grads = run(model, x)
    monkeypatch.setattr(attention, "CPU_EXPLICIT_MAX_TOKENS", 0)  # every length through the fused kernel
    fused, fused_grads = run(model, x)
    # both float32 paths sit within float32 rounding of the float64 result (measured: ~1e-6 of each
    # gradient's largest entry for either path); they differ from each other by about that much too
    for out, grads in ((explicit, explicit_grads), (fused, fused_grads)):
        torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
        for g, ref in zip(grads, reference_grads):
            torch.testing.assert_close(g.double(), ref, rtol=0, atol=5e-6 * ref.abs().max().item())


# -- the oneDNN linear path (CPU inference) beside F.linear ----------------------------------------------
@pytest.mark.parametrize(
    "name,kwargs,size",
    [
        ("deit_small_patch16_224", {"depth": 2}, 224),
        ("swin_tiny_patch4_window7_224", {"embed_dim": 32, "depths": (2, 2, 2, 1), "num_heads": (1, 2, 4, 8)}, 224),
        ("swinv2_tiny_window8_256", {"embed_dim": 32, "depths": (2, 2, 2, 1), "num_heads": (1, 2, 4, 8)}, 256),
    ],
)
def test_onednn_linear_matches_f_linear(name, kwargs, size):
    from torch.profiler import profile

    from vitkit.layers.linear import onednn_linear_enabled, set_onednn_linear

    if not onednn_linear_enabled():
        pytest.skip("this torch build has no oneDNN linear kernel")
    torch.manual_seed(0)
    model = vitkit.create_model(name, **kwargs).eval()
    for p in model.parameters():  # weights far from the init, so every layer shapes the output
        p.data.normal_(0, p[0].numel() ** -0.5 if p.ndim > 1 else 0.5)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        with profile() as prof:
            fast = model(x)
        assert any("_linear_pointwise" in e.key for e in prof.key_averages())  # the fast path ran
        previous = set_onednn_linear(False)
        try:
            with profile() as prof:
                exact = model(x)
            assert not any("_linear_pointwise" in e.key for e in prof.key_averages())
        finally:
            set_onednn_linear(previous)
    assert (fast - exact).abs().max() <= 1e-5 * exact.abs().max()
    # training (gradients on) always takes F.linear: the oneDNN kernel has no backward
    model.train()
    model(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
