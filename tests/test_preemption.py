"""Preemption: real SIGTERM / SIGINT sent to a real `vitkit train` process stop it at a step boundary
with a mid-epoch state.pt, exit 143 / 130 and print the resume command; `--resume` then finishes
with weights bit-identical to an uninterrupted run. Also: a second signal, a run killed before its
first checkpoint, a full disk during a save, 2 processes (gloo) and `vitkit submit --requeue`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitkit
from test_data import write_idx
from vitkit.cli import main
from vitkit.train.preemption import Preempted, StopRequest

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
    "--set",
    "ema_decay=0.9",
    "--train-samples",
    "200",
    "--epochs",
    "2",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("preempt_data")
    return {
        "VITKIT_DATA": str(write_idx(root / "idx", n_train=240, n_test=40)),
        "XDG_CACHE_HOME": str(root / "cache"),
        "VITKIT_OFFLINE": "1",
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env) -> Path:
    """An uninterrupted run (12 steps an epoch, 2 epochs), in this process."""
    out = tmp_path_factory.mktemp("preempt") / "reference"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        assert main(["train", "--output", str(out), *TINY]) == 0
    return out


def start(env: dict[str, str], *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vitkit", "train", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def wait_for_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    """Until metrics.jsonl logs optimiser step `step` (the run is then inside its loop)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            lines = (run / "metrics.jsonl").read_text().splitlines()
            if any(json.loads(line).get("step", 0) >= step for line in lines):
                return
        except (OSError, ValueError):  # not written yet, or a line being replaced
            pass
        time.sleep(0.002)
    raise AssertionError(f"step {step} never logged: {proc.communicate()[1][-2000:]}")


def same_weights(a: Path, b: Path) -> bool:
    for name in ("last.safetensors", "best.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def resume(env: dict[str, str], run: Path, *extra: str) -> subprocess.CompletedProcess:
    """`vitkit train --resume RUN` as a process of its own (for launches the suite must not run inside)."""
    done = subprocess.run(
        [sys.executable, "-m", "vitkit", "train", "--resume", str(run), *extra],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def resume_here(env: dict[str, str], run: Path, *extra: str, code: int = 0) -> tuple[str, str]:
    """`vitkit train --resume RUN` in this process (what it tests is the resume, not a process start,
    which costs seconds on a slow CPU); returns its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for key, value in env.items():
            mp.setenv(key, value)
        got = main(["train", "--resume", str(run), *extra])
    assert got == code, err.getvalue()[-3000:]
    return out.getvalue(), err.getvalue()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_mid_epoch_and_resume_is_bit_identical(reference, env, tmp_path, signum):
    run = tmp_path / "run"
    proc = start(env, "--output", str(run), *TINY)
    wait_for_step(run, proc, 3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert f"continue with: vitkit train --resume {run}\n" in err
    state = torch.load(run / "state.pt", weights_only=True)
    assert 0 < state["global_step"] < 24 and state["epoch_position"] > 0  # stopped inside an epoch
    info = json.loads((run / "run.json").read_text())
    assert info["status"].startswith(f"stopped by {signal.Signals(signum).name} in epoch")
    assert not list(run.glob(".*.tmp"))
    if signum == signal.SIGINT:  # resuming is the same as after SIGTERM: checked once, to keep the suite short
        return

    out, _ = resume_here(env, run, "--threads", "1")
    assert f"resuming {run} in epoch {state['epoch'] + 1}, after {state['epoch_position']} batches" in out
    assert same_weights(reference, run)
    records = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (reference, run)]
    assert [r.get("step") for r in records[0]] == [r.get("step") for r in records[1]]  # every step logged once
    for a, b in zip(*records):  # the resumed epoch's mean loss joins both parts: equal up to rounding
        assert a.keys() == b.keys()
        if "train_loss" in a:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)


def test_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in a background job
    stop = StopRequest()
    with stop.installed():
        os.kill(os.getpid(), signal.SIGINT)  # the first: a request, no exit
        assert stop.signum == signal.SIGINT and exits == []
        os.kill(os.getpid(), signal.SIGTERM)  # the second: out now
    assert exits == [143]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert Preempted(15, "x").code == 143 and Preempted(2, "x").code == 130


@pytest.mark.slow  # the handler's second-signal exit is checked in-process above
def test_two_signals_leave_a_loadable_checkpoint(env, tmp_path):
    run = tmp_path / "run"
    proc = start(env, "--output", str(run), *TINY)
    wait_for_step(run, proc, 13)  # inside epoch 2: epoch 1's state.pt exists
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    torch.load(run / "state.pt", weights_only=True)  # the previous checkpoint, or the stop's: whole
    resume(env, run, "--threads", "1")
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_killed_before_first_checkpoint_restarts_in_place(reference, env, tmp_path):
    run = tmp_path / "run"
    proc = start(env, "--output", str(run), *TINY)
    wait_for_step(run, proc, 2)
    proc.kill()
    proc.communicate()
    assert (run / "config.yaml").is_file() and not (run / "state.pt").exists()
    out, _ = resume_here(env, run, "--threads", "1")
    assert "has no checkpoint yet: starting it again from the beginning" in out
    assert same_weights(reference, run)
    steps = [json.loads(x).get("step") for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None] == list(range(1, 25))  # the killed run's lines are gone


def _fsize_limit(limit: int):
    def set_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit, write() fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


def test_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(env, tmp_path):
    run = tmp_path / "run"
    wider = [*TINY, "--set", "model_args.embed_dim=128", "--set", "model_args.num_heads=4"]  # state.pt >> data
    proc = start(env, "--output", str(run), *wider)
    wait_for_step(run, proc, 3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    before = (run / "state.pt").read_bytes()
    # state.pt holds the model, its EMA and two AdamW moments: 0.6 of it is more than the weights
    # files, the data cache and the figures the resumed run writes, and less than state.pt
    limit = int(0.6 * len(before))
    assert limit > 4 * 240 * 28 * 28
    done = subprocess.run(
        [sys.executable, "-m", "vitkit", "train", "--resume", str(run), "--threads", "1"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_fsize_limit(limit),
    )
    assert done.returncode in (1, 2), done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if not line.startswith("epoch ")]  # progress lines
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"cannot write {run / 'state.pt'}: File too large" in lines[0] and "is intact" in lines[0]
    assert (run / "state.pt").read_bytes() == before and not list(run.glob(".*.tmp"))
    resume_here(env, run, "--threads", "1")  # with space again, the run finishes from the kept state


def test_two_processes_agree_on_the_stopping_step_and_resume(env, tmp_path):
    run = tmp_path / "two"
    proc = start(env, "--nproc", "2", "--output", str(run), *TINY)
    wait_for_step(run, proc, 3)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)  # to the launcher: torchrun relays it to both workers
    _, err = proc.communicate(timeout=120)
    stopped_in = time.time() - sent
    assert proc.returncode == 143, err[-3000:]
    assert stopped_in < 30, stopped_in  # torchrun's SIGKILL comes 30 s after the relay
    assert f"continue with: vitkit train --resume {run} --nproc 2" in err
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["epoch_position"] > 0 and len(state["rng_ranks"]) == 2
    _, err = resume_here(env, run, code=1)
    assert "stopped mid-epoch with 2 process(es): resume it with --nproc 2" in err
    resume(env, run, "--nproc", "2")
    steps = [json.loads(x).get("step") for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None] == list(range(1, 13))  # 6 steps an epoch on each rank


def _stub(bin_dir: Path, name: str, body: str) -> None:
    (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
    (bin_dir / name).chmod(0o755)


def test_requeue_script_saves_requeues_and_resumes(reference, env, tmp_path):
    """The sbatch script of `vitkit submit --requeue`, run by bash with stand-ins for srun, scontrol
    and torchrun (which starts one real `python -m vitkit train`): Slurm's SIGTERM to the script
    stops the run with a saved state, the job requeues itself, and run again it resumes and finishes."""
    bin_dir, run, script = tmp_path / "bin", tmp_path / "run", tmp_path / "job.sbatch"
    bin_dir.mkdir()
    _stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"')
    _stub(
        bin_dir,
        "scontrol",
        f'[[ "$1" == requeue ]] && echo "$@" >> {tmp_path}/requeued\n'
        '[[ "$1 $2" == "show hostnames" ]] && echo node1\ntrue',
    )
    _stub(bin_dir, "torchrun", f'while [[ "$1" != -m ]]; do shift; done\nshift\nexec {sys.executable} -m "$@"')
    assert (
        main(
            [
                "submit",
                "--nodes",
                "1",
                "--gpus-per-node",
                "1",
                "--requeue",
                "--no-submit",
                "--output",
                str(script),
                "--",
                "--output",
                str(run),
                *TINY,
            ]
        )
        == 0
    )
    text = script.read_text()
    assert "#SBATCH --requeue\n" in text and "#SBATCH --signal=B:TERM@120\n" in text
    src = str(Path(vitkit.__file__).parents[1])  # this vitkit, though the job runs in another folder
    job_env = {
        **env,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]),
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_JOB_NUM_NODES": "1",
    }
    job = subprocess.Popen(
        ["bash", str(script)],
        env={**os.environ, **job_env},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(run, job, 3)
    job.send_signal(signal.SIGTERM)  # what --signal=B:TERM sends: to the batch script only
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err[-2000:]
    assert "training exited with 143; requeueing job 4242" in out
    assert (tmp_path / "requeued").read_text() == "requeue 4242\n"
    assert torch.load(run / "state.pt", weights_only=True)["epoch_position"] > 0

    again = subprocess.run(
        ["bash", str(script)], env={**os.environ, **job_env}, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )  # the requeued job
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming {run} in epoch" in again.stdout
    assert same_weights(reference, run)


def test_requeue_needs_the_run_folder(tmp_path, capsys):
    assert (
        main(
            [
                "submit",
                "--nodes",
                "1",
                "--gpus-per-node",
                "1",
                "--requeue",
                "--no-submit",
                "--output",
                str(tmp_path / "j.sbatch"),
                "--",
                "--epochs",
                "3",
            ]
        )
        == 2
    )
    assert "--requeue resumes from the run folder" in capsys.readouterr().err


def test_pretraining_stops_on_sigterm_and_resumes_identically(tmp_path, monkeypatch, capsys):
    """SimMIM runs through the same loop: a SIGTERM (sent by this process to itself in its second
    batch) stops it mid-epoch with exit code 143; `vitkit pretrain --resume` then gives the same encoder."""
    from test_simmim import TINY_VIT_ARGS, _write_unlabelled_folder
    from vitkit.pretrain.pretraining import SimMIMTask

    data = tmp_path / "unlabelled"
    _write_unlabelled_folder(data)
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["pretrain", "--data", str(data), "--epochs", "2", *TINY_VIT_ARGS]
    assert main([*args, "--output", str(full)]) == 0

    batch_loss, calls = SimMIMTask.batch_loss, []

    def signalled(self, run, epoch):
        inner = batch_loss(self, run, epoch)

        def loss(model, batch):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return inner(model, batch)

        return loss

    monkeypatch.setattr(SimMIMTask, "batch_loss", signalled)
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--output", str(part)])
    assert stopped.value.code == 143
    assert f"continue with: vitkit pretrain --resume {part}" in capsys.readouterr().err
    assert torch.load(part / "state.pt", weights_only=True)["epoch_position"] == 2
    monkeypatch.setattr(SimMIMTask, "batch_loss", batch_loss)
    assert main(["pretrain", "--resume", str(part), "--threads", "1"]) == 0
    a, b = load_file(full / "encoder.safetensors"), load_file(part / "encoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stream_that_cannot_skip_draws_and_drops_with_the_random_state_kept():
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, IterableDataset

    from vitkit.train.run_loop import StoppableBatches

    class Stream(IterableDataset):  # augments with the global RNG, like a stream with --workers 0
        def __iter__(self):
            for i in range(10):
                yield torch.tensor(i), torch.rand(())

        def __len__(self):
            return 10

    loader = DataLoader(Stream(), batch_size=2)
    run = SimpleNamespace(stop=StopRequest(), device=torch.device("cpu"), config=SimpleNamespace(grad_accum=1))
    torch.manual_seed(0)
    full = list(StoppableBatches(loader, run, 0))
    torch.manual_seed(0)  # the state a run stopped after 2 batches would restore
    part = StoppableBatches(loader, run, 2)
    assert not part.skips_itself and len(part) == 3
    got = list(part)
    assert [b[0].tolist() for b in got] == [b[0].tolist() for b in full[2:]]  # the same samples go on
    assert torch.equal(got[0][1], full[0][1])  # drawn from the restored state, not after the dropped batches
    run.stop.signum = signal.SIGTERM
    stopped = StoppableBatches(loader, run, 0)
    assert len(list(stopped)) == 1 and stopped.stopped == signal.SIGTERM  # one step, then the boundary
