"""`vitkit eval` reproduces what a run logged (val with the best weights, model or EMA; test), and
`vitkit predict` classifies image files with the run's transform and class names."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from test_data import fake_images, offline_idx, write_folder
from vitkit.cli import main
from vitkit.data import fashion_mnist
from vitkit.data.datasets import build_dataset, load_data
from vitkit.data.transforms import eval_transform
from vitkit.tools.inference import load_inference
from vitkit.weights.vitkit_format import read_metadata


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-epoch run with EMA on tiny IDX files, shared by the tests below.

    Seed 4 makes the EMA weights the best ones here (val top-1 43% vs 30% at epoch 2), so the
    reproduction test covers a best.safetensors that holds the EMA."""
    tmp = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        offline_idx(mp, tmp, n_train=400, n_test=60)
        out = tmp / "run"
        code = main(
            [
                "train",
                "--output",
                str(out),
                "--seed",
                "4",
                "--epochs",
                "3",
                "--patch-size",
                "7",
                "--batch-size",
                "32",
                "--threads",
                "1",
                "--val-samples",
                "30",
                "--set",
                "ema=true",
                "--set",
                "ema_decay=0.8",
                "--set",
                "model_args.depth=1",
                "--set",
                "model_args.embed_dim=32",
                "--set",
                "model_args.num_heads=2",
                "--set",
                "lr=3e-3",
            ]
        )
        assert code == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        yield out, records, mp


def eval_json(tmp_path, *args: str) -> dict:
    out = tmp_path / "result.json"
    assert main(["eval", *args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_eval_reproduces_the_best_val_top1_it_logged(run, tmp_path):
    out, records, _ = run
    final = records[-1]
    best = next(r for r in records if r.get("epoch") == final["best_epoch"] and "val_top1" in r)
    logged = best["ema_val_top1" if final["best_source"] == "ema" else "val_top1"]
    assert read_metadata(out / "best.safetensors")["source"] == final["best_source"]
    assert final["best_val_top1"] == logged
    result = eval_json(tmp_path, "--run", str(out), "--split", "val")
    assert result["top1"] == logged and result["samples"] == 30 and result["split"] == "val"
    assert set(result) >= {"top1", "top5", "loss", "images_per_s", "split", "samples"}


def test_eval_reproduces_the_logged_test_metrics(run, tmp_path):
    out, records, _ = run
    result = eval_json(tmp_path, "--run", str(out), "--confusion", str(tmp_path / "confusion.png"))
    assert result["split"] == "test" and result["samples"] == 60  # test is the default where there is one
    assert (result["top1"], result["top5"], result["loss"]) == (
        records[-1]["test_top1"],
        records[-1]["test_top5"],
        records[-1]["test_loss"],
    )
    assert (tmp_path / "confusion.png").stat().st_size > 1000
    # the weight file alone carries its transform and classes
    alone = eval_json(tmp_path, "--checkpoint", str(out / "best.safetensors"), "--data", "fashion-mnist")
    assert alone["top1"] == result["top1"]
    subset = eval_json(tmp_path, "--run", str(out), "--test-samples", "25")
    assert subset["samples"] == 25 and subset["split"] == "test"


def test_predict_uses_the_run_transform_and_class_names(run, tmp_path, capsys):
    out, _, _ = run
    images, _ = fake_images(3, seed=2)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image.numpy(), mode="L").save(paths[-1])
    Image.fromarray(images[0].numpy(), mode="L").convert("RGBA").save(tmp_path / "rgba.png")  # any mode works
    capsys.readouterr()
    assert (
        main(["predict", *map(str, paths), str(tmp_path / "rgba.png"), "--run", str(out), "--top-k", "3", "--json"])
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    inference = load_inference(run=out)
    with torch.no_grad():
        probs = inference.model.eval()(eval_transform(inference.spec)(images[:, None])).softmax(-1)
    for entry, p in zip(results, probs):
        assert len(entry["top"]) == 3 and entry["top"][0]["index"] == int(p.argmax())
        assert entry["top"][0]["class"] == fashion_mnist.CLASSES[int(p.argmax())]
        assert entry["top"][0]["prob"] == pytest.approx(float(p.max()), abs=1e-6)
    assert results[3]["top"] == results[0]["top"]  # RGBA of the same pixels: same answer
    assert main(["predict", str(paths[0]), "--run", str(out), "--top-k", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{paths[0]}: ") and line.count("%") == 2


def test_a_run_with_flip_tta_logs_mean_probability_figures_that_eval_and_predict_reproduce(run, tmp_path, capsys):
    _, _, _ = run  # its environment: the tiny IDX data
    out = tmp_path / "tta"
    assert (
        main(
            [
                "train",
                "--output",
                str(out),
                "--seed",
                "1",
                "--epochs",
                "2",
                "--patch-size",
                "7",
                "--batch-size",
                "32",
                "--threads",
                "1",
                "--val-samples",
                "30",
                "--set",
                "tta=hflip",
                "--set",
                "model_args.depth=1",
                "--set",
                "model_args.embed_dim=32",
                "--set",
                "model_args.num_heads=2",
                "--set",
                "lr=3e-3",
            ]
        )
        == 0
    )
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    result = eval_json(tmp_path, "--run", str(out))  # the run's own tta
    assert result["tta"] == "hflip"
    logged = (final["test_top1"], final["test_top5"], final["test_loss"])
    assert (result["top1"], result["top5"], result["loss"]) == logged
    # what was logged is the mean of the image's and its mirror's probabilities, computed here by hand in
    # fp32 against `eval --amp off` (the run's amp is auto: bf16 on a CPU with bf16 units, whose rounding
    # differs with the batch composition)
    result = eval_json(tmp_path, "--run", str(out), "--amp", "off")
    inference = load_inference(run=out)
    data = load_data(inference.config, splits=("test",))
    images, targets = (
        torch.stack(t) if isinstance(t[0], torch.Tensor) else torch.tensor(t)
        for t in zip(*build_dataset(data, "test", inference.config, train=False))
    )
    model = inference.model.eval()
    with torch.no_grad():
        plain = model(images).softmax(-1)
        mean = (plain + model(images.flip(-1)).softmax(-1)) / 2
    assert result["top1"] == pytest.approx(100 * mean.argmax(1).eq(targets).double().mean().item())
    assert result["loss"] == pytest.approx(-mean[torch.arange(len(targets)), targets].log().mean().item(), rel=1e-4)
    without = eval_json(tmp_path, "--run", str(out), "--tta", "none", "--amp", "off")
    assert without["tta"] == "none"
    assert without["loss"] == pytest.approx(-plain[torch.arange(len(targets)), targets].log().mean().item(), rel=1e-4)
    # predict follows the run's setting too
    path = tmp_path / "0.png"
    Image.fromarray(fake_images(1, seed=5)[0][0].numpy(), mode="L").save(path)
    capsys.readouterr()
    assert main(["predict", str(path), "--run", str(out), "--top-k", "10", "--json"]) == 0
    probs = {t["index"]: t["prob"] for t in json.loads(capsys.readouterr().out)[0]["top"]}
    x = eval_transform(inference.spec)(fake_images(1, seed=5)[0][:, None])
    with torch.no_grad():
        expected = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1))[0] / 2
    assert [probs[i] for i in range(10)] == pytest.approx(expected.tolist(), abs=1e-6)


def test_eval_and_predict_errors_are_one_line(run, tmp_path, capsys):
    out, _, _ = run
    assert main(["eval", "--checkpoint", str(out / "best.safetensors")]) == 2
    assert "need --data" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing.png"), "--run", str(out)]) == 1
    assert "missing.png does not exist" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path)]) == 1
    assert "is not a vitkit run folder" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    assert main(["predict", str(broken), "--run", str(out)]) == 1
    err = capsys.readouterr().err
    assert "cannot read image" in err and err.count("\n") == 1


def test_folder_without_test_split_defaults_to_val_and_other_classes_are_refused(run, tmp_path, capsys):
    out, _, _ = run
    root = write_folder(
        tmp_path / "folder",
        {
            "train": {"a": [("L", (20, 20))] * 4, "b": [("RGB", (28, 20))] * 4},
            "val": {"a": [("L", (28, 28))] * 3, "b": [("L", (28, 28))] * 2},
        },
    )
    assert main(["eval", "--run", str(out), "--data", str(root)]) == 2
    assert "differ from the ones the model was trained on" in capsys.readouterr().err
    folder_run = tmp_path / "folder_run"
    assert (
        main(
            [
                "train",
                "--data",
                str(root),
                "--output",
                str(folder_run),
                "--smoke",
                "--patch-size",
                "7",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    result = eval_json(tmp_path, "--run", str(folder_run))
    assert result["split"] == "val" and result["samples"] == 5


def test_eval_of_a_named_model_with_local_pretrained_weights(tmp_path):
    import torch.nn.functional as F
    from torchvision.transforms.v2 import functional as TF

    import vitkit
    from vitkit.data.folder import load_image
    from vitkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageSpec
    from vitkit.weights.vitkit_format import save_model

    torch.manual_seed(0)
    full = vitkit.create_model("vit_tiny_patch16_224")
    weights = tmp_path / "tiny.safetensors"
    save_model(full, weights)
    root = write_folder(
        tmp_path / "imgs",
        {
            "val": {"a": [("RGB", (300, 240))] * 2, "b": [("L", (200, 260))] * 2},
            "train": {"a": [("RGB", (8, 8))], "b": [("RGB", (8, 8))]},
        },
    )
    result = eval_json(tmp_path, "--model", "vit_tiny_patch16_224", "--pretrained", str(weights), "--data", str(root))
    assert result["split"] == "val" and result["samples"] == 4
    spec = ImageSpec(224, 3, tuple(IMAGENET_MEAN), tuple(IMAGENET_STD), 0.875)
    transform = eval_transform(spec)
    files = sorted((root / "val").rglob("*.png"))
    x = torch.stack([transform(TF.pil_to_tensor(load_image(f, "RGB"))) for f in files])
    labels = torch.tensor([0 if f.parent.name == "a" else 1 for f in files])
    with torch.no_grad():
        loss = F.cross_entropy(full.eval()(x), labels).item()
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
