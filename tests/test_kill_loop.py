"""Killed at any moment: SIGKILL a real `vitkit train` at random moments (at a random time, after a
random step, or the instant a temporary file shows a write in progress), check that every file in
the run folder is whole, continue with `--resume` (the original command while the folder holds no
config yet), and at the end compare the weights with an uninterrupted run: bit-identical.

The long loop (20 kills) runs with --run-slow; a 3-kill sample always runs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_data import write_idx
from test_preemption import same_weights
from vitkit.cli import main

TINY = [
    "--seed",
    "0",
    "--threads",
    "1",
    "--workers",
    "0",
    "--patch-size",
    "7",
    "--batch-size",
    "16",
    "--set",
    "model_args.depth=1",
    "--set",
    "model_args.embed_dim=32",
    "--set",
    "model_args.num_heads=2",
    "--set",
    "log_every=1",
    "--set",
    "ema=true",
    "--train-samples",
    "200",
]


def check_whole(run: Path) -> list[str]:
    """Load every file of the run folder (raises on a corrupt one); returns the stale temporaries."""
    if not run.is_dir():  # killed before it made the folder
        return []
    for path in run.iterdir():
        if path.name.startswith("."):
            continue
        if path.name == "state.pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".safetensors":
            load_file(path)
        elif path.name == "run.json":
            json.loads(path.read_text())
        elif path.name == "metrics.jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.name == "config.yaml":
            assert yaml.safe_load(path.read_text())["model"]
    return [p.name for p in run.glob(".*.tmp")]


def _kill_at_random(proc: subprocess.Popen, run: Path, rng: random.Random) -> str:
    """Wait for a random moment of one of three kinds, then SIGKILL; returns the kind ("" if it finished)."""
    kind = rng.choice(["time", "step", "write"])
    deadline = time.time() + (rng.uniform(0.2, 4.0) if kind == "time" else 60)
    step = rng.randint(1, 8)
    seen = None
    while time.time() < deadline and proc.poll() is None:
        if kind == "write" and any(
            n.startswith((".state.pt", ".last.safetensors", ".best.safetensors"))
            for n in (os.listdir(run) if run.is_dir() else [])
        ):
            break  # a checkpoint is being written right now
        if kind == "step" and (run / "metrics.jsonl").is_file():
            logged = (run / "metrics.jsonl").read_text().count('"step"')
            seen = logged if seen is None else seen
            if logged >= seen + step:
                break
        time.sleep(0.0005 if kind == "write" else 0.01)
    if proc.poll() is not None:
        return ""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return kind


def kill_loop(run: Path, env: dict[str, str], args: list[str], kills: int, seed: int) -> dict[str, int]:
    """`kills` SIGKILLs, each followed by a resume; then the run is finished. Returns counts."""
    rng = random.Random(seed)
    counts = {"kills": 0, "during_writes": 0, "before_config": 0}
    while counts["kills"] < kills:
        command = ["--resume", str(run)] if (run / "config.yaml").is_file() else ["--output", str(run), *args]
        counts["before_config"] += command[0] == "--output" and counts["kills"] > 0
        proc = subprocess.Popen(
            [sys.executable, "-m", "vitkit", "train", *command],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        kind = _kill_at_random(proc, run, rng)
        if not kind:  # it finished first: not a kill
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            break
        proc.stderr.close()
        counts["kills"] += 1
        stale = check_whole(run)
        counts["during_writes"] += any(n.startswith((".state.pt", ".last.", ".best.")) for n in stale)
    assert main(["train", "--resume", str(run)]) == 0  # the last resume, in this process (its env is set)
    assert not check_whole(run)  # the resume removed what killed writes left
    return counts


def _run(tmp_path: Path, monkeypatch, epochs: int, kills: int, seed: int) -> dict[str, int]:
    env = {
        "VITKIT_DATA": str(write_idx(tmp_path / "idx", n_train=240, n_test=40)),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "VITKIT_OFFLINE": "1",
    }
    args = [*TINY, "--epochs", str(epochs)]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["train", "--output", str(tmp_path / "reference"), *args]) == 0
    counts = kill_loop(tmp_path / "killed", env, args, kills, seed)
    assert counts["kills"] == kills, counts  # the run outlasted every planned kill
    assert same_weights(tmp_path / "reference", tmp_path / "killed")
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["status"] == "finished"
    print(f"kill loop: {counts}")
    return counts


def test_three_kills_at_random_moments_then_identical_weights(tmp_path, monkeypatch):
    # 8 epochs (~100 steps): long enough that a kill up to 4 s in, or 8 steps on, lands before the run ends
    # even where start-up is fast
    _run(tmp_path, monkeypatch, epochs=8, kills=3, seed=1)


@pytest.mark.slow
def test_twenty_kills_at_random_moments_then_identical_weights(tmp_path, monkeypatch):
    _run(tmp_path, monkeypatch, epochs=12, kills=20, seed=2)
