"""`vitkit train --nproc 2` end to end on CPU (gloo): one run folder written by rank 0, a checkpoint
that loads in one process, logged accuracies that `vitkit eval` reproduces, the same weights as one
process with the doubled batch (augmentation, dropout and drop-path off), and `--resume` with another
process count and strategy (FSDP)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_data import write_idx
from vitkit.cli import main
from vitkit.factory import load_model

RUN = [
    "--data",
    "fashion-mnist",
    "--train-samples",
    "32",
    "--val-samples",
    "13",
    "--test-samples",
    "11",
    "--epochs",
    "1",
    "--seed",
    "0",
    "--threads",
    "1",
    "--workers",
    "0",
    "--set",
    "crop=resize",
    "--set",
    "hflip=0",
    "--set",
    "warmup_epochs=0",
    "--set",
    "log_every=1",
    "--set",
    "ema=true",
    "--set",
    "ema_decay=0.5",
    "--set",
    "amp=off",  # fp32 on every CPU: the comparisons below are numeric (auto is bf16 on CPUs with bf16 units)
]
TINY_VIT = ["--set", "model_args.depth=2", "--set", "model_args.embed_dim=32", "--set", "model_args.num_heads=2"]
COMMON = RUN + TINY_VIT


@pytest.fixture(scope="module")
def data_env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ddp_data")
    return {"VITKIT_DATA": str(write_idx(root / "idx")), "XDG_CACHE_HOME": str(root / "cache"), "VITKIT_OFFLINE": "1"}


def _vitkit(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "vitkit", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_env) -> dict[str, Path]:
    """A 2-process run and its 1-process reference: a distilled DeiT student with EMA and hard
    distillation from a small ViT teacher, so both work under DDP (and, resumed, under FSDP)."""
    root = tmp_path_factory.mktemp("ddp")
    work = root / "work"
    work.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in data_env.items():
            mp.setenv(key, value)
        assert main(["train", "--output", str(root / "teacher"), *COMMON]) == 0
    student = [
        *COMMON,
        "--model",
        "deit_tiny_distilled_patch16_224",
        "--patch-size",
        "7",
        *TINY_VIT,
        "--teacher",
        str(root / "teacher"),
        "--distillation",
        "hard",
    ]
    _vitkit("train", "--nproc", "2", "--batch-size", "4", "--output", "two", *student, cwd=work, env=data_env)
    # the reference: one process with batch 2 x 4, in this process
    with pytest.MonkeyPatch.context() as mp:
        for key, value in data_env.items():
            mp.setenv(key, value)
        assert main(["train", "--batch-size", "8", "--output", str(root / "one"), *student]) == 0
    return {"two": work / "two", "one": root / "one", "work": work}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rank_zero_writes_one_run_folder(runs):
    assert sorted(p.name for p in runs["work"].iterdir()) == ["two"]  # no second folder from rank 1
    two = runs["two"]
    for name in (
        "config.yaml",
        "run.json",
        "metrics.jsonl",
        "last.safetensors",
        "best.safetensors",
        "state.pt",
        "curves.png",
    ):
        assert (two / name).is_file(), name
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    config = yaml.safe_load((two / "config.yaml").read_text())
    assert (config["model"], config["distillation"], config["ema"]) == ("deit_tiny_distilled_patch16_224", "hard", True)
    assert len([r for r in _records(two) if "val_top1" in r]) == 1  # logged once, by rank 0


def test_checkpoint_loads_in_one_process_and_eval_reproduces_the_log(runs, data_env, monkeypatch, tmp_path):
    two = runs["two"]
    load_model(two / "best.safetensors")
    final = _records(two)[-1]
    for key, value in data_env.items():
        monkeypatch.setenv(key, value)
    for split, logged in (("val", "best_val_top1"), ("test", "test_top1")):
        out = tmp_path / f"{split}.json"
        assert main(["eval", "--run", str(two), "--split", split, "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["samples"] == {"val": 13, "test": 11}[split]
        assert result["top1"] == pytest.approx(final[logged], abs=1e-9)


def test_two_processes_equal_one_with_the_doubled_batch(runs):
    two, one = load_file(runs["two"] / "last.safetensors"), load_file(runs["one"] / "last.safetensors")
    assert two.keys() == one.keys()
    for key in one:
        assert (two[key] - one[key]).abs().max().item() <= 1e-5, key


def _extended(run: Path, dest: Path) -> Path:
    """A copy of a finished 1-epoch run with 2 epochs in its config: it resumes like an interrupted run."""
    shutil.copytree(run, dest)
    config = yaml.safe_load((dest / "config.yaml").read_text())
    (dest / "config.yaml").write_text(yaml.safe_dump({**config, "epochs": 2}, sort_keys=False))
    return dest


def test_resume_from_two_processes_in_one(runs, data_env, monkeypatch, tmp_path):
    single = _extended(runs["two"], tmp_path / "single")
    for key, value in data_env.items():
        monkeypatch.setenv(key, value)
    assert main(["train", "--resume", str(single)]) == 0
    assert [r["epoch"] for r in _records(single) if "val_top1" in r] == [1, 2]
    assert load_file(single / "last.safetensors").keys() == load_file(runs["one"] / "last.safetensors").keys()


def test_a_swinv2_giant_run_resumes_in_two_fsdp_processes_and_writes_a_plain_checkpoint(
    data_env, monkeypatch, tmp_path
):
    """1 process -> 2 FSDP processes (one torchrun launch: processes cost seconds each to start), on a
    depth-reduced Swin V2-G with the extra norms: the sharded run loads the full state and saves it whole."""
    args = [
        "--model",
        "swinv2_giant_window12_192",
        "--img-size",
        "64",
        "--batch-size",
        "4",
        "--set",
        "model_args.depths=[1,1,2,1]",
        "--set",
        "model_args.embed_dim=16",
        "--set",
        "model_args.num_heads=[1,2,4,8]",
        "--set",
        "model_args.window_size=4",
        "--set",
        "model_args.extra_norm_every_n_blocks=2",
    ]
    for key, value in data_env.items():
        monkeypatch.setenv(key, value)
    assert main(["train", "--output", str(tmp_path / "one"), *RUN, *args]) == 0
    sharded = _extended(tmp_path / "one", tmp_path / "g")
    _vitkit("train", "--nproc", "2", "--fsdp", "--resume", str(sharded), cwd=tmp_path, env=data_env)
    assert [r["epoch"] for r in _records(sharded) if "val_top1" in r] == [1, 2]
    assert yaml.safe_load((sharded / "config.yaml").read_text())["fsdp"] is True
    model = load_model(sharded / "last.safetensors")  # unsharded, in this process
    assert type(model).__name__ == "SwinTransformer" and model.config.depths == (1, 1, 2, 1)
    assert load_file(sharded / "last.safetensors").keys() == load_file(tmp_path / "one" / "last.safetensors").keys()
    assert _records(sharded)[-1]["test_top1"] >= 0


def test_fsdp_offload_without_cuda_is_a_clear_error(data_env, tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the offload run itself is tested in test_distributed.py")
    for key, value in data_env.items():
        monkeypatch.setenv(key, value)
    assert main(["train", "--fsdp-offload", "--output", str(tmp_path / "x"), *COMMON]) == 2
    assert "fsdp_offload needs fsdp" in capsys.readouterr().err
    assert main(["train", "--fsdp", "--fsdp-offload", "--output", str(tmp_path / "y"), *COMMON]) == 2
    assert "--fsdp-offload needs CUDA" in capsys.readouterr().err
    assert main(["train", "--fsdp", "--output", str(tmp_path / "z"), *COMMON]) == 2
    assert "add --nproc N" in capsys.readouterr().err
