"""The bottom layer: what every other part of vitkit may use (atomic writes, error types, the version).

Imports nothing from the rest of vitkit, and nothing heavy (no torch) at import time.
"""

from vitkit.core.errors import FileFormatError, NonFiniteError, UsageError, VitkitError
from vitkit.core.files import atomic_path, save_figure, write_text
from vitkit.core.version import __version__

__all__ = [
    "FileFormatError",
    "NonFiniteError",
    "UsageError",
    "VitkitError",
    "__version__",
    "atomic_path",
    "save_figure",
    "write_text",
]
