"""Package attributes that load on first use (PEP 562), so importing a package stays cheap.

`vitkit`, `vitkit.data` and `vitkit.pretrain` name their public attributes in a table (attribute ->
module) instead of importing them: `vitkit --help` and `vitkit models` then run without torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any


def lazy_attributes(
    package: str, homes: dict[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for `package`: `homes` maps an attribute to the module that defines it
    (relative names are taken inside `package`); `submodules` are reachable as attributes too."""
    submodules = tuple(submodules)

    def __getattr__(name: str) -> Any:
        if name in homes:
            home = homes[name]
            module = importlib.import_module(home if "." in home else f"{package}.{home}")
            value = getattr(module, name)
            setattr(importlib.import_module(package), name, value)  # later look-ups skip this function
            return value
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(homes) | set(submodules))

    return __getattr__, __dir__
