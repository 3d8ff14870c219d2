"""Experiment trackers beside metrics.jsonl: TensorBoard event files and MLflow runs.

Each metrics record goes to every tracker under one tag scheme: a record with a `step` is logged as
`step/KEY` at that step, an epoch record as `epoch/KEY` at its epoch, and the closing record (best and
test figures) as `final/KEY` at step 0. MLflow also gets the config as params and, at the end, the
curves and the best weights as artifacts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from vitkit.core.errors import VitkitError
from vitkit.core.files import write_text

TRACKERS = ("tensorboard", "mlflow")
LOG_CHOICES = ("auto", "none", *TRACKERS)  # auto: TensorBoard when it is installed
DEFAULT_MLFLOW_URI = "sqlite:///runs/mlflow.db"  # recent MLflow refuses a bare file store
EXPERIMENT = "vitkit"
MLFLOW_RUN_FILE = "mlflow.json"  # the run id, so a resumed training run logs into the same MLflow run


def parse_log(value: str) -> list[str]:
    """The trackers a `--log` value names: comma-separated tensorboard, mlflow; auto; none."""
    names = [v.strip() for v in value.split(",") if v.strip()] or ["none"]
    bad = [n for n in names if n not in LOG_CHOICES]
    if bad:
        raise VitkitError(f"--log {value}: unknown {', '.join(bad)}; use {', '.join(LOG_CHOICES)} (or a,b)")
    if ("none" in names or "auto" in names) and len(names) > 1:
        raise VitkitError(f"--log {value}: auto and none stand alone; name trackers as tensorboard,mlflow")
    return names


def tag(record: dict[str, Any], key: str) -> tuple[str, int]:
    """(tag, step) of one metric of a metrics.jsonl record."""
    if "step" in record:
        return f"step/{key}", int(record["step"])
    if "epoch" in record:
        return f"epoch/{key}", int(record["epoch"])
    return f"final/{key}", 0


def scalars(record: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(tag, value, step) of every numeric metric of a record (step and epoch are the axes, not metrics)."""
    out = []
    for key, value in record.items():
        if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name, step = tag(record, key)
        out.append((name, float(value), step))
    return out


class TensorBoardTracker:
    """Scalars into RUN/tensorboard with torch's SummaryWriter."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415  the optional track extra

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log_params(self, params: dict[str, Any]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(params, indent=2, default=str) + "\n```", 0)

    def log(self, record: dict[str, Any]) -> None:
        for name, value, step in scalars(record):
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self, artifacts: list[Path], status: str = "FINISHED") -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per training run, through MlflowClient (no global "active run" state)."""

    def __init__(self, run_dir: Path, uri: str | None) -> None:
        from mlflow.tracking import MlflowClient  # noqa: PLC0415  the optional track extra

        self.uri = uri or DEFAULT_MLFLOW_URI
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        id_file = run_dir / MLFLOW_RUN_FILE
        saved = json.loads(id_file.read_text()) if id_file.is_file() else {}
        if saved.get("tracking_uri") == self.uri:  # a resumed run continues its MLflow run
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=_artifact_root(self.uri))
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        write_text(id_file, json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param  # noqa: PLC0415  the optional track extra

        flat = [Param(k, str(v)) for k, v in _flatten(params).items()]
        existing = self.client.get_run(self.run_id).data.params
        flat = [p for p in flat if p.key not in existing]  # params are write-once: a resume keeps them
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=flat[i : i + 100])

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415  the optional track extra

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value, step in scalars(record)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, artifacts: list[Path], status: str = "FINISHED") -> None:
        """Upload `artifacts` and end the MLflow run as `status`: FINISHED, FAILED (an error) or KILLED
        (stopped by a signal; a resume sets it RUNNING again)."""
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status=status)


def _artifact_root(uri: str) -> str | None:
    """The default store keeps artifacts in runs/mlruns (beside the database for any sqlite URI)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()
    return None  # a tracking server chooses its own artifact store


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_trackers(log: str, run_dir: str | os.PathLike, mlflow_uri: str | None = None) -> list[Any]:
    """The trackers `log` names for the run folder `run_dir`; a named one that is not installed is an error."""
    run_dir = Path(run_dir)
    names = parse_log(log)
    if names == ["auto"]:
        return [TensorBoardTracker(run_dir)] if _installed("tensorboard") else []
    trackers: list[Any] = []
    for name in names:
        if name == "none":
            continue
        if not _installed(name):
            raise VitkitError(f"--log {name} needs {name}: pip install 'vitkit[track]'")
        trackers.append(TensorBoardTracker(run_dir) if name == "tensorboard" else MlflowTracker(run_dir, mlflow_uri))
    return trackers
