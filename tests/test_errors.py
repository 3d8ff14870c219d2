"""The CLI's error contract (issue 17, item 3): usage errors exit 2 in one line, failures the user can
fix exit 1 in one line, anything else keeps its traceback and says it is a bug."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vitkit
from vitkit.cli import BUG_NOTE, exit_code, main
from vitkit.cli import models as models_cli
from vitkit.core.errors import FileFormatError, NonFiniteError, UsageError, VitkitError
from vitkit.data.folder import ImageReadError

SRC = str(Path(vitkit.__file__).resolve().parents[1])


def _raise(err: BaseException):
    def run(args):
        raise err

    return run


@pytest.mark.parametrize(
    "err, code",
    [
        (UsageError("--top-k must be >= 1"), 2),
        (VitkitError("the run folder is locked"), 1),
        (FileFormatError("x.pth is truncated"), 1),
        (ImageReadError("cannot read image a.png"), 1),
        (NonFiniteError("loss is nan at step 3"), 1),
        (FileNotFoundError("checkpoint a.safetensors does not exist"), 1),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 1),
        (OSError(errno.ENOSPC, "No space left on device", "run/state.pt"), 1),
    ],
)
def test_user_errors_are_one_line(err, code, monkeypatch, capsys):
    monkeypatch.setattr(models_cli, "run", _raise(err))
    monkeypatch.delenv("VITKIT_DEBUG", raising=False)
    assert main(["models"]) == code
    out, stderr = capsys.readouterr()
    assert stderr.startswith("vitkit models: error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr


@pytest.mark.parametrize(
    "err",
    [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        ValueError("not enough values to unpack"),  # raised outside vitkit's own raise statements
        KeyError("blocks.0.attn"),
        OSError(errno.EIO, "Input/output error"),
        TypeError("unsupported operand"),
    ],
)
def test_anything_else_keeps_its_traceback_and_says_it_is_a_bug(err, monkeypatch):
    monkeypatch.setattr(models_cli, "run", _raise(err))
    with pytest.raises(type(err)) as caught:
        main(["models"])
    assert caught.value.__notes__ == [BUG_NOTE]


def test_exit_code_of_legacy_messages_depends_on_who_raised_them():
    from vitkit.factory import create_model

    with pytest.raises(ValueError) as caught:
        create_model("not_a_model")
    assert exit_code(caught.value) == (
        1 if isinstance(caught.value, VitkitError) and not isinstance(caught.value, UsageError) else 2
    )
    try:
        int("x")  # a ValueError from a builtin, not from a vitkit `raise`
    except ValueError as err:
        assert exit_code(err) is None


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    monkeypatch.setattr(models_cli, "run", _raise(KeyboardInterrupt()))
    assert main(["models"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_debug_shows_the_traceback_of_user_errors(monkeypatch):
    monkeypatch.setattr(models_cli, "run", _raise(VitkitError("bad file")))
    monkeypatch.setenv("VITKIT_DEBUG", "1")
    with pytest.raises(VitkitError):
        main(["models"])


def test_bad_flags_exit_2_through_argparse(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["predict", "x.png"])  # --run or --checkpoint is required
    assert caught.value.code == 2 and "one of the arguments --run --checkpoint is required" in capsys.readouterr().err


def _vitkit(shell: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    return subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env, timeout=300)


def test_real_processes_a_closed_pipe_and_a_bug(tmp_path):
    # two real processes in one shell (starting Python and torch is what costs): the fuzz test's
    # subprocess sample covers the usage / failure exit codes of real processes
    script = tmp_path / "bug.py"
    script.write_text(
        "import sys\n"
        "from vitkit.cli import main, models\n"
        "def run(args):\n"
        "    raise RuntimeError('CUDA error: device-side assert triggered')\n"
        "models.run = run\n"
        "sys.exit(main(['models']))\n"
    )
    done = _vitkit(
        # `true` exits at once, so the table's first write meets a closed pipe (with `head -1` the whole
        # table can fit in the pipe's buffer before head exits, and no write fails)
        f'"$PYTHON" -m vitkit models | true; echo "rc=${{PIPESTATUS[0]}}"; echo ==== >&2; '
        f'"$PYTHON" {script}; echo "bug rc=$?"'
    )
    pipe_err, bug_err = done.stderr.split("====\n")
    assert "rc=141" in done.stdout
    assert "Traceback" not in pipe_err and "BrokenPipe" not in pipe_err, pipe_err
    assert "bug rc=1" in done.stdout and "Traceback (most recent call last)" in bug_err
    assert "RuntimeError: CUDA error" in bug_err and "this is a bug" in bug_err
