"""`vitkit export --format hub`: timm's `local-dir:` loader rebuilds the run's model with the same logits,
vitkit reads the folder back identically, and timm folders are told from transformers folders."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from test_data import offline, offline_idx, write_idx  # noqa: F401  (offline is a fixture)
from test_train import TINY
from vitkit.cli import main
from vitkit.factory import load_model
from vitkit.train.modeling import load_weights
from vitkit.weights.checkpoint import save_checkpoint
from vitkit.weights.timm_hub import folder_kind


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory):
    """A one-epoch tiny run on small IDX files and its hub folder."""
    root = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as mp:
        offline_idx(mp, root, n_train=300, n_test=40)
        run, out = root / "run", root / "hub"
        assert main(["train", "--output", str(run), "--seed", "0", *TINY, "--epochs", "1"]) == 0
        assert main(["export", "--format", "hub", "--run", str(run), "--output", str(out)]) == 0
        yield run, out, root


def test_hub_folder_has_timm_config_weights_and_card(hub_run):
    _, out, _ = hub_run
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["num_classes"] == 10 and config["num_features"] == 32
    assert config["model_args"]["patch_size"] == 7 and config["model_args"]["in_chans"] == 1
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28]
    assert len(config["label_names"]) == 10
    card = (out / "README.md").read_text()
    for part in ("## Data", "## Recipe", "## Results", "## Limits", "## Licence", "vitkit eval --checkpoint"):
        assert part in card
    assert folder_kind(out) == "timm"


def test_timm_local_dir_gives_the_runs_logits(hub_run):
    run, out, _ = hub_run
    ours, _ = load_weights(run / "best.safetensors")
    ref = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        a, b = ours.eval()(x), ref(x)
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()


def test_vitkit_reads_the_folder_back_exactly(hub_run, capsys):
    run, out, root = hub_run
    ours, meta = load_weights(run / "best.safetensors")
    back, back_meta = load_weights(out)
    assert json.loads(back_meta["inputs"]) == json.loads(meta["inputs"])
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), back.eval()(x))
    results = []
    for source in (["--run", str(run)], ["--checkpoint", str(out), "--data", "fashion-mnist"]):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("VITKIT_DATA", str(root / "idx"))
            mp.setenv("VITKIT_OFFLINE", "1")
            # fp32 on both sides: the run's own amp (auto) is bf16 on CPUs with bf16 units
            args = ["eval", *source, "--split", "test", "--amp", "off", "--out", str(root / "eval.json")]
            assert main(args) == 0
        results.append(json.loads((root / "eval.json").read_text()))
    assert results[0]["top1"] == results[1]["top1"] and results[0]["loss"] == results[1]["loss"]


def test_folders_timm_and_transformers_wrote_are_told_apart(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=5).eval()
    timm.models.save_for_hf(ref, str(tmp_path / "timm"), safe_serialization=True)
    assert folder_kind(tmp_path / "timm") == "timm"
    model = load_model(tmp_path / "timm")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model.eval()(x) - ref(x)).abs().max().item() <= 1e-5 * ref(x).abs().max().item()
    save_checkpoint(model, tmp_path / "hf", format="hf")
    assert folder_kind(tmp_path / "hf") == "transformers"
    with pytest.raises(ValueError, match="not a timm Hub folder"):
        load_model(tmp_path / "hf")


def test_export_hub_needs_a_run(tmp_path, capsys):
    # a user path that is not a run: a failure, exit 1
    assert main(["export", "--format", "hub", "--run", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert "is not a finished vitkit run" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
