"""`vitkit models [PATTERN] [--json] [--pretrained]`: the variant table (MACs per image: 1 MAC = 2 FLOPs),
or with --pretrained the variants that have weight records and their default record."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model variants", description="List the registered model variants.")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'deit*' (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--pretrained", action="store_true", help="only variants with pretrained weights, with their default record"
    )
    p.epilog = "MACs: multiply-accumulates per image at the native input size (1 MAC = 2 FLOPs), see `vitkit flops`."
    p.set_defaults(run=run)


def row(name: str) -> dict:
    import torch

    from vitkit.factory import count_parameters, get_variant
    from vitkit.tools.flops import fast_macs

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


def rows(pattern: str) -> list[dict]:
    from vitkit.factory import list_models

    return [row(name) for name in list_models(pattern)]


def pretrained_rows(names: list[str]) -> list[dict]:
    from dataclasses import asdict

    from vitkit.weights.pretrained import get_record, list_pretrained

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
    print(f"{'name':<{width}}  {'weights':<{tag_width}}  {'top-1':>5}  {'input':>7}  {'crop':>4}  {'classes':>7}"
          "  licence")
    for r in table:
        top1 = f"{r['top1']:.1f}" if r["top1"] is not None else "-"
        size = "x".join(str(s) for s in r["input_size"])
        print(
            f"{r['model']:<{width}}  {r['tag']:<{tag_width}}  {top1:>5}  {size:>7}  {r['crop_pct']:>4.2f}"
            f"  {r['num_classes']:>7}  {r['license']}"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    from vitkit.factory import list_models

    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no model matches {args.pattern!r}: try `vitkit models` for the full list")
    if getattr(args, "pretrained", False):
        return run_pretrained(names, args.json)
    if args.json:
        print(json.dumps([row(name) for name in names], indent=2))
        return 0
    width = max(len(name) for name in names)
    print(f"{'name':<{width}}  {'family':<7} {'params (M)':>10} {'MACs (G)':>9}  {'input':>9}  {'classes':>7}")
    for name in names:  # a row as soon as it is counted
        r = row(name)
        size = "x".join(str(s) for s in r["img_size"])
        print(
            f"{r['name']:<{width}}  {r['family']:<7} {r['params'] / 1e6:>10.2f} {r['macs'] / 1e9:>9.2f}"
            f"  {size:>9}  {r['num_classes']:>7}",
            flush=True,
        )
    return 0
