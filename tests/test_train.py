"""Training: config layering, optimiser groups and schedule, the engine on one batch, the run folder,
exact resume after SIGKILL, non-finite loss, torchvision models, image folders, torch.compile."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import vitkit
from test_data import offline, write_folder, write_idx  # noqa: F401  (offline is a fixture)
from vitkit.cli import main
from vitkit.core.errors import NonFiniteError
from vitkit.train import supervised
from vitkit.train.config import TrainConfig, TtaMode, check_resume_compatible
from vitkit.train.engine import TTA_MODES, evaluate, supervised_loss, train_one_epoch
from vitkit.train.fields import parse_set
from vitkit.train.losses import CrossEntropy
from vitkit.train.optim import build_optimizer, build_scheduler, param_groups
from vitkit.train.recipes import build_config, list_recipes, load_recipe
from vitkit.weights.vitkit_format import read_metadata

CPU = torch.device("cpu")
TINY = [
    "--set",
    "model_args.depth=1",
    "--set",
    "model_args.embed_dim=32",
    "--set",
    "model_args.num_heads=2",
    "--patch-size",
    "7",
    "--batch-size",
    "32",
    "--threads",
    "1",
]


@pytest.fixture
def idx_data(offline, monkeypatch):  # noqa: F811
    folder = write_idx(offline / "idx", n_train=400, n_test=60)
    monkeypatch.setenv("VITKIT_DATA", str(folder))
    return folder


def tiny_vit(**overrides) -> torch.nn.Module:
    args = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2)
    return vitkit.create_model("vit_tiny_patch16_224", **(args | overrides))


def batches(n: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


# -- config ----------------------------------------------------------------------------------------


def test_recipe_then_flags_then_set():
    assert "fmnist_demo" in list_recipes()
    config = build_config(None, {"epochs": 3, **parse_set(["lr=1e-3", "model_args.depth=2", "clip_grad=null"])})
    assert config.recipe == "fmnist_demo" and config.model == "vit_tiny_patch16_224" and config.data == "fashion-mnist"
    assert config.epochs == 3 and config.lr == 1e-3 and isinstance(config.lr, float) and config.clip_grad is None
    recipe_args = load_recipe("fmnist_demo")[1]["model_args"]
    assert config.model_args == {**recipe_args, "depth": 2}  # merged with the recipe's
    # another model starts from its own config, not the recipe's overrides
    assert build_config(None, {"model": "torchvision:resnet18"}).model_args == {}
    with pytest.raises(ValueError, match="unknown config field 'epoch'; did you mean epochs"):
        build_config(None, parse_set(["epoch=3"]))
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        build_config(None, parse_set(["batch_size=abc"]))
    with pytest.raises(ValueError, match="crop must be one of rrc, pad, random, resize"):
        build_config(None, parse_set(["crop=zoom"]))
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        build_config("nope")


OLD_FLAGS = {
    "train": "--recipe --list-recipes --model --data --epochs --batch-size --lr --img-size --patch-size --output "
    "--resume --seed --device --workers --threads --compile --nproc --fsdp --fsdp-offload --train-samples "
    "--val-samples --test-samples --val-split --skip-corrupt --teacher --distillation --distill-alpha --distill-tau "
    "--smoke --finetune --layer-decay --set",
    "pretrain": "--method --recipe --model --data --mask-ratio --mask-patch-size --epochs --batch-size --lr "
    "--img-size --output --resume --seed --device --workers --threads --compile --nproc --train-samples "
    "--val-samples --val-split --skip-corrupt --smoke --set",
}


def test_every_config_field_is_a_flag_typed_and_described_by_the_dataclass():
    import argparse
    import dataclasses

    from vitkit.cli import build_parser
    from vitkit.cli.config_flags import NOT_FLAGS, requested_fields
    from vitkit.pretrain.settings import MASK_RULE, PretrainConfig

    parser = build_parser()
    for command, classes in (("train", (TrainConfig,)), ("pretrain", (PretrainConfig, TrainConfig))):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        flags = {o: a for a in sub._actions for o in a.option_strings}
        for cls in classes:
            for f in dataclasses.fields(cls):
                if f.name not in NOT_FLAGS:  # recipe, smoke, model_args: --recipe, --smoke, --set / --patch-size
                    assert flags[f"--{f.name.replace('_', '-')}"].dest == f.name, (command, f.name)
        # every flag the hand-written parsers had (README and scripts use them)
        for flag in OLD_FLAGS[command].split():
            assert flag in flags, (command, flag)
    args = parser.parse_args(
        [
            "train",
            "--batch-size",
            "5",
            "--ema",
            "--crop",
            "pad",
            "--betas",
            "[0.9, 0.95]",
            "--layer-decay",
            "0.5",
            "--set",
            "lr=0.01",
            "--patch-size",
            "7",
        ]
    )
    assert requested_fields(args, TrainConfig) == {
        "batch_size": 5,
        "ema": True,
        "crop": "pad",
        "betas": "[0.9, 0.95]",
        "layer_decay": 0.5,
        "lr": 0.01,
        "model_args": {"patch_size": 7},
    }
    assert build_config(None, requested_fields(args, TrainConfig)).betas == [0.9, 0.95]
    for bad in (["train", "--crop", "zoom"], ["train", "--batch-size", "x"], ["pretrain", "--lr-schedule", "step"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    helps = {a.dest: a.help for a in parser._subparsers._group_actions[0].choices["pretrain"]._actions}
    assert helps["lr"] == "peak learning rate (after warm-up)"  # the field's comment
    assert MASK_RULE in helps["mask_patch_size"]  # metadata={"help": ...}
    assert "RandAugment" in helps["auto_augment"]  # a DataConfig field, inherited


def test_smoke_shrinks_the_recipe_and_flags_still_win(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("model: vit_base_patch16_224\ndata: some/folder\nepochs: 300\nbatch_size: 1024\n")
    config = build_config(str(recipe), smoke=True)
    assert config.recipe == "mine" and config.epochs == 1 and config.train_samples == 64 and config.batch_size == 16
    assert config.model_args == {"depth": 1, "embed_dim": 32, "num_heads": 2}
    assert build_config(str(recipe), {"epochs": 2}, smoke=True).epochs == 2


def test_resume_may_repeat_but_not_contradict():
    saved = TrainConfig(epochs=5, lr=1e-3, model_args={"depth": 2})
    check_resume_compatible(saved, {"epochs": 5, "lr": "1e-3", "threads": 7, "device": "cpu"})
    with pytest.raises(ValueError, match=r"epochs=6 \(run has 5\).*model_args.depth=3"):
        check_resume_compatible(saved, {"epochs": 6, "model_args": {"depth": 3}})


# -- optimiser and schedule ------------------------------------------------------------------------


def test_no_weight_decay_on_norms_biases_tokens_and_position_embedding():
    model = tiny_vit()
    decay, plain = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "blocks.0.attn.qkv.bias", "head.bias"} <= plain_names
    assert {names[id(p)] for p in decay["params"]} == {
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
        "head.weight",
    }
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0


def test_linear_warmup_then_cosine_per_step():
    opt = build_optimizer(tiny_vit(), lr=1.0, weight_decay=0.0)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=4, warmup_lr=0.1, min_lr=0.0)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected_warmup = [0.1 + 0.9 * i / 4 for i in range(4)]
    expected_cosine = [0.5 * (1 + math.cos(math.pi * i / 6)) for i in range(6)]
    assert lrs == pytest.approx(expected_warmup + expected_cosine, abs=1e-9)


# -- engine ----------------------------------------------------------------------------------------


def test_gradient_accumulation_equals_one_big_batch_and_clipping_applies():
    data = batches(2, 4)
    big = [(torch.cat([data[0][0], data[1][0]]), torch.cat([data[0][1], data[1][1]]))]
    results = []
    for loader, accum in ((data, 2), (big, 1)):
        torch.manual_seed(0)
        model = tiny_vit()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        stats = train_one_epoch(
            model, supervised_loss(CrossEntropy(), CPU), loader, opt, device=CPU, grad_accum=accum, clip_grad=0.01
        )
        assert stats["steps"] == 1 and stats["images"] == 8
        results.append(model.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=1e-6)
    # clipped: SGD moved the weights by lr * (gradient of norm <= 0.01)
    torch.manual_seed(0)
    start = torch.cat([p.flatten() for p in tiny_vit().parameters()])
    end = torch.cat([results[0][k].flatten() for k, _ in tiny_vit().named_parameters()])
    assert (end - start).norm() <= 0.1 * 0.01 + 1e-6


def test_engine_reports_metrics_ema_and_bf16_autocast():
    model = tiny_vit()
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    opt = build_optimizer(model, 1e-3, 0.05)
    logs = []
    stats = train_one_epoch(
        model,
        supervised_loss(CrossEntropy(0.1), CPU),
        batches(4, 8),
        opt,
        device=CPU,
        ema=ema,
        amp_dtype=torch.bfloat16,
        log_every=2,
        on_log=logs.append,
        start_step=10,
    )
    assert [line["step"] for line in logs] == [12, 14] and set(logs[0]) >= {"train_loss", "lr", "images_per_s"}
    assert stats["steps"] == 4 and stats["train_loss"] > 0
    assert not torch.equal(ema.module.head.weight, model.head.weight)
    result = evaluate(ema.module, batches(2, 8, seed=1), device=torch.device("cpu"), num_classes=10)
    assert result["samples"] == 16 and 0 <= result["top1"] <= result["top5"] <= 100
    assert result["confusion"].sum() == 16


def test_flip_tta_scores_by_the_mean_probability_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).eval()  # not mirror-symmetric
    data = list(batches(3, 8, seed=2))
    images, targets = (torch.cat(t) for t in zip(*data))
    with torch.no_grad():
        plain = model(images).softmax(-1)
        mean = (plain + model(images.flip(-1)).softmax(-1)) / 2
    result = evaluate(model, data, device=torch.device("cpu"), tta="hflip")
    top5 = mean.topk(5, dim=1).indices.eq(targets[:, None]).any(1)
    assert result["top1"] == pytest.approx(100 * mean.argmax(1).eq(targets).double().mean().item())
    assert result["top5"] == pytest.approx(100 * top5.double().mean().item())
    assert result["loss"] == pytest.approx(-mean[torch.arange(24), targets].log().mean().item(), rel=1e-5)
    # the mirror changes the answer here, so the two modes differ; none is the plain model
    assert not torch.equal(mean.argmax(1), plain.argmax(1))
    without = evaluate(model, data, device=torch.device("cpu"))
    assert without["loss"] == pytest.approx(-plain[torch.arange(24), targets].log().mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="tta must be one of none, hflip; got 'vflip'"):
        evaluate(model, data, device=torch.device("cpu"), tta="vflip")
    assert typing.get_args(TtaMode) == TTA_MODES


def test_non_finite_loss_raises_before_the_step():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def nan_loss(outputs, targets, images):
        return outputs.sum() * float("nan")

    with pytest.raises(NonFiniteError, match="became nan at epoch 3, batch 1/2"):
        train_one_epoch(model, supervised_loss(nan_loss, CPU), batches(2, 4), opt, device=CPU, epoch=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compile_matches_eager():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert (compiled - eager).abs().max().item() <= 1e-5 * eager.abs().max().item()


# -- whole runs ------------------------------------------------------------------------------------


def train_cli(out: Path, *extra: str) -> int:
    return main(["train", "--output", str(out), "--seed", "0", *TINY, *extra])


def test_run_folder_holds_every_file(idx_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(out, "--epochs", "2", "--set", "ema=true", "--set", "ema_decay=0.9", "--set", "log_every=3") == 0
    for name in (
        "config.yaml",
        "run.json",
        "metrics.jsonl",
        "last.safetensors",
        "best.safetensors",
        "state.pt",
        "curves.png",
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    epochs = [r for r in records if "val_top1" in r]
    assert [r["step"] for r in steps] == list(range(3, 23, 3)) and set(steps[0]) >= {"train_loss", "lr", "images_per_s"}
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert set(epochs[0]) >= {"train_loss", "lr", "val_top1", "val_top5", "val_loss", "ema_val_top1", "ema_val_top5"}
    assert set(records[-1]) >= {"test_top1", "test_top5", "test_loss", "best_val_top1", "best_source"}
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and set(state) >= {"model", "optimizer", "scheduler", "ema", "rng", "best"}
    meta = read_metadata(out / "best.safetensors")
    assert meta["source"] == records[-1]["best_source"] and meta["model"] == "vit_tiny_patch16_224"
    assert json.loads(meta["inputs"])["classes"][9] == "Ankle boot"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["in_chans"], config["num_classes"], config["img_size"], config["seed"]) == (1, 10, 28, 0)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["torch"] == torch.__version__ and info["data"]["train"] == 360
    assert {"start_time", "end_time", "command", "device", "threads", "git_commit"} <= set(info)
    capsys.readouterr()
    assert train_cli(out, "--epochs", "2") == 2
    assert "already holds a run: continue it with --resume" in capsys.readouterr().err


def test_resume_after_sigkill_in_epoch_two_gives_identical_weights(idx_data, tmp_path):
    args = ["--epochs", "2", "--set", "log_every=1", "--train-samples", "400"]
    reference = tmp_path / "reference"
    assert train_cli(reference, *args) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "VITKIT_DATA": str(idx_data)}
    cmd = [sys.executable, "-m", "vitkit", "train", "--output", str(killed), "--seed", "0", *TINY, *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(json.loads(line).get("epoch") == 2 for line in metrics.read_text().splitlines()):
            proc.send_signal(signal.SIGKILL)  # a step of epoch 2 is logged: the run is inside epoch 2
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert torch.load(killed / "state.pt", weights_only=True)["epoch"] == 1

    assert main(["train", "--resume", str(killed), "--epochs", "2", "--threads", "1"]) == 0
    a, b = load_file(reference / "last.safetensors"), load_file(killed / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [(reference / "metrics.jsonl").read_text(), (killed / "metrics.jsonl").read_text()]
    strip = [[{k: v for k, v in json.loads(x).items() if k != "images_per_s"} for x in t.splitlines()] for t in lines]
    assert strip[0] == strip[1]
    with pytest.raises(ValueError, match=r"contradict.*epochs=3 \(run has 2\)"):
        supervised.prepare_resume(killed, {"epochs": 3})


def test_non_finite_loss_mid_run_keeps_the_last_good_checkpoint(idx_data, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}

    class FailsInEpochTwo(CrossEntropy):
        def forward(self, outputs, targets, images=None):
            calls["n"] += 1
            loss = super().forward(outputs, targets, images)
            return loss * float("inf") if calls["n"] > 11 else loss  # 11 batches per epoch

    monkeypatch.setattr(supervised, "build_criterion", lambda config: FailsInEpochTwo(config.label_smoothing))
    out = tmp_path / "run"
    assert train_cli(out, "--epochs", "3") == 1  # a failure while running (NonFiniteError), not a usage error
    err = capsys.readouterr().err
    assert "loss became" in err and "epoch 2" in err and "checkpoint of epoch 1" in err and "\n" == err[-1]
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 1
    assert read_metadata(out / "last.safetensors")["epoch"] == "1"
    assert json.loads((out / "run.json").read_text())["status"].startswith("stopped")


def test_torchvision_model_trains_and_reloads_from_its_metadata(idx_data, tmp_path):
    out = tmp_path / "cnn"
    assert (
        main(
            [
                "train",
                "--model",
                "torchvision:resnet18",
                "--output",
                str(out),
                "--smoke",
                "--seed",
                "0",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    meta = read_metadata(out / "best.safetensors")
    assert meta["model"] == "torchvision:resnet18"
    from vitkit.train.modeling import load_weights

    model, _ = load_weights(out / "best.safetensors")
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_image_folder_run_with_skipped_corrupt_file(tmp_path):
    root = write_folder(
        tmp_path / "pets",
        {
            "train": {"cat": [("RGB", (30, 20))] * 6, "dog": [("RGBA", (25, 25))] * 6},
            "val": {"cat": [("RGB", (30, 30))] * 2, "dog": [("L", (12, 30))] * 2},
            "test": {"cat": [("RGB", (40, 40))] * 2, "dog": [("RGB", (16, 16))] * 2},
        },
    )
    (root / "train" / "dog" / "bad.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(root),
                "--img-size",
                "16",
                "--patch-size",
                "8",
                "--output",
                str(out),
                "--smoke",
                "--skip-corrupt",
                "--seed",
                "1",
                "--threads",
                "1",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    info = json.loads((out / "run.json").read_text())
    assert info["data"]["classes"] == ["cat", "dog"] and info["data"]["skipped_corrupt"] == 1
    assert info["data"]["skipped_files"][0].endswith("bad.jpg")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["in_chans"] == 3 and config["num_classes"] == 2 and config["img_size"] == 16


def test_bad_data_is_a_one_line_cli_error(tmp_path, capsys):
    # a missing user path: a failure, exit 1
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vitkit train: error: data folder") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # nothing is written before the data is found
