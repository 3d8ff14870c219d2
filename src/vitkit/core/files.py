"""Atomic file writes (nothing the user made is ever half-written) and vitkit's cache folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vitkit.core.errors import VitkitError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    On error the temporary file is removed and any existing `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp creates 0600 files: give the result the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def cache_root() -> Path:
    """Where vitkit keeps what it downloads or builds: `$VITKIT_CACHE`, default ~/.cache/vitkit."""
    return Path(os.environ.get("VITKIT_CACHE") or "~/.cache/vitkit").expanduser()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> None:
    """Write a matplotlib figure as PNG atomically (temp file, then rename)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def write_folder(path: str | os.PathLike, files: dict[str, Callable[[Path], Any]]) -> None:
    """Write a folder of files so none is ever half-written: `files` maps each name to a function that
    writes it to the path it is given; all are built in a temporary folder beside `path`, which is then
    renamed into place (or, when `path` exists, each file is renamed into it: one atomic rename per file)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VitkitError(f"{path} exists and is not a folder: give a folder path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        for name, write in files.items():
            write(tmp / name)
        if not path.exists():
            os.replace(tmp, path)
            return
        for name in files:
            os.replace(tmp / name, path / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
