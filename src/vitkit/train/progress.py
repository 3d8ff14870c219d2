"""Per-epoch progress: a tqdm bar on a terminal, plain lines in logs (CI)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Callable as `progress(images=, loss=, lr=)` once per batch (see `train_one_epoch`)."""

    def __init__(
        self, total: int, desc: str, *, enabled: bool = True, every: int = 50, stream: TextIO | None = None
    ) -> None:
        self.total, self.desc, self.enabled, self.every = total, desc, enabled, every
        self.stream = stream or sys.stderr
        self.done = 0
        self.images = 0
        self.start = time.perf_counter()
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, desc=desc, unit="batch", file=self.stream, dynamic_ncols=True, leave=False)

    def __call__(self, *, images: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        self.done += 1
        self.images += images
        rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            if self.done % 5 == 0 or self.done == self.total:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
        elif self.done % self.every == 0 or self.done == self.total:
            eta = (self.total - self.done) * (time.perf_counter() - self.start) / self.done
            print(
                f"{self.desc} [{self.done}/{self.total}] loss {loss:.4f} lr {lr:.2e} "
                f"{rate:.0f} img/s eta {_clock(eta)}",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
