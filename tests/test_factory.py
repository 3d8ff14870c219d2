"""The layers below the factory, the lazy root package, `load_model` for every kind of model file and
the encoder-only case of `load_checkpoint`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitkit
from vitkit.data.transforms import ImageSpec
from vitkit.factory import load_model
from vitkit.models.swin import SwinBlock
from vitkit.models.vit import Block
from vitkit.train.modeling import build_model, load_weights, save_weights
from vitkit.weights.vitkit_format import read_metadata, save_model

SRC = Path(vitkit.__file__).parent
# a bare environment keeps the Makefile's byte-code cache, or torch compiles from source (PERFORMANCE item 28)
BYTECODE_CACHE = {key: os.environ[key] for key in ("PYTHONPYCACHEPREFIX",) if key in os.environ}
TINY_VIT = dict(img_size=32, patch_size=4, depth=1, embed_dim=32, num_heads=2)
TINY_SWIN = dict(img_size=32, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(SRC.parent), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", **BYTECODE_CACHE},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


# -- layers ----------------------------------------------------------------------------------------
def test_import_vitkit_leaves_torch_out_and_the_public_names_load_on_use():
    out = _python(
        "import sys, vitkit\n"
        "print('torch' in sys.modules, vitkit.__version__ == vitkit.core.version.__version__)\n"
        "m = vitkit.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32, patch_size=4, depth=1)\n"
        "print(type(m).__name__, 'torch' in sys.modules, vitkit.load_model.__module__, vitkit.LoadReport.__name__)"
    )
    assert out.splitlines() == ["False True", "VisionTransformer True vitkit.factory LoadReport"]
    for name in vitkit.__all__:
        assert getattr(vitkit, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vitkit.nope  # noqa: B018


def _vitkit_imports(path: Path) -> set[str]:
    """Every vitkit module `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return {m for m in found if m.startswith("vitkit")}


def test_registry_imports_only_core_and_layers_and_data_no_training():
    assert all(m.startswith(("vitkit.core", "vitkit.layers")) for m in _vitkit_imports(SRC / "registry.py"))
    for path in (SRC / "data").glob("*.py"):
        upward = [m for m in _vitkit_imports(path) if m.startswith(("vitkit.train", "vitkit.pretrain", "vitkit.tools"))]
        assert not upward, (path, upward)
    # the table is empty until a family registers: a clear error, not a silent "unknown model"
    out = _python(
        "import vitkit.registry as r\ntry:\n    r.get_variant('vit_tiny_patch16_224')\n"
        "except RuntimeError as e:\n    print(e)"
    )
    assert "import vitkit.factory" in out


def test_models_report_their_block_types():
    vit = vitkit.create_model("vit_tiny_patch16_224", **TINY_VIT)
    swin = vitkit.create_model("swinv2_tiny_window8_256", **TINY_SWIN)
    assert vit.block_types() == (Block,) and swin.block_types() == (SwinBlock,)
    for model in (vit, swin):
        blocks = [m for m in model.modules() if isinstance(m, model.block_types())]
        assert len(blocks) == (1 if model is vit else 4)


# -- load_model ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, args", [("vit_tiny_patch16_224", TINY_VIT), ("swin_tiny_patch4_window7_224", TINY_SWIN)]
)
def test_load_model_rebuilds_a_vitkit_model(name, args, tmp_path):
    model = vitkit.create_model(name, num_classes=4, in_chans=1, drop_path_rate=0.1, **args).eval()
    save_model(model, tmp_path / "m.safetensors")
    rebuilt = vitkit.load_model(tmp_path / "m.safetensors", device="cpu").eval()
    assert rebuilt.config == model.config and rebuilt.variant_name == name
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(rebuilt(x), model(x))


def test_load_model_rebuilds_a_torchvision_model(tmp_path):
    model = build_model("torchvision:resnet18", num_classes=3, in_chans=1, img_size=32).eval()
    spec = ImageSpec(32, 1, (0.5,), (0.5,), 1.0)
    save_weights(model, tmp_path / "best.safetensors", spec=spec, classes=["a", "b", "c"])
    rebuilt = load_model(tmp_path / "best.safetensors").eval()
    assert type(rebuilt).__name__ == "ResNet" and rebuilt.variant_name == "torchvision:resnet18"
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(rebuilt(x), model(x))
    again, meta = load_weights(tmp_path / "best.safetensors")  # the training side's entry goes the same way
    assert torch.equal(again.eval()(x), model(x)) and meta == read_metadata(tmp_path / "best.safetensors")


def test_load_model_refuses_files_without_a_model_name(tmp_path):
    model = vitkit.create_model("vit_tiny_patch16_224", **TINY_VIT)
    vitkit.save_checkpoint(model, tmp_path / "timm.safetensors", format="timm")
    with pytest.raises(ValueError, match=r"not a vitkit checkpoint.*load_checkpoint\(model, path\)"):
        load_model(tmp_path / "timm.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")


# -- encoder-only files ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, args", [("vit_tiny_patch16_224", TINY_VIT), ("swinv2_tiny_window8_256", TINY_SWIN)])
def test_an_encoder_file_loads_into_a_headed_model_with_the_head_new(name, args, tmp_path):
    encoder = vitkit.create_model(name, num_classes=0, in_chans=1, **args)
    path = tmp_path / "encoder.safetensors"
    save_model(encoder, path, {"pretrained_with": "simmim"})
    assert load_model(path).config.num_classes == 0  # the file alone rebuilds the headless encoder

    model = vitkit.create_model(name, num_classes=10, in_chans=1, **args)
    report = vitkit.load_checkpoint(model, path)
    head = {k for k in model.state_dict() if k.startswith("head")}
    assert set(report.reinitialised) == head and all("without a classifier" in v for v in report.reinitialised.values())
    assert report.ok and report.loaded == len(encoder.state_dict())
    saved = encoder.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items() if k not in head)


@pytest.mark.parametrize("change", [{"in_chans": 3}, {"img_size": 64}, {"depth": 2}])
def test_an_encoder_that_does_not_fit_is_one_error_and_nothing_loads(change, tmp_path):
    path = tmp_path / "encoder.safetensors"
    save_model(
        vitkit.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, **TINY_VIT),
        path,
        {"pretrained_with": "simmim"},
    )
    model = vitkit.create_model("vit_tiny_patch16_224", num_classes=10, **(TINY_VIT | {"in_chans": 1} | change))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit this model.*pre-trained, with its model_args") as err:
        vitkit.load_checkpoint(model, path)
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
