"""Choices for argparse that live in torch-importing modules, read only when an argument is checked.

Building the parser must not import torch (`vitkit --help` stays fast), yet the lists of choices have one
home in the library. Give such an argument a `metavar`, so argparse does not list the choices while the
parser is built; they are read when a value is checked or the command's own help is printed.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from typing import overload


class LazyChoices(Sequence[str]):
    """The tuple `module.attribute`, imported on first use."""

    def __init__(self, module: str, attribute: str) -> None:
        self._where = (module, attribute)
        self._values: tuple[str, ...] | None = None

    def _load(self) -> tuple[str, ...]:
        if self._values is None:
            self._values = tuple(getattr(importlib.import_module(self._where[0]), self._where[1]))
        return self._values

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...
    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return self._load()[index]

    def __len__(self) -> int:
        return len(self._load())

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __contains__(self, value: object) -> bool:
        return value in self._load()


TTA_MODES = LazyChoices("vitkit.train.config", "TTA_MODES")
