"""Experiment tracking for real: TensorBoard event files read back with tensorboard's EventAccumulator, and
an MLflow sqlite store read back with MLflow's client; both hold every metric of metrics.jsonl at its step."""

from __future__ import annotations

import json

import pytest

from test_data import offline, write_idx  # noqa: F401  (offline is a fixture)
from test_train import TINY
from vitkit.cli import main
from vitkit.train.run_folder import read_metrics
from vitkit.train.tracking import MLFLOW_RUN_FILE, build_trackers, parse_log, scalars

pytest.importorskip("tensorboard", reason="the track extra (tensorboard) is not installed")
mlflow = pytest.importorskip("mlflow", reason="the track extra (mlflow) is not installed")


@pytest.fixture
def tracked_run(offline, monkeypatch):  # noqa: F811
    """A two-epoch tiny run logged to TensorBoard and to MLflow's default store (cwd: tmp)."""
    monkeypatch.setenv("VITKIT_DATA", str(write_idx(offline / "idx", n_train=300, n_test=40)))
    monkeypatch.chdir(offline)
    run = offline / "run"
    args = [
        "train",
        "--output",
        str(run),
        "--seed",
        "0",
        *TINY,
        "--epochs",
        "2",
        "--set",
        "log_every=2",
        "--log",
        "tensorboard,mlflow",
    ]
    assert main(args) == 0
    return run


def _expected(run) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for record in read_metrics(run):
        for name, value, step in scalars(record):
            out.setdefault(name, {})[step] = value
    return out


def test_tensorboard_and_mlflow_hold_every_metric_at_its_step(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tracked_run
    expected = _expected(run)
    assert any(k.startswith("step/") for k in expected) and "epoch/val_top1" in expected
    assert "final/test_top1" in expected
    board = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    board.Reload()
    for name, points in expected.items():
        got = {e.step: e.value for e in board.Scalars(name)}
        assert got.keys() == points.keys(), name
        for step, value in points.items():
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-6), (name, step)

    # MLflow: the default store under ./runs, read back with its own client
    assert (run.parent / "runs" / "mlflow.db").is_file()
    client = mlflow.tracking.MlflowClient(tracking_uri="sqlite:///runs/mlflow.db")
    run_id = json.loads((run / MLFLOW_RUN_FILE).read_text())["run_id"]
    record = client.get_run(run_id)
    assert record.info.status == "FINISHED"
    assert record.data.params["model_args.depth"] == "1" and record.data.params["epochs"] == "2"
    for name, points in expected.items():
        history = {m.step: m.value for m in client.get_metric_history(run_id, name)}
        assert history == pytest.approx(points), name
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"curves.png", "best.safetensors"} <= artifacts
    assert any((run.parent / "runs" / "mlruns").rglob("best.safetensors"))


def test_a_crashed_run_ends_its_mlflow_run_as_failed(offline, monkeypatch, tmp_path):  # noqa: F811
    """A bug mid-run keeps its traceback, and the MLflow run does not stay RUNNING."""
    from vitkit.train.supervised import SupervisedTask

    monkeypatch.setenv("VITKIT_DATA", str(write_idx(offline / "idx", n_train=300, n_test=40)))
    uri = f"sqlite:///{tmp_path}/track.db"

    def broken(self, run, epoch, stats):
        raise RuntimeError("a bug in validation")

    monkeypatch.setattr(SupervisedTask, "validate", broken)
    run = offline / "run"
    args = ["train", "--output", str(run), "--seed", "0", *TINY, "--epochs", "2", "--log", "mlflow"]
    with pytest.raises(RuntimeError, match="a bug in validation"):  # bugs keep their traceback
        main([*args, "--mlflow-uri", uri])
    run_id = json.loads((run / MLFLOW_RUN_FILE).read_text())["run_id"]
    assert mlflow.tracking.MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FAILED"


def test_mlflow_uri_overrides_the_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/elsewhere/track.db"
    (tracker,) = build_trackers("mlflow", tmp_path, uri)
    tracker.log_params({"lr": 0.1, "model_args": {"depth": 2}})
    tracker.log({"step": 3, "epoch": 0, "train_loss": 1.5})
    tracker.close([])
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    got = client.get_run(tracker.run_id)
    assert got.data.params == {"lr": "0.1", "model_args.depth": "2"}
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "step/train_loss")] == [(3, 1.5)]
    assert (tmp_path / "elsewhere" / "track.db").is_file()


def test_bad_log_values_name_the_fix():
    assert parse_log("tensorboard,mlflow") == ["tensorboard", "mlflow"]
    with pytest.raises(ValueError, match="unknown wandb"):
        parse_log("wandb")
    with pytest.raises(ValueError, match="stand alone"):
        parse_log("none,mlflow")
