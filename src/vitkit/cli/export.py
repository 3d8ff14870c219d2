"""`vitkit export (MODEL | --checkpoint FILE) --output PATH --format onnx|torch-export`: export and check."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export to ONNX or a torch.export program, checked on random inputs",
        description=(
            "Export a model (random weights by name, or a vitkit checkpoint) through torch.export: ONNX by the "
            "dynamo exporter, checked with onnxruntime, or a .pt2 program, checked by loading it. The check runs "
            "two batch sizes with --dynamic-batch and a second image size with --dynamic-size, and fails when the "
            "largest difference from the eager model exceeds 1e-4 of the output's largest magnitude; the output "
            "file is written only when it passes. ONNX needs the export extra: pip install 'vitkit[export]'. "
            "A Swin .pt2 with --dynamic-size is specialised on which stages fit in one window (as at the model's "
            "own size); ONNX has no such limit."
        ),
    )
    p.add_argument("model", nargs="?", default=None, help="registered model name (random weights)")
    p.add_argument("--checkpoint", default=None, help="a vitkit .safetensors file (e.g. a run's best.safetensors)")
    p.add_argument("--output", required=True, help="file to write (.onnx or .pt2); a folder with --format hub")
    p.add_argument(
        "--format",
        choices=("onnx", "torch-export", "hub"),
        default="onnx",
        help="default onnx; hub: a timm / Hugging Face Hub folder of a run (--run DIR) with a model card",
    )
    p.add_argument(
        "--run",
        dest="run_dir",
        metavar="DIR",
        default=None,
        help="with --format hub: the run folder whose best.safetensors is exported",
    )
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (else the batch is fixed at 1)")
    p.add_argument(
        "--dynamic-size",
        action="store_true",
        help="any height/width that is a multiple of the patch size (ViT resamples its position "
        "embedding, Swin pads to whole windows)",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--json", action="store_true", help="print the check as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.format == "hub" or args.run_dir is not None:
        return _run_hub(args)
    from vitkit.tools.export import (  # noqa: PLC0415  fast CLI start-up
        describe,
        export_model,
        load_for_export,
        require_onnx,
    )

    if args.format == "onnx":
        require_onnx()  # before building anything
    model = load_for_export(args.model, args.checkpoint, dynamic_size=args.dynamic_size)
    report = export_model(
        model,
        args.output,
        format=args.format,
        dynamic_batch=args.dynamic_batch,
        dynamic_size=args.dynamic_size,
        opset=args.opset,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else describe(report))
    return 0


def _run_hub(args: argparse.Namespace) -> int:
    from vitkit.tools.hub import export_hub  # noqa: PLC0415  fast CLI start-up

    if args.format != "hub" or args.run_dir is None or args.model or args.checkpoint:
        raise ValueError("a hub folder is exported from a run: vitkit export --format hub --run DIR --output OUT")
    out = export_hub(args.run_dir, args.output)
    print(json.dumps({"output": str(out), "format": "hub"}) if args.json else f"wrote the hub folder {out}")
    return 0
