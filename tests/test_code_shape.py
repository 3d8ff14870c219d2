"""The shape of src/vitkit, checked on its syntax trees: functions that fit on a screen, public functions
fully typed, and the layers contract (import-linter) kept, so `make test` catches an upward import."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "vitkit"
MAX_LINES = 60

Function = ast.FunctionDef | ast.AsyncFunctionDef


def _functions(tree: ast.AST, prefix: str = "", private: bool = False) -> Iterator[tuple[str, Function, bool]]:
    """(qualified name, node, private) of every function, nested ones included; a function is private when
    its name or an enclosing class's starts with `_` (dunder methods are public), and every nested
    function is private."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            hidden = private or (node.name.startswith("_") and not node.name.startswith("__"))
            yield prefix + node.name, node, hidden
            yield from _functions(node, f"{prefix}{node.name}.", True)
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.", private or node.name.startswith("_"))


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _is_argparse_table(module: str, name: str) -> bool:
    # a command's add_parser is one add_argument call per flag: long by nature, read as a table
    return module.startswith("cli/") and name == "add_parser"


def long_functions(modules: list[tuple[str, ast.Module]], limit: int = MAX_LINES) -> list[str]:
    """`module::function (N lines)` for each function longer than `limit` lines, from `def` to its last line,
    decorators excluded, argparse tables excepted."""
    found = []
    for module, tree in modules:
        for name, node, _ in _functions(tree):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1  # end_lineno: always set by ast.parse
            if lines > limit and not _is_argparse_table(module, name):
                found.append(f"{module}::{name} ({lines} lines)")
    return found


def untyped_public_functions(modules: list[tuple[str, ast.Module]]) -> list[str]:
    """`module:line function` for each public function missing a parameter or return annotation."""
    found = []
    for module, tree in modules:
        for name, node, private in _functions(tree):
            if private:
                continue
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *(p for p in (a.vararg, a.kwarg) if p)]
            missing = [p.arg for p in params if p.annotation is None and p.arg not in ("self", "cls")]
            missing += ["return"] if node.returns is None else []
            if missing:
                found.append(f"{module}:{node.lineno} {name}: no annotation for {', '.join(missing)}")
    return found


def test_no_function_is_longer_than_a_screen():
    long = long_functions(list(_modules()))
    assert not long, f"functions over {MAX_LINES} lines (split them):\n" + "\n".join(long)


def test_public_functions_are_typed():
    untyped = untyped_public_functions(list(_modules()))
    assert not untyped, "public functions without full type hints:\n" + "\n".join(untyped)


def test_the_checks_find_what_they_look_for():
    source = (
        "def add_parser(sub):\n" + "    x = 1\n" * 70 + "\n"  # an argparse table in cli/: allowed, but untyped
        "class Thing:\n"
        "    def run(self, n: int) -> int:\n" + "        n += 1\n" * 60 + "        return n\n"
        "    def _helper(self, n):\n        return n\n"  # private: may go untyped
        "    def __call__(self, x) -> None:\n        pass\n"  # dunder: public
    )
    tree = ast.parse(source)
    assert long_functions([("cli/x.py", tree)]) == ["cli/x.py::Thing.run (62 lines)"]
    assert long_functions([("tools/x.py", tree)]) == [
        "tools/x.py::add_parser (71 lines)",
        "tools/x.py::Thing.run (62 lines)",
    ]
    assert untyped_public_functions([("m.py", tree)]) == [
        "m.py:1 add_parser: no annotation for sub, return",
        "m.py:138 Thing.__call__: no annotation for x",
    ]


def _lint_imports() -> str | None:
    beside = Path(sys.executable).with_name("lint-imports")  # the venv running the tests
    return str(beside) if beside.exists() else shutil.which("lint-imports")


def test_layers_contract_is_kept():
    exe = _lint_imports()
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    # PYTHONPATH: analyse this tree, whatever vitkit the environment has installed
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"lint-imports found an upward import or a cycle:\n{done.stdout[-4000:]}{done.stderr}"
