"""The run folder: config, provenance, metrics, weights and plots, every file written atomically.

Only the main rank writes; on other ranks every method is a no-op.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import IO, Any

from vitkit.core.errors import VitkitError
from vitkit.core.files import write_text
from vitkit.train.config import TrainConfig
from vitkit.train.tracking import build_trackers

CONFIG, RUN_INFO, METRICS = "config.yaml", "run.json", "metrics.jsonl"
LAST, BEST, STATE, CURVES = "last.safetensors", "best.safetensors", "state.pt", "curves.png"


class RunFolder:
    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self.trackers: list[Any] = []  # vitkit.train.tracking: TensorBoard, MLflow (`log` in the config)
        self._metrics: IO[str] | None = None  # metrics.jsonl, open for appending once the run logs

    def file(self, name: str) -> Path:
        return self.path / name

    # -- config and provenance --------------------------------------------------------------
    def write_config(self, config: TrainConfig) -> None:
        """Write config.yaml and start the config's trackers (`log`, `mlflow_uri`) with it as params."""
        if self.enabled:
            write_text(self.file(CONFIG), config.to_yaml())
            self.close_trackers()
            self.trackers = build_trackers(
                getattr(config, "log", "auto"), self.path, getattr(config, "mlflow_uri", None)
            )
            for tracker in self.trackers:
                tracker.log_params(dataclasses.asdict(config))

    def write_run_info(self, info: dict[str, Any]) -> None:
        if self.enabled:
            write_text(self.file(RUN_INFO), json.dumps(info, indent=2) + "\n")

    def read_run_info(self) -> dict[str, Any]:
        path = self.file(RUN_INFO)
        return json.loads(path.read_text()) if path.is_file() else {}

    # -- metrics ----------------------------------------------------------------------------
    def load_metrics(self, *, upto_epoch: int, upto_step: int) -> None:
        """Read metrics.jsonl, dropping what a killed run logged after the checkpoint it resumes, and
        rewrite it once (atomically); later lines are appended."""
        path = self.file(METRICS)
        lines = path.read_text().splitlines() if path.is_file() else []
        kept = []
        for n, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines) - 1:  # a line torn by the kill
                    continue
                raise VitkitError(f"{path}, line {n + 1}, is not JSON: repair or delete it, then resume") from None
            if "best_val_top1" in record:  # the closing line: written again at the end
                continue
            if "step" in record and record["step"] > upto_step:
                continue
            if "step" not in record and record.get("epoch", 0) > upto_epoch:
                continue
            kept.append(record)
        self.records = kept
        self._close_metrics()
        if self.enabled:
            write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
            self._metrics = path.open("a")

    def log(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl and send it to the trackers. Each line reaches the OS at
        once (readers see it); an epoch line (no "step") is also synced to the disk."""
        if not self.enabled:
            return
        self.records.append(record)
        if self._metrics is None:  # a new run: replace what an earlier run in this folder left
            self._metrics = self.file(METRICS).open("w")
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if "step" not in record:
            os.fsync(self._metrics.fileno())
        for tracker in self.trackers:
            tracker.log(record)

    def _close_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def epoch_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "step" not in r and "epoch" in r]

    def close(self, status: str = "FINISHED") -> None:
        """Close metrics.jsonl and finish the trackers with `status` (MLflow's FINISHED, FAILED or KILLED);
        MLflow gets the curves and the best weights as artifacts. A second call does nothing."""
        self._close_metrics()
        artifacts = [self.file(n) for n in (CURVES, BEST) if self.file(n).is_file()]
        for tracker in self.trackers:
            tracker.close(artifacts, status)
        self.trackers = []

    def close_trackers(self) -> None:
        for tracker in self.trackers:
            tracker.close([], "FINISHED")
        self.trackers = []


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
