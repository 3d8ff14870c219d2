"""`vitkit train --finetune RUN|FILE` at a new resolution, the finetune recipe, and FixRes end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

import vitkit
from test_data import offline, write_idx  # noqa: F401  (offline is a fixture)
from vitkit.cli import main
from vitkit.data.transforms import ImageSpec
from vitkit.layers import resample_abs_pos_embed
from vitkit.train.finetune import finetune_fields, finetune_file, load_finetune_weights
from vitkit.train.modeling import save_weights

TINY_VIT = dict(patch_size=4, embed_dim=32, depth=1, num_heads=2)
TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)


def _trained_run(run: Path, name: str, img_size: int, num_classes: int = 10, **args) -> torch.nn.Module:
    """A run folder whose best.safetensors holds a randomly initialised model (as `vitkit train` writes it)."""
    torch.manual_seed(0)
    model = vitkit.create_model(name, img_size=img_size, in_chans=1, num_classes=num_classes, **args)
    spec = ImageSpec(img_size, 1, (0.5,), (0.5,), 1.0, "bilinear")
    save_weights(model, run / "best.safetensors", spec=spec, classes=[str(i) for i in range(num_classes)])
    return model


def _same(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...]) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in sa.items():
        if not any(s in key for s in skip):
            torch.testing.assert_close(sb[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_vit_run_folder_at_a_new_size_resamples_the_position_embedding(name, tmp_path):
    source = _trained_run(tmp_path, name, 16, **TINY_VIT)
    fields = finetune_fields(tmp_path)
    assert fields["model"] == name and fields["img_size"] == 16 and fields["model_args"] == TINY_VIT
    model = vitkit.create_model(name, img_size=28, in_chans=1, num_classes=10, **fields["model_args"])
    said = load_finetune_weights(model, tmp_path)
    assert "best.safetensors" in said and "resampled pos_embed" in said and "re-initialised" not in said
    prefix = source.num_prefix_tokens
    expected = resample_abs_pos_embed(source.pos_embed, (7, 7), (4, 4), prefix)
    torch.testing.assert_close(model.pos_embed, expected, rtol=0, atol=0)
    _same(source, model, skip=("pos_embed",))  # every other tensor, heads included, as trained


def test_new_class_count_reinitialises_the_head_and_says_so(tmp_path):
    source = _trained_run(tmp_path, "vit_tiny_patch16_224", 16, **TINY_VIT)
    model = vitkit.create_model("vit_tiny_patch16_224", img_size=16, in_chans=1, num_classes=5, **TINY_VIT)
    said = load_finetune_weights(model, tmp_path / "best.safetensors")
    assert "re-initialised head.bias, head.weight (the checkpoint has 10 classes" in said and "resampled" not in said
    _same(source, model, skip=("head.",))
    assert model.head.weight.shape == (5, 32)


def test_swin_file_at_a_new_window_resamples_the_position_tables(tmp_path):
    name = "swin_tiny_patch4_window7_224"
    source = _trained_run(tmp_path, name, 32, **TINY_SWIN)
    args = {**finetune_fields(tmp_path)["model_args"], "window_size": 8}
    model = vitkit.create_model(name, img_size=64, in_chans=1, num_classes=10, **args)
    said = load_finetune_weights(model, tmp_path / "best.safetensors")
    assert "resampled" in said and "relative_position_bias_table" in said
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape[0] == 15 * 15
    _same(source, model, skip=("relative_position",))


def test_a_timm_checkpoint_needs_the_model_named(tmp_path, capsys):
    ref = timm.create_model("vit_tiny_patch16_224", img_size=16, in_chans=1, num_classes=10, **TINY_VIT)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    assert finetune_fields(tmp_path / "timm.pth") == {}
    model = vitkit.create_model("vit_tiny_patch16_224", img_size=28, in_chans=1, num_classes=10, **TINY_VIT)
    assert "resampled pos_embed" in load_finetune_weights(model, tmp_path / "timm.pth")
    assert main(["train", "--finetune", str(tmp_path / "timm.pth"), "--smoke"]) == 2
    assert "add --model NAME" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        finetune_file(tmp_path / "nothing.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds none of"):
        finetune_file(tmp_path / "empty")


@pytest.fixture
def idx_data(offline, monkeypatch):  # noqa: F811
    folder = write_idx(offline / "idx", n_train=120, n_test=40)
    monkeypatch.setenv("VITKIT_DATA", str(folder))
    return folder


def test_fixres_train_small_then_finetune_recipe_at_the_target_size(idx_data, tmp_path, capsys):
    common = ["--data", "fashion-mnist", "--smoke", "--seed", "0", "--threads", "1"]
    low = tmp_path / "low"
    assert main(["train", "--img-size", "14", "--patch-size", "7", "--output", str(low), *common]) == 0
    high = tmp_path / "high"
    assert (
        main(
            [
                "train",
                "--recipe",
                "finetune",
                "--finetune",
                str(low),
                "--img-size",
                "28",
                "--output",
                str(high),
                *common,
            ]
        )
        == 0
    )
    assert "resampled pos_embed" in capsys.readouterr().out
    config = yaml.safe_load((high / "config.yaml").read_text())
    assert config["img_size"] == 28 and config["model_args"]["patch_size"] == 7
    assert (config["recipe"], config["lr"], config["weight_decay"], config["epochs"]) == ("finetune", 5e-6, 1e-8, 1)
    meta = vitkit.weights.read_metadata(high / "best.safetensors")
    assert json.loads(meta["inputs"])["img_size"] == 28
    weights = vitkit.load_model(high / "best.safetensors")
    assert weights.pos_embed.shape[1] == 1 + 16  # a 4x4 grid at 28 (2x2 at 14)
    assert main(["train", "--recipe", "finetune", "--smoke", "--output", str(tmp_path / "x")]) == 2
    assert "add --finetune" in capsys.readouterr().err
