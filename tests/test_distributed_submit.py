"""`vitkit submit`: the sbatch script is valid bash, runs torchrun on every node with the rendezvous on the
first node and exactly the train arguments given, is submitted when sbatch exists, and bad options fail
with one line. The script is run with stand-ins for srun, scontrol, torchrun and sbatch."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vitkit.cli import main

TRAIN_ARGS = ["--recipe", "deit_small", "--set", "name=a b", "--data", "/data/it's here", "--epochs", "3"]


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def fake_cluster(tmp_path: Path, monkeypatch) -> Path:
    """A bin folder with srun (runs its command once, as for one node), scontrol and torchrun (records argv)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"')
    _stub(bin_dir, "scontrol", '[[ "$1 $2" == "show hostnames" ]] && printf "gpu-a1\\ngpu-a2\\n"')
    _stub(bin_dir, "torchrun", f'printf "%s\\n" "$@" > {tmp_path}/torchrun.args')
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return bin_dir


def test_script_is_valid_bash_and_runs_torchrun_with_the_arguments(tmp_path, fake_cluster, capsys):
    script = tmp_path / "job.sbatch"
    argv = [
        "submit",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--partition",
        "gpu",
        "--time",
        "1-00:00:00",
        "--account",
        "proj7",
        "--job-name",
        "deit",
        "--setup",
        "export FROM_SETUP=1",
        "--output",
        str(script),
        "--",
        *TRAIN_ARGS,
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote {script}" in out and f"sbatch {script}" in out  # no sbatch here: says where the script is
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    for directive in (
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--time=1-00:00:00",
        "--account=proj7",
        "--job-name=deit",
    ):
        assert f"#SBATCH {directive}\n" in text
    env = dict(os.environ, SLURM_JOB_NODELIST="gpu-a[1-2]", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242")
    subprocess.run(["bash", str(script)], check=True, env=env, cwd=tmp_path)
    args = (tmp_path / "torchrun.args").read_text().splitlines()
    assert args == [
        "--nnodes",
        "2",
        "--nproc_per_node",
        "4",
        "--rdzv_id",
        "4242",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "gpu-a1:29500",
        "-m",
        "vitkit",
        "train",
        *TRAIN_ARGS,
    ]


def test_submits_with_sbatch_and_default_path(tmp_path, fake_cluster, monkeypatch, capsys):
    _stub(fake_cluster, "sbatch", f'echo "$@" > {tmp_path}/sbatch.args\necho "Submitted batch job 77"')
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "--nodes", "1", "--gpus-per-node", "8", "--", "--smoke"]) == 0
    assert "Submitted batch job 77" in capsys.readouterr().out
    (script,) = (tmp_path / "slurm").glob("vitkit-*.sbatch")
    assert (tmp_path / "sbatch.args").read_text().split() == [str(Path("slurm") / script.name)]
    assert script.read_text().rstrip().endswith("-m vitkit train \\\n    --smoke")
    assert os.access(script, os.X_OK)
    # a refusal is one line naming the script
    _stub(fake_cluster, "sbatch", 'echo "sbatch: error: invalid partition" >&2; exit 1')
    assert main(["submit", "--nodes", "1", "--gpus-per-node", "1", "--output", "x.sbatch"]) == 1
    assert "sbatch refused x.sbatch: sbatch: error: invalid partition" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--nodes", "0", "--gpus-per-node", "1"], "--nodes must be >= 1"),
        (["--nodes", "1", "--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
        (["--nodes", "1", "--gpus-per-node", "1", "--job-name", "my job"], "--job-name must be one word"),
        (["--nodes", "1", "--gpus-per-node", "1", "--", "train", "--smoke"], "without the word `train`"),
        (["--nodes", "1", "--gpus-per-node", "1", "--", "--nproc", "2"], "--nproc is for one machine"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, extra, message):
    script = tmp_path / "bad.sbatch"
    assert main(["submit", "--output", str(script), "--no-submit", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not script.exists()
