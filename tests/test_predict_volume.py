"""`vitkit predict` at volume (issue 17, item 11): results stream, memory stays flat, a bad file in
the middle stops the run with its path (results before it printed) or, with --skip-corrupt, is left
out and listed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitkit
from vitkit.cli import main
from vitkit.tools import predict as predict_module
from vitkit.tools.inference import load_inference
from vitkit.tools.predict import PredictStats, iter_predictions, predict

SRC = str(Path(vitkit.__file__).resolve().parents[1])
SMALL = dict(depth=1, embed_dim=32, num_heads=2, img_size=16, patch_size=8, num_classes=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    vitkit.weights.save_model(vitkit.create_model("vit_tiny_patch16_224", **SMALL), path)
    return path


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _images(folder_path: Path, n: int, bad: dict[int, bytes] | None = None) -> list[Path]:
    """n PNGs (a few distinct ones repeated: writing is what costs), with `bad` {index: bytes} replaced."""
    folder_path.mkdir(parents=True, exist_ok=True)
    blobs = [_png(i) for i in range(8)]
    paths = []
    for i in range(n):
        path = folder_path / f"img{i:06d}.png"
        path.write_bytes((bad or {}).get(i, blobs[i % len(blobs)]))
        paths.append(path)
    return paths


def test_results_stream_one_batch_at_a_time(tmp_path, checkpoint, monkeypatch):
    paths = _images(tmp_path / "imgs", 10)
    decoded = []
    real = predict_module.load_image
    monkeypatch.setattr(predict_module, "load_image", lambda p, m: decoded.append(p) or real(p, m))
    inference = load_inference(checkpoint=checkpoint)
    results = iter_predictions(inference.model, paths, inference.spec, batch_size=2)
    first = next(results)
    assert first["image"] == str(paths[0]) and len(decoded) == 2  # one batch decoded, not all ten
    rest = list(results)
    assert [r["image"] for r in rest] == list(map(str, paths[1:])) and len(decoded) == 10
    # the list API gives the same, and a folder argument expands to its images in order
    assert predict(inference.model, [tmp_path / "imgs"], inference.spec) == [first, *rest]


def test_bad_file_in_the_middle_stops_with_its_path(tmp_path, checkpoint, capsys):
    whole = _png(99)
    paths = _images(tmp_path / "imgs", 6, bad={3: whole[: len(whole) // 2]})
    code = main(["predict", *map(str, paths), "--checkpoint", str(checkpoint), "--batch-size", "1", "--workers", "1"])
    out, err = capsys.readouterr()
    assert code == 1 and err.count("\n") == 1
    assert f"cannot read image {paths[3]}" in err and "--skip-corrupt" in err
    assert [line.split(":")[0] for line in out.splitlines()] == list(map(str, paths[:3]))  # streamed before it


def test_skip_corrupt_leaves_bad_files_out_and_lists_them(tmp_path, checkpoint, capsys):
    whole = _png(99)
    paths = _images(tmp_path / "imgs", 7, bad={2: b"", 3: whole[:100], 5: b"not an image"})
    code = main(
        [
            "predict",
            str(tmp_path / "imgs"),
            "--checkpoint",
            str(checkpoint),
            "--skip-corrupt",
            "--json",
            "--batch-size",
            "3",
            "--workers",
            "0",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert [r["image"] for r in json.loads(out)] == [str(paths[i]) for i in (0, 1, 4, 6)]
    assert "skipped 3 unreadable image(s)" in err and str(paths[3]) in err
    stats = PredictStats()
    inference = load_inference(checkpoint=checkpoint)
    list(iter_predictions(inference.model, paths, inference.spec, skip_corrupt=True, stats=stats))
    assert stats.classified == 4 and stats.skipped == [paths[i] for i in (2, 3, 5)]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-k", "0"], "--top-k must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--workers", "-1"], "--workers must be between 0 and 64"),
        (["--workers", "100000"], "--workers must be between 0 and 64"),
    ],
)
def test_bad_options_are_usage_errors(flags, message, tmp_path, checkpoint, capsys):
    image = _images(tmp_path, 1)[0]
    assert main(["predict", str(image), "--checkpoint", str(checkpoint), *flags]) == 2
    assert message in capsys.readouterr().err


def test_json_of_no_images_is_an_empty_list(tmp_path, checkpoint, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--checkpoint", str(checkpoint), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def peak_rss_mb(folders: list[Path], checkpoint: Path, workers: int = 0) -> list[float]:
    """Peak RSS (MB) of one fresh process after `vitkit predict FOLDER --json` over each folder in turn.

    A cost per file (results kept, paths leaked) raises the peak with the folder's size; the import
    and the model, paid once, do not.
    """
    code = (
        "import os, resource, sys\n"
        "from vitkit.cli import main\n"
        "sys.stdout = open(os.devnull, 'w')\n"
        f"for folder in {[str(f) for f in folders]!r}:\n"
        f"    code = main(['predict', folder, '--checkpoint', {str(checkpoint)!r}, '--json', '--device', 'cpu',"
        f" '--workers', '{workers}'])\n"
        "    print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    rows = [line.split() for line in done.stderr.splitlines()[-len(folders) :]]
    assert [r[0] for r in rows] == ["0"] * len(folders), done.stderr[-2000:]
    return [int(r[1]) / 1024 for r in rows]  # ru_maxrss is in KiB on Linux


@pytest.mark.parametrize(
    "small, large",
    [
        (1000, 2000),
        pytest.param(1000, 10_000, marks=pytest.mark.slow),
    ],
)
def test_peak_memory_does_not_grow_with_the_file_count(small, large, tmp_path, checkpoint):
    paths = _images(tmp_path / "big", large)
    (tmp_path / "small").mkdir()
    for p in paths[:small]:
        os.link(p, tmp_path / "small" / p.name)
    base, grown = peak_rss_mb([tmp_path / "small", tmp_path / "big"], checkpoint)
    print(f"peak RSS: {small} files {base:.1f} MB, then {large} files {grown:.1f} MB")
    assert grown <= base + 50, (base, grown)
