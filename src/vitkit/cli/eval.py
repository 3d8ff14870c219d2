"""`vitkit eval`: top-1, top-5 and loss of a run, a checkpoint or a pretrained model on a split."""

from __future__ import annotations

import argparse
import json

from vitkit.cli.choices import add_inference_flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a run, checkpoint or pretrained model",
        description="Evaluate on a data split. With --run, the run's best weights, transforms, split seed and "
        "subsets are used, so the numbers equal those the run logged.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", dest="run_dir", metavar="DIR", help="a run folder written by `vitkit train`")
    src.add_argument("--checkpoint", metavar="FILE", help="a .safetensors file written by vitkit, or a timm Hub folder")
    src.add_argument("--model", metavar="NAME", help="a vitkit model name, with --pretrained")
    p.add_argument(
        "--pretrained",
        nargs="?",
        const=True,
        default=False,
        metavar="SOURCE",
        help="with --model: its default pretrained weights, or a local checkpoint path",
    )
    p.add_argument("--data", help="fashion-mnist or an image folder (default: the run's data)")
    p.add_argument("--split", choices=("val", "test"), help="default: test when the data has one, else val")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--val-samples", type=int, help="evaluate a fixed random subset of N val images")
    count.add_argument("--test-samples", type=int, help="evaluate a fixed random subset of N test images")
    p.add_argument("--img-size", type=int, help="input size (default: the model's)")
    p.add_argument("--crop-pct", type=float, help="resize to img_size / crop_pct, centre-crop img_size")
    p.add_argument("--batch-size", type=int, help="default: the run's eval batch size")
    add_inference_flags(p, amp_default="the run's own setting, so the figures equal those it logged")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--workers", type=int, help="data-loading processes")
    p.add_argument("--out", metavar="FILE.json", help="also write the metrics as JSON")
    p.add_argument("--confusion", metavar="FILE.png", help="also plot the confusion matrix")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vitkit.core.files import write_text  # noqa: PLC0415  fast CLI start-up
    from vitkit.tools.inference import apply_amp, evaluate_split, inference_device, load_inference  # noqa: PLC0415  fast CLI start-up
    from vitkit.train.plots import plot_confusion  # noqa: PLC0415  fast CLI start-up

    if args.pretrained and not args.model:
        raise ValueError("--pretrained goes with --model NAME")
    if args.run_dir is None and args.data is None:
        raise ValueError("--checkpoint and --model need --data (fashion-mnist or an image folder)")
    device = inference_device(args.device, args.checkpoint)  # an int8 file: the CPU
    inference = load_inference(
        run=args.run_dir, checkpoint=args.checkpoint, model=args.model, pretrained=args.pretrained, device=device
    )
    if args.amp is not None:
        apply_amp(inference, args.amp, device, say=print)
    split = args.split or ("val" if args.val_samples is not None else "test" if args.test_samples is not None else None)
    if (split == "test" and args.val_samples is not None) or (split == "val" and args.test_samples is not None):
        raise ValueError(f"--split {split} takes --{split}-samples, not the other split's")
    samples = args.val_samples if args.val_samples is not None else args.test_samples
    result = evaluate_split(
        inference,
        data=args.data,
        split=split,
        samples=samples,
        img_size=args.img_size,
        crop_pct=args.crop_pct,
        batch_size=args.batch_size,
        device=device,
        workers=args.workers,
        confusion=args.confusion is not None,
        tta=args.tta,
    )
    print(
        f"{result['split']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
        f"({result['samples']} images, {result['images_per_s']:.0f} images/s"
        + (", with the mirror images (--tta hflip))" if result["tta"] == "hflip" else ")")
    )
    if args.confusion:
        plot_confusion(
            result["confusion"],
            result["classes"],
            args.confusion,
            title=f"{result['split']} top-1 {result['top1']:.2f}%",
        )
        print(f"confusion matrix: {args.confusion}")
    if args.out:
        keys = ("top1", "top5", "loss", "images_per_s", "split", "samples", "data", "checkpoint", "tta")
        write_text(args.out, json.dumps({k: result[k] for k in keys}, indent=2) + "\n")
    return 0
