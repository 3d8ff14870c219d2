"""`vitkit flops MODEL [--img-size N] [--levels L] [--json]`: parameters and MACs per image."""

from __future__ import annotations

import argparse
import json

CONVENTION = (
    "1 MAC = 2 FLOPs. Counted by torch.utils.flop_counter.FlopCounterMode on the meta device: linear layers, "
    "matrix products, "
    "convolutions (the patch embedding) and the attention products inside "
    "scaled_dot_product_attention; element-wise ops, norms, softmax and activations are not counted."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flops",
        help="parameters and multiply-accumulates (MACs) per image, with a per-module breakdown",
        description="Count a model's parameters and multiply-accumulates (MACs) per image, with a per-module "
        "breakdown. " + CONVENTION,
    )
    p.add_argument("model", help="registered model name (see `vitkit models`)")
    p.add_argument("--img-size", type=int, default=None, help="square input size (default: the model's own)")
    p.add_argument(
        "--levels",
        type=int,
        default=2,
        help="module levels in the breakdown (2: blocks.0 / layers.0; 4 also shows each block's attention "
        "products; default 2)",
    )
    p.add_argument("--json", action="store_true", help='print {"model", "img_size", "params", "macs", "breakdown"}')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vitkit.tools.flops import macs_report  # noqa: PLC0415  fast CLI start-up

    report = macs_report(args.model, img_size=args.img_size, levels=args.levels)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    h, w = report.img_size
    print(
        f"{report.model} at {h}x{w}: {report.params / 1e6:.2f} M parameters, {report.macs / 1e9:.3f} G MACs per image"
    )
    width = max(len(k) for k in report.breakdown)
    print(f"{'module':<{width}}  {'MACs (M)':>10}  {'share':>6}")
    for name, macs in report.breakdown.items():
        print(f"{name:<{width}}  {macs / 1e6:>10.2f}  {100 * macs / report.macs:>5.1f}%")
    print("(1 MAC = 2 FLOPs; attention products counted, element-wise ops not)")
    return 0
