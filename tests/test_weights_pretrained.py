"""Pretrained records (timm's defaults), download into the cache with hash check, the offline
failure, `pretrained="path"`, eval preprocessing equal to timm's, torch.hub, and the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from timm.models import get_arch_pretrained_cfgs

import vitkit
from vitkit.cli import main
from vitkit.weights import pretrained
from vitkit.weights.records import RECORDS

REPO = Path(__file__).resolve().parents[1]
TINY = dict(depth=1, embed_dim=32, num_heads=2, img_size=32)


def test_records_are_timms_defaults():
    names = set(vitkit.list_models())
    for record in RECORDS:
        assert record.model in names
        if record.model not in timm.list_models():
            continue  # the *_in21k names, which timm has dropped (pre-logits layer)
        cfgs = get_arch_pretrained_cfgs(record.model)
        default = next(iter(cfgs))  # timm's default tag is the first one listed
        assert record.name == default
        cfg = cfgs[default]
        assert record.num_classes == cfg.num_classes
        assert record.input_size == tuple(cfg.input_size[1:])
        assert (record.crop_pct, record.interpolation, record.license) == (cfg.crop_pct, cfg.interpolation, cfg.license)
        assert record.mean == tuple(cfg.mean) and record.std == tuple(cfg.std)
        hub = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors"
        assert record.url in (hub, cfg.url)
        if cfg.url:
            assert cfg.url in (record.url, record.origin)
    # every variant that timm has weights for has a record
    timm_with_weights = {n for n in names if n in timm.list_models(pretrained=True)}
    assert timm_with_weights <= set(pretrained.list_pretrained())


def _file_record(tmp_path: Path, **changes):
    ref = timm.create_model("deit_tiny_patch16_224", **TINY).eval()
    src = tmp_path / "mirror" / "weights.safetensors"
    src.parent.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, src)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    record = pretrained.get_record("deit_tiny_patch16_224")
    return ref, src, dataclasses.replace(record, **dict(url=src.as_uri(), sha256=sha[:16], format="timm") | changes)


def test_download_cache_and_hash(tmp_path, monkeypatch):
    ref, src, record = _file_record(tmp_path)
    monkeypatch.setitem(pretrained._BY_MODEL, record.model, record)
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))
    model = vitkit.create_model("deit_tiny_patch16_224", **TINY, pretrained=True).eval()
    cached = tmp_path / "cache" / "deit_tiny_patch16_224.fb_in1k.safetensors"
    assert cached.is_file() and model.pretrained_record == record
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        # the weights are timm's bit for bit; the outputs agree to float32 rounding (timm's fused
        # attention kernel against our explicit one for short sequences on the CPU)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    # the cache serves the next call (the source may be gone)
    src.unlink()
    vitkit.create_model("deit_tiny_patch16_224", **TINY, pretrained=True)
    # a file that is not the recorded one is refused, and a bad download never lands in the cache
    monkeypatch.setitem(pretrained._BY_MODEL, record.model, dataclasses.replace(record, sha256="00000000"))
    with pytest.raises(ValueError, match="does not have the sha256"):
        vitkit.create_model("deit_tiny_patch16_224", **TINY, pretrained=True)
    cached.unlink()
    (tmp_path / "again").mkdir()
    _, _, bad = _file_record(tmp_path / "again", sha256="00000000")
    monkeypatch.setitem(pretrained._BY_MODEL, record.model, bad)
    with pytest.raises(ValueError, match="does not have the sha256"):
        vitkit.create_model("deit_tiny_patch16_224", **TINY, pretrained=True)
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_fails_fast_and_says_what_to_fetch(tmp_path, monkeypatch):
    # a host that cannot resolve (RFC 2606 .invalid): the offline path, whatever the test machine's network
    record = pretrained.get_record("deit_tiny_patch16_224")
    record = dataclasses.replace(record, url="https://weights.vitkit.invalid/deit.pth")
    monkeypatch.setitem(pretrained._BY_MODEL, record.model, record)
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        vitkit.create_model("deit_tiny_patch16_224", **TINY, pretrained=True)
    assert time.monotonic() - start < 20
    message = str(err.value)
    assert record.url in message and str(tmp_path / "cache" / "deit_tiny_patch16_224.fb_in1k.pth") in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="no pretrained weights are recorded"):
        pretrained.get_record("swinv2_giant_window12_192")


def test_pretrained_local_path(tmp_path):
    ref, src, _ = _file_record(tmp_path)
    model = vitkit.create_model("deit_tiny_patch16_224", **TINY, num_classes=3, pretrained=str(src))
    assert torch.equal(model.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)
    assert model.head.weight.shape == (3, 32)  # a new head for 3 classes


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "vit_base_patch32_384", "swinv2_base_window12_192"])
def test_eval_transform_matches_timm(name):
    with torch.device("meta"):
        ref = timm.create_model(name)
    expected = create_transform(**resolve_data_config({}, model=ref))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 411, 3), dtype=np.uint8))
    ours = vitkit.eval_transform(name)(img)
    # equal up to rounding: ToDtype multiplies by 1/255 where timm's ToTensor divides by 255
    torch.testing.assert_close(ours, expected(img), rtol=0, atol=1e-6)
    with torch.device("meta"):
        model = vitkit.create_model(name)
    torch.testing.assert_close(vitkit.eval_transform(model)(img), ours, rtol=0, atol=0)


def test_torch_hub_local():
    model = torch.hub.load(str(REPO), "deit_tiny_patch16_224", source="local", **TINY, num_classes=4)
    assert model.variant_name == "deit_tiny_patch16_224"
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    swin = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, img_size=32,
                pretrained_window_sizes=(0, 0))  # fmt: skip
    model = torch.hub.load(str(REPO), "swinv2_tiny_window8_256", source="local", **swin)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    # one entry point per variant (torch.hub.list reads GitHub repositories only)
    spec = importlib.util.spec_from_file_location("vitkit_hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert all(callable(getattr(hubconf, name)) for name in vitkit.list_models())


def test_cli_convert_and_pretrained_listing(tmp_path, capsys):
    ref = timm.create_model("deit_tiny_patch16_224", **TINY).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "deit.pth")
    tiny = [item for k, v in TINY.items() for item in ("--set", f"{k}={v}")]
    cmd = ["convert", str(tmp_path / "deit.pth"), str(tmp_path / "hf"),
           "--model", "deit_tiny_patch16_224", "--to", "hf"]  # fmt: skip
    assert main(cmd + tiny) == 0
    out = capsys.readouterr().out
    assert "format timm" in out and (tmp_path / "hf" / "config.json").is_file()
    cmd = ["convert", str(tmp_path / "hf"), str(tmp_path / "t.pth"), "--model", "deit_tiny_patch16_224", "--to", "timm"]
    assert main(cmd + tiny) == 0
    assert "format hf" in capsys.readouterr().out
    assert torch.equal(torch.load(tmp_path / "t.pth", weights_only=True)["pos_embed"], ref.pos_embed)
    # a checkpoint that does not fit: one line on stderr, exit status 1 (found while running)
    cmd = ["convert", str(tmp_path / "deit.pth"), str(tmp_path / "x"), "--model", "deit_tiny_distilled_patch16_224"]
    assert main(cmd + tiny) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit deit_tiny_distilled_patch16_224" in err
    assert not (tmp_path / "x").exists()
    assert main(["models", "--pretrained", "deit_tiny*"]) == 0
    out = capsys.readouterr().out
    assert "deit_tiny_patch16_224" in out and "72.2" in out and "apache-2.0" in out
