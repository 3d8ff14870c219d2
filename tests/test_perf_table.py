"""scripts/perf_table.py: one run replaces the table between the markers of the report and nothing else.
Tiny settings: the script is a benchmark, no speed is asserted. It runs in this process, as
`python scripts/perf_table.py` would run it (a new interpreter costs seconds on a slow CPU)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "perf_table.py"
ARGS = [
    "--models",
    "deit_tiny_patch16_224",
    "--img-size",
    "32",
    "--modes",
    "infer",
    "--batch-sizes",
    "1",
    "--steps",
    "1",
    "--rounds",
    "1",
    "--warmup",
    "0",
    "--threads",
    "1",
    "--amps",
    "fp32",
    "bf16",
    "--peak-size",
    "256",
]


def _run(out: Path, monkeypatch) -> int:
    """The script's exit code (its output goes to capsys)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *ARGS, "--out", str(out)])
    threads = torch.get_num_threads()  # the script sets its own (--threads) and leaves them set
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    except SystemExit as stop:  # the interpreter's rule: a message is printed and exits 1, a number is the code
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            return 1
        return stop.code or 0
    finally:
        torch.set_num_threads(threads)
    return 0


def test_the_table_is_regenerated_between_the_markers(tmp_path, monkeypatch, capsys):
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# Performance\n\nbefore\n<!-- perf-table:start -->\nold table\n<!-- perf-table:end -->\nafter\n")
    assert _run(doc, monkeypatch) == 0, capsys.readouterr().err
    text = doc.read_text()
    assert text.startswith("# Performance\n\nbefore\n<!-- perf-table:start -->\n") and text.endswith("-->\nafter\n")
    assert "old table" not in text
    rows = [line for line in text.splitlines() if line.startswith("| deit_tiny_patch16_224 |")]
    assert [row.split(" | ")[1:4] for row in rows] == [["infer", "fp32", "1"], ["infer", "bf16", "1"]]
    assert "matmul peak" in text and "CPU: " in text and "GFLOP/s" in text


def test_a_report_without_markers_is_left_alone(tmp_path, monkeypatch, capsys):
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# my notes\n")
    assert _run(doc, monkeypatch) == 1 and "markers" in capsys.readouterr().err
    assert doc.read_text() == "# my notes\n"
