"""`vitkit` command line: a thin layer over the library, one module per command.

Exit codes: 0 success; 2 a usage error (argparse's own, or `UsageError`: a bad flag, name or value,
nothing run); 1 a failure the user can fix while running (any other `VitkitError`, a missing or
unreadable user path); 130 interrupted; 141 stdout closed early (`vitkit models | head -1`).
Anything else is a bug: it keeps its traceback (exit 1) with a note saying so.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import linecache
import os
import sys
from pathlib import Path

from vitkit.core.errors import UsageError, VitkitError
from vitkit.core.version import __version__

# command name -> module in vitkit.cli that defines add_parser(subparsers) and run(args) -> int
COMMANDS = {
    "models": "models",
    "flops": "flops",
    "bench": "bench",
    "export": "export",
    "attention": "attention",
    "train": "train",
    "pretrain": "pretrain",
    "eval": "eval",
    "predict": "predict",
    "submit": "submit",
    "convert": "convert",
    "data": "data",
    "serve": "serve",
    "quantize": "quantize",
}

EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 1, 130, 141
# OS errors about the user's paths or disk, not about vitkit: one line, exit 1
_USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ELOOP, errno.ENAMETOOLONG, errno.EFBIG}
_PACKAGE = str(Path(__file__).resolve().parents[1])  # .../vitkit
BUG_NOTE = (
    "vitkit: this is a bug (in vitkit, or in torch / the GPU driver), not a problem with your input: "
    "please report it with the traceback above"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitkit", description="Vision Transformer backbones: build, train, evaluate, convert."
    )
    parser.add_argument("--version", action="version", version=f"vitkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(f"vitkit.cli.{module}").add_parser(sub)
    return parser


def _add_note(err: BaseException, note: str) -> None:
    if sys.version_info >= (3, 11):
        err.add_note(note)
    else:  # Python 3.10 has no exception notes: the note goes before the traceback
        print(note, file=sys.stderr)


def _raised_by_vitkit(err: BaseException) -> bool:
    """True when a `raise` statement in vitkit's own code raised `err` (not torch, numpy or a builtin)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    filename = tb.tb_frame.f_code.co_filename
    line = linecache.getline(filename, tb.tb_lineno).lstrip()
    return str(Path(filename).resolve()).startswith(_PACKAGE) and line.startswith("raise")


def exit_code(err: BaseException) -> int | None:
    """The exit code of an error the user can fix, or None for a bug (which keeps its traceback)."""
    if isinstance(err, UsageError):
        return EXIT_USAGE
    if isinstance(err, VitkitError):
        return EXIT_FAILURE
    if isinstance(err, _USER_OS_ERRORS) or (isinstance(err, OSError) and err.errno in _USER_ERRNOS):
        return EXIT_FAILURE
    # not yet converted to the VitkitError family: a message vitkit raised on purpose is still the
    # user's to fix (a ValueError validates a value, a RuntimeError reports a failure while running)
    if type(err) is ValueError and _raised_by_vitkit(err):
        return EXIT_USAGE
    if type(err) is RuntimeError and _raised_by_vitkit(err):
        return EXIT_FAILURE
    return None


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:
        raise  # handled in main
    except KeyboardInterrupt:
        print(f"vitkit {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        code = exit_code(err)
        if code is None or os.environ.get("VITKIT_DEBUG"):
            if code is None:
                _add_note(err, BUG_NOTE)
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"vitkit {args.command}: error: {message}", file=sys.stderr)
        return code


def main(argv: list[str] | None = None) -> int:
    """Run one `vitkit` command; returns its exit code (argparse exits 2 itself on bad flags)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc N` starts it again
    try:
        code = _run(args)
        sys.stdout.flush()  # a reader that went away shows up here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # the reader closed the pipe (`vitkit models | head -1`): stop quietly, as a SIGPIPE'd tool does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
