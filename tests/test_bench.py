"""`vitkit bench`: results are consistent, every mode runs, --vs timm prints the ratio for a ViT and a
Swin, the largest-batch search. Tiny iteration counts: no speed is asserted (that is the tool's job)."""

from __future__ import annotations

import json

import pytest

from vitkit.cli import main
from vitkit.layers import kernels
from vitkit.tools.bench import BenchOptions, benchmark, compare_with_timm, search_largest, timm_pair


def test_benchmark_result_is_consistent():
    opts = BenchOptions(batch_size=2, img_size=(64, 64), warmup=1, steps=5)
    r = benchmark("deit_tiny_patch16_224", opts, depth=2)
    assert r.model == "deit_tiny_patch16_224" and r.impl == "vitkit" and r.device == "cpu"
    assert r.steps == 5 and r.img_size == (64, 64)
    assert 0 < r.step_ms_p10 <= r.step_ms <= r.step_ms_p90
    assert r.throughput == pytest.approx(2 / (r.step_ms / 1e3))
    assert r.peak_memory_mb is None  # CPU: not measured


@pytest.mark.parametrize("extra", [{"mode": "train"}, {"mode": "train", "amp": "bf16", "channels_last": True}])
def test_train_mode_steps_the_optimizer(extra):
    opts = BenchOptions(batch_size=2, img_size=(64, 64), warmup=0, steps=2, **extra)
    r = benchmark("deit_tiny_distilled_patch16_224", opts, depth=1)
    assert r.mode == "train" and r.throughput > 0
    assert r.weights == "float32" and r.amp == extra.get("amp")  # training keeps fp32 weights under autocast


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_swin_bf16_train_and_infer(name):
    small = dict(embed_dim=32, depths=(2, 2, 2, 1), num_heads=(1, 2, 4, 8))
    for mode in ("train", "infer"):
        opts = BenchOptions(batch_size=2, img_size=(64, 64), warmup=0, steps=1, mode=mode, amp="bf16")
        r = benchmark(name, opts, **small)
        assert r.amp == "bf16" and r.weights == ("bfloat16" if mode == "infer" else "float32")


def test_amp_choice_is_printed_and_timm_autocasts(capsys):
    argv = [
        "bench",
        "deit_tiny_patch16_224",
        "--vs",
        "timm",
        "--batch-size",
        "1",
        "--img-size",
        "32",
        "--warmup",
        "0",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--device",
        "cpu",
        "--amp",
        "bf16",
        "--json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["amp_choice"]["chosen"] == "bf16" and result["amp_choice"]["requested"] == "bf16"
    assert result["ours"]["weights"] == "bfloat16" and result["timm"]["weights"] == "float32"
    assert result["ours"]["amp"] == result["timm"]["amp"] == "bf16"
    assert result["kernels"] == kernels.status()  # which of vitkit's own kernels ran, or why none did
    assert main([*argv[:-1], "--autocast-only", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ours"]["weights"] == "float32"
    assert main(argv[:-3] + ["--amp", "auto"]) == 0
    assert capsys.readouterr().out.startswith("amp auto -> ")


@pytest.mark.parametrize("name,size", [("deit_tiny_patch16_224", "32"), ("swin_tiny_patch4_window7_224", "64")])
def test_vs_timm_prints_the_ratio(name, size, capsys):
    argv = [
        "bench",
        name,
        "--vs",
        "timm",
        "--batch-size",
        "1",
        "--img-size",
        size,
        "--warmup",
        "0",
        "--steps",
        "1",
        "--rounds",
        "2",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    ratio_lines = [line for line in out.splitlines() if "ratio" in line]
    assert len(ratio_lines) == 1 and "over 2 alternating rounds" in ratio_lines[0]
    assert f"{name}  vitkit" in out and f"{name}  timm" in out


def test_comparison_holds_the_same_weights_and_reports_the_spread():
    import torch

    ours, ref = timm_pair("deit_tiny_patch16_224", (32, 32), depth=1)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), ref.eval()(x), atol=1e-5)
    opts = BenchOptions(batch_size=1, img_size=(32, 32), warmup=0, steps=2)
    result = compare_with_timm("deit_tiny_patch16_224", opts, rounds=3, depth=1).to_dict()
    assert result["ratio_low"] <= result["ratio"] <= result["ratio_high"] and result["rounds"] == 3
    assert result["ours"]["impl"] == "vitkit" and result["timm"]["impl"] == "timm"
    assert result["ours"]["steps"] == result["timm"]["steps"] == 6


def test_cli_json(capsys):
    argv = [
        "bench",
        "deit_tiny_patch16_224",
        "--batch-size",
        "1",
        "--img-size",
        "32",
        "--warmup",
        "0",
        "--steps",
        "2",
        "--json",
        "--mode",
        "train",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "train" and result["batch_size"] == 1 and result["img_size"] == [32, 32]
    assert result["steps"] == 2 and result["throughput"] > 0


def test_deit_preset_needs_cuda(capsys):
    assert main(["bench", "deit_tiny_patch16_224", "--preset", "deit", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "CUDA" in err and "kills a process" in err and "--batch-size" in err


def test_bad_options(capsys):
    assert main(["bench", "deit_tiny_patch16_224", "--batch-size", "0"]) == 2
    assert "batch size must be >= 1" in capsys.readouterr().err
    assert main(["bench", "not_a_model"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.parametrize("limit,start", [(1000, 64), (5, 64), (1, 64), (100_000, 64), (63, 64), (64, 64)])
def test_search_largest(limit, start):
    calls = []

    def fits(n: int) -> bool:
        calls.append(n)
        return n <= limit

    found = search_largest(fits, start=start, limit=16384)
    assert found <= min(limit, 16384)
    assert found >= 0.97 * min(limit, 16384)  # within ~3%: throughput is flat there
    assert len(calls) < 25


def test_search_largest_nothing_fits():
    with pytest.raises(RuntimeError, match="batch size 1"):
        search_largest(lambda n: False)
