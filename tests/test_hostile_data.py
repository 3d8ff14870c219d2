"""Broken and unusual image files in an image folder (issue 17, items 4 and 10).

A folder is seeded with zero-byte, truncated, non-image, CMYK, 16-bit, palette and RGBA files.
Without --skip-corrupt the first bad file stops the run with its path and the hint when it is met;
with it, files a header check catches are skipped at scan time (nothing is decoded then), files
that only fail to decode are skipped when met and listed, and no file is decoded twice. Valid but
unusual modes are converted, not dropped.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vitkit.data import folder
from vitkit.data.datasets import build_dataset, load_data, resolve_data_fields
from vitkit.data.folder import ImageReadError
from vitkit.train.config import TrainConfig


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _noise(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _palette() -> Image.Image:
    img = Image.new("P", (12, 12), 1)
    img.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    img.info["transparency"] = 0
    return img


UNUSUAL = {  # name -> (image, the RGB value its centre pixel must convert to)
    "cmyk.jpg": (Image.new("CMYK", (12, 12), (0, 0, 0, 0)), (255, 255, 255)),
    "sixteen_bit.png": (Image.fromarray(np.full((12, 12), 0x8000, np.uint16)), (128, 128, 128)),
    "palette.png": (_palette(), (250, 10, 10)),
    "rgba.png": (Image.new("RGBA", (12, 12), (10, 200, 30, 128)), (10, 200, 30)),
    "grey_alpha.png": (Image.new("LA", (12, 12), (77, 0)), (77, 77, 77)),
    "bilevel.png": (Image.new("1", (12, 12), 1), (255, 255, 255)),
}


def _seed(root: Path, header_bad: bool = True, decode_bad: bool = True) -> dict[str, Path]:
    """root/{train,val}/<class>/...: good PNGs, the unusual modes and the bad files; returns the bad ones."""
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.new("RGB", (14, 10), (20 * i, 100, 200)).save(root / split / name / f"good{i}.png")
    for name, (image, _) in UNUSUAL.items():
        image.save(root / "train" / "a" / name)
    bad = {}
    if header_bad:
        bad["zero"] = root / "train" / "a" / "zero_bytes.png"
        bad["zero"].write_bytes(b"")
        bad["text"] = root / "train" / "b" / "notes.jpg"
        bad["text"].write_text("not an image at all")
    if decode_bad:
        whole = _png(_noise())
        bad["truncated"] = root / "train" / "b" / "truncated.png"
        bad["truncated"].write_bytes(whole[: len(whole) // 2])
    return bad


@pytest.fixture
def count_decodes(monkeypatch) -> Counter:
    """Counts full decodes per file."""
    decodes: Counter = Counter()
    real = folder.load_image

    def counted(path, mode):
        decodes[Path(path)] += 1
        return real(path, mode)

    monkeypatch.setattr(folder, "load_image", counted)
    return decodes


def _train_set(root: Path, skip: bool):
    config = TrainConfig(data=str(root), skip_corrupt=skip, img_size=8)
    data = load_data(config)
    return data, build_dataset(data, "train", resolve_data_fields(config, data, default_img_size=8), train=False)


def test_header_bad_file_stops_the_scan_with_its_path_and_the_hint(tmp_path):
    bad = _seed(tmp_path / "d")
    with pytest.raises(ImageReadError) as caught:
        load_data(TrainConfig(data=str(tmp_path / "d")))
    message = str(caught.value)
    assert str(bad["zero"]) in message and "empty" in message and "--skip-corrupt" in message and "\n" not in message
    assert message.count("cannot read image") == 1


def test_decode_bad_file_stops_when_met(tmp_path):
    bad = _seed(tmp_path / "d", header_bad=False)
    _, dataset = _train_set(tmp_path / "d", skip=False)
    where = [p for p, _ in dataset.samples].index(bad["truncated"])
    for i in range(where):
        dataset[i]  # every file before it decodes
    with pytest.raises(ImageReadError, match=rf"cannot read image {bad['truncated']}: .*--skip-corrupt"):
        dataset[where]


def test_decode_bad_file_in_a_worker_is_still_one_line(tmp_path):
    _seed(tmp_path / "d", header_bad=False)
    _, dataset = _train_set(tmp_path / "d", skip=False)
    with pytest.raises(ImageReadError) as caught:
        list(DataLoader(dataset, batch_size=4, num_workers=1))
    assert "truncated.png" in str(caught.value) and "\n" not in str(caught.value)


def test_skip_corrupt_scans_headers_only_and_decodes_each_file_once(tmp_path, count_decodes):
    bad = _seed(tmp_path / "d")
    data, dataset = _train_set(tmp_path / "d", skip=True)
    assert sum(count_decodes.values()) == 0  # the scan decoded nothing
    assert sorted(data.skipped) == sorted([bad["zero"], bad["text"]])  # the header check's catch
    names = [p.name for p, _ in dataset.samples]
    assert "truncated.png" in names and set(UNUSUAL) <= set(names)  # unusual modes kept

    for _epoch in range(2):
        images = [dataset[i][0] for i in range(len(dataset))]
        assert all(x.shape == (3, 8, 8) for x in images)
        assert dataset.skipped == [bad["truncated"]]
    # each file decoded once per epoch, the truncated one once in all (known bad afterwards); the file after
    # it stands in for it, so it is decoded twice per epoch
    paths = [p for p, _ in dataset.samples]
    stand_in = paths[(paths.index(bad["truncated"]) + 1) % len(paths)]
    expected = {p: 1 if p == bad["truncated"] else 4 if p == stand_in else 2 for p in paths}
    assert count_decodes == expected


def test_skipped_files_found_by_workers_reach_the_main_process(tmp_path):
    bad = _seed(tmp_path / "d", header_bad=False)
    _, dataset = _train_set(tmp_path / "d", skip=True)
    batches = list(DataLoader(dataset, batch_size=4, num_workers=2))
    assert sum(len(labels) for _, labels in batches) == len(dataset)  # a replacement for the bad one
    assert dataset.skipped == [bad["truncated"]]


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_unusual_modes_are_converted(name, tmp_path):
    image, rgb = UNUSUAL[name]
    path = tmp_path / name
    image.save(path)
    folder.check_header(path)
    pixel = folder.load_image(path, "RGB").getpixel((6, 6))
    assert pixel == pytest.approx(rgb, abs=3 if name.endswith(".jpg") else 0)
    grey = folder.load_image(path, "L")
    assert grey.mode == "L" and grey.size == (12, 12)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height RGB pixels whose image data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))  # 10^10 pixels declared in 33 bytes
    with pytest.raises(ImageReadError, match=rf"cannot read image {bomb}: .*pixels.*--skip-corrupt"):
        folder.check_header(bomb)
    with pytest.raises(ImageReadError, match="pixels"):
        folder.load_image(bomb, "RGB")


def test_an_all_bad_split_is_one_error(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="has no readable images"):
        load_data(TrainConfig(data=str(root), skip_corrupt=True))
    whole = _png(_noise())
    for split in ("train", "val"):
        (root / split / "a" / "x.png").write_bytes(whole[: len(whole) // 2])
    _, dataset = _train_set(root, skip=True)
    with pytest.raises(ValueError, match="none of the 1 images could be decoded"):
        dataset[0]


def test_dataset_items_are_tensors(tmp_path):
    _seed(tmp_path / "d", header_bad=False, decode_bad=False)
    _, dataset = _train_set(tmp_path / "d", skip=False)
    x, label = dataset[0]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and label in (0, 1)


def test_train_lists_files_skipped_when_read_in_run_json(tmp_path):
    """`vitkit train --skip-corrupt`: a file that passes the header check but fails to decode is skipped
    when met and listed in run.json at the epoch's end."""
    from vitkit.cli import main

    bad = _seed(tmp_path / "d", header_bad=False)
    run = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(tmp_path / "d"),
        "--skip-corrupt",
        "--output",
        str(run),
        "--epochs",
        "1",
        "--img-size",
        "8",
        "--patch-size",
        "4",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--seed",
        "0",
        "--set",
        "model_args.depth=1",
        "--set",
        "model_args.embed_dim=16",
        "--set",
        "model_args.num_heads=2",
    ]
    assert main(args) == 0
    data = json.loads((run / "run.json").read_text())["data"]
    assert data["skipped_when_read"]["train"] == {"count": 1, "files": [str(bad["truncated"])]}
