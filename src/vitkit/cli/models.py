"""`vitkit models [PATTERN] [--json] [--pretrained]`: the variant table (MACs per image: 1 MAC = 2 FLOPs),
or with --pretrained the variants that have weight records and their default record.

The table is data (vitkit/models/variants.json, written by scripts/make_variant_table.py and checked
against the builders by tests/test_cli_startup.py), so listing the variants needs no torch.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vitkit.core.errors import VitkitError

# beside the model code, read as a file: importing vitkit.models would import torch
TABLE = Path(__file__).resolve().parents[1] / "models" / "variants.json"
FIELDS = ("name", "family", "params", "macs", "img_size", "num_classes")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model variants", description="List the registered model variants.")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'deit*' (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--pretrained", action="store_true", help="only variants with pretrained weights, with their default record"
    )
    p.epilog = "MACs: multiply-accumulates per image at the native input size (1 MAC = 2 FLOPs), see `vitkit flops`."
    p.set_defaults(run=run)


def measure_variant(name: str) -> dict[str, Any]:
    """A variant's row of the table, counted from its builder on the meta device (imports torch)."""
    import torch  # noqa: PLC0415  imports torch

    from vitkit.factory import count_parameters, get_variant  # noqa: PLC0415  imports torch
    from vitkit.tools.flops import fast_macs  # noqa: PLC0415  imports torch

    variant = get_variant(name)
    # one build on the meta device gives both counts (no memory, no arithmetic)
    with torch.device("meta"):
        model = variant.build(variant.config).eval()
    return {
        "name": name,
        "family": variant.family,
        "params": count_parameters(model),
        "macs": fast_macs(model),
        "img_size": list(variant.config.img_size),
        "num_classes": variant.config.num_classes,
    }


def variant_table() -> list[dict[str, Any]]:
    """Every variant's row (FIELDS), sorted by name, from the shipped table; no torch."""
    try:
        rows = json.loads(TABLE.read_text())["variants"]
    except (OSError, ValueError, KeyError) as err:
        raise VitkitError(
            f"the variant table {TABLE} is missing or unreadable ({err}): reinstall vitkit, "
            "or regenerate it with scripts/make_variant_table.py"
        ) from None
    return sorted(rows, key=lambda r: r["name"])


def pretrained_rows(names: list[str]) -> list[dict]:
    from vitkit.weights.pretrained import get_record, list_pretrained  # noqa: PLC0415  imports torch

    have = set(list_pretrained())
    return [asdict(get_record(name)) for name in names if name in have]


def run_pretrained(names: list[str], as_json: bool) -> int:
    table = pretrained_rows(names)
    if not table:
        raise ValueError("no variant matching the pattern has pretrained weights: try `vitkit models --pretrained`")
    if as_json:
        print(json.dumps(table, indent=2))
        return 0
    width = max(len(r["model"]) for r in table)
    tag_width = max(len(r["tag"]) for r in table)
    print(
        f"{'name':<{width}}  {'weights':<{tag_width}}  {'top-1':>5}  {'input':>7}  {'crop':>4}  {'classes':>7}  licence"
    )
    for r in table:
        top1 = f"{r['top1']:.1f}" if r["top1"] is not None else "-"
        size = "x".join(str(s) for s in r["input_size"])
        print(
            f"{r['model']:<{width}}  {r['tag']:<{tag_width}}  {top1:>5}  {size:>7}  {r['crop_pct']:>4.2f}"
            f"  {r['num_classes']:>7}  {r['license']}"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    table = [r for r in variant_table() if fnmatch.fnmatchcase(r["name"], args.pattern)]
    if not table:
        raise ValueError(f"no model matches {args.pattern!r}: try `vitkit models` for the full list")
    if getattr(args, "pretrained", False):
        return run_pretrained([r["name"] for r in table], args.json)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    width = max(len(r["name"]) for r in table)
    print(f"{'name':<{width}}  {'family':<7} {'params (M)':>10} {'MACs (G)':>9}  {'input':>9}  {'classes':>7}")
    for r in table:
        size = "x".join(str(s) for s in r["img_size"])
        print(
            f"{r['name']:<{width}}  {r['family']:<7} {r['params'] / 1e6:>10.2f} {r['macs'] / 1e9:>9.2f}"
            f"  {size:>9}  {r['num_classes']:>7}"
        )
    return 0
