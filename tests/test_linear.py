"""The oneDNN training linear (`vitkit.layers.linear._OneDNNLinear`) against `F.linear`: same numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkit
from vitkit.core.hardware import has_avx512
from vitkit.layers import linear as linear_module
from vitkit.layers.linear import fp32_backward_kernels, linear, onednn_linear_enabled, set_onednn_linear

pytestmark = pytest.mark.skipif(not onednn_linear_enabled(), reason="this torch has no oneDNN linear kernel")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _grad_fns(y: torch.Tensor) -> set[str]:
    seen, todo = set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and type(fn).__name__ not in seen:
            seen.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
    return seen


@pytest.fixture
def plain_linear():
    """Run the test body with the oneDNN paths off, then restore the setting."""
    previous = set_onednn_linear(False)
    yield
    set_onednn_linear(previous)


# the backward products on oneDNN or torch.mm by shape and CPU kind (`fp32_backward_kernels`), both kinds
# faked on every CPU: AVX-512 takes mm for grad_weight at (96, 288, 16 x 784), AVX2 oneDNN for grad_input
# at 16 x 784 tokens (>= 4 x in_features) and mm for it at 3 x 49
@pytest.mark.parametrize("in_f,out_f,tokens", [(96, 288, 784), (384, 96, 784), (384, 1152, 49), (1536, 384, 49)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "avx2"])
def test_fp32_forward_and_gradients_match_f_linear(in_f, out_f, tokens, bias, avx512, monkeypatch):
    monkeypatch.setattr(linear_module, "_avx512", lambda: avx512)
    calls = []
    onednn = linear_module._lp
    monkeypatch.setattr(linear_module, "_lp", lambda *args: calls.append(args) or onednn(*args))
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f, bias=bias)
    x = torch.randn(16 if tokens > 49 else 3, tokens, in_f, requires_grad=True)
    y = linear(layer, x)
    assert "_OneDNNLinearBackward" in _grad_fns(y)
    g = torch.randn_like(y)
    y.backward(g)
    x_by_onednn, w_by_onednn = fp32_backward_kernels(x.shape[0] * tokens, in_f, out_f, avx512)
    assert len(calls) == 1 + x_by_onednn + w_by_onednn  # the forward, then each product oneDNN took
    got = [x.grad, layer.weight.grad] + ([layer.bias.grad] if bias else [])
    x.grad, layer.weight.grad = None, None
    layer.zero_grad()
    ref = F.linear(x, layer.weight, layer.bias)
    ref.backward(g)
    want = [x.grad, layer.weight.grad] + ([layer.bias.grad] if bias else [])
    assert _rel(y, ref) <= 1e-5
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and _rel(a, b) <= 1e-5


def test_backward_kernels_by_cpu_kind():
    # the CPU kind: AVX-512 with F, BW, VL and DQ, as oneDNN's AVX-512 kernels need
    assert has_avx512({"model": "test", "flags": ["avx2", "avx512bw", "avx512dq", "avx512f", "avx512vl", "fma"]})
    assert not has_avx512({"model": "test", "flags": ["avx2", "avx512f", "fma"]})
    assert not has_avx512({"model": "test", "flags": ["avx2", "fma"]})
    # Swin-T at batch 8: stage 1's qkv (25088 tokens, 96 -> 288), stage 3's fc2 (1568, 1536 -> 384)
    assert fp32_backward_kernels(25088, 96, 288, avx512=True) == (True, False)  # long reduction: mm
    assert fp32_backward_kernels(1568, 1536, 384, avx512=True) == (True, True)
    assert fp32_backward_kernels(25088, 96, 288, avx512=False) == (True, False)
    assert fp32_backward_kernels(1568, 1536, 384, avx512=False) == (False, False)
    assert fp32_backward_kernels(1568, 384, 1536, avx512=False) == (True, False)  # 1568 >= 4 x 384


def test_separate_bias_gets_its_gradient():
    """Swin V2's qkv passes its own bias (q and v biases around zeros); it must learn."""
    layer = nn.Linear(32, 96, bias=False)
    q_bias = torch.randn(32, requires_grad=True)
    bias = torch.cat((q_bias, torch.zeros(32), torch.zeros(32)))
    x = torch.randn(10, 32)  # input needs no gradient: the weight and bias still do
    linear(layer, x, bias=bias).square().sum().backward()
    want = torch.autograd.grad(F.linear(x, layer.weight, bias).square().sum(), q_bias)[0]
    assert _rel(q_bias.grad, want) <= 1e-5


@pytest.mark.parametrize("in_f,out_f,tokens", [(96, 384, 784), (384, 1152, 49)])
def test_bf16_autocast_training_matches_f_linear_to_bf16_rounding(onednn_bf16, in_f, out_f, tokens):
    """Under bf16 autocast the layer casts as autocast does (weights, bias and input to bf16; gradients
    back to the fp32 parameters) and adds the bias inside oneDNN: forward and gradients agree with
    autocast's F.linear to bf16 rounding, and the parameters' gradients come back in fp32."""
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f)
    x = torch.randn(4, tokens, in_f, requires_grad=True)
    g = torch.randn(4, tokens, out_f)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(layer, x)
    assert y.dtype == torch.bfloat16 and "_OneDNNLinearBackward" in _grad_fns(y)
    y.backward(g.bfloat16())
    got = [x.grad, layer.weight.grad, layer.bias.grad]
    x.grad = None
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(x, layer.weight, layer.bias)
    ref.backward(g.bfloat16())
    want = [x.grad, layer.weight.grad, layer.bias.grad]
    assert _rel(y.float(), ref.float()) <= 1e-2
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and _rel(a, b) <= 1e-2


def test_bf16_without_onednn_bf16_takes_f_linear(monkeypatch):
    """On a CPU whose oneDNN has no bf16 inner product (AVX2 only: it refuses to make the primitive), bf16
    autocast training and bf16 inference go through F.linear and give exactly its numbers, and the fp32
    paths keep oneDNN. Faked here by the probe's result, so that it runs on every CPU."""
    import vitkit.layers.linear as linear_module

    monkeypatch.setattr(linear_module, "_BF16_AVAILABLE", False)
    assert linear_module.onednn_linear_supports(torch.float32)
    assert not linear_module.onednn_linear_supports(torch.bfloat16)
    layer = nn.Linear(48, 96)
    x = torch.randn(2, 17, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(layer, x, gelu=True)
        ref = F.gelu(F.linear(x, layer.weight, layer.bias))
    assert y.dtype == torch.bfloat16 and "_OneDNNLinearBackward" not in _grad_fns(y)
    assert torch.equal(y, ref)
    assert "_OneDNNLinearBackward" in _grad_fns(linear(layer, x))  # fp32 training keeps oneDNN
    bf16 = nn.Linear(48, 96).bfloat16()
    xb = torch.randn(2, 17, 48, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(linear(bf16, xb, gelu=True), F.gelu(F.linear(xb, bf16.weight, bf16.bias)))
        assert bf16 not in linear_module._PACKED  # no oneDNN bf16 weight was packed


def test_bf16_weights_keep_torchs_linear():
    bf16 = nn.Linear(384, 1152).bfloat16()
    xb = torch.randn(4, 49, 384, dtype=torch.bfloat16, requires_grad=True)
    assert "_OneDNNLinearBackward" not in _grad_fns(linear(bf16, xb))
    with torch.autocast("cpu", dtype=torch.float16):  # fp16 autocast: autocast's own path
        assert "_OneDNNLinearBackward" not in _grad_fns(linear(nn.Linear(8, 4), torch.randn(2, 8, requires_grad=True)))


def test_second_order_gradients_match():
    """create_graph=True (e.g. a gradient penalty) takes differentiable ops in the backward."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)

    def penalty(fn) -> torch.Tensor:
        (gx,) = torch.autograd.grad(torch.tanh(fn(x)).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), layer.weight)[0]

    got = penalty(lambda t: linear(layer, t))
    want = penalty(lambda t: F.linear(t, layer.weight, layer.bias))
    assert _rel(got, want) <= 1e-5


def test_empty_batch_and_float64_fall_back_to_f_linear():
    layer = nn.Linear(8, 4)
    x = torch.randn(0, 8, requires_grad=True)
    linear(layer, x).sum().backward()  # oneDNN cannot reduce over zero tokens: F.linear's path
    assert layer.weight.grad.abs().max().item() == 0.0
    layer64, x64 = nn.Linear(8, 4).double(), torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 alone, and so do we
        assert linear(layer64, x64).dtype == torch.float64


def test_switch_and_inference_keep_their_paths(plain_linear):
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    assert "_OneDNNLinearBackward" not in _grad_fns(linear(layer, x))  # switched off by the fixture
    set_onednn_linear(True)
    with torch.no_grad():
        assert linear(layer, x).grad_fn is None


def _train_losses(model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int) -> tuple[list, dict]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, grads = [], {}
    for step in range(steps):
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads


TWO_STAGES = dict(
    embed_dim=32, depths=(2, 2), num_heads=(2, 4), pretrained_window_sizes=(0, 0), num_classes=10, drop_path_rate=0.0
)  # no random layer drops: both runs must see the same network


@pytest.mark.parametrize(
    "name,kwargs,size",
    [
        ("deit_small_patch16_224", dict(depth=2, num_classes=10, img_size=64), 64),
        ("swin_tiny_patch4_window7_224", dict(TWO_STAGES, img_size=56), 56),
        ("swinv2_tiny_window8_256", dict(TWO_STAGES, img_size=64), 64),
    ],
)
def test_training_steps_match_plain_linear(name, kwargs, size):
    """Gradients of a ViT / Swin / Swin V2 within 1e-5 relative, and the same loss curve over 4 AdamW steps."""
    torch.manual_seed(0)
    model = vitkit.create_model(name, **kwargs).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, target = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
    fast_losses, fast_grads = _train_losses(model, x, target, steps=4)
    model.load_state_dict(state)
    previous = set_onednn_linear(False)
    try:
        plain_losses, plain_grads = _train_losses(model, x, target, steps=4)
    finally:
        set_onednn_linear(previous)
    assert fast_grads.keys() == plain_grads.keys()
    for n, g in plain_grads.items():
        scale = g.abs().max().item()
        assert (fast_grads[n] - g).abs().max().item() <= 1e-5 * scale + 1e-12, n
    assert fast_losses == pytest.approx(plain_losses, rel=1e-4)


def test_training_gradients_match_timm():
    """With the oneDNN training path on, a ViT's gradients still match timm's (same weights) to 1e-5."""
    timm = pytest.importorskip("timm")
    kwargs = dict(depth=2, num_classes=10, img_size=64, drop_path_rate=0.0)
    torch.manual_seed(0)
    ref = timm.create_model("deit_small_patch16_224", **kwargs).train()
    ours = vitkit.create_model("deit_small_patch16_224", **kwargs).train()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, target = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    F.cross_entropy(ref(x), target).backward()
    F.cross_entropy(ours(x), target).backward()
    theirs = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        want = theirs[n].grad
        assert (p.grad - want).abs().max().item() <= 1e-5 * want.abs().max().item() + 1e-12, n


@pytest.mark.slow  # torch.compile of a forward and backward: about a minute on 2 cores
def test_compiled_training_step_matches_eager():
    """torch.compile traces the plain F.linear (the oneDNN function stays out of the graph); same gradients."""
    torch.manual_seed(0)
    model = vitkit.create_model("deit_tiny_patch16_224", depth=1, num_classes=10, img_size=32, patch_size=8).train()
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([3, 4])
    F.cross_entropy(model(x), target).backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(torch.compile(model)(x), target).backward()
    for n, p in model.named_parameters():
        assert (p.grad - eager[n]).abs().max().item() <= 1e-5 * eager[n].abs().max().item() + 1e-12, n


# -- inference: prepacked weights --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_inference_equals_plain_weight_and_follows_weight_changes(request, dtype):
    """The packed weight gives the same outputs as the plain one, with and without the fused GELU, for
    other row counts than the one it was packed for, and is rebuilt after every kind of weight change."""
    from vitkit.layers.linear import _PACKED

    if dtype == torch.bfloat16:
        request.getfixturevalue("onednn_bf16")

    torch.manual_seed(0)
    layer = nn.Linear(48, 96).to(dtype)
    x = torch.randn(2, 37, 48).to(dtype)

    def plain(x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, 48), layer.weight, layer.bias, "none", [], "")
        return (F.gelu(y) if gelu else y).view(*x.shape[:-1], 96)

    with torch.inference_mode():
        assert torch.equal(linear(layer, x), plain(x))
        packed = _PACKED[layer][1]
        assert torch.equal(linear(layer, x[:1, :5]), plain(x[:1, :5]))  # 5 rows: same packed weight
        assert _PACKED[layer][1] is packed
        assert (linear(layer, x, gelu=True).float() - plain(x, gelu=True).float()).abs().max().item() <= (
            1e-6 if dtype == torch.float32 else 2e-2
        )
    with torch.no_grad():
        layer.weight.mul_(-1)  # in place: a new version
        assert torch.equal(linear(layer, x), plain(x))
        layer.load_state_dict({"weight": torch.randn(96, 48).to(dtype), "bias": layer.bias.clone()})
        assert torch.equal(linear(layer, x), plain(x))
        layer.load_state_dict({"weight": torch.randn(96, 48).to(dtype), "bias": layer.bias.clone()}, assign=True)
        assert torch.equal(linear(layer, x), plain(x))  # a new Parameter object
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x.float().to(dtype)).sum().backward()
    opt.step()  # an optimiser step between two inference calls
    with torch.no_grad():
        assert torch.equal(linear(layer, x), plain(x))


def test_inplace_gelu_leaves_inputs_and_views_alone():
    """Off the oneDNN path, GELU runs in place only on the layer's own new output, never on its input."""

    class Passthrough(nn.Linear):  # not a plain nn.Linear: the F.linear path
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if self.out_features == 8 else x[:, :4]

    torch.manual_seed(0)
    layer, x = nn.Linear(8, 8), torch.randn(3, 8)
    previous = set_onednn_linear(False)
    try:
        with torch.no_grad():
            assert torch.equal(linear(layer, x, gelu=True), F.gelu(layer(x)))
            for passthrough in (Passthrough(8, 8), Passthrough(8, 4)):
                before = x.clone()
                y = linear(passthrough, x, gelu=True)
                assert torch.equal(x, before) and torch.equal(y, F.gelu(passthrough(before)))
    finally:
        set_onednn_linear(previous)
