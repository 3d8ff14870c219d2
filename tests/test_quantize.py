"""`vitkit quantize`: int8 models behind an accuracy gate, in a file whose loading executes nothing."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from test_data import fake_images, offline_idx
from vitkit.cli import main
from vitkit.core import hardware
from vitkit.core.errors import VitkitError
from vitkit.core.hardware import vnni_flags
from vitkit.data import fashion_mnist
from vitkit.factory import create_model
from vitkit.layers.attention import set_attention_dtype
from vitkit.tools.quantize import int8_layer_names, quantize_model
from vitkit.train.modeling import load_weights
from vitkit.weights.quantized import FORMAT_NAME, is_quantized_file, load_quantized, quantized_linears, save_quantized
from vitkit.weights.vitkit_format import read_metadata, save_model

# int8 vs fp32 on random-weight models: the largest logit difference, relative to the largest fp32 logit
INT8_TOLERANCE = 0.1
INT8_BF16_TOLERANCE = 0.15  # int8 layers and bf16 attention (int8 models on CPUs with bf16 units)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch run of a one-block ViT on tiny IDX files."""
    tmp = tmp_path_factory.mktemp("quantize")
    with pytest.MonkeyPatch.context() as mp:
        offline_idx(mp, tmp, n_train=300, n_test=40)
        out = tmp / "run"
        code = main(
            [
                "train",
                "--output",
                str(out),
                "--seed",
                "1",
                "--epochs",
                "2",
                "--patch-size",
                "7",
                "--batch-size",
                "32",
                "--threads",
                "1",
                "--val-samples",
                "40",
                "--set",
                "model_args.depth=1",
                "--set",
                "model_args.embed_dim=32",
                "--set",
                "model_args.num_heads=2",
                "--set",
                "lr=3e-3",
            ]
        )
        assert code == 0
        yield out


def test_quantize_run_writes_a_file_that_predicts_as_the_in_memory_int8_model(run, tmp_path, capsys, monkeypatch):
    target = tmp_path / "int8.safetensors"
    monkeypatch.setattr(hardware, "vnni_flags", lambda: [])  # a CPU without VNNI: the output says what int8 gains
    assert main(["quantize", "--run", str(run), "--out", str(target), "--max-drop", "100", "--test"]) == 0
    printed = capsys.readouterr().out
    assert "val top-1: fp32" in printed and "test top-1: fp32" in printed and str(target) in printed
    assert "note: this CPU has no VNNI" in printed
    assert is_quantized_file(target) and not is_quantized_file(run / "best.safetensors")

    meta = read_metadata(target)
    assert meta["format"] == FORMAT_NAME and meta["inputs"] == read_metadata(run / "best.safetensors")["inputs"]
    gate = json.loads(meta["gate"])
    # the gate's fp32 figure is the one `vitkit eval --run DIR --split val` gives (amp is off on the CPU)
    assert main(["eval", "--run", str(run), "--split", "val", "--out", str(tmp_path / "val.json")]) == 0
    evaluated = json.loads((tmp_path / "val.json").read_text())
    assert (gate["fp32_top1"], gate["samples"]) == (evaluated["top1"], evaluated["samples"])

    fp32, _ = load_weights(run / "best.safetensors")
    in_memory = quantize_model(fp32)
    loaded = load_quantized(target, create_model)
    assert set(quantized_linears(loaded)) == set(int8_layer_names(fp32)) == set(quantized_linears(in_memory))
    images = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(images), in_memory(images))

    # eval and predict take the int8 file: the test figure is the gate's, the class names the run's
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(target),
                "--data",
                "fashion-mnist",
                "--split",
                "test",
                "--out",
                str(tmp_path / "test.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "test.json").read_text())["top1"] == gate["test"]["int8_top1"]
    image, _ = fake_images(1, seed=3)
    Image.fromarray(image[0].numpy()).save(tmp_path / "shoe.png")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "shoe.png"), "--checkpoint", str(target), "--json", "--top-k", "2"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert len(entry["top"]) == 2 and entry["top"][0]["class"] in fashion_mnist.CLASSES


def test_the_gate_refuses_a_model_that_drops_too_much(run, tmp_path, capsys):
    target = tmp_path / "refused.safetensors"
    # refused by the gate: a failure, exit 1
    assert main(["quantize", "--run", str(run), "--out", str(target), "--max-drop", "-100"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing written" in err and "--max-drop -100" in err
    assert err.count("%") == 2 and "int8 top-1" in err and "fp32" in err  # both figures are named
    assert not target.exists() and not list(tmp_path.glob(".refused*"))


def test_a_checkpoint_with_data_is_quantised_beside_it(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hardware, "vnni_flags", lambda: ["avx512_vnni"])  # with VNNI: no note
    assert main(["quantize", "--checkpoint", str(run / "best.safetensors")]) == 2
    assert "--checkpoint needs --data" in capsys.readouterr().err
    checkpoint = tmp_path / "weights.safetensors"
    checkpoint.write_bytes((run / "best.safetensors").read_bytes())
    assert (
        main(
            [
                "quantize",
                "--checkpoint",
                str(checkpoint),
                "--data",
                "fashion-mnist",
                "--max-drop",
                "100",
                "--scheme",
                "per-tensor",
            ]
        )
        == 0
    )
    written = tmp_path / "weights.int8.safetensors"
    printed = capsys.readouterr().out
    assert str(written) in printed and read_metadata(written)["scheme"] == "per-tensor" and "note:" not in printed
    assert load_quantized(written, create_model).int8_metadata["source"] == str(checkpoint)


@pytest.mark.parametrize(
    "name,fields",
    [
        ("vit_tiny_patch16_224", dict(depth=1, img_size=32, patch_size=8)),
        ("deit_tiny_distilled_patch16_224", dict(depth=1, img_size=32, patch_size=8)),
        ("deit3_small_patch16_224", dict(depth=1, img_size=32, patch_size=8)),
        ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), img_size=56)),
        ("swinv2_tiny_window8_256", dict(depths=(1, 1, 1, 1), img_size=64, window_size=4)),
    ],
)
def test_every_family_round_trips_and_stays_near_fp32(name, fields, tmp_path):
    fp32 = create_model(name, num_classes=7, **fields).eval()
    for scheme in ("per-channel", "per-tensor"):
        int8 = quantize_model(fp32, scheme)
        save_quantized(int8, tmp_path / "m.safetensors")
        loaded = load_quantized(tmp_path / "m.safetensors", create_model)
        x = torch.randn(3, 3, *fp32.config.img_size)
        with torch.no_grad():
            ref, out = fp32(x), int8(x)
            assert torch.equal(loaded(x), out)  # loaded with the same attention dtype as quantised
            set_attention_dtype(int8, None)
            fp32_attention = int8(x)
        # the int8 layers alone; with bf16 attention (CPUs with bf16 units) its rounding adds to theirs
        assert (fp32_attention - ref).abs().max() <= INT8_TOLERANCE * ref.abs().max()
        assert (out - ref).abs().max() <= INT8_BF16_TOLERANCE * ref.abs().max()
    assert loaded.variant_name == name and not loaded.training


def hostile(tmp_path, tensors: dict, meta: dict) -> str:
    path = tmp_path / "hostile.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(VitkitError) as err:
        load_quantized(path, create_model)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    return str(err.value)


def test_hostile_or_garbled_files_give_one_line_errors(tmp_path):
    fp32 = create_model("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, num_classes=3).eval()
    good = tmp_path / "good.safetensors"
    save_quantized(quantize_model(fp32), good)
    tensors, meta = load_file(str(good)), read_metadata(good)

    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(struct.pack("<Q", 2**40) + b"{not json")
    assert not is_quantized_file(garbled)
    with pytest.raises(VitkitError, match="not a valid safetensors file"):
        load_quantized(garbled, create_model)
    save_model(fp32, tmp_path / "fp32.safetensors")
    with pytest.raises(VitkitError, match="is not a vitkit int8 model"):
        load_quantized(tmp_path / "fp32.safetensors", create_model)

    assert "'quantized' entry" in hostile(tmp_path, tensors, {**meta, "quantized": "import os"})
    assert "not a Linear layer" in hostile(tmp_path, tensors, {**meta, "quantized": json.dumps(["norm"])})
    assert "unknown model" in hostile(tmp_path, tensors, {**meta, "model": "os.system"})
    assert "cannot load" in hostile(tmp_path, tensors, {**meta, "config": json.dumps({"depth": -3})})
    assert "not a JSON object" in hostile(tmp_path, tensors, {**meta, "config": "[1, 2]"})
    name = int8_layer_names(fp32)[0]
    nan_scale = {**tensors, f"{name}.weight_scale": torch.full_like(tensors[f"{name}.weight_scale"], float("nan"))}
    assert "non-finite scale" in hostile(tmp_path, nan_scale, meta)
    as_float = {**tensors, f"{name}.weight_int8": tensors[f"{name}.weight_int8"].float()}
    assert "expected int8" in hostile(tmp_path, as_float, meta)
    missing = {k: v for k, v in tensors.items() if k != "norm.weight"}
    assert "do not match" in hostile(tmp_path, missing, meta)
    assert "format version" in hostile(tmp_path, tensors, {**meta, "format_version": "99"})


def test_the_scheme_choices_are_checked_when_parsed(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--run", "x", "--scheme", "per-row"])
    assert "'per-channel', 'per-tensor'" in capsys.readouterr().err


# -- fc1 + GELU in one oneDNN int8 kernel (CPUs with VNNI) ---------------------------------------------
def _int8_gelu_reference(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GELU of the exact integer product the kernel should compute, in float64: x quantised to uint8
    over its own range (containing 0), the layer's int8 weights and scales, the fp32 bias."""
    weight, bias = layer._weight_bias()
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        w_scale = weight.q_per_channel_scales().double()
    else:
        w_scale = torch.full((weight.shape[0],), weight.q_scale(), dtype=torch.float64)
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    xq = (x / scale).round().add(zero).clamp(0, 255)
    acc = (xq.double() - zero.double()) @ weight.int_repr().double().t()  # exact in float64
    y = acc * scale.double() * w_scale + bias.double()
    return torch.nn.functional.gelu(y)


@pytest.mark.parametrize("scheme", ["per-channel", "per-tensor"])
def test_int8_fc1_gelu_kernel_computes_the_integer_product(scheme):
    """Where it applies (oneDNN int8 kernel, VNNI), fc1 + GELU equals the float64 reference of the same
    quantised operands, and differs from fp32 less than torch.ao's fbgemm layer (7-bit activations)."""
    from vitkit.layers import linear as lin

    torch.manual_seed(0)
    fp32 = create_model("deit_small_patch16_224", depth=1, img_size=32, patch_size=8, num_classes=5).eval()
    int8 = quantize_model(fp32, scheme)
    fc1 = int8.blocks[0].mlp.fc1
    x = torch.randn(2, 17, fc1.in_features) * 3
    if not lin._use_int8_gelu(fc1, x):
        pytest.skip("no oneDNN int8 kernel or no VNNI on this CPU: fc1 keeps torch.ao's layer")
    with torch.no_grad():
        got = lin.linear(fc1, x, gelu=True)
        want = _int8_gelu_reference(fc1, x.reshape(-1, fc1.in_features)).view_as(got)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        fbgemm = torch.nn.functional.gelu(fc1(x))
        exact = torch.nn.functional.gelu(fp32.blocks[0].mlp.fc1(x))
        assert (got - exact).norm() < (fbgemm - exact).norm()
        # new weights (set_weight_bias): the packed copy is rebuilt
        weight, bias = fc1._weight_bias()
        fc1.set_weight_bias(weight, bias + 1.0)
        moved = _int8_gelu_reference(fc1, x.reshape(-1, fc1.in_features)).view_as(got)
        assert not torch.allclose(moved, want)
        torch.testing.assert_close(lin.linear(fc1, x, gelu=True).double(), moved, rtol=1e-5, atol=1e-5)
    # gradients needed: never this path (the kernel has no backward)
    assert not lin._use_int8_gelu(fc1, x.requires_grad_())


def test_int8_fc1_gelu_stays_off_without_vnni(monkeypatch):
    """A CPU without VNNI keeps torch.ao's fbgemm layer (oneDNN's u8 x s8 sums could saturate there)."""
    from vitkit.layers import linear as lin

    int8 = quantize_model(create_model("deit_small_patch16_224", depth=1, img_size=32, patch_size=8).eval())
    fc1 = int8.blocks[0].mlp.fc1
    x = torch.randn(2, 5, fc1.in_features)
    monkeypatch.setattr(lin, "vnni_flags", lambda: [])
    assert not lin._use_int8_gelu(fc1, x)
    with torch.no_grad():
        torch.testing.assert_close(lin.linear(fc1, x, gelu=True), torch.nn.functional.gelu(fc1(x)))
    # the flag read from /proc/cpuinfo decides
    assert vnni_flags({"model": "test", "flags": ["avx2", "avx512_vnni"]}) == ["avx512_vnni"]
    assert vnni_flags({"model": "test", "flags": ["avx2", "fma", "avx512_bf16"]}) == []


@pytest.mark.parametrize("flags,dtype", [(["avx512_bf16", "avx512f"], torch.bfloat16), (["avx2", "fma"], None)])
def test_int8_attention_runs_in_bf16_only_on_cpus_with_bf16_units(flags, dtype, monkeypatch, tmp_path):
    """quantize_model and load_quantized both set the attention dtype from the CPU's flags: bf16 where the
    CPU has bf16 units (AVX512_BF16 / AMX), fp32 elsewhere, where bf16 is emulated and slow."""
    from vitkit.core import hardware

    monkeypatch.setattr(hardware, "cpu_info", lambda: {"model": "test", "flags": flags})
    for name, fields in (
        ("deit_small_patch16_224", dict(depth=1, img_size=32, patch_size=8)),
        ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), img_size=56)),
    ):
        int8 = quantize_model(create_model(name, num_classes=3, **fields).eval())
        save_quantized(int8, tmp_path / "m.safetensors")
        loaded = load_quantized(tmp_path / "m.safetensors", create_model)
        for model in (int8, loaded):
            layers = [m for m in model.modules() if hasattr(m, "core_dtype")]
            assert layers and all(m.core_dtype == dtype for m in layers)
