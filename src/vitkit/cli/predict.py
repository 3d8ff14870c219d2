"""`vitkit predict IMAGE...`: top-k classes with probabilities per image."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vitkit.train.config import TTA_MODES


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
    p.add_argument("--tta", choices=TTA_MODES,
                   help="hflip: average the probabilities of each image and its mirror (default: the run's own "
                   "setting, else none)")
    p.add_argument("--amp", choices=("off", "bf16", "auto"),
                   help="bf16: weights and activations in bfloat16; auto: bf16 on CUDA and on CPUs with AMX or "
                   "AVX512_BF16, else fp32 (default: off)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.set_defaults(run=run)


def apply_amp(inference: Any, amp: str, device: Any, quiet: bool = False) -> None:
    """Resolve `--amp` (printing the choice unless quiet); bf16 holds the model's weights in bf16.

    The config's amp becomes off either way: a bf16 model needs no autocast, which would only keep
    its linear layers off the oneDNN path (`vitkit.layers.linear`)."""
    import dataclasses

    from vitkit.core.hardware import describe_amp, resolve_amp
    from vitkit.layers.precision import cast_for_inference

    dtype, record = resolve_amp(amp, device)
    if not quiet:
        print(describe_amp(record))
    cast_for_inference(inference.model, dtype)
    inference.config = dataclasses.replace(inference.config, amp="off")


def run(args: argparse.Namespace) -> int:
    from vitkit.tools.evaluate import load_inference
    from vitkit.tools.predict import predict
    from vitkit.train.parallel import resolve_device

    device = resolve_device(args.device)
    inference = load_inference(run=args.run_dir, checkpoint=args.checkpoint, device=device)
    if args.amp is not None:
        apply_amp(inference, args.amp, device, quiet=args.json)
    results = predict(inference.model, args.images, inference.spec, inference.classes, top_k=args.top_k, device=device,
                      tta=args.tta or inference.config.tta)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for entry in results:
        ranked = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in entry["top"])
        print(f"{entry['image']}: {ranked}")
    return 0
