"""vitkit.data.unlabelled: a folder of images without labels, split into train and val."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

from vitkit.data.data_config import DataConfig
from vitkit.data.unlabelled import load_images, load_unlabelled


def _write(root, n: int, size: int = 12, mode: str = "L") -> None:
    for i in range(n):
        path = root / f"part{i % 3}" / "deeper" / f"img{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, (size + i % 2, size), color=i * 5).save(path)


def test_every_image_in_any_nesting_is_split_into_train_and_val(tmp_path):
    _write(tmp_path / "imgs", 20)
    (tmp_path / "imgs" / ".hidden.png").write_bytes(b"not an image")  # hidden files are not images
    (tmp_path / "imgs" / "notes.txt").write_text("not an image either")
    data = load_unlabelled(DataConfig(data=str(tmp_path / "imgs"), val_split=0.25), tmp_path / "imgs")
    assert (len(data.splits["train"]), len(data.splits["val"])) == (15, 5)
    assert data.classes == [] and data.in_chans == 1 and data.mean == [0.5] and not data.skipped
    train = {p for p, _ in data.splits["train"].samples}
    assert train.isdisjoint(p for p, _ in data.splits["val"].samples)
    assert all(label == 0 for _, label in data.splits["train"].samples)
    # the same split again (split_seed), and subsets of a fixed size
    again = load_images(DataConfig(data=str(tmp_path / "imgs"), val_split=0.25, train_samples=4))
    assert {p for p, _ in again.splits["train"].samples} <= train and len(again.splits["train"]) == 4


def test_unreadable_and_missing_data_are_one_line_errors(tmp_path):
    root = tmp_path / "imgs"
    _write(root, 6, mode="RGB")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    config = DataConfig(data=str(root), val_split=0.5)
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png.*--skip-corrupt"):
        load_images(config)
    data = load_images(dataclasses.replace(config, skip_corrupt=True))
    assert [p.name for p in data.skipped] == ["broken.png"] and data.in_chans == 3
    with pytest.raises(ValueError, match="--val-split 0.1"):
        load_images(dataclasses.replace(config, skip_corrupt=True, val_split=0.0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(DataConfig(data=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no readable images"):
        load_images(DataConfig(data=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="too few"):
        load_images(DataConfig(data=str(root), val_split=0.01, skip_corrupt=True))


def test_a_labelled_folder_keeps_its_labels(tmp_path):
    for split in ("train", "val"):
        for name in ("a", "b"):
            _write(tmp_path / "lab" / split / name, 2)
    data = load_images(DataConfig(data=str(tmp_path / "lab")))
    assert data.classes == ["a", "b"] and set(data.splits) == {"train", "val"}
