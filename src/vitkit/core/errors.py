"""Errors the user can fix: the CLI prints them as one line; anything else keeps its traceback.

`VitkitError` subclasses ValueError so that code catching ValueError (argparse-style validation,
older callers) keeps working.
"""

from __future__ import annotations


class VitkitError(ValueError):
    """A problem with the user's input, files or settings, stated with its fix."""


class NonFiniteError(VitkitError):
    """The loss (or a gradient) became NaN or infinite; the step that produced it was not applied."""
