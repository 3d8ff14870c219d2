"""`vitkit predict IMAGE...`: top-k classes with probabilities per image."""

from __future__ import annotations

import argparse
import json

from vitkit.cli.choices import TTA_MODES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify image files with a trained run or checkpoint",
        description="Print the top-k classes and probabilities for each image, using the run's class names "
        "and eval transform.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", dest="run_dir", metavar="DIR",
                     help="a run folder written by `vitkit train` (its best weights)")
    src.add_argument("--checkpoint", metavar="FILE", help="a .safetensors file written by vitkit")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--tta", choices=TTA_MODES, metavar="MODE",
                   help="test-time augmentation (%(choices)s): hflip averages the probabilities of each image and "
                   "its mirror (default: the run's own setting, else none)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vitkit.tools.evaluate import load_inference
    from vitkit.tools.predict import predict
    from vitkit.tools.quantize import int8_inference
    from vitkit.train.parallel import resolve_device
    from vitkit.weights.quantized import is_quantized_file

    if args.checkpoint and is_quantized_file(args.checkpoint):  # `vitkit quantize` output: CPU, no autocast
        inference, device = int8_inference(args.checkpoint, args.device), resolve_device("cpu")
    else:
        device = resolve_device(args.device)
        inference = load_inference(run=args.run_dir, checkpoint=args.checkpoint, device=device)
    results = predict(inference.model, args.images, inference.spec, inference.classes, top_k=args.top_k, device=device,
                      tta=args.tta or inference.config.tta)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for entry in results:
        ranked = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in entry["top"])
        print(f"{entry['image']}: {ranked}")
    return 0
