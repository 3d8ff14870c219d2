"""Data: Fashion-MNIST found offline (tiny IDX files written here), image folders and their errors,
seeded splits and subsets, batched and per-image transforms, sharded samplers."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitkit.data import fashion_mnist
from vitkit.data.datasets import build_dataset, holdout, load_data, resolve_data_fields, subset
from vitkit.data.folder import ImageReadError
from vitkit.data.samplers import ShardedSampler, build_loader, set_loader_epoch
from vitkit.data.transforms import (
    Augment,
    BatchTrainTransform,
    ImageSpec,
    eval_transform,
    random_pad_crop,
    random_resized_crop,
    train_transform,
)
from vitkit.train.config import TrainConfig

CLASSES = 10


# -- helpers shared with test_train.py and test_eval.py -------------------------------------------


def fake_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 28, 28) uint8 images whose class (a bright horizontal band's row) a tiny ViT can learn."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        row = 2 + 2 * label
        images[i, row : row + 3, 4:24] = 230
    return images, labels


def write_idx(folder: Path, n_train: int = 200, n_test: int = 60, gz: bool = True) -> Path:
    """Fashion-MNIST's four IDX files (big-endian header, then uint8 data), optionally gzipped."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = fake_images(n, seed)
        blobs = {
            f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 0x803, n, 28, 28) + images.numpy().tobytes(),
            f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 0x801, n) + labels.to(torch.uint8).numpy().tobytes(),
        }
        for name, blob in blobs.items():
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(blob)
            else:
                (folder / name).write_bytes(blob)
    return folder


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No real data anywhere: an empty cache, no Debian folder, no download."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VITKIT_DATA", raising=False)
    monkeypatch.setenv("VITKIT_OFFLINE", "1")
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    return tmp_path


def offline_idx(mp: pytest.MonkeyPatch, root: Path, n_train: int, n_test: int) -> Path:
    """For module-scoped fixtures: what `offline` sets (an empty cache under root, no Debian folder, no
    download), with a tiny IDX Fashion-MNIST under root as $VITKIT_DATA; returns its folder."""
    mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
    mp.setenv("VITKIT_OFFLINE", "1")
    mp.setattr(fashion_mnist, "DEBIAN_DIR", root / "no-debian")
    data = write_idx(root / "idx", n_train=n_train, n_test=n_test)
    mp.setenv("VITKIT_DATA", str(data))
    return data


def write_folder(root: Path, spec: dict[str, dict[str, list[tuple[str, tuple[int, int]]]]]) -> Path:
    """root/<split>/<class>/<i>.png from {split: {class: [(mode, (w, h)), ...]}}."""
    for split, classes in spec.items():
        for name, images in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, (mode, size) in enumerate(images):
                colour = {"L": 40 * i % 255, "RGB": (200, 30 * i % 255, 10), "RGBA": (10, 200, 30, 128)}[mode]
                Image.new(mode, size, colour).save(folder / f"{i}.png")
    return root


# -- Fashion-MNIST ---------------------------------------------------------------------------------


def test_finds_gzipped_idx_in_the_debian_folder_and_decompresses_once(offline, monkeypatch):
    debian = write_idx(offline / "debian")
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", debian)
    root = fashion_mnist.find_fashion_mnist()
    assert root == fashion_mnist.cache_dir()
    assert (root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    images, labels = fashion_mnist.load_fashion_mnist(train=True, root=root)
    expected, expected_labels = fake_images(200, 1)
    assert images.shape == (200, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], expected) and torch.equal(labels, expected_labels)
    # the second lookup reads the cache: the Debian folder is no longer needed
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", offline / "gone")
    assert fashion_mnist.find_fashion_mnist() == root


def test_vitkit_data_never_replaces_the_shared_cache(offline, monkeypatch):
    """A folder named by $VITKIT_DATA is copied into a cache of its own: a later run without
    $VITKIT_DATA still reads the real data, not the last folder a user (or a test) pointed at."""
    debian = write_idx(offline / "debian")
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", debian)
    mine = write_idx(offline / "mine", n_train=30, n_test=10, gz=False)
    monkeypatch.setenv("VITKIT_DATA", str(mine))
    assert len(fashion_mnist.load_fashion_mnist(train=True)[0]) == 30
    monkeypatch.delenv("VITKIT_DATA")
    assert len(fashion_mnist.load_fashion_mnist(train=True)[0]) == 200


def test_vitkit_data_comes_first(offline, monkeypatch):
    write_idx(offline / "debian")
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", offline / "debian")
    mine = write_idx(offline / "mine" / "fashion-mnist", n_train=30, n_test=10, gz=False)
    monkeypatch.setenv("VITKIT_DATA", str(mine.parent))
    images, _ = fashion_mnist.load_fashion_mnist(train=True)
    assert len(images) == 30


def test_missing_fashion_mnist_lists_where_it_looked_and_how_to_get_it(offline):
    with pytest.raises(FileNotFoundError) as err:
        fashion_mnist.find_fashion_mnist()
    message = str(err.value)
    assert "$VITKIT_DATA (not set)" in message and str(fashion_mnist.cache_dir()) in message
    assert str(offline / "no-debian") in message
    assert "apt-get install dataset-fashion-mnist" in message and "internet" in message
    assert "\n" not in message


def test_fashion_mnist_splits_are_seeded_and_subsets_fixed(offline, monkeypatch):
    monkeypatch.setenv("VITKIT_DATA", str(write_idx(offline / "idx")))
    config = TrainConfig(data="fashion-mnist", val_split=0.1, train_samples=50, test_samples=20)
    torch.manual_seed(123)  # the global seed must not matter
    a = load_data(config)
    torch.manual_seed(456)
    b = load_data(config)
    assert {k: len(v) for k, v in a.splits.items()} == {"train": 50, "val": 20, "test": 20}
    for split in a.splits:
        assert torch.equal(a.splits[split].images, b.splits[split].images)
    other = load_data(TrainConfig(data="fashion-mnist", split_seed=1, train_samples=50))
    assert not torch.equal(a.splits["val"].images, other.splits["val"].images)
    assert a.classes[0] == "T-shirt/top" and a.in_chans == 1 and a.native_size == 28


def test_holdout_and_subset_are_disjoint_sorted_and_deterministic():
    train, val = holdout(100, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert set(train.tolist()).isdisjoint(val.tolist()) and sorted(train.tolist() + val.tolist()) == list(range(100))
    assert torch.equal(holdout(100, 0.1, seed=3)[1], val) and not torch.equal(holdout(100, 0.1, seed=4)[1], val)
    assert subset(10, None, 0) is None and subset(10, 50, 0) is None
    assert torch.equal(subset(100, 7, 5), subset(100, 7, 5)) and len(subset(100, 7, 5)) == 7


# -- image folders -------------------------------------------------------------------------------


def test_image_folder_greyscale_rgb_rgba_of_any_size(tmp_path):
    root = write_folder(
        tmp_path / "mixed",
        {
            "train": {"cat": [("RGB", (40, 30)), ("RGBA", (17, 50))], "dog": [("L", (64, 64)), ("RGB", (33, 33))]},
            "val": {"dog": [("RGBA", (20, 20))]},
            "test": {"cat": [("L", (100, 10))]},
        },
    )
    config = TrainConfig(data=str(root), crop="rrc")
    data = load_data(config)
    assert data.classes == ["cat", "dog"] and data.in_chans == 3
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 4, "val": 1, "test": 1}
    config = resolve_data_fields(config, data, default_img_size=32)
    assert (config.img_size, config.in_chans, config.num_classes) == (32, 3, 2)
    for split in ("train", "val", "test"):
        image, label = build_dataset(data, split, config)[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert build_dataset(data, "val", config)[0][1] == 1  # val has only "dog", labelled as in train

    grey = write_folder(
        tmp_path / "grey", {"train": {"a": [("L", (9, 9))], "b": [("L", (12, 8))]}, "val": {"a": [("L", (9, 9))]}}
    )
    data = load_data(TrainConfig(data=str(grey)))
    assert data.in_chans == 1 and "test" not in data.splits
    config = resolve_data_fields(TrainConfig(data=str(grey), img_size=16), data, default_img_size=224)
    assert build_dataset(data, "train", config)[0][0].shape == (1, 16, 16)


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    root = write_folder(
        tmp_path / "d", {"train": {"a": [("RGB", (8, 8))] * 2, "b": [("RGB", (8, 8))]}, "val": {"a": [("RGB", (8, 8))]}}
    )
    bad = root / "train" / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "train" / "b" / "notes.txt").write_text("ignored: not an image extension")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png.*--skip-corrupt"):
        load_data(TrainConfig(data=str(root)))
    data = load_data(TrainConfig(data=str(root), skip_corrupt=True))
    assert data.skipped == [bad] and len(data.splits["train"]) == 3


def test_empty_class_missing_val_class_and_missing_path_errors(tmp_path):
    root = write_folder(tmp_path / "d", {"train": {"a": [("RGB", (8, 8))]}, "val": {"a": [("RGB", (8, 8))]}})
    (root / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*train/empty has no images"):
        load_data(TrainConfig(data=str(root)))
    (root / "train" / "empty").rmdir()
    write_folder(root, {"val": {"zebra": [("RGB", (8, 8))]}})
    with pytest.raises(ValueError, match=r"zebra in .*val are not in the train split"):
        load_data(TrainConfig(data=str(root)))
    with pytest.raises(FileNotFoundError, match=r"data folder .*nowhere does not exist"):
        load_data(TrainConfig(data=str(tmp_path / "nowhere")))


def test_folder_without_val_holds_out_part_of_train(tmp_path):
    root = write_folder(tmp_path / "d", {"train": {"a": [("L", (8, 8))] * 10, "b": [("L", (8, 8))] * 10}})
    data = load_data(TrainConfig(data=str(root), val_split=0.2))
    assert len(data.splits["train"]) == 16 and len(data.splits["val"]) == 4
    with pytest.raises(FileNotFoundError, match="no val/ folder"):
        load_data(TrainConfig(data=str(root), val_split=0.0))


def test_read_error_from_a_worker_keeps_one_line():
    wrapped = (
        "Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1\nvitkit.data.folder.ImageReadError: cannot read image /d/a.png: truncated; fix it'
    )
    assert str(ImageReadError(wrapped)) == "cannot read image /d/a.png: truncated; fix it"


# -- transforms ------------------------------------------------------------------------------------


def test_batched_pad_crop_takes_a_window_of_the_padded_image_per_image():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8)
    out = random_pad_crop(x, 8, 2, "constant")
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(x)):
        windows = {(dy, dx): padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)}
        found = [offset for offset, window in windows.items() if torch.equal(out[i], window)]
        assert found, f"image {i} is not a window of its padded input"
        offsets.add(found[0])
    assert len(offsets) > 5  # each image draws its own offset
    assert torch.equal(random_pad_crop(x, 8, 0), x)


def test_batched_train_transform_flips_per_image_and_normalises():
    spec = ImageSpec(28, 1, (0.5,), (0.5,), 1.0)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
    out = BatchTrainTransform(spec, Augment(crop="resize", hflip=0.5))(images)
    plain = images.float() / 255 * 2 - 1
    flipped = [torch.allclose(o, p.flip(-1), atol=1e-6) for o, p in zip(out, plain)]
    kept = [torch.allclose(o, p, atol=1e-6) for o, p in zip(out, plain)]
    assert all(f or k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < 32
    rrc = random_resized_crop(torch.rand(5, 3, 40, 30), 16)
    assert rrc.shape == (5, 3, 16, 16)
    assert BatchTrainTransform(ImageSpec(16, 3, (0.5,), (0.5,)), Augment())(images[:4]).shape == (4, 3, 16, 16)


def test_eval_transform_is_the_same_for_a_batch_and_for_single_images():
    spec = ImageSpec(24, 3, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), crop_pct=0.875)
    images = torch.randint(0, 256, (3, 3, 40, 36), dtype=torch.uint8)
    t = eval_transform(spec)
    batch = t(images)
    assert batch.shape == (3, 3, 24, 24)
    for i in range(3):
        assert torch.equal(batch[i], t(images[i]))


# -- samplers --------------------------------------------------------------------------------------


def test_sharded_sampler_shards_without_overlap_and_reshuffles_per_epoch():
    shards = [list(ShardedSampler(10, shuffle=True, seed=1, rank=r, world_size=3, pad=False)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    padded = [ShardedSampler(10, shuffle=True, seed=1, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in padded] == [4, 4, 4] and [len(list(s)) for s in padded] == [4, 4, 4]
    s = ShardedSampler(10, shuffle=True, seed=1)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == list(range(10))
    s.set_epoch(0)
    assert list(s) == first
    assert list(ShardedSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_loader_fetches_whole_batches_from_memory(offline, monkeypatch):
    monkeypatch.setenv("VITKIT_DATA", str(write_idx(offline / "idx")))
    config = TrainConfig(data="fashion-mnist", crop="pad", crop_padding=2)
    data = load_data(config)
    config = resolve_data_fields(config, data, default_img_size=224)
    loader = build_loader(build_dataset(data, "train", config), train=True, batch_size=32, seed=0)
    set_loader_epoch(loader, 1, seed=0)
    images, labels = next(iter(loader))
    assert images.shape == (32, 1, 28, 28) and images.dtype == torch.float32 and labels.shape == (32,)
    assert len(loader) == 180 // 32  # the last partial batch is dropped when training


def test_real_fashion_mnist(monkeypatch):
    """Runs on the real data set when it is installed (apt-get install dataset-fashion-mnist)."""
    monkeypatch.setenv("VITKIT_OFFLINE", "1")
    try:
        fashion_mnist.find_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist): tiny IDX files only")
    data = load_data(TrainConfig(data="fashion-mnist"))
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 54000, "val": 6000, "test": 10000}
    train = data.splits["train"].images.float() / 255
    assert abs(train.mean().item() - fashion_mnist.MEAN[0]) < 2e-3
    assert abs(train.std().item() - fashion_mnist.STD[0]) < 2e-3
    assert torch.bincount(data.splits["test"].targets).tolist() == [1000] * 10


def test_truncated_image_fails_at_load_time_with_its_name_even_in_a_worker(tmp_path):
    root = write_folder(
        tmp_path / "d", {"train": {"a": [("RGB", (8, 8))], "b": [("RGB", (8, 8))]}, "val": {"a": [("RGB", (8, 8))]}}
    )
    jpeg = root / "val" / "a" / "cut.jpg"
    Image.effect_noise((64, 64), 60).convert("RGB").save(jpeg, quality=95)
    blob = jpeg.read_bytes()
    jpeg.write_bytes(blob[: len(blob) * 2 // 3])  # the header is intact: the scan lets it through
    config = TrainConfig(data=str(root), img_size=16)
    data = load_data(config)
    config = resolve_data_fields(config, data, default_img_size=16)
    loader = build_loader(build_dataset(data, "val", config), train=False, batch_size=2, workers=1)
    with pytest.raises(ImageReadError) as err:
        list(loader)
    assert str(err.value).startswith(f"cannot read image {jpeg}") and "\n" not in str(err.value)


def test_random_crop_takes_a_window_of_the_eval_resize_and_eval_takes_its_centre():
    # 28x28 images, img_size 24, crop_pct 0.857: eval resizes to 28 and takes the centre 24x24;
    # crop "random" takes a random 24x24 window of the same 28x28 image (a +-2 pixel shift)
    spec = ImageSpec(24, 1, (0.0,), (1.0,), crop_pct=0.857)
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    aug = Augment(crop="random", crop_padding=0, hflip=0.0)
    torch.manual_seed(0)
    out = BatchTrainTransform(spec, aug)(images)
    assert out.shape == (64, 1, 24, 24)
    full = images.float() / 255
    offsets = set()
    for i in range(64):
        windows = {(dy, dx): full[i, :, dy : dy + 24, dx : dx + 24] for dy in range(5) for dx in range(5)}
        found = [offset for offset, window in windows.items() if torch.equal(out[i], window)]
        assert found, f"image {i} is not a window of its image"
        offsets.add(found[0])
    assert len(offsets) > 10  # each image draws its own shift
    assert torch.allclose(eval_transform(spec)(images), full[:, :, 2:26, 2:26], atol=1e-6)
    per_image = train_transform(spec, aug)(images[0])
    windows = [full[0, :, dy : dy + 24, dx : dx + 24] for dy in range(5) for dx in range(5)]
    assert any(torch.allclose(per_image, window, atol=1e-6) for window in windows)
