"""`vitkit predict IMAGE...`: top-k classes with probabilities per image."""

from __future__ import annotations

import argparse
import json
import sys

from vitkit.cli.choices import add_inference_flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify image files with a trained run or checkpoint",
        description="Print the top-k classes and probabilities for each image, using the run's class names "
        "and eval transform.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders (their images, recursively)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--run", dest="run_dir", metavar="DIR", help="a run folder written by `vitkit train` (its best weights)"
    )
    src.add_argument("--checkpoint", metavar="FILE", help="a .safetensors file written by vitkit")
    p.add_argument("--top-k", type=int, default=5)
    add_inference_flags(p, amp_default="off")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=int, default=64, help="images classified together (default 64)")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (default 2; 0: in this one)")
    p.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave out images that cannot be decoded (listed on stderr at the end) instead of stopping",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list instead of lines (streamed as well)")
    p.set_defaults(run=run)


def _line(entry: dict) -> str:
    ranked = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in entry["top"])
    return f"{entry['image']}: {ranked}"


def run(args: argparse.Namespace) -> int:
    from vitkit.tools.inference import apply_amp, inference_device, load_inference  # noqa: PLC0415  fast CLI start-up
    from vitkit.tools.predict import (  # noqa: PLC0415  fast CLI start-up
        PredictStats,
        check_options,
        expand_images,
        iter_predictions,
    )

    check_options(args.top_k, args.tta or "none", args.batch_size, args.workers)  # flags first, before any loading
    paths = expand_images(args.images)  # a mistyped path fails before the model loads
    device = inference_device(args.device, args.checkpoint)  # an int8 file: the CPU
    inference = load_inference(run=args.run_dir, checkpoint=args.checkpoint, device=device)
    if args.amp is not None:
        apply_amp(inference, args.amp, device, say=None if args.json else print)
    stats = PredictStats()
    results = iter_predictions(
        inference.model,
        paths,
        inference.spec,
        inference.classes,
        top_k=args.top_k,
        device=device,
        tta=args.tta or inference.settings.tta,
        batch_size=args.batch_size,
        workers=args.workers,
        skip_corrupt=args.skip_corrupt,
        stats=stats,
    )
    # one line (or one JSON list item) per image as its batch finishes: nothing accumulates
    opened = False
    for entry in results:
        if args.json:
            print(("[\n" if not opened else ",\n") + json.dumps(entry), end="")
            opened = True
        else:
            print(_line(entry))
    if args.json:
        print("[]" if not opened else "\n]")
    if stats.skipped:
        shown = ", ".join(map(str, stats.skipped[:5])) + (" ..." if len(stats.skipped) > 5 else "")
        print(f"vitkit predict: skipped {len(stats.skipped)} unreadable image(s): {shown}", file=sys.stderr)
    return 0
