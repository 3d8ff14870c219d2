"""`vitkit convert SRC DST --model NAME [--to vitkit|timm|hf]`: load any supported checkpoint into
a vitkit model and write it in another format, printing what the load changed."""

from __future__ import annotations

import argparse

import yaml


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between formats",
        description="Load SRC (timm, official DeiT / Swin, HF, torchvision, mmpretrain or JAX .npz; file or "
        "HF directory) into MODEL and save it to DST. Prints the load report.",
    )
    p.add_argument("src", help="checkpoint file or HuggingFace model directory")
    p.add_argument("dst", help="output file (vitkit, timm) or directory (hf)")
    p.add_argument("--model", required=True, help="variant name, e.g. deit_small_patch16_224 (`vitkit models`)")
    p.add_argument("--to", choices=("vitkit", "timm", "hf"), default="vitkit", help="output format (default: vitkit)")
    p.add_argument(
        "--from",
        dest="src_format",
        default="auto",
        choices=("auto", "vitkit", "timm", "deit", "swin", "hf", "torchvision", "mmpretrain", "jax"),
        help="source format (default: detected from the keys)",
    )
    p.add_argument("--num-classes", type=int, help="classes of the output model (a new head if it differs)")
    p.add_argument("--img-size", type=int, help="input size of the output model (position tables resampled)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field of the output model, e.g. --set in_chans=1 (repeatable)",
    )
    p.add_argument("--no-strict", action="store_true", help="load what fits instead of failing on other keys")
    p.set_defaults(run=run)


def parse_overrides(items: list[str]) -> dict:
    """FIELD=VALUE pairs; values are read as YAML scalars / lists (`depth=6`, `depths=[2,2,6,2]`)."""
    fields = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set in_chans=1")
        parsed = yaml.safe_load(value)
        fields[key.strip()] = tuple(parsed) if isinstance(parsed, list) else parsed
    return fields


def run(args: argparse.Namespace) -> int:
    from vitkit.factory import create_model  # noqa: PLC0415  fast CLI start-up
    from vitkit.weights import load_checkpoint, save_checkpoint  # noqa: PLC0415  fast CLI start-up

    fields = parse_overrides(args.set)
    fields.update({k: getattr(args, k) for k in ("num_classes", "img_size") if getattr(args, k) is not None})
    model = create_model(args.model, **fields)
    report = load_checkpoint(model, args.src, format=args.src_format, strict=not args.no_strict)
    print(report)
    save_checkpoint(model, args.dst, format=args.to)
    print(f"wrote {args.dst} ({args.to})")
    return 0
