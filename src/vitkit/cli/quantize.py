"""`vitkit quantize`: an int8 model for CPU inference, written only when it keeps the fp32 accuracy."""

from __future__ import annotations

import argparse

from vitkit.cli.choices import LazyChoices

SCHEMES = LazyChoices("vitkit.tools.quantize", "SCHEMES")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="write an int8 model for CPU inference, behind an accuracy gate",
        description="Quantise the Linear layers to int8 (torch.ao dynamic quantisation) and measure top-1 of the "
        "fp32 and int8 models on the validation split (the one `vitkit eval --run DIR --split val` uses). "
        "The int8 model is written only when it loses at most --max-drop points.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", dest="run_dir", metavar="DIR", help="a run folder written by `vitkit train`")
    src.add_argument("--checkpoint", metavar="FILE", help="a .safetensors file written by vitkit (needs --data)")
    p.add_argument("--data", help="fashion-mnist or an image folder (default: the run's data)")
    p.add_argument("--out", metavar="FILE", help="default: DIR/int8.safetensors, or FILE's name + .int8.safetensors")
    p.add_argument(
        "--max-drop",
        type=float,
        default=0.5,
        metavar="POINTS",
        help="largest allowed loss of val top-1, in percentage points (default: 0.5)",
    )
    p.add_argument(
        "--scheme",
        choices=SCHEMES,
        default="per-channel",
        metavar="SCHEME",
        help="int8 weight scales: %(choices)s (default: per-channel)",
    )
    p.add_argument("--val-samples", type=int, help="gate on a fixed random subset of N val images (default: the run's)")
    p.add_argument("--test", action="store_true", help="also report both models' top-1 on the test split")
    p.add_argument("--batch-size", type=int, help="default: the run's eval batch size")
    p.add_argument("--workers", type=int, help="data-loading processes")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vitkit.tools.quantize import quantize  # noqa: PLC0415  fast CLI start-up

    result = quantize(
        run=args.run_dir,
        checkpoint=args.checkpoint,
        data=args.data,
        out=args.out,
        max_drop=args.max_drop,
        scheme=args.scheme,
        val_samples=args.val_samples,
        batch_size=args.batch_size,
        workers=args.workers,
        test=args.test,
    )
    print(
        f"val top-1: fp32 {result.fp32_top1:.2f}%  int8 {result.int8_top1:.2f}%  drop {result.drop:.2f} points "
        f"(limit {result.max_drop:g}, {result.samples} images)"
    )
    if result.test is not None:
        t = result.test
        print(
            f"test top-1: fp32 {t['fp32_top1']:.2f}%  int8 {t['int8_top1']:.2f}%  "
            f"drop {t['fp32_top1'] - t['int8_top1']:.2f} points"
        )
    print(f"int8 model: {result.written}")
    from vitkit.core.hardware import vnni_flags  # noqa: PLC0415  fast CLI start-up

    if not vnni_flags():
        print(
            "note: this CPU has no VNNI (avx512_vnni, avx_vnni or amx_int8): its int8 products run at about its "
            "fp32 rate, and int8 inference measured 0.95-1.23x fp32 on such a CPU (docs/INT8.md)"
        )
    return 0
