"""Mixed precision: `--amp auto` chosen from the CPU flags (the probe faked), the bf16 inference path
within a stated tolerance of fp32, and `--amp` on `vitkit eval`, `predict` and `bench`."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import vitkit
from test_data import write_folder
from test_swin import _randomize
from vitkit.cli import main
from vitkit.core import hardware
from vitkit.core.hardware import parse_cpuinfo, resolve_amp
from vitkit.layers.precision import cast_for_inference

AMX = {"model": "Intel Xeon Platinum 8480+", "flags": ["avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]}
AVX512_BF16 = {"model": "AMD EPYC 9654", "flags": ["avx2", "avx512f", "avx512_bf16"]}
PLAIN = {"model": "Intel Core i7-8700", "flags": ["avx2", "fma"]}
# bf16 weights and activations against fp32, on weights far from the init: the largest logit error
# is ~0.8% of the largest logit (deit, swin, swinv2); the tests allow 2%
BF16_TOLERANCE = 0.02


def test_parse_cpuinfo():
    text = "processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\n"
    assert parse_cpuinfo(text) == {"model": "AMD EPYC 9654", "flags": ["avx512_bf16", "avx512f", "fpu"]}
    assert parse_cpuinfo("")["flags"] == []


@pytest.mark.parametrize(
    "info,device,amp,chosen,flags",
    [
        (AMX, "cpu", "auto", "bf16", ["amx_bf16", "amx_tile", "avx512_bf16"]),
        (AVX512_BF16, "cpu", "auto", "bf16", ["avx512_bf16"]),
        (PLAIN, "cpu", "auto", "off", []),
        (PLAIN, "cuda", "auto", "bf16", []),
        (PLAIN, "cpu", "bf16", "bf16", []),
        (AMX, "cpu", "off", "off", ["amx_bf16", "amx_tile", "avx512_bf16"]),
    ],
)
def test_auto_follows_the_cpu_flags(monkeypatch, info, device, amp, chosen, flags):
    monkeypatch.setattr(hardware, "cpu_info", lambda: info)  # the probe, faked
    dtype, record = resolve_amp(amp, device)
    assert dtype == (torch.bfloat16 if chosen == "bf16" else None)
    assert record["chosen"] == chosen and record["requested"] == amp and record["flags"] == flags
    assert record["cpu"] == info["model"]
    if amp == "auto" and device == "cpu":
        assert ("AVX512_BF16" in record["reason"]) == (chosen == "off") or flags[0] in record["reason"]
    if amp == "bf16" and not flags:
        assert "no bf16 units" in record["reason"]  # warned: emulated bf16 is very slow


def test_bad_amp_values():
    with pytest.raises(ValueError, match="off, bf16, auto"):
        resolve_amp("fp8", "cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_amp("fp16", "cpu")
    assert resolve_amp("fp16", "cuda")[0] == torch.float16


def test_the_probe_needs_no_torch():
    # the module alone (the package root may import torch): the probe itself must not
    code = (
        "import importlib.util as u, sys; spec = u.spec_from_file_location('hw', sys.argv[1]); "
        "h = u.module_from_spec(spec); spec.loader.exec_module(h); info = h.cpu_info(); "
        "assert 'torch' not in sys.modules; print(info['model'])"
    )
    out = subprocess.run([sys.executable, "-c", code, hardware.__file__], capture_output=True, text=True, check=True)
    assert out.stdout.strip()


def test_the_recipe_chooses_by_hardware():
    from vitkit.train.recipes import build_config

    assert build_config("fmnist_best").amp == "auto"


@pytest.mark.parametrize(
    "name,kwargs,size",
    [
        ("deit_small_patch16_224", {"depth": 2}, 224),
        ("swin_tiny_patch4_window7_224", {"embed_dim": 32, "depths": (2, 2, 2, 1), "num_heads": (1, 2, 4, 8)}, 224),
        ("swinv2_tiny_window8_256", {"embed_dim": 32, "depths": (2, 2, 2, 1), "num_heads": (1, 2, 4, 8)}, 256),
    ],
)
def test_bf16_inference_is_within_tolerance_of_fp32(name, kwargs, size):
    model = vitkit.create_model(name, **kwargs).eval()
    _randomize(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
        low = cast_for_inference(copy.deepcopy(model), torch.bfloat16)
        out = low(x)  # fp32 input: cast by the model's hook
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(x).float()
    assert out.dtype == torch.bfloat16 and next(low.parameters()).dtype == torch.bfloat16
    scale = ref.abs().max()
    assert (out.float() - ref).abs().max() <= BF16_TOLERANCE * scale
    assert (autocast - ref).abs().max() <= BF16_TOLERANCE * scale
    with torch.no_grad():  # back to fp32: the hook goes, the outputs are fp32 again
        cast_for_inference(low, None)
        assert low(x).dtype == torch.float32


def test_eval_and_predict_take_amp(tmp_path, capsys):
    from vitkit.weights.vitkit_format import save_model

    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=2)
    weights = tmp_path / "tiny.safetensors"
    save_model(model, weights)
    root = write_folder(
        tmp_path / "imgs",
        {
            "val": {"a": [("RGB", (40, 40))] * 3, "b": [("L", (50, 40))] * 3},
            "train": {"a": [("RGB", (8, 8))], "b": [("RGB", (8, 8))]},
        },
    )
    results = {}
    for amp in ("off", "bf16"):
        out = tmp_path / f"{amp}.json"
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(weights), "--data", str(root), "--amp", amp, "--out", str(out)]) == 0
        assert f"amp {amp} -> {'fp32' if amp == 'off' else 'bf16'} on cpu" in capsys.readouterr().out
        results[amp] = json.loads(out.read_text())
    assert results["bf16"]["samples"] == results["off"]["samples"] == 6
    assert results["bf16"]["loss"] == pytest.approx(results["off"]["loss"], rel=BF16_TOLERANCE)
    image = next((root / "val" / "a").iterdir())
    probs = {}
    for amp in ("off", "bf16"):
        assert main(["predict", str(image), "--checkpoint", str(weights), "--amp", amp, "--json"]) == 0
        probs[amp] = json.loads(capsys.readouterr().out)[0]["top"][0]
    assert probs["bf16"]["index"] == probs["off"]["index"]
    assert probs["bf16"]["prob"] == pytest.approx(probs["off"]["prob"], abs=BF16_TOLERANCE)
    assert main(["predict", str(image), "--checkpoint", str(weights), "--amp", "auto"]) == 0
    assert capsys.readouterr().out.startswith("amp auto -> ")
