"""vitkit's compiled window attention kernel: it builds, matches a float64 reference (fp32 to float rounding,
bf16 within its rounding), takes Swin's strided q / k / v and per-window biases, runs inside Swin and
Swin V2 inference with the same outputs as the torch path, trains with the same gradients (its
backward against float64 and against the torch path in whole models), and steps aside where it
does not apply."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.core.errors import VitkitError
from vitkit.layers import kernels


def reference(q, k, v, bias, scale):
    """(W, H, N, D) -> (W, N, H, D) in float64; window w adds bias[w % G]."""
    q, k, v, bias = (t.double() for t in (q, k, v, bias))
    W, H, N, _ = q.shape
    b = bias.repeat(W // bias.shape[0], 1, 1, 1)
    attn = (q @ k.transpose(-2, -1) * scale + b).softmax(-1)
    return (attn @ v).transpose(1, 2)


def qkv_views(windows, heads, n, d, dtype):
    """q, k, v as Swin's attention makes them: strided views of one (W, N, 3, H, D) projection."""
    qkv = torch.randn(windows, n, 3, heads, d).to(dtype)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize(
    "windows,groups,heads,n,d",
    [(16, 4, 3, 49, 32), (6, 1, 2, 64, 32), (4, 2, 1, 144, 16), (3, 3, 2, 9, 48), (2, 1, 4, 20, 64)],
)
def test_matches_float64_reference(built, windows, groups, heads, n, d):
    q, k, v = qkv_views(windows, heads, n, d, torch.float32)
    bias = torch.randn(groups, heads, n, n)
    bias[0, 0, :, -1] = -100.0  # a masked key, as Swin's shift mask sets it
    scale = d**-0.5
    want = reference(q, k, v, bias, scale)
    got = kernels.window_attention(q, k, v, bias, scale)
    assert got.shape == (windows, n, heads, d) and got.dtype == torch.float32 and got.is_contiguous()
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-6

    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    got16 = kernels.window_attention(qb, kb, vb, bias, scale)
    assert got16.dtype == torch.bfloat16
    # bf16 inputs are rounded (2^-9 relative) before fp32 arithmetic: the reference of the rounded
    # inputs is matched to the output's own rounding
    want16 = reference(qb, kb, vb, bias, scale)
    assert ((got16.double() - want16).abs().max() / want16.abs().max()).item() < 8e-3


def test_cosine_attention_matches_float64_reference(built):
    """Swin V2: q and k L2-normalised, head h's scores times cosine[h] (and scale)."""
    q, k, v = qkv_views(8, 3, 64, 32, torch.float32)
    q[0, 0, 0] = 0.0  # a zero row: F.normalize's eps keeps it finite
    bias = torch.randn(4, 3, 64, 64)
    cosine = torch.tensor([3.0, 10.0, 100.0])
    qn = torch.nn.functional.normalize(q.double(), dim=-1) * cosine.double().view(1, 3, 1, 1)
    want = reference(qn, torch.nn.functional.normalize(k.double(), dim=-1), v, bias, 0.5)
    got = kernels.window_attention(q, k, v, bias, 0.5, cosine)
    # scores up to +-50 carry fp32 rounding of ~3e-6 into the exponent: the parity bound, 1e-5
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5
    with pytest.raises(RuntimeError, match="one value per head"):
        kernels.window_attention(q, k, v, bias, 0.5, cosine[:2])


def test_nan_propagates_as_through_softmax(built):
    """A NaN score (here from a NaN in q) makes its row's output NaN, as torch's softmax does; other rows
    are untouched."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = qkv_views(2, 2, 9, 32, dtype)
        q[1, 0, 4, 3] = float("nan")  # q is a view of the projection: written in place
        out = kernels.window_attention(q, k, v, torch.zeros(1, 2, 9, 9), 0.2)
        assert out[1, 4, 0].isnan().all()
        assert out.isnan().sum() == 32 and torch.isfinite(out[0]).all()


def test_rejects_what_it_cannot_take(built):
    q, k, v = qkv_views(2, 2, 9, 32, torch.float32)
    with pytest.raises(RuntimeError, match="head_dim must be"):
        kernels.window_attention(q[..., :24], k[..., :24], v[..., :24], torch.zeros(1, 2, 9, 9), 1.0)
    with pytest.raises(RuntimeError, match="bias must be"):
        kernels.window_attention(q, k, v, torch.zeros(3, 2, 9, 9), 1.0)  # 3 does not divide 2 windows
    with pytest.raises(RuntimeError, match="float32 or all bfloat16"):
        kernels.window_attention(q.double(), k.double(), v.double(), torch.zeros(1, 2, 9, 9), 1.0)


def test_gathers_windows_from_a_map_and_writes_them_back(built):
    """With `rows`: q, k, v are (B, T, heads, D) maps, window b * nW + n is image b's tokens rows[n], and
    each output token lands where it came from: partition, shift and their inverses without copies."""
    B, T, heads, d, nw, n = 2, 36, 3, 32, 4, 9
    qkv = torch.randn(B, T, 3, heads, d)
    q, k, v = qkv.unbind(2)
    rows = torch.randperm(T).view(nw, n)
    bias = torch.randn(nw, heads, n, n)
    got = kernels.window_attention(q, k, v, bias, 0.3, None, rows)
    assert got.shape == (B, T, heads, d)
    # the same windows gathered by hand, through the window form
    gather = lambda t: t[:, rows.flatten()].view(B * nw, n, heads, d).transpose(1, 2)  # noqa: E731
    want = reference(gather(q), gather(k), gather(v), bias, 0.3)  # (B * nw, n, heads, d)
    back = torch.empty(B, T, heads, d, dtype=torch.float64)
    back[:, rows.flatten()] = want.reshape(B, T, heads, d)
    assert ((got.double() - back).abs().max() / back.abs().max()).item() < 1e-6
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.window_attention(q, k, v, bias, 0.3, None, rows.clone().fill_(T))
    with pytest.raises(RuntimeError, match="covering every token"):
        kernels.window_attention(q, k, v, bias, 0.3, None, rows[:2])


def test_applies_only_to_cpu_inference(built):
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        assert kernels.window_attention_applies(x, 32)
        assert not kernels.window_attention_applies(x, 24)  # head_dim 24
        assert not kernels.window_attention_applies(x.double(), 32)
    assert not kernels.window_attention_applies(x.requires_grad_(), 32)  # training: window_attention_train
    assert kernels.window_attention_trains(x, 32) and not kernels.window_attention_trains(x, 24)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not kernels.window_attention_trains(x, 32)
    previous = kernels.set_kernels(False)
    try:
        with torch.no_grad():
            assert not kernels.window_attention_applies(x.detach(), 32)
        assert kernels.status() == "vitkit kernels: off"
    finally:
        kernels.set_kernels(previous)


@pytest.mark.parametrize("isa", ["none", "avx2", "avx512"])
def test_models_take_the_attention_kernel_where_it_pays_on_the_build(built, monkeypatch, isa):
    """By default (`set_attention_kernel(None)`) Swin (head_dim 32) and ViT (64) take the kernel on an
    AVX-512 build, Swin alone on the AVX2 build (at ViT's head size it tied torch's attention there), and
    neither where no build applies; faked here by the ISA probe, so that every case runs on every CPU.
    Outputs agree either way."""
    head_dim = {"none": 0, "avx2": 32, "avx512": 64}[isa]
    expected = {"none": 0, "avx2": 8, "avx512": 8 + 2}[isa]
    swin = vitkit.create_model("swin_tiny_patch4_window7_224", img_size=112, depths=(2, 2, 2, 2), num_classes=10)
    vit = vitkit.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=10)
    calls = []
    real = kernels.window_attention
    monkeypatch.setattr(kernels, "window_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(kernels, "_attention_head_dim", lambda: head_dim)
    x = torch.randn(2, 3, 112, 112)
    previous = kernels.set_attention_kernel(None)
    try:
        assert kernels.attention_kernel_chosen(32) is (isa != "none")
        assert kernels.attention_kernel_chosen(64) is (isa == "avx512")
        assert ("attention: torch's" in kernels.status()) is (isa == "none")
        assert ("up to head_dim 32" in kernels.status()) is (isa == "avx2")
        with torch.no_grad():
            got = [swin.eval()(x), vit.eval()(x[:, :, :64, :64])]
        assert len(calls) == expected
        kernels.set_attention_kernel(False)
        assert not kernels.attention_kernel_chosen(32)
        with torch.no_grad():
            want = [swin(x), vit(x[:, :, :64, :64])]
        assert len(calls) == expected
    finally:
        kernels.set_attention_kernel(previous)
    for a, b in zip(got, want, strict=True):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


@pytest.mark.parametrize(
    "name,size,mapped",
    [
        ("swin_tiny_patch4_window7_224", 112, 8),  # maps of whole windows: all 8 blocks gather from the map
        # 24 x 24 and 12 x 12 maps pad to whole windows (window form); 6 x 6 and 3 x 3 are one window each
        ("swin_tiny_patch4_window7_224", 96, 4),
        ("swinv2_tiny_window8_256", 128, 8),
    ],
)
def test_swin_inference_runs_the_kernel_with_the_same_outputs(built, name, size, mapped, monkeypatch):
    model = vitkit.create_model(name, img_size=size, depths=(2, 2, 2, 2), num_classes=10).eval()
    x = torch.randn(3, 3, size, size)
    calls = []
    real = kernels.window_attention
    monkeypatch.setattr(kernels, "window_attention", lambda *a: calls.append(a[6] is not None) or real(*a))
    with torch.no_grad():
        fast = model(x)
        assert len(calls) == 8 and sum(calls) == mapped  # every block, shifted ones (with a mask) included
        kernels.set_kernels(False)
        try:
            plain = model(x)
        finally:
            kernels.set_kernels(True)
    assert len(calls) == 8
    assert ((fast - plain).abs().max() / plain.abs().max()).item() < 1e-5

    # bf16 weights (vitkit's bf16 inference): the kernel against the torch path, same tolerance as
    # the bf16 attention core (tests/test_attention.py)
    bf16 = vitkit.create_model(name, img_size=size, depths=(2, 2, 2, 2), num_classes=10).eval()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    with torch.no_grad():
        fast16 = bf16(x.bfloat16()).float()
    assert ((fast16 - plain).abs().max() / plain.abs().max()).item() < 0.05


def test_autocast_inference(built, monkeypatch):
    """bf16 autocast (`vitkit bench --autocast-only`): the projections give bf16 q, k, v and the kernel
    takes them; fp16 autocast (which the kernel does not take) keeps the torch path."""
    model = vitkit.create_model("swin_tiny_patch4_window7_224", img_size=112, depths=(2, 2, 2, 2), num_classes=10)
    model.eval()
    x = torch.randn(2, 3, 112, 112)
    calls = []
    real = kernels.window_attention
    monkeypatch.setattr(kernels, "window_attention", lambda *a: calls.append(a[0].dtype) or real(*a))
    with torch.no_grad():
        plain = model(x)
        calls.clear()
        with torch.autocast("cpu", torch.bfloat16):
            fast = model(x)
        assert calls and set(calls) == {torch.bfloat16}
        calls.clear()
        with torch.autocast("cpu", torch.float16):
            half = model(x)
        assert not calls
    for out in (fast, half):
        assert ((out.float() - plain).abs().max() / plain.abs().max()).item() < 0.05


def map_reference(qkv, bias, scale, rows, cosine=None):
    """`window_attention_train`'s result in float64 from gathered windows: qkv (B, T, 3, H, D), rows (nW, N)."""
    B, T, _, H, D = qkv.shape
    nW, N = rows.shape
    q, k, v = qkv[:, rows.flatten()].view(B, nW, N, 3, H, D).permute(3, 0, 1, 4, 2, 5).unbind(0)  # (B, nW, H, N, D)
    if cosine is not None:
        q, k = F.normalize(q, dim=-1) * cosine.view(H, 1, 1), F.normalize(k, dim=-1)
    G = bias.shape[0]
    b = bias.repeat(B // G, 1, 1, 1).view(B, 1, H, N, N) if nW == 1 else bias.repeat(nW // G, 1, 1, 1)[None]
    windows = (q @ k.transpose(-2, -1) * scale + b).softmax(-1) @ v
    out = torch.empty(B, T, H, D, dtype=windows.dtype)
    out[:, rows.flatten()] = windows.permute(0, 1, 3, 2, 4).reshape(B, nW * N, H, D)
    return out


@pytest.mark.parametrize(
    "images,windows,groups,heads,n,d",
    [
        (2, 4, 4, 3, 49, 32),  # shifted: one bias per window of an image
        (2, 4, 1, 3, 49, 32),  # one bias for all windows
        (3, 1, 1, 2, 64, 16),  # each image one window
        (6, 1, 3, 2, 9, 48),  # window form: each window an image, the bias cycling with them
        (2, 6, 3, 4, 20, 64),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cosine", [False, True])
def test_training_op_and_its_gradients_match_float64(built, images, windows, groups, heads, n, d, dtype, cosine):
    torch.manual_seed(0)
    T = windows * n
    rows = torch.randperm(T).view(windows, n)
    qkv = torch.randn(images, T, 3, heads, d)
    bias = torch.randn(groups, heads, n, n)
    bias[0, 0, :, -1] = -100.0  # a masked key
    grad = torch.randn(images, T, heads, d)
    scale = 1.0 if cosine else d**-0.5
    temperature = torch.rand(heads) * 20 + 1 if cosine else None  # Swin V2's clamped exp(logit scale)
    # the reference of the inputs as the kernel gets them (bf16: rounded), so that what is left is the
    # kernel's own rounding
    qkv, grad = qkv.to(dtype).float(), grad.to(dtype).float()
    q64, b64 = qkv.double().requires_grad_(), bias.double().requires_grad_()
    t64 = temperature.double().requires_grad_() if cosine else None
    want = map_reference(q64, b64, scale, rows, t64)
    want.backward(grad.double())
    q, b = qkv.to(dtype).requires_grad_(), bias.clone().requires_grad_()
    t = temperature.clone().requires_grad_() if cosine else None
    out = kernels.window_attention_train(q, b, scale, rows, t)
    out.backward(grad.to(dtype))
    assert out.dtype == q.grad.dtype == dtype and b.grad.dtype == torch.float32
    assert q.grad.shape == qkv.shape and b.grad.shape == bias.shape
    pairs = [(out, want), (q.grad, q64.grad), (b.grad, b64.grad)] + ([(t.grad, t64.grad)] if cosine else [])
    # the differentiable torch path that second derivatives take
    pairs.append((kernels.window_attention_reference(q64, b64, scale, rows, t64), want))
    # fp32: float rounding; bf16: outputs rounded to 8 bits, arithmetic in fp32. The temperature's
    # gradient sums dS * cos(q, k) over every window, with cancellation, from dS whose rowsum(dO * O)
    # term reads the rounded output: 1.4-2.4% in bf16 at these shapes, hence its own bound
    tols = [1e-5] * 4 if dtype == torch.float32 else [1e-2, 1e-2, 1e-2, 5e-2]
    tols = tols[: len(pairs) - 1] + [1e-12]  # the reference in float64 against float64
    for (got, ref), tol in zip(pairs, tols, strict=True):
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < tol


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_bias_gradient_whatever_the_thread_count(built, threads):
    """The bias gradient's (bias, head) groups split between threads at different places with 1, 3 or 4
    threads: each thread writes the groups it holds whole and sets the split ones aside; all sum right."""
    torch.manual_seed(0)
    rows = torch.randperm(4 * 49).view(4, 49)
    qkv = torch.randn(3, 4 * 49, 3, 5, 32)
    grad = torch.randn(3, 4 * 49, 5, 32)
    previous = torch.get_num_threads()
    for groups in (1, 2, 4):
        bias = torch.randn(groups, 5, 49, 49)
        b64 = bias.double().requires_grad_()
        map_reference(qkv.double(), b64, 0.2, rows).backward(grad.double())
        b = bias.clone().requires_grad_()
        torch.set_num_threads(threads)
        try:
            kernels.window_attention_train(qkv, b, 0.2, rows).backward(grad)
        finally:
            torch.set_num_threads(previous)
        assert ((b.grad.double() - b64.grad).abs().max() / b64.grad.abs().max()).item() < 1e-5


def test_calling_the_kernel_while_it_is_off_names_the_fix(built):
    previous = kernels.set_kernels(False)
    try:
        with pytest.raises(VitkitError, match=r"kernels: off: set_kernels\(True\)"):
            kernels.window_attention_train(
                torch.randn(2, 8, 3, 2, 32), torch.zeros(1, 2, 4, 4), 1.0, torch.arange(8).view(2, 4)
            )
    finally:
        kernels.set_kernels(previous)


def test_training_op_rejects_what_it_cannot_take(built):
    qkv = torch.randn(2, 8, 3, 2, 32)
    rows = torch.arange(8).view(2, 4)
    bias = torch.zeros(1, 2, 4, 4)
    out = kernels.window_attention_train(qkv, bias, 0.2, rows)
    q, k, v = qkv.unbind(2)
    lse = torch.zeros(4, 2, 4)
    with pytest.raises(RuntimeError, match="out and grad must be contiguous"):
        torch.ops.vitkit.window_attention_backward(out[:, :4].contiguous(), q, k, v, out, lse, bias, 0.2, None, rows)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.vitkit.window_attention_backward(out, q, k, v, out, lse[:2], bias, 0.2, None, rows)


def _grads(model, x, autocast=None):
    model.zero_grad()
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = model(x).float().square().mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "name,size,mapped",
    [
        ("swin_tiny_patch4_window7_224", 112, 8),  # maps of whole windows: the kernel gathers from the map
        ("swin_tiny_patch4_window7_224", 96, 4),  # 24 x 24 and 12 x 12 maps pad to whole windows: window form
        ("swinv2_tiny_window8_256", 128, 8),  # cosine attention: normalisation and logit scale in the kernel
    ],
)
def test_swin_training_runs_the_kernel_with_the_same_gradients(built, name, size, mapped, monkeypatch):
    """Training (gradients on) takes the kernel and its backward in every block; every parameter's
    gradient (the position-bias tables and Swin V2's logit scales included) matches the torch path's."""
    torch.manual_seed(0)
    model = vitkit.create_model(name, img_size=size, depths=(2, 2, 2, 2), num_classes=10, drop_path_rate=0.0).train()
    x = torch.randn(2, 3, size, size)
    calls = []
    real = kernels.window_attention_train
    # map form: qkv holds the 2 images (window form: one row per window)
    monkeypatch.setattr(kernels, "window_attention_train", lambda *a: calls.append(a[0].shape[0] == 2) or real(*a))
    fast = _grads(model, x)
    assert len(calls) == 8 and sum(calls) == mapped
    kernels.set_kernels(False)
    try:
        plain = _grads(model, x)
    finally:
        kernels.set_kernels(True)
    assert len(calls) == 8 and fast.keys() == plain.keys()
    assert any("relative_position_bias_table" in n or "cpb_mlp" in n for n in fast)
    for n, g in plain.items():
        assert ((fast[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() < 1e-4, n

    # bf16 autocast: the kernel on bf16 q, k, v against the fp32 torch path, to bf16's rounding
    calls.clear()
    fast16 = _grads(model, x, torch.bfloat16)
    assert len(calls) == 8
    total = sum(((fast16[n] - g).square().sum() for n, g in plain.items()))
    assert (total / sum(g.square().sum() for g in plain.values())).sqrt().item() < 0.05


def _penalty_grads(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    (gx,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    return list(torch.autograd.grad(gx.square().sum(), list(model.parameters())))


@pytest.mark.parametrize("name,size", [("swin_tiny_patch4_window7_224", 56), ("swinv2_tiny_window8_256", 64)])
def test_second_derivatives_match_the_torch_path(built, name, size):
    """A gradient penalty (create_graph=True) through Swin V1 and V2: the kernel's backward recomputes
    through differentiable torch ops, and the penalty's gradients match the torch path's."""
    torch.manual_seed(0)
    model = vitkit.create_model(name, img_size=size, depths=(2, 2, 2, 2), num_classes=4, drop_path_rate=0.0)
    x = torch.randn(2, 3, size, size, requires_grad=True)
    fast = _penalty_grads(model, x)
    kernels.set_kernels(False)
    try:
        plain = _penalty_grads(model, x)
    finally:
        kernels.set_kernels(True)
    for a, b in zip(fast, plain, strict=True):
        assert ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() < 1e-4


def test_training_with_attention_dropout_takes_the_torch_path(built, monkeypatch):
    model = vitkit.create_model(
        "swin_tiny_patch4_window7_224", img_size=64, depths=(2, 2, 2, 2), num_classes=4, attn_drop_rate=0.1
    )
    monkeypatch.setattr(kernels, "window_attention_train", lambda *a: pytest.fail("the kernel has no dropout"))
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert model.layers[0].blocks[0].attn.relative_position_bias_table.grad is not None
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 64, 64))  # inference: no dropout, the kernel applies again


def test_build_without_a_compiler_names_the_fix(monkeypatch, tmp_path):
    if kernels.isa() is None:
        pytest.skip("no supported instruction set: the error would name the CPU instead")
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "compiler", lambda: None)
    with pytest.raises(VitkitError, match="install g\\+\\+"):
        kernels.build()
    assert not list(tmp_path.rglob("*.so*"))  # nothing half-written left behind
    monkeypatch.setattr(kernels, "compiler", lambda: "false")  # a compiler that fails
    with pytest.raises(VitkitError, match="failed \\(false, exit 1\\).*--verbose"):
        kernels.build()
    assert not list(tmp_path.rglob("*.so*")) and not list(tmp_path.rglob("*.tmp"))


def test_the_flop_count_includes_the_kernel(built):
    from vitkit.tools.flops import count_macs

    model = vitkit.create_model("swin_tiny_patch4_window7_224", img_size=112, depths=(2, 2, 2, 2)).eval()
    x = torch.randn(1, 3, 112, 112)
    on_cpu, _ = count_macs(model, x)
    on_meta, _ = count_macs(model.to("meta"), x.to("meta"))  # the torch path, counted by torch
    assert on_cpu == on_meta


def test_kernel_speed_op_mode_times_the_op_against_sdpa_on_the_same_inputs(built):
    """`scripts/kernel_speed.py --op` (the attention op against torch's SDPA): its SDPA call, fed the batch-major
    (images, groups * heads) views and one bias, computes what the kernel computes, so the two times are of
    the same work; the line names both times and the kernel's GFLOP/s."""
    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "kernel_speed.py"))
    line = script["compare_op"](8, 2, 49, 32, 4, rounds=1)
    assert re.fullmatch(
        r"windows 8 heads 2 tokens 49 head_dim 32 bias groups 4: kernel [\d.]+ ms \(\d+ GFLOP/s\), "
        r"torch SDPA [\d.]+ ms, kernel / torch time [\d.]+",
        line,
    ), line
    qkv = torch.randn(8, 49, 3, 2, 32)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    bias = torch.randn(4, 2, 49, 49)
    with torch.inference_mode():
        ours = kernels.window_attention(q, k, v, bias, 32**-0.5)  # (windows, tokens, heads, head_dim)
        views = (t.reshape(2, 4 * 2, 49, 32) for t in (q, k, v))
        ref = F.scaled_dot_product_attention(*views, attn_mask=bias.view(1, 8, 49, 49), scale=32**-0.5)
    torch.testing.assert_close(ours, ref.reshape(8, 2, 49, 32).transpose(1, 2), rtol=1e-5, atol=1e-5)
