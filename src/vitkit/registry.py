"""The variant table: every model name maps to a family, a config and a builder.

Families register their variants when `vitkit.models` is imported; nothing here knows a family.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Variant:
    name: str
    family: str  # "vit", "deit", "deit3", "swin", "swinv2"
    config: Any  # a frozen config dataclass holding every architecture setting
    build: Callable[[Any], nn.Module]


_VARIANTS: dict[str, Variant] = {}


def register(name: str, family: str, config: Any, build: Callable[[Any], nn.Module]) -> None:
    if name in _VARIANTS:
        raise ValueError(f"model name {name!r} is registered twice")
    _VARIANTS[name] = Variant(name, family, config, build)


def _table() -> dict[str, Variant]:
    import vitkit.models  # noqa: F401  (registers the families)

    return _VARIANTS


def get_variant(name: str) -> Variant:
    table = _table()
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (`vitkit models` lists them all)")
    return table[name]


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered variants matching an fnmatch pattern, sorted."""
    return sorted(n for n in _table() if fnmatch.fnmatchcase(n, pattern))


def to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
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
        raise ValueError(
            f"unknown option {', '.join(unknown)} for {name}; allowed: {', '.join(sorted(allowed))}"
        )
    if fields.get("img_size") is not None:
        fields["img_size"] = to_2tuple(fields["img_size"])
    config = dataclasses.replace(config, **fields)
    config.validate()
    return config


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    in_chans: int | None = None,
    pretrained: bool | str = False,
    **overrides: Any,
) -> nn.Module:
    """Build a model by its (timm) name; every default equals timm's for that name.

    `overrides` replace any field of the variant's config (`depth`, `drop_path_rate`,
    `dynamic_img_size`, ...). `pretrained=True` loads the variant's default weight record,
    `pretrained="path"` a local checkpoint in any supported format.
    """
    given = {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans}
    fields = {k: v for k, v in given.items() if v is not None} | overrides
    config = resolve_config(name, **fields)
    model = get_variant(name).build(config)
    model.variant_name = name
    if pretrained:
        from vitkit.weights.pretrained import load_pretrained

        load_pretrained(model, name, pretrained)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_info(name: str, **fields: Any) -> dict[str, Any]:
    """Family, resolved config, parameter count and native input size, built on the meta device."""
    variant = get_variant(name)
    config = resolve_config(name, **fields)
    with torch.device("meta"):
        model = variant.build(config)
    return {
        "name": name,
        "family": variant.family,
        "config": dataclasses.asdict(config),
        "params": count_parameters(model),
        "img_size": tuple(config.img_size),
        "num_classes": config.num_classes,
    }
