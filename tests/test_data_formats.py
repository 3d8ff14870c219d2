"""The same 2,000 Fashion-MNIST images as an image folder, a CSV manifest, WebDataset shards and a saved
Hugging Face dataset: same class counts, and one unshuffled epoch (0 workers) gives the same training loss.
Also: shards split over ranks and workers, tar members read safely, and the data CLI."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import pytest
import torch

from test_data import write_idx
from vitkit.cli import main
from vitkit.data import fashion_mnist
from vitkit.data.data_config import DataConfig
from vitkit.data.datasets import build_dataset, load_data, resolve_data_fields
from vitkit.data.samplers import build_loader
from vitkit.data.shards import ShardSet, ShardStream, iter_samples, open_source
from vitkit.tools.data_tools import data_stats, iter_images
from vitkit.train.config import TrainConfig

datasets = pytest.importorskip("datasets", reason="the data extra (datasets) is not installed")
SIZES = {"train": 1600, "val": 200, "test": 200}  # 2,000 images


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{kind: --data value} for one set of 2,000 images: Fashion-MNIST's own where installed, else IDX files
    the test writes (same format, synthetic images)."""
    root = tmp_path_factory.mktemp("formats")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        mp.setenv("VITKIT_OFFLINE", "1")
        if not any(fashion_mnist.DEBIAN_DIR.glob("*idx*")):
            mp.setenv("VITKIT_DATA", str(write_idx(root / "idx", n_train=2300, n_test=300)))
        data = load_data(DataConfig(data="fashion-mnist", **{f"{k}_samples": v for k, v in SIZES.items()}))
    folder = root / "folder"
    names = [f"{i}_{name.replace('/', '-')}" for i, name in enumerate(data.classes)]  # sorted = class order
    for split, part in data.splits.items():
        for n, (image, label) in enumerate(iter_images(part, "L")):
            (folder / split / names[label]).mkdir(parents=True, exist_ok=True)
            image.save(folder / split / names[label] / f"{n:05d}.png")
    scanned = load_data(DataConfig(data=str(folder)))
    with open(root / "all.csv", "w", newline="") as f:  # the folder's order, labels by name
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for split, part in scanned.splits.items():
            for path, label in part.samples:
                writer.writerow([path.relative_to(root), names[label], split])
    assert main(["data", "shard", str(folder), "--output", str(root / "shards"), "--shard-size", "500"]) == 0
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    hf = datasets.DatasetDict(
        {
            {"val": "validation"}.get(split, split): datasets.Dataset.from_dict(
                {
                    "image": [{"bytes": p.read_bytes(), "path": None} for p, _ in part.samples],
                    "label": [label for _, label in part.samples],
                },
                features=features,
            )
            for split, part in scanned.splits.items()
        }
    )
    hf.save_to_disk(str(root / "hf"))
    return {
        "folder": str(folder),
        "csv": str(root / "all.csv"),
        "wds": f"wds:{root / 'shards'}",
        "hf": f"hf:{root / 'hf'}",
    }


def test_every_format_has_the_same_class_counts(sources):
    stats = {kind: data_stats(source, limit=200) for kind, source in sources.items()}
    reference = stats["folder"]
    assert {k: v["images"] for k, v in reference["per_split"].items()} == SIZES
    for kind, got in stats.items():
        assert got["classes"] == reference["classes"], kind
        for split in SIZES:
            assert got["per_split"][split]["per_class"] == reference["per_split"][split]["per_class"], (kind, split)
        assert got["mean"] == reference["mean"] and got["std"] == reference["std"], kind


def _epoch_loss(source: str) -> float:
    from vitkit.train.engine import supervised_loss, train_one_epoch
    from vitkit.train.losses import CrossEntropy

    config = TrainConfig(data=source, img_size=28, crop_pct=1.0)
    data = load_data(config, splits=("train",))
    config = resolve_data_fields(config, data, 28)
    dataset = build_dataset(data, "train", config, train=False)  # eval transform: nothing random
    loader = build_loader(dataset, train=False, batch_size=100, workers=0)  # in order, each image once
    torch.manual_seed(0)
    import vitkit

    model = vitkit.create_model(
        "vit_tiny_patch16_224",
        img_size=28,
        patch_size=7,
        in_chans=1,
        num_classes=10,
        embed_dim=32,
        depth=1,
        num_heads=2,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cpu = torch.device("cpu")
    result = train_one_epoch(model, supervised_loss(CrossEntropy(0.0), cpu), loader, optimizer, device=cpu)
    assert result["images"] == SIZES["train"]
    return result["train_loss"]


def test_one_unshuffled_epoch_gives_the_same_training_loss(sources):
    losses = {kind: _epoch_loss(source) for kind, source in sources.items()}
    assert len(set(losses.values())) == 1, losses


def test_training_runs_from_shards(sources, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                sources["wds"],
                "--output",
                str(out),
                "--epochs",
                "1",
                "--seed",
                "0",
                "--set",
                "model_args.depth=1",
                "--set",
                "model_args.embed_dim=32",
                "--set",
                "model_args.num_heads=2",
                "--patch-size",
                "7",
                "--batch-size",
                "64",
                "--threads",
                "1",
                "--train-samples",
                "640",
            ]
        )
        == 0
    )
    info = json.loads((out / "run.json").read_text())
    assert info["data"]["train"] == 640 and info["data"]["val"] == SIZES["val"]
    assert "[10/10]" in capsys.readouterr().err  # a defined epoch: 640 images in 10 whole batches


def test_shards_split_over_ranks_and_workers(sources):
    shards = open_source(sources["wds"]).splits["train"]
    keys = [s["__key__"] for shard in shards.shards for s in iter_samples(shard, decode_keys=("cls",))]
    seen = []
    for rank in range(2):  # evaluation: every sample exactly once over 2 ranks x 2 workers
        stream = ShardStream(shards, 1)
        stream.configure(shuffle=False, seed=0, rank=rank, world_size=2, pad=False)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        seen += [label for _, label in loader]
    assert len(seen) == len(keys)
    subset = shards.select(torch.arange(300))  # a subset of a stream: its first 300 samples, split over ranks
    parts = []
    for rank in range(2):
        stream = ShardStream(subset, 1)
        stream.configure(shuffle=False, seed=0, rank=rank, world_size=2, pad=False)
        parts.append([label for _, label in stream])
    assert len(parts[0]) == len(parts[1]) == 150
    counts = []
    for rank in range(3):  # training: shuffled, the same defined count on every rank, in whole batches
        stream = ShardStream(shards, 1, shuffle_buffer=50)
        stream.configure(shuffle=True, seed=1, rank=rank, world_size=3, pad=True, batch_size=64)
        stream.set_epoch(2)
        counts.append(sum(1 for _ in stream._raw()))
        assert counts[-1] == len(stream) == (1600 // 3 + 1) // 64 * 64
    import webdataset  # the reference reader sees the same samples in our shards

    assert [s["__key__"] for s in webdataset.WebDataset([str(p) for p in shards.shards], shardshuffle=False)] == keys


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            info.size = len(payload) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)


def test_tar_members_never_leave_the_shard(tmp_path):
    good = [("a.cls", b"1", tarfile.REGTYPE), ("a.png", b"x", tarfile.REGTYPE), ("b.png", b"", tarfile.SYMTYPE)]
    _tar(tmp_path / "ok.tar", good)
    assert list(iter_samples(tmp_path / "ok.tar")) == [{"__key__": "a", "cls": b"1", "png": b"x"}]  # link skipped
    for bad in ("../evil.cls", "/abs/evil.cls"):
        _tar(tmp_path / "bad.tar", [(bad, b"1", tarfile.REGTYPE)])
        with pytest.raises(ValueError, match="leaves the shard"):
            list(iter_samples(tmp_path / "bad.tar"))
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="not a readable tar"):
        list(iter_samples(tmp_path / "broken.tar"))
    assert len(ShardSet([tmp_path / "ok.tar"])) == 1


def test_data_cli_stats_bench_and_errors(sources, tmp_path, capsys):
    assert main(["data", "stats", sources["csv"], "--limit", "50"]) == 0
    assert "splits: train, val, test" in capsys.readouterr().out
    bench = ["--images", "128", "--workers", "0", "1", "--rounds", "1", "--json"]
    assert main(["data", "bench", sources["folder"], *bench]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["loader"], r["workers"]) for r in rows} == {("vitkit", 0), ("timm", 0), ("vitkit", 1), ("timm", 1)}
    assert all(r["images"] == 128 and r["images_per_s"] > 0 for r in rows)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\nx.png,1\n")
    assert main(["data", "stats", str(bad)]) == 1  # a malformed user file: a failure, exit 1
    assert "needs a header line with path and label" in capsys.readouterr().err
    assert main(["data", "shard", sources["folder"], "--output", str(tmp_path / "s"), "--shard-size", "0"]) == 2
