"""scripts/perf_table.py: one run replaces the table between the markers of the report and nothing else.
Tiny settings: the script is a benchmark, no speed is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def _run(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--out", str(out)], capture_output=True, text=True)


def test_the_table_is_regenerated_between_the_markers(tmp_path):
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# Performance\n\nbefore\n<!-- perf-table:start -->\nold table\n<!-- perf-table:end -->\nafter\n")
    result = _run(doc)
    assert result.returncode == 0, result.stderr
    text = doc.read_text()
    assert text.startswith("# Performance\n\nbefore\n<!-- perf-table:start -->\n") and text.endswith("-->\nafter\n")
    assert "old table" not in text
    rows = [line for line in text.splitlines() if line.startswith("| deit_tiny_patch16_224 |")]
    assert [row.split(" | ")[1:4] for row in rows] == [["infer", "fp32", "1"], ["infer", "bf16", "1"]]
    assert "matmul peak" in text and "CPU: " in text and "GFLOP/s" in text


def test_a_report_without_markers_is_left_alone(tmp_path):
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# my notes\n")
    result = _run(doc)
    assert result.returncode != 0 and "markers" in result.stderr
    assert doc.read_text() == "# my notes\n"
