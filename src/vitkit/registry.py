"""The variant table: every model name maps to a family, a config and a builder.

Families register their variants when `vitkit.models` is imported; nothing here knows a family.
`vitkit.factory` builds models from the filled table (`create_model`, `list_models`, `model_info`).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Variant:
    name: str
    family: str  # "vit", "deit", "deit3", "swin", "swinv2"
    config: Any  # a frozen config dataclass holding every architecture setting
    build: Callable[[Any], nn.Module]


_VARIANTS: dict[str, Variant] = {}


def register(name: str, family: str, config: Any, build: Callable[[Any], nn.Module]) -> None:
    """Add a variant to the table (each family's module calls this on import)."""
    if name in _VARIANTS:
        raise ValueError(f"model name {name!r} is registered twice")
    _VARIANTS[name] = Variant(name, family, config, build)


def get_variant(name: str) -> Variant:
    """The registered variant `name`; unknown names raise ValueError with the closest matches.

    The table fills when `vitkit.models` is imported (`vitkit.factory` does it); this module imports
    no family, so it sits below them.
    """
    if not _VARIANTS:
        raise RuntimeError("no model family is registered yet: import vitkit.factory (or vitkit.models) first")
    if name not in _VARIANTS:
        close = difflib.get_close_matches(name, list(_VARIANTS), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (`vitkit models` lists them all)")
    return _VARIANTS[name]


def variant_names() -> list[str]:
    """Every registered name, in registration order."""
    return list(_VARIANTS)


def to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An image size as an (H, W) pair."""
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return (int(size[0]), int(size[1]))
    raise ValueError(f"img_size must be an int or an (H, W) pair of ints, got {size!r}")


def resolve_config(name: str, **fields: Any) -> Any:
    """The variant's config with `fields` replaced; unknown fields and bad values raise ValueError."""
    config = get_variant(name).config
    allowed = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"unknown option {', '.join(unknown)} for {name}; allowed: {', '.join(sorted(allowed))}")
    if fields.get("img_size") is not None:
        fields["img_size"] = to_2tuple(fields["img_size"])
    config = dataclasses.replace(config, **fields)
    config.validate()
    return config


def count_parameters(model: nn.Module) -> int:
    """The number of parameters of `model`."""
    return sum(p.numel() for p in model.parameters())
