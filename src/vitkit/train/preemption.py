"""Stopping a run cleanly on SIGTERM (Slurm's warning before preemption or a time limit) and Ctrl-C.

The first signal only sets a flag. The run loop reads it, agreed over all ranks, at each optimiser
step boundary (`StopRequest.agreed`), saves a mid-epoch state and raises `Preempted`, which exits
with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT). A second signal exits at once:
files are written atomically, so the previous checkpoint stays intact.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch

from vitkit.train import parallel

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
    """The run stopped on a signal after saving its state; the exit code is 128 + the signal number.

    A SystemExit, so that the CLI exits with that code (no traceback, no "error" line) and library
    callers can catch it.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.signum, self.message = signum, message


class StopRequest:
    """The first SIGTERM / SIGINT asks the run to stop at the next step boundary; a second exits at once."""

    def __init__(self) -> None:
        self.signum = 0  # 0: no request

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:  # the second signal: leave now; atomic writes keep the last checkpoint whole
            os._exit(128 + signum)
        self.signum = signum
        if parallel.is_main():
            name = signal.Signals(signum).name
            print(
                f"\n{name}: stopping at the next step to save the run (send it again to quit at once)",
                file=sys.stderr,
                flush=True,
            )

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle the stop signals inside the block (only the main thread may set handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0 for none): every rank calls it at the same step and gets the
        same answer, so all stop together."""
        if parallel.get_world_size() == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


def resume_command(command: str, run_dir: os.PathLike | str) -> str:
    """The command that continues the run in `run_dir`: `vitkit COMMAND --resume DIR`, with `--nproc N`
    when `vitkit --nproc` started this run (under a bare torchrun, torchrun's own flags go first)."""
    words = ["vitkit", command, "--resume", str(run_dir)]
    nproc = os.environ.get("VITKIT_NPROC")
    if nproc:
        words += ["--nproc", nproc]
    elif parallel.get_world_size() > 1:  # launched by torchrun: repeat its flags
        return f"the torchrun launch of this run, ending in: -m {shlex.join(words[1:])}"
    return shlex.join(words)
