"""A non-finite loss or gradient: the run stops with a diagnosis and keeps its last checkpoint, or with
`on_nonfinite: skip` skips the step and counts it (issue 17, item 7). NaNs are injected into batches."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import vitkit
from test_data import offline, write_idx  # noqa: F401  (offline is a fixture)
from test_simmim import TINY_VIT_ARGS, _write_unlabelled_folder
from vitkit.cli import main
from vitkit.core.errors import NonFiniteError
from vitkit.pretrain import pretraining
from vitkit.train import supervised
from vitkit.train.engine import supervised_loss, train_one_epoch
from vitkit.train.losses import CrossEntropy
from vitkit.train.optim import build_optimizer, build_scheduler
from vitkit.train.run_folder import read_metrics

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
    "--seed",
    "0",
]


def tiny_vit() -> torch.nn.Module:
    return vitkit.create_model(
        "vit_tiny_patch16_224",
        img_size=28,
        patch_size=7,
        in_chans=1,
        num_classes=10,
        embed_dim=32,
        depth=1,
        num_heads=2,
    )


def batches(n: int, nan_at: tuple[int, ...] = ()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = [(torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]
    for i in nan_at:
        out[i][0][1, 0, 3, 3] = float("nan")  # one pixel of one image
    return out


def poisoned(batch_loss, at: set[int]):
    """`batch_loss` with a NaN pixel injected into the images of its calls numbered `at` (from 1)."""
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if calls["n"] in at:
            images = (batch[0] if isinstance(batch, (list, tuple)) else batch).clone()
            images[0, 0, 0, 0] = float("nan")
            batch = (images, *batch[1:]) if isinstance(batch, (list, tuple)) else images
        return batch_loss(model, batch)

    return loss


def test_a_nan_in_a_batch_stops_before_the_step_with_a_diagnosis():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, 1e-3, 0.05)
    with pytest.raises(NonFiniteError) as err:
        train_one_epoch(
            model,
            supervised_loss(CrossEntropy(), CPU),
            batches(3, nan_at=(1,)),
            opt,
            device=CPU,
            epoch=4,
            start_step=30,
        )
    message = str(err.value)
    assert "the training loss became nan at epoch 4, batch 2/3 (step 32): lr 0.001, loss scale none" in message
    assert "non-finite gradients in 20 parameter(s) of group(s) [0, 1]: cls_token" in message and "\n" not in message
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed and all(torch.isfinite(v).all() for v in model.state_dict().values())  # step 31 applied only


def test_a_non_finite_gradient_with_a_finite_loss_names_its_parameters():
    model = tiny_vit()
    model.head.weight.register_hook(lambda grad: grad * float("inf"))  # the loss stays finite
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, 1e-3, 0.05)
    with pytest.raises(NonFiniteError, match=r"gradients became non-finite at epoch 0, batch 1/2 \(step 1\)") as err:
        train_one_epoch(model, supervised_loss(CrossEntropy(), CPU), batches(2), opt, device=CPU)
    decay_group = next(i for i, g in enumerate(opt.param_groups) if any(p is model.head.weight for p in g["params"]))
    assert str(err.value).endswith(f"non-finite gradients in 1 parameter(s) of group(s) [{decay_group}]: head.weight")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_skip_mode_skips_and_counts_up_to_the_limit():
    model = tiny_vit()
    opt = build_optimizer(model, 1e-3, 0.05)
    sched = build_scheduler(opt, total_steps=8, warmup_steps=2, warmup_lr=1e-5, min_lr=1e-5)
    loss = supervised_loss(CrossEntropy(), CPU)
    with pytest.warns(UserWarning, match=r"skipped a step: the training loss became nan at epoch 0, batch 2/4"):
        stats = train_one_epoch(
            model, loss, batches(4, nan_at=(1,)), opt, device=CPU, scheduler=sched, on_nonfinite="skip", max_skips=1
        )
    assert stats["nonfinite_skips"] == 1 and stats["steps"] == 4 and stats["images"] == 12
    assert sched.last_epoch == 4 and math.isfinite(stats["train_loss"])  # the schedule moved on; loss of 3 batches
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with (
        pytest.raises(NonFiniteError, match=r"1 step\(s\) skipped in this epoch, max_nonfinite_skips reached"),
        pytest.warns(UserWarning),
    ):
        train_one_epoch(model, loss, batches(4, nan_at=(0, 2)), opt, device=CPU, on_nonfinite="skip", max_skips=1)


def test_fp16_leaves_non_finite_gradients_to_the_scaler():
    model = tiny_vit()
    model.head.weight.register_hook(lambda grad: grad * float("inf"))
    opt = build_optimizer(model, 1e-3, 0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    stats = train_one_epoch(model, supervised_loss(CrossEntropy(), CPU), batches(2), opt, device=CPU, scaler=scaler)
    assert stats["nonfinite_skips"] == 0 and scaler.get_scale() < 1024.0  # the scaler skipped and backed off
    with pytest.raises(NonFiniteError, match="loss scale 256; non-finite gradients"):  # a NaN loss still stops
        train_one_epoch(
            model, supervised_loss(CrossEntropy(), CPU), batches(2, nan_at=(0,)), opt, device=CPU, scaler=scaler
        )


# -- end to end: vitkit train and vitkit pretrain through the same engine ---------------------------
@pytest.fixture
def idx_data(offline, monkeypatch):  # noqa: F811
    folder = write_idx(offline / "idx", n_train=400, n_test=60)
    monkeypatch.setenv("VITKIT_DATA", str(folder))
    return folder


def test_train_skips_a_nan_batch_and_counts_it_then_stops_past_the_limit(idx_data, tmp_path, monkeypatch, capsys):
    real = supervised.supervised_loss
    monkeypatch.setattr(supervised, "supervised_loss", lambda *a: poisoned(real(*a), at={13}))  # epoch 2, batch 2
    out = tmp_path / "skip"
    with pytest.warns(UserWarning, match="skipped a step: the training loss became nan at epoch 2, batch 2/11"):
        assert main(["train", "--output", str(out), *TINY, "--epochs", "2", "--on-nonfinite", "skip"]) == 0
    epochs = [r for r in read_metrics(out) if "step" not in r and "epoch" in r]
    assert [r["nonfinite_skips"] for r in epochs] == [0, 1] and all(math.isfinite(r["train_loss"]) for r in epochs)
    assert all(torch.isfinite(v).all() for v in load_file(out / "last.safetensors").values())

    monkeypatch.setattr(supervised, "supervised_loss", lambda *a: poisoned(real(*a), at={13, 14}))
    stopped = tmp_path / "stopped"
    with pytest.warns(UserWarning, match="skipped a step"):
        code = main(
            [
                "train",
                "--output",
                str(stopped),
                *TINY,
                "--epochs",
                "2",
                "--on-nonfinite",
                "skip",
                "--set",
                "max_nonfinite_skips=1",
            ]
        )
    err = capsys.readouterr().err
    assert code != 0 and "batch 3/11 (step 14)" in err and "max_nonfinite_skips reached" in err
    assert "the checkpoint of epoch 1" in err and torch.load(stopped / "state.pt", weights_only=True)["epoch"] == 1

    # the command the message prints: resume, skipping (the poisoned batch is now the second of epoch 2)
    assert f"--resume {stopped} --on-nonfinite skip" in err
    monkeypatch.setattr(supervised, "supervised_loss", lambda *a: poisoned(real(*a), at={2}))
    with pytest.warns(UserWarning, match="skipped a step"):
        assert main(["train", "--resume", str(stopped), "--on-nonfinite", "skip", "--threads", "1"]) == 0
    assert [r.get("nonfinite_skips") for r in read_metrics(stopped) if "step" not in r and "epoch" in r] == [0, 1]


def test_pretrain_stops_on_a_nan_batch_keeping_epoch_one_and_can_skip(tmp_path, monkeypatch, capsys):
    data = tmp_path / "unlabelled"
    _write_unlabelled_folder(data)
    real = pretraining.masked_image_loss
    per_epoch = {}

    def counting(*a):
        inner = real(*a)
        per_epoch["calls"] = per_epoch.get("calls", 0) + 1
        return poisoned(inner, at={2} if per_epoch["calls"] == 2 else set())  # epoch 2, batch 2

    monkeypatch.setattr(pretraining, "masked_image_loss", counting)
    out = tmp_path / "pre"
    code = main(["pretrain", "--data", str(data), "--epochs", "2", "--output", str(out), *TINY_VIT_ARGS])
    err = capsys.readouterr().err
    assert code != 0 and "the training loss became nan at epoch 2, batch 2/" in err and "loss scale none" in err
    assert "pre-training stopped (the checkpoint of epoch 1" in err
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 1 and (out / "encoder.safetensors").is_file()

    per_epoch.clear()
    skipped = tmp_path / "skipped"
    with pytest.warns(UserWarning, match="skipped a step"):
        assert (
            main(
                [
                    "pretrain",
                    "--data",
                    str(data),
                    "--epochs",
                    "2",
                    "--output",
                    str(skipped),
                    *TINY_VIT_ARGS,
                    "--on-nonfinite",
                    "skip",
                ]
            )
            == 0
        )
    assert [r["nonfinite_skips"] for r in read_metrics(skipped) if "step" not in r] == [0, 1]
