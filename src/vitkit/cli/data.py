"""`vitkit data shard|stats|bench SOURCE`: WebDataset shards, a description, and loader throughput of a data source.

SOURCE is anything `--data` takes: fashion-mnist, an image folder, a .csv manifest, wds:PATTERN, hf:PATH.
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="shard, describe or benchmark a data source",
        description="Work with a data source: anything --data takes (fashion-mnist, an image folder, "
        "a .csv manifest with path,label[,split], wds:PATTERN shards, hf:PATH saved datasets).",
    )
    tools = p.add_subparsers(dest="data_command", required=True, metavar="TOOL")

    shard = tools.add_parser(
        "shard",
        help="write WebDataset tar shards (PNG + class index) and index.json",
        description="Write every split of SOURCE as {split}-000000.tar, ... (lossless PNG bytes "
        "and a .cls label per sample) plus index.json; train with --data wds:OUTPUT.",
    )
    shard.add_argument("source")
    shard.add_argument("--output", required=True, help="a new or empty folder")
    shard.add_argument("--shard-size", type=int, default=1000, help="samples per shard (1000)")
    _common(shard)

    stats = tools.add_parser("stats", help="images per class and split, sizes, modes, mean and std")
    stats.add_argument("source")
    stats.add_argument("--limit", type=int, default=10_000, help="train images used for the mean and std (10000)")
    _common(stats)

    bench = tools.add_parser("bench", help="loader images/s at 0, 1 and 2 workers, beside timm's create_loader")
    bench.add_argument("source")
    bench.add_argument("--images", type=int, default=1024, help="train images per measurement (1024)")
    bench.add_argument("--batch-size", type=int, default=64)
    bench.add_argument("--img-size", type=int, help="input size (default: the data's native size, else 224)")
    bench.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    bench.add_argument("--rounds", type=int, default=2, help="passes per loader, best kept (2)")
    bench.add_argument("--no-timm", action="store_true", help="time vitkit's loader only")
    _common(bench)
    p.set_defaults(run=run)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val-split", type=float, default=0.1, help="held out of train when the source has no val (0.1)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from vitkit.tools import data_tools  # noqa: PLC0415  fast CLI start-up

    if args.data_command == "shard":
        report = data_tools.write_shards(args.source, args.output, args.shard_size, val_split=args.val_split)
        print(json.dumps(report, indent=2) if args.json else _shard_text(report))
    elif args.data_command == "stats":
        report = data_tools.data_stats(args.source, args.limit, val_split=args.val_split)
        print(json.dumps(report, indent=2) if args.json else _stats_text(report))
    else:
        rows = data_tools.data_bench(
            args.source,
            workers=tuple(args.workers),
            images=args.images,
            batch_size=args.batch_size,
            img_size=args.img_size,
            timm=not args.no_timm,
            rounds=args.rounds,
            val_split=args.val_split,
        )
        if args.json:
            print(json.dumps([{**vars(r), "images_per_s": r.images_per_s} for r in rows], indent=2))
        else:
            print(f"{'loader':8} {'workers':>7} {'images':>7} {'img/s':>9}")
            for r in rows:
                print(f"{r.loader:8} {r.workers:>7} {r.images:>7} {r.images_per_s:>9.1f}")
    return 0


def _shard_text(report: dict) -> str:
    parts = [f"{k}: {v['samples']} samples in {v['shards']} shard(s)" for k, v in report.items() if isinstance(v, dict)]
    return f"wrote {report['output']} ({report['classes']} classes): " + "; ".join(parts)


def _stats_text(report: dict) -> str:
    present = [s for s, ok in report["splits"].items() if ok]
    lines = [f"{report['source']}: {len(report['classes'])} classes; splits: {', '.join(present)}"]
    for name, part in report["per_split"].items():
        lines.append(
            f"{name}: {part['images']} images; modes {part['modes']}; "
            f"sizes {part['sizes']} ({part['distinct_sizes']} distinct)"
        )
        lines.append("  per class: " + ", ".join(f"{k} {v}" for k, v in part["per_class"].items()))
    if "mean" in report:
        lines.append(f"mean {report['mean']}, std {report['std']} (over {report['stats_images']} train images)")
    return "\n".join(lines)
