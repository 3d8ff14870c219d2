"""One variant per structural kind for `make test`, every variant under `--run-slow`.

Two variants are of one kind when their configs differ only in size (width, depth, heads, MLP
ratio): they run the same code, so timm parity on the narrowest of them checks that code path, and
`make test-all` checks every variant."""

from __future__ import annotations

import dataclasses

import pytest

from vitkit.factory import get_variant

SIZE_FIELDS = ("embed_dim", "depth", "depths", "num_heads", "mlp_ratio")


def kind(name: str) -> tuple[str, str]:
    variant = get_variant(name)
    config = {k: v for k, v in dataclasses.asdict(variant.config).items() if k not in SIZE_FIELDS}
    return variant.family, repr(sorted(config.items()))


def width(name: str) -> tuple[int, int]:
    config = get_variant(name).config
    depth = getattr(config, "depth", None) or sum(config.depths)
    return config.embed_dim, depth


def representatives(names: list[str]) -> set[str]:
    """The narrowest (then shallowest, then first by name) variant of each kind among `names`."""
    best: dict[tuple[str, str], str] = {}
    for name in sorted(names):
        key = kind(name)
        if key not in best or width(name) < width(best[key]):
            best[key] = name
    return set(best.values())


def sampled(names: list[str]) -> list:
    """`names` as pytest parameters: the representatives always run, the others under --run-slow."""
    keep = representatives(names)
    later = pytest.mark.slow("another variant of a kind checked in make test")
    return [n if n in keep else pytest.param(n, marks=later) for n in names]
