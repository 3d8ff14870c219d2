"""Choices for argparse that live in torch-importing modules, read only when an argument is checked.

Building the parser must not import torch (`vitkit --help` stays fast), yet the lists of choices have one
home in the library. Give such an argument a `metavar`, so argparse does not list the choices while the
parser is built; they are read when a value is checked or the command's own help is printed.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator, Sequence
from typing import overload

from vitkit.core.hardware import AMP_CHOICES


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


def add_inference_flags(p: argparse.ArgumentParser, amp_default: str) -> None:
    """`--tta` and `--amp`, as `vitkit eval` and `vitkit predict` take them."""
    p.add_argument(
        "--tta",
        choices=TTA_MODES,
        metavar="MODE",
        help="test-time augmentation (%(choices)s): hflip averages the probabilities of each image and "
        "its mirror (default: the run's own setting, else none)",
    )
    p.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        help="bf16: weights and activations in bfloat16; auto: bf16 on CUDA and on CPUs with AMX or "
        f"AVX512_BF16, else fp32 (default: {amp_default})",
    )
