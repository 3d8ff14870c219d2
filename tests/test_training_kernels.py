"""vitkit's kernels around the linear layers and norms in bf16 training: the GELU that keeps its slope,
the column sums (bias gradients), LayerNorm forward and backward, and the bf16 weight copies kept
between steps. Each against float64, torch's own ops, or torch's path, and where it steps aside."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkit
from vitkit.layers import LayerNorm, Mlp, kernels
from vitkit.layers import linear as linear_module
from vitkit.layers.drop_path import DropPath
from vitkit.layers.linear import _BF16_COPIES, linear, onednn_linear_enabled


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _gelu64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double().requires_grad_()
    y = F.gelu(x)
    (slope,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), slope


# -- GELU with its slope ----------------------------------------------------------------------------
def test_gelu_and_its_slope_match_float64(built):
    x = torch.cat([torch.randn(4099) * 3, torch.linspace(-12, 12, 2001), torch.tensor([0.0, -0.0, 1e-30])])
    y = x.clone()
    slope = torch.ops.vitkit.gelu_train_(y)  # y written over the input
    want_y, want_s = _gelu64(x)
    assert (y.double() - want_y).abs().max().item() < 1e-6  # torch's own fp32 GELU is within ~1.2e-6
    assert (slope.double() - want_s).abs().max().item() < 1e-6
    # bf16: the fp32 values rounded once: within half a bf16 step (at most 2^-8 of the value) of float64,
    # above the fp32 error's floor (1e-6 absolute, where GELU's tail is tiny); torch's bf16 GELU likewise
    xb = x.bfloat16()
    yb = xb.clone()
    sb = torch.ops.vitkit.gelu_train_(yb)
    assert yb.dtype == sb.dtype == torch.bfloat16
    want_yb, want_sb = _gelu64(xb)
    for got, want in ((yb, want_yb), (sb, want_sb), (F.gelu(xb), want_yb)):
        assert ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()


def test_gelu_backward_is_the_product_and_sums_the_bias_gradient(built):
    torch.manual_seed(0)
    g, s = torch.randn(130, 19).bfloat16(), torch.randn(130, 19).bfloat16()  # rows past a block, a tail
    dx, db = torch.ops.vitkit.gelu_backward(g, s, True)
    assert torch.equal(dx, g * s)  # computed in fp32, rounded once: torch's bf16 product
    assert db.dtype == torch.float32 and _rel(db, dx.double().sum(0)) < 1e-6
    dx, db = torch.ops.vitkit.gelu_backward(g.float(), s.float(), False)
    assert torch.equal(dx, g.float() * s.float()) and db.numel() == 0
    with pytest.raises(RuntimeError, match="must match in shape and dtype"):
        torch.ops.vitkit.gelu_backward(g, s.float(), True)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.vitkit.gelu_train_(torch.randn(4, 6).t())


@pytest.mark.parametrize("shape", [(25088, 96), (130, 19), (1, 16), (0, 8)])
def test_column_sums_match_float64_whatever_the_thread_count(built, shape):
    torch.manual_seed(0)
    x = torch.randn(shape).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.vitkit.column_sums(x)
        torch.set_num_threads(3)
        three = torch.ops.vitkit.column_sums(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)  # fixed blocks of rows, added in order
    assert one.dtype == torch.float32 and one.shape == (shape[1],)
    if x.numel():
        assert (one.double() - x.double().sum(0)).abs().max().item() <= 1e-5 * x.shape[0] ** 0.5


# -- LayerNorm ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [96, 37, 768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_ops_match_float64(built, C, dtype):
    torch.manual_seed(0)
    x = (torch.randn(300, C) * 3 + 1).to(dtype)
    w, b = torch.randn(C), torch.randn(C)
    g = (torch.randn(300, C) * 1e-3).to(dtype)
    y, mean, rstd = torch.ops.vitkit.layer_norm_forward(x, w, b, 1e-5)
    dx, sums = torch.ops.vitkit.layer_norm_backward(g, x, mean, rstd, w, True)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    ref = F.layer_norm(x64, (C,), w64, b64, 1e-5)
    ref.backward(g.double())
    tol = 1e-6 if dtype == torch.float32 else 2**-8  # bf16: the fp32 result rounded once
    assert y.dtype == dx.dtype == dtype
    assert _rel(y, ref) < tol and _rel(dx, x64.grad) < tol
    # the parameters' gradients are summed in fp32, in either dtype
    assert _rel(sums[:C], w64.grad) < 1e-5 and _rel(sums[C:], b64.grad) < 1e-5
    # without parameters: unit scale, zero shift
    y0, _, _ = torch.ops.vitkit.layer_norm_forward(x, None, None, 1e-5)
    assert _rel(y0, F.layer_norm(x.double(), (C,), eps=1e-5)) < tol


def test_layer_norm_op_errors_name_the_input(built):
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="weight must be a contiguous float32 CPU tensor of 8"):
        torch.ops.vitkit.layer_norm_forward(x, torch.randn(7), torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="both weight and bias, or neither"):
        torch.ops.vitkit.layer_norm_forward(x, torch.randn(8), None, 1e-5)
    with pytest.raises(RuntimeError, match="one value per row"):
        torch.ops.vitkit.layer_norm_backward(x, x, torch.zeros(3), torch.ones(3), None, False)


def test_layer_norm_module_takes_the_kernel_for_bf16_only(built, monkeypatch):
    """bf16 CPU inputs: the kernel (gradients through its backward); fp32 inputs: torch's LayerNorm,
    bit for bit; with the kernels off, or while exporting/counting, torch's path."""
    torch.manual_seed(0)
    norm = LayerNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    calls = []
    real = torch.ops.vitkit.layer_norm_forward
    monkeypatch.setattr(
        torch.ops.vitkit, "layer_norm_forward", lambda *a: calls.append(a[0].dtype) or real(*a), raising=False
    )
    x = torch.randn(2, 5, 7, 96)
    assert torch.equal(norm(x), F.layer_norm(x, (96,), norm.weight, norm.bias, 1e-6)) and not calls
    # bf16 through a permuted (non-contiguous) view, as the patch embedding's output arrives
    xb = torch.randn(2, 96, 5, 7).bfloat16().permute(0, 2, 3, 1).requires_grad_()
    y = norm(xb)
    assert calls == [torch.bfloat16] and y.shape == xb.shape and y.dtype == torch.bfloat16
    g = torch.randn_like(y)
    y.backward(g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (xb, norm.weight, norm.bias))
    F.layer_norm(x64, (96,), w64, b64, 1e-6).backward(g.double())
    assert _rel(y, F.layer_norm(x64, (96,), w64, b64, 1e-6)) < 2**-8
    assert _rel(xb.grad, x64.grad) < 2**-8
    assert norm.weight.grad.dtype == torch.float32 and _rel(norm.weight.grad, w64.grad) < 1e-5
    assert _rel(norm.bias.grad, b64.grad) < 1e-5
    calls.clear()
    previous = kernels.set_kernels(False)
    try:
        assert torch.equal(norm(xb), F.layer_norm(xb, (96,), norm.weight, norm.bias, 1e-6)) and not calls
    finally:
        kernels.set_kernels(previous)
    with torch.no_grad():  # inference (e.g. weights cast to bf16): the kernel without autograd
        assert norm.bfloat16()(xb).dtype == torch.bfloat16 and calls


def test_layer_norm_second_derivative_takes_torchs_path(built):
    torch.manual_seed(0)
    norm = LayerNorm(32)
    x = torch.randn(6, 32).bfloat16().requires_grad_()

    def penalty(fn) -> torch.Tensor:
        (gx,) = torch.autograd.grad(fn(x).float().square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.float().square().sum(), norm.weight)[0]

    got = penalty(norm)
    want = penalty(lambda t: F.layer_norm(t, (32,), norm.weight, norm.bias, norm.eps))
    assert _rel(got, want) < 1e-2


# -- fc1 + GELU in bf16 training, and the kept bf16 weight copies ------------------------------------------
needs_onednn = pytest.mark.skipif(not onednn_linear_enabled(), reason="this torch has no oneDNN linear kernel")


@needs_onednn
def test_mlp_bf16_training_fuses_gelu_with_the_same_gradients(built, onednn_bf16):
    torch.manual_seed(0)
    mlp = Mlp(96, 384).train()
    x = torch.randn(4, 49, 96, requires_grad=True)
    g = torch.randn(4, 49, 96).bfloat16()

    def grads(fn):
        mlp.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x)
        y.backward(g)
        return [y, x.grad, *(p.grad for p in mlp.parameters())]

    got = grads(mlp)
    # fc1 and its GELU in one _OneDNNLinear call: no separate GELU node
    assert _has_fn(got[0], "_OneDNNLinearBackward") and not _has_fn(got[0], "GeluBackward0")
    want = grads(lambda t: F.linear(F.gelu(F.linear(t, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias))
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) < 2e-2  # bf16 rounding; the fc1 bias gradient is summed in fp32 here
    for p in mlp.parameters():
        assert p.grad.dtype == torch.float32


@needs_onednn
@pytest.mark.parametrize("avx512", [False, True])
def test_mlp_fp32_training_fuses_gelu_on_avx2_only(built, monkeypatch, avx512):
    """fp32 training: fc1's GELU is vitkit's kernel on AVX2-only CPUs, where it measured faster, and torch's
    GELU on AVX-512 ones (not measured there); the CPU kind is faked, so both run everywhere. The gradients
    agree with torch's composition to fp32 rounding either way."""
    monkeypatch.setattr(linear_module, "_avx512", lambda: avx512)
    torch.manual_seed(0)
    mlp = Mlp(96, 384).train()
    x = torch.randn(4, 49, 96, requires_grad=True)
    g = torch.randn(4, 49, 96)

    def grads(fn):
        mlp.zero_grad()
        x.grad = None
        y = fn(x)
        y.backward(g)
        return [y, x.grad, *(p.grad for p in mlp.parameters())]

    got = grads(mlp)
    assert _has_fn(got[0], "GeluBackward0") is avx512
    want = grads(lambda t: F.linear(F.gelu(F.linear(t, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias))
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) < 1e-5


def _has_fn(y: torch.Tensor, name: str) -> bool:
    seen, todo = set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            if type(fn).__name__ == name:
                return True
            todo.extend(f for f, _ in fn.next_functions)
    return False


@needs_onednn
def test_act_hooks_keep_the_gelu_module(built):
    mlp = Mlp(16, 32).train()
    seen = []
    mlp.act.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mlp(torch.randn(2, 16, requires_grad=True)).float().sum().backward()
    mlp.eval()
    with torch.no_grad():
        mlp(torch.randn(2, 16))
    assert seen == [(2, 32), (2, 32)]


@needs_onednn
def test_bf16_second_derivatives_through_linear_and_gelu(built):
    """create_graph=True under bf16 autocast recomputes through differentiable ops (the casts included)."""
    torch.manual_seed(0)
    mlp = Mlp(32, 64).train()
    x = torch.randn(8, 32, requires_grad=True)

    def penalty(fn) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (gx,) = torch.autograd.grad(fn(x).float().square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), mlp.fc1.weight)[0]

    got = penalty(mlp)
    want = penalty(lambda t: F.linear(F.gelu(F.linear(t, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias))
    assert got.dtype == torch.float32 and _rel(got, want) < 3e-2


@needs_onednn
def test_bf16_weight_copies_follow_every_weight_change(built, onednn_bf16):
    """The bf16 copy of a weight is kept between steps and refilled in place on every forward, so it
    follows the fp32 weight however it changes: fused AdamW (which does not bump the version counter),
    plain SGD, a write under no_grad. Two forwards before one backward: each graph keeps its own copy."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    for opt in (torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True), torch.optim.SGD(layer.parameters(), lr=0.1)):
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = linear(layer, x)
                want = F.linear(x, layer.weight, layer.bias)
            assert torch.equal(y, want)  # the same bf16 casts autocast makes, from the current weights
            y.float().square().sum().backward()
            opt.step()
            opt.zero_grad()
    kept = _BF16_COPIES[layer]["weight"]
    with torch.no_grad():
        layer.weight.mul_(-1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(linear(layer, x), F.linear(x, layer.weight, layer.bias))
    assert _BF16_COPIES[layer]["weight"].data_ptr() == kept.data_ptr()  # refilled, not reallocated

    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = linear(layer, xg)
    with torch.no_grad():
        layer.weight.add_(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        second = linear(layer, xg)  # the first graph still holds its copy: this one gets another
    (first.float().sum() + second.float().square().sum()).backward()
    got = xg.grad.clone()
    xg.grad = None
    with torch.no_grad():
        layer.weight.sub_(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref1 = F.linear(xg, layer.weight, layer.bias)
    with torch.no_grad():
        layer.weight.add_(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref2 = F.linear(xg, layer.weight, layer.bias)
    (ref1.float().sum() + ref2.float().square().sum()).backward()
    assert _rel(got, xg.grad) < 1e-2


@needs_onednn
def test_gelu_buffers_are_reused_only_when_free(built, onednn_bf16):
    """fc1 + GELU's slope lives in a buffer kept per layer and its backward's product in a kept scratch:
    reused step after step, never while a graph still holds them. Two forwards before their backwards,
    and a backward run twice (retain_graph), give the gradients of separate steps."""
    torch.manual_seed(0)
    mlp = Mlp(32, 64).train()
    xs = [torch.randn(4, 6, 32) for _ in range(2)]

    def grads(*inputs: torch.Tensor, twice: bool = False) -> torch.Tensor:
        m = copy.deepcopy(mlp)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sum(m(x).float().square().sum() for x in inputs)
        loss.backward(retain_graph=twice)
        if twice:
            loss.backward()
        return m.fc1.weight.grad

    separate = grads(xs[0]) + grads(xs[1])
    assert _rel(grads(*xs), separate) < 1e-6  # the second forward did not write over the first's slope
    assert _rel(grads(xs[0], twice=True), 2 * grads(xs[0])) < 1e-6  # the slope survived the first backward

    with torch.autocast("cpu", dtype=torch.bfloat16):
        mlp(xs[0]).float().sum().backward()
        kept = _BF16_COPIES[mlp.fc1]["slope"]
        mlp(xs[0]).float().sum().backward()
    assert _BF16_COPIES[mlp.fc1]["slope"].data_ptr() == kept.data_ptr()  # reused once its graph was done


@needs_onednn
def test_eval_drops_the_kept_training_buffers(built, monkeypatch):
    """`model.eval()` frees fc1's GELU slope, the bf16 weight copies and the backward's scratch; training
    again makes them anew with the same gradients. The scratch is one flat buffer for every shape (a Swin's
    stages, a short last batch), as large as the largest product."""
    monkeypatch.setattr(linear_module, "_avx512", lambda: False)  # fp32 takes the GELU kernel
    torch.manual_seed(0)
    model = nn.Sequential(Mlp(32, 64), Mlp(32, 128)).train()

    def step(x: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    x = torch.randn(4, 6, 32)
    first = step(x)
    assert {id(m) for m in (model[0].fc1, model[1].fc1)} <= {id(m) for m in _BF16_COPIES.keys()}
    step(x[:1])  # a short batch: its products fit the kept scratch
    scratch = [flat for buffers in linear_module._SCRATCH.values() for flat in buffers.values()]
    assert len(scratch) == 1 and scratch[0].numel() == 4 * 6 * 128
    model.eval()
    assert not any(m in _BF16_COPIES for m in model.modules()) and not linear_module._SCRATCH
    with torch.no_grad():
        model(x)  # inference keeps none of them
    assert not any(m in _BF16_COPIES for m in model.modules()) and not linear_module._SCRATCH
    model.train()
    assert all(torch.equal(a, b) for a, b in zip(step(x), first, strict=True))
    if linear_module._BF16_AVAILABLE:  # bf16 autocast training keeps copies of the weights as well
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().sum().backward()
        assert "weight" in _BF16_COPIES[model[0].fc2]
    linear_module.release_training_buffers()
    assert not _BF16_COPIES and not linear_module._SCRATCH


@needs_onednn
def test_inference_caches_follow_a_fused_optimiser_step():
    """Prepacked inference weights and Swin's eval-mode bias are keyed on the weights' versions and on
    the optimiser steps taken: a fused AdamW step (no version bump) between two evaluations shows."""
    torch.manual_seed(0)
    model = vitkit.create_model("swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1, 1, 1), num_classes=4).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        before = model(x)
    model(x).square().sum().backward()  # eval mode, gradients on
    opt.step()
    with torch.no_grad():
        after = model(x)
    from vitkit.layers.linear import set_onednn_linear  # noqa: PLC0415

    previous, kept = set_onednn_linear(False), kernels.set_kernels(False)
    try:
        fresh = copy.deepcopy(model)
        with torch.no_grad():
            want = fresh(x)
    finally:
        set_onednn_linear(previous)
        kernels.set_kernels(kept)
    assert not torch.allclose(before, after)
    assert _rel(after, want) < 1e-4


def test_drop_path_scales_the_mask_as_timm_does():
    timm = pytest.importorskip("timm")
    x = torch.randn(8, 5, 7)
    ours = DropPath(0.3).train()
    torch.manual_seed(3)
    got = ours(x)
    torch.manual_seed(3)
    want = timm.layers.DropPath(0.3).train()(x)
    assert torch.equal(got, want)


@needs_onednn
def test_swin_bf16_training_step_matches_the_torch_path(built):
    """A whole Swin-T (small) bf16 training step with the kernels on against them off: the same loss
    and matmul gradients within bf16 rounding."""
    torch.manual_seed(0)
    model = vitkit.create_model(
        "swin_tiny_patch4_window7_224", img_size=112, depths=(1, 1, 1, 1), num_classes=10, drop_path_rate=0.0
    ).train()
    _assert_bf16_step_matches(model, torch.randn(2, 3, 112, 112))


# -- ViT attention through the window kernel (one window per image) ----------------------------------
def _vit_attention(dim: int = 128, heads: int = 4, attn_drop: float = 0.0) -> nn.Module:
    from vitkit.layers.attention import Attention  # noqa: PLC0415

    torch.manual_seed(0)
    return Attention(dim, heads, attn_drop=attn_drop)


def _attention_grads(attn: nn.Module, x: torch.Tensor, g: torch.Tensor, bf16: bool) -> list[torch.Tensor]:
    m = copy.deepcopy(attn).train()
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = m(x)
    y.float().backward(g)
    return [y.detach().float(), x.grad, *(p.grad for p in m.parameters())]


@pytest.mark.parametrize("tokens", [17, 197])
@pytest.mark.parametrize("bf16", [False, True])
def test_vit_attention_kernel_matches_the_torch_path(built, monkeypatch, tokens, bf16):
    """ViT attention through the kernel (each image one window, zero bias) against the torch path
    (explicit or SDPA): output and every gradient, fp32 to float rounding, bf16 to bf16 rounding; and
    in inference the same output as in training."""
    import vitkit.layers.attention as attention  # noqa: PLC0415

    attn = _vit_attention(dim=128 if tokens == 17 else 192, heads=4 if tokens == 17 else 3)
    x, g = torch.randn(3, tokens, attn.qkv.in_features), torch.randn(3, tokens, attn.qkv.in_features)
    calls = []
    real = kernels.window_attention_train
    monkeypatch.setattr(kernels, "window_attention_train", lambda *a: calls.append(1) or real(*a))
    on = _attention_grads(attn, x, g, bf16)
    assert calls, "the kernel did not run"
    monkeypatch.setattr(attention, "KERNEL_MAX_TOKENS", 0)
    off = _attention_grads(attn, x, g, bf16)
    tol = 2e-2 if bf16 else 1e-5
    for a, b in zip(on, off, strict=True):
        assert _rel(a, b) < tol
    monkeypatch.setattr(attention, "KERNEL_MAX_TOKENS", 256)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        inferred = copy.deepcopy(attn).eval()(x).float()
    assert _rel(inferred, on[0]) < (1e-2 if bf16 else 1e-6)


def test_vit_attention_kernel_steps_aside(built, monkeypatch):
    """Attention dropout in training, longer sequences than the cap, and a bf16 core in an fp32 model
    keep the torch paths; recording keeps the kernel's output and records softmax(q k^T * scale)."""
    import vitkit.layers.attention as attention  # noqa: PLC0415

    calls = []
    real = kernels.window_attention
    monkeypatch.setattr(kernels, "window_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 17, 128)
    with torch.no_grad():
        plain = _vit_attention().eval()(x)
        assert len(calls) == 1
        dropped = _vit_attention(attn_drop=0.1).train()
        assert dropped._kernel_mode(x) is None and dropped.eval()._kernel_mode(x) == "infer"
        monkeypatch.setattr(attention, "KERNEL_MAX_TOKENS", 16)
        assert _vit_attention().eval()._kernel_mode(x) is None
        monkeypatch.setattr(attention, "KERNEL_MAX_TOKENS", 256)
        cored = _vit_attention().eval()
        cored.core_dtype = torch.bfloat16
        assert cored._kernel_mode(x) is None
        recorder = _vit_attention().eval()
        recorder.record_attn = True
        assert torch.equal(recorder(x), plain)
        q, k, _ = recorder.qkv(x).view(2, 17, 3, 4, 32).permute(2, 0, 3, 1, 4)
        expected = (q @ k.transpose(-2, -1) * recorder.scale).softmax(-1)
        torch.testing.assert_close(recorder.last_attn, expected)


@needs_onednn
def test_vit_bf16_training_step_matches_the_torch_path(built):
    """The Fashion-MNIST ViT's bf16 training step with every kernel on against all off: the same loss and
    matmul-weight gradients within bf16 rounding."""
    torch.manual_seed(0)
    model = vitkit.create_model(
        "vit_tiny_patch16_224",
        img_size=28,
        in_chans=1,
        num_classes=10,
        patch_size=7,
        embed_dim=128,
        depth=2,
        num_heads=4,
        mlp_ratio=2.0,
    ).train()
    _assert_bf16_step_matches(model, torch.randn(8, 1, 28, 28))


def _assert_bf16_step_matches(model: nn.Module, x: torch.Tensor) -> None:
    """A bf16 training step of `model` with the kernels on against them off: the same loss, and the
    matmul weights' gradients within bf16 rounding (relative L2 over all of them)."""

    def step(on: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = copy.deepcopy(model)
        previous = kernels.set_kernels(on)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(x).float().square().mean()
            loss.backward()
        finally:
            kernels.set_kernels(previous)
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    loss_on, on = step(True)
    loss_off, off = step(False)
    assert abs(loss_on - loss_off).item() < 2e-2 * loss_off.abs().item()
    matmul_grads = [n for n in off if n.endswith("weight") and "norm" not in n]
    total = sum(float((on[n] - off[n]).square().sum()) for n in matmul_grads)
    assert (total / sum(float(off[n].square().sum()) for n in matmul_grads)) ** 0.5 < 0.05


def test_vit_attention_kernel_trains_after_inference_mode(built):
    """The kernel's cached zero bias, first made under inference_mode, can still be saved by a training step."""
    attn = _vit_attention(dim=64, heads=2)
    x = torch.randn(2, 9, 64)
    with torch.inference_mode():
        attn.eval()(x)
    attn.train()(x.requires_grad_()).sum().backward()
    assert x.grad is not None
