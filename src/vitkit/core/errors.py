"""Errors the user can fix: the CLI prints them as one line; anything else keeps its traceback.

`VitkitError` subclasses ValueError so that code catching ValueError (argparse-style validation,
older callers) keeps working. The CLI's exit codes follow the class: `UsageError` (a bad flag,
name or value, found before any work) exits 2; every other `VitkitError` (a missing, corrupt or
unsafe file, a run that diverged) exits 1.
"""

from __future__ import annotations


class VitkitError(ValueError):
    """A problem with the user's input, files or settings, stated with its fix."""


class UsageError(VitkitError):
    """A bad flag, unknown name or impossible value: nothing was run (exit code 2)."""


class FileFormatError(VitkitError):
    """A user file that is truncated, corrupt, unsafe to read or not what it claims to be; names the file."""


class NonFiniteError(VitkitError):
    """The loss (or a gradient) became NaN or infinite; the step that produced it was not applied."""
