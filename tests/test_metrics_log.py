"""metrics.jsonl is appended to, a line at a time, and truncated once on resume (issue 17, item 2).
End to end, a SIGKILLed and resumed run's metrics equal an uninterrupted run's: test_train.py."""

from __future__ import annotations

import json

import pytest

from vitkit.core.errors import VitkitError
from vitkit.train import run_folder
from vitkit.train.run_folder import METRICS, RunFolder, read_metrics

STEPS_PER_EPOCH = 5


def epoch_lines(epoch: int) -> list[dict]:
    """An epoch's step lines (one per step) and its closing epoch line."""
    first = (epoch - 1) * STEPS_PER_EPOCH
    steps = [
        {"step": first + s, "epoch": epoch, "train_loss": 1.0 / (first + s)} for s in range(1, STEPS_PER_EPOCH + 1)
    ]
    return steps + [{"epoch": epoch, "train_loss": 1.0 / epoch, "val_top1": 10.0 * epoch}]


@pytest.fixture
def rewrites(monkeypatch):
    """Counts whole-file rewrites of metrics.jsonl (atomic `write_text`) and disk syncs."""
    counts = {"write_text": 0, "fsync": 0}
    real_write, real_fsync = run_folder.write_text, run_folder.os.fsync

    def write_text(path, text):
        counts["write_text"] += path.name == METRICS
        return real_write(path, text)

    def fsync(fd):
        counts["fsync"] += 1
        return real_fsync(fd)

    monkeypatch.setattr(run_folder, "write_text", write_text)
    monkeypatch.setattr(run_folder.os, "fsync", fsync)
    return counts


def test_a_log_line_is_appended_not_the_file_rewritten(tmp_path, rewrites):
    folder = RunFolder(tmp_path)
    folder.log({"step": 1, "epoch": 1})
    inode = (tmp_path / METRICS).stat().st_ino
    sizes = []
    for epoch in range(1, 41):  # 240 lines
        for record in epoch_lines(epoch):
            folder.log(record)
            sizes.append((tmp_path / METRICS).stat().st_size)  # each line is readable at once
    folder.close()
    assert rewrites["write_text"] == 0 and (tmp_path / METRICS).stat().st_ino == inode  # the same file, appended to
    growth = [b - a for a, b in zip(sizes, sizes[1:])]
    assert max(growth) < 100  # a line's cost is its own bytes, not the file's
    assert rewrites["fsync"] == 40  # once per epoch line
    assert read_metrics(tmp_path)[1:] == [r for e in range(1, 41) for r in epoch_lines(e)]


def test_resume_truncates_once_to_the_checkpoint_then_appends(tmp_path, rewrites):
    for name in ("reference", "killed"):
        (tmp_path / name).mkdir()
    reference = RunFolder(tmp_path / "reference")
    for epoch in (1, 2, 3):
        for record in epoch_lines(epoch):
            reference.log(record)
    reference.close()

    killed = RunFolder(tmp_path / "killed")
    for record in epoch_lines(1) + epoch_lines(2) + epoch_lines(3)[:3]:  # killed inside epoch 3 ...
        killed.log(record)
    killed.close()
    with (tmp_path / "killed" / METRICS).open("a") as f:
        f.write('{"step": 14, "epo')  # ... mid-write
    resumed = RunFolder(tmp_path / "killed")
    # ... and state.pt holds epoch 2 (after step 10): the lines after it go, once
    resumed.load_metrics(upto_epoch=2, upto_step=2 * STEPS_PER_EPOCH)
    assert rewrites["write_text"] == 1 and resumed.records == epoch_lines(1) + epoch_lines(2)
    for record in epoch_lines(3):
        resumed.log(record)
    resumed.close()
    assert rewrites["write_text"] == 1
    assert read_metrics(tmp_path / "killed") == read_metrics(tmp_path / "reference")


def test_a_new_run_replaces_an_old_metrics_file_and_a_damaged_line_is_named(tmp_path):
    (tmp_path / METRICS).write_text('{"epoch": 9}\n')
    folder = RunFolder(tmp_path)
    folder.log({"epoch": 1})
    folder.close()
    assert read_metrics(tmp_path) == [{"epoch": 1}]

    (tmp_path / METRICS).write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(VitkitError, match=r"metrics.jsonl, line 2, is not JSON"):
        RunFolder(tmp_path).load_metrics(upto_epoch=2, upto_step=10)


def test_other_ranks_write_nothing(tmp_path):
    folder = RunFolder(tmp_path, enabled=False)
    folder.log({"epoch": 1})
    folder.load_metrics(upto_epoch=1, upto_step=1)
    folder.close()
    assert not (tmp_path / METRICS).exists() and json.dumps(folder.records) == "[]"
