"""`vitkit models [PATTERN] [--json]`: the variant table."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model variants", description="List the registered model variants.")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'deit*' (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def rows(pattern: str) -> list[dict]:
    from vitkit.registry import list_models, model_info

    out = []
    for name in list_models(pattern):
        info = model_info(name)
        out.append(
            {
                "name": name,
                "family": info["family"],
                "params": info["params"],
                "img_size": list(info["img_size"]),
                "num_classes": info["num_classes"],
            }
        )
    return out


def run(args: argparse.Namespace) -> int:
    table = rows(args.pattern)
    if not table:
        raise ValueError(f"no model matches {args.pattern!r}: try `vitkit models` for the full list")
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    width = max(len(r["name"]) for r in table)
    print(f"{'name':<{width}}  {'family':<7} {'params (M)':>10}  {'input':>9}  {'classes':>7}")
    for r in table:
        size = "x".join(str(s) for s in r["img_size"])
        print(f"{r['name']:<{width}}  {r['family']:<7} {r['params'] / 1e6:>10.2f}  {size:>9}  {r['num_classes']:>7}")
    return 0
