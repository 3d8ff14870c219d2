"""`vitkit flops`: published MACs, CPU and meta counts agree, the breakdown, the fast count, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from vitkit.cli import main
from vitkit.tools.flops import count_macs, macs_report, model_macs

# (name, img_size, published GMACs per image)
PUBLISHED = [
    ("deit_tiny_patch16_224", None, 1.26),
    ("deit_small_patch16_224", None, 4.61),
    ("vit_base_patch16_224", None, 17.58),
    ("vit_base_patch16_384", None, 55.5),
    ("swin_tiny_patch4_window7_224", None, 4.51),
    ("swin_base_patch4_window7_224", None, 15.47),
    ("swinv2_tiny_window8_256", None, 5.96),
]


@pytest.mark.parametrize("name,img_size,published", PUBLISHED)
def test_published_macs_within_2_percent(name, img_size, published):
    macs = macs_report(name, img_size=img_size).macs / 1e9
    assert abs(macs - published) <= 0.02 * published, f"{name}: {macs:.3f} G MACs, published {published} G"


def test_img_size_override_matches_the_384_variant():
    assert macs_report("vit_base_patch16_224", img_size=384).macs == macs_report("vit_base_patch16_384").macs


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224"])
def test_cpu_and_meta_counts_agree(name):
    # on the CPU, SDPA runs `_scaled_dot_product_flash_attention_for_cpu`, which FlopCounterMode
    # does not count by itself; on meta it decomposes into bmm
    small = {"depth": 2} if name.startswith("deit") else {"depths": (1, 1, 1, 1)}
    cpu = vitkit.create_model(name, **small).eval()
    with torch.device("meta"):
        meta = vitkit.create_model(name, **small).eval()
    x = torch.randn(1, 3, 224, 224)
    cpu_total, cpu_parts = count_macs(cpu, x, levels=4)
    meta_total, meta_parts = count_macs(meta, x.to("meta"), levels=4)
    assert cpu_total == meta_total
    assert cpu_parts == meta_parts


def test_attention_products_are_counted():
    report = macs_report("deit_tiny_patch16_224", levels=4)
    n, d = 197, 192  # tokens (196 patches + class token), width
    assert report.breakdown["blocks.0.attn (self)"] == 2 * n * n * d  # q @ k^T and attn @ v
    assert report.breakdown["blocks.0.attn.qkv"] == n * d * 3 * d
    # the patch embedding: a 16x16 convolution, one output per patch and channel
    assert report.breakdown["patch_embed.proj"] == 196 * d * 3 * 16 * 16


@pytest.mark.parametrize("levels", [1, 2, 4])
def test_breakdown_partitions_the_total(levels):
    report = macs_report("swin_tiny_patch4_window7_224", levels=levels)
    assert sum(report.breakdown.values()) == report.macs
    assert all(k.count(".") < levels or k.endswith("(self)") for k in report.breakdown)


def test_levels_must_be_positive_and_overrides_reach_the_model():
    with pytest.raises(ValueError, match="levels must be >= 1"):
        macs_report("deit_tiny_patch16_224", levels=0)
    full, half = macs_report("deit_tiny_patch16_224"), macs_report("deit_tiny_patch16_224", depth=6)
    per_block = full.breakdown["blocks.0"]
    assert full.macs - half.macs == 6 * per_block


@pytest.mark.parametrize(
    "name",
    [
        "deit_small_distilled_patch16_224",
        "deit3_small_patch16_224",
        "swin_small_patch4_window7_224",
        "swinv2_tiny_window16_256",
    ],
)
def test_fast_count_equals_full_count(name):
    assert model_macs(name) == macs_report(name).macs


def test_cli_json(capsys):
    assert main(["flops", "deit_tiny_patch16_224", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"model", "img_size", "params", "macs", "breakdown"}
    assert out["model"] == "deit_tiny_patch16_224" and out["img_size"] == [224, 224]
    assert out["params"] == 5_717_416  # timm's count for DeiT-Ti
    assert out["macs"] == sum(out["breakdown"].values()) and 1.2e9 < out["macs"] < 1.3e9


def test_cli_table_and_bad_size(capsys):
    assert main(["flops", "swinv2_tiny_window8_256", "--levels", "1"]) == 0
    out = capsys.readouterr().out
    assert "5.940 G MACs" in out and "1 MAC = 2 FLOPs" in out and "layers" in out
    assert main(["flops", "deit_tiny_patch16_224", "--img-size", "100"]) == 2
    assert "multiple of patch_size" in capsys.readouterr().err


def test_models_table_has_macs(capsys):
    assert main(["models", "deit_tiny_patch16_224"]) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert "MACs (G)" in header and " 1.25 " in line
    assert main(["models", "swin_tiny*", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["macs"] == macs_report("swin_tiny_patch4_window7_224").macs
