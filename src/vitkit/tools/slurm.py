"""Multi-node training on Slurm: an sbatch script that runs torchrun on every node of the allocation.

One Slurm task per node; each starts `torchrun --nproc_per_node G`, and the nodes meet through
torchrun's c10d rendezvous on the allocation's first node (from SLURM_JOB_NODELIST, via scontrol).
Nothing in the script is checked locally: paths and modules are the cluster's.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vitkit.core.files import write_text


@dataclass(frozen=True)
class SlurmJob:
    nodes: int
    gpus_per_node: int
    train_args: tuple[str, ...] = ()  # the arguments of `vitkit train`
    job_name: str = "vitkit"
    partition: str | None = None
    time: str | None = None  # Slurm's formats: "MM", "HH:MM:SS", "D-HH:MM"
    account: str | None = None
    cpus_per_task: int | None = None  # CPU cores per node (one task per node)
    setup: tuple[str, ...] = ()  # shell lines run first, e.g. "source ~/venv/bin/activate"
    port: int = 29500  # rendezvous port on the first node
    log: str = "%x-%j.out"  # Slurm's --output pattern (%x job name, %j job id)
    requeue: bool = False  # on Slurm's warning signal: save, requeue, resume from the run folder
    signal_lead: int = 120  # seconds before the time limit (or preemption) at which Slurm warns

    def validate(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node must be >= 1, got {self.gpus_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        for name in ("job_name", "partition", "time", "account", "log"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or any(c.isspace() for c in value)):
                raise ValueError(f"--{name.replace('_', '-')} must be one word without spaces, got {value!r}")
        if any("\n" in line for line in self.setup):
            raise ValueError("--setup takes one shell line per use: repeat --setup for several lines")
        if self.train_args[:1] == ("train",):
            raise ValueError("give the arguments of `vitkit train` after `--`, without the word `train`")
        if any(a == "--nproc" or a.startswith("--nproc=") for a in self.train_args):
            raise ValueError("--nproc is for one machine: the script starts --gpus-per-node processes per node")
        if self.requeue and run_folder(self.train_args) is None:
            raise ValueError(
                "--requeue resumes from the run folder: give it in the train arguments, e.g. -- --output runs/deit"
            )
        if self.requeue and not 10 <= self.signal_lead <= 3600:
            raise ValueError(f"--signal-lead must be in 10..3600 seconds, got {self.signal_lead}")


def run_folder(train_args: tuple[str, ...]) -> str | None:
    """The `--output DIR` of `vitkit train` arguments, or None."""
    for i, arg in enumerate(train_args):
        if arg == "--output" and i + 1 < len(train_args):
            return train_args[i + 1]
        if arg.startswith("--output="):
            return arg.split("=", 1)[1]
    return None


def sbatch_script(job: SlurmJob) -> str:
    """The text of the sbatch script for `job`."""
    job.validate()
    directives = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",  # one torchrun per node; it starts the per-GPU processes
        f"--gpus-per-node={job.gpus_per_node}",
        f"--output={job.log}",
    ]
    for flag, value in (
        ("cpus-per-task", job.cpus_per_task),
        ("partition", job.partition),
        ("time", job.time),
        ("account", job.account),
    ):
        if value is not None:
            directives.append(f"--{flag}={value}")
    if job.requeue:  # SIGTERM to this script `signal_lead` s ahead; the log continues across requeues
        directives += ["--requeue", f"--signal=B:TERM@{job.signal_lead}", "--open-mode=append"]
    # $-variables stay quoted for the job's shell; the train arguments are quoted as given
    parts = [
        "torchrun",
        '--nnodes "$SLURM_JOB_NUM_NODES"',
        f"--nproc_per_node {job.gpus_per_node}",
        '--rdzv_id "$SLURM_JOB_ID"',
        "--rdzv_backend c10d",
        f'--rdzv_endpoint "$head_node:{job.port}"',
        "-m vitkit train",
    ]
    if job.requeue:
        parts.append('"${train_args[@]}"')
    elif job.train_args:
        parts.append(shlex.join(job.train_args))
    command = " \\\n    ".join(parts)
    lines = [
        "#!/bin/bash",
        "# Written by `vitkit submit`. Submit with: sbatch THIS_FILE",
        *(f"#SBATCH {d}" for d in directives),
        "set -euo pipefail",
        "",
        *job.setup,
        "",
        "# the first node of the allocation hosts torchrun's c10d rendezvous",
        "# (sed, not head: head would close the pipe early, a failure under pipefail)",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        "",
        *(_requeue_lines(job, command) if job.requeue else [f"srun --kill-on-bad-exit=1 {command}"]),
        "",
    ]
    return "\n".join(lines)


def _requeue_lines(job: SlurmJob, command: str) -> list[str]:
    # Slurm signals only this script (B:); the trap relays SIGTERM to srun, srun to torchrun, torchrun
    # to every rank: they agree on a step, save state.pt and exit 143. Then the job requeues itself
    # and, started again, resumes from the run folder
    folder = shlex.quote(run_folder(job.train_args) or "")
    return [
        f"run_dir={folder}",
        'if [ -f "$run_dir/config.yaml" ]; then',
        '    train_args=(--resume "$run_dir")  # requeued: continue the run',
        "else",
        f"    train_args=({shlex.join(job.train_args)})",
        "fi",
        "stopping=0",
        'trap \'stopping=1; echo "SIGTERM: saving $run_dir, then requeueing"; '
        'kill -TERM "$child" 2>/dev/null || true\' TERM',
        f"srun --kill-on-bad-exit=1 {command} &",
        "child=$!",
        "status=0",
        'wait "$child" || status=$?',
        'if [ "$stopping" = 1 ]; then',
        "    status=0",
        '    wait "$child" || status=$?  # the first wait returned when the trap ran: wait for the save',
        '    echo "training exited with $status; requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        'exit "$status"',
    ]


def default_script_path(job_name: str) -> Path:
    return Path("slurm") / f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"


def write_script(job: SlurmJob, path: str | os.PathLike | None = None) -> Path:
    """Write the sbatch script atomically (executable) and return its path."""
    path = Path(path) if path is not None else default_script_path(job.job_name)
    write_text(path, sbatch_script(job))
    path.chmod(0o755)
    return path


def submit(path: str | os.PathLike) -> str | None:
    """Submit the script with `sbatch` and return its reply ("Submitted batch job N"); None without sbatch."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        return None
    done = subprocess.run([sbatch, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"sbatch refused {path}: {reason[-1] if reason else f'exit code {done.returncode}'}")
    return done.stdout.strip()
