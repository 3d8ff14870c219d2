"""What every run process sets up before its first epoch, for `vitkit train` and `vitkit pretrain`
alike: the process group, the run folder and seed agreed by all ranks (`prepare_run`), threads and
deterministic algorithms (`runtime`), mixed precision, and the provenance recorded in run.json.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import random
import secrets
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from vitkit.core.hardware import resolve_amp
from vitkit.core.version import __version__
from vitkit.train import parallel
from vitkit.train.config import TrainConfig
from vitkit.train.run_folder import CONFIG


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `amp` on `device` (None: fp32); `vitkit.core.hardware.resolve_amp` decides:
    auto is bf16 on CUDA and on CPUs with AMX or AVX512_BF16, fp32 on any other CPU; fp16 needs CUDA."""
    return resolve_amp(amp, device)[0]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def runtime(threads: int | None, deterministic: bool) -> Iterator[None]:
    """Thread count and deterministic algorithms for the run, restored afterwards."""
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS reductions
        # warn_only: a CUDA op without a deterministic kernel warns instead of ending a long run
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.benchmark = saved[3]


def now() -> str:
    """The local time, ISO 8601, to the second."""
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _command_line() -> str:
    argv = sys.argv
    if argv and (Path(argv[0]).name in ("vitkit", "__main__.py")):
        return shlex.join(["vitkit", *argv[1:]])
    return shlex.join(argv)


def provenance(device: torch.device) -> dict[str, Any]:
    """Versions, commit, command line, device and process count: what run.json records."""
    return {
        "vitkit": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": sys.version.split()[0],
        "git_commit": _git_commit(),
        "command": _command_line(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "world_size": parallel.get_world_size(),
    }


def default_output(config: TrainConfig) -> Path:
    """runs/<recipe or model>-<date>-<time>."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.recipe or config.model.replace(':', '_')}-{stamp}"


def prepare_run(config: TrainConfig, resume: bool) -> tuple[torch.device, Path, TrainConfig, bool]:
    """The start of `vitkit train` and `vitkit pretrain` in every process: join torchrun's process
    group (when launched by it), agree on rank 0's run folder, stop every rank when that folder
    cannot be used, and agree on the seed (an unseeded run records the one rank 0 drew).

    Returns the device, the run folder, the config with both filled in, and whether the run is
    seeded (deterministic).
    """
    device = parallel.init_distributed(config.device)
    run_dir = Path(parallel.broadcast_object(str(config.output or default_output(config))))
    problem: Exception | None = None
    if parallel.is_main() and not resume and (run_dir / CONFIG).exists():
        problem = ValueError(
            f"{run_dir} already holds a run: continue it with --resume {run_dir} or choose another --output"
        )
    # a run folder without state.pt (killed before its first checkpoint) restarts in place
    if parallel.is_main() and resume and not (run_dir / CONFIG).is_file():
        problem = FileNotFoundError(f"{run_dir} holds no run to resume (no {CONFIG}): start it again without --resume")
    problem = parallel.broadcast_object(problem)  # every rank stops, not only rank 0
    if problem is not None:
        raise problem
    config = dataclasses.replace(config, output=str(run_dir))
    deterministic = config.seed is not None
    if config.seed is None:
        config = dataclasses.replace(config, seed=parallel.broadcast_object(secrets.randbelow(2**31)))
    return device, run_dir, config, deterministic
