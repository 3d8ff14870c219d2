"""`vitkit train --nproc 2` end to end on CPU (gloo): one run folder written by rank 0, a checkpoint
that loads in one process, logged accuracies that `vitkit eval` reproduces, and - with augmentation,
dropout and drop-path off - the same weights as one process with the doubled batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_data import write_idx
from vitkit.cli import main
from vitkit.weights.io import load_model

COMMON = [
    "--data", "fashion-mnist", "--train-samples", "32", "--val-samples", "13", "--test-samples", "11",
    "--epochs", "1", "--seed", "0", "--threads", "1", "--workers", "0",
    "--set", "crop=resize", "--set", "hflip=0", "--set", "warmup_epochs=0", "--set", "log_every=1",
    "--set", "ema=true", "--set", "ema_decay=0.5", "--set", "model_args.depth=2",
    "--set", "model_args.embed_dim=32", "--set", "model_args.num_heads=2",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, VITKIT_DATA=str(write_idx(root / "idx")), XDG_CACHE_HOME=str(root / "cache"),
               VITKIT_OFFLINE="1")
    work = root / "work"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "vitkit", "train", "--nproc", "2", "--batch-size", "4", "--output", "two", *COMMON],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # the reference: one process, batch 2 x 4, in this process
    saved = {k: os.environ.get(k) for k in ("VITKIT_DATA", "XDG_CACHE_HOME", "VITKIT_OFFLINE")}
    os.environ.update({k: env[k] for k in saved})
    try:
        assert main(["train", "--batch-size", "8", "--output", str(root / "one"), *COMMON]) == 0
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {"two": work / "two", "one": root / "one", "work": work, "env": env, "stdout": done.stdout}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rank_zero_writes_one_run_folder(runs):
    assert sorted(p.name for p in runs["work"].iterdir()) == ["two"]  # no second folder from rank 1
    two = runs["two"]
    for name in ("config.yaml", "run.json", "metrics.jsonl", "last.safetensors", "best.safetensors", "state.pt",
                 "curves.png"):
        assert (two / name).is_file(), name
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    epochs = [r for r in _records(two) if "epoch" in r and "val_top1" in r]
    assert len(epochs) == 1  # logged once, by rank 0
    state = torch.load(two / "state.pt", weights_only=True)
    assert state["epoch"] == 1


def test_checkpoint_loads_in_one_process_and_eval_reproduces_the_log(runs, tmp_path):
    two = runs["two"]
    model = load_model(two / "best.safetensors")
    assert sum(p.numel() for p in model.parameters()) > 0
    final = _records(two)[-1]
    env = runs["env"]
    for split, key in (("val", "best_val_top1"), ("test", "test_top1")):
        out = tmp_path / f"{split}.json"
        done = subprocess.run(
            [sys.executable, "-m", "vitkit", "eval", "--run", str(two), "--split", split, "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(out.read_text())["top1"] == pytest.approx(final[key], abs=1e-9)


def test_two_processes_equal_one_with_the_doubled_batch(runs):
    two, one = load_file(runs["two"] / "last.safetensors"), load_file(runs["one"] / "last.safetensors")
    assert two.keys() == one.keys()
    for key in one:
        assert (two[key] - one[key]).abs().max().item() <= 1e-5, key
