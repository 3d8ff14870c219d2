"""`vitkit pretrain`: self-supervised SimMIM pre-training; the run saves the encoder for fine-tuning."""

from __future__ import annotations

import argparse

MASK_RULE = (
    "the mask patch must be a multiple of the model's patch size and divide the image size "
    "(the paper: 32 at 192 px; for 32x32 images use e.g. 8 with Swin's 4x4 patches)"
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pre-training (SimMIM masked image modelling); labels are not needed",
        description="Pre-train a ViT / DeiT / Swin / Swin V2 encoder with SimMIM: random mask patches are "
        "replaced by a learned mask token and a light head regresses their pixels (L1). The run folder holds "
        "encoder.safetensors (the encoder alone) for `vitkit train --finetune RUN`, reconstructions.png and "
        f"the usual training files. Rule: {MASK_RULE}.",
    )
    p.add_argument("--method", choices=("simmim",), default=None, help="pre-training method (simmim)")
    p.add_argument("--recipe", help="shipped recipe name or YAML file (default: simmim_fmnist)")
    p.add_argument("--model", help="vitkit ViT / DeiT / Swin / Swin V2 name (default: the recipe's)")
    p.add_argument("--data", help="fashion-mnist, an image folder (train/ [val/]), or an unlabelled folder of images")
    p.add_argument("--mask-ratio", type=float, help="fraction of mask patches masked (default 0.6)")
    p.add_argument("--mask-patch-size", type=int, help=f"mask patch side in pixels; {MASK_RULE}")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (after warm-up)")
    p.add_argument("--img-size", type=int, help="input size (Swin: a multiple of 32, the encoder's stride)")
    p.add_argument("--output", help="run folder (default: runs/<recipe>-<date>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last finished epoch")
    p.add_argument("--seed", type=int, help="seed: makes the run deterministic")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, help="data-loading processes")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="pre-train with N processes on this machine (DDP through torchrun; gloo on CPU)")
    p.add_argument("--train-samples", type=int, help="pre-train on a fixed random subset of N images")
    p.add_argument("--val-samples", type=int, help="measure the val loss on a fixed random subset of N images")
    p.add_argument("--val-split", type=float, help="fraction held out for validation when there is no val/ (0.1)")
    p.add_argument("--skip-corrupt", action="store_const", const=True, help="skip unreadable images (counted)")
    p.add_argument("--smoke", action="store_true", help="shrink the recipe to seconds: few samples, 1 epoch, tiny model")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field: training fields as `vitkit train`, and mask_ratio, "
                   "mask_patch_size, lr_schedule (cosine|multistep), milestones, gamma")
    p.set_defaults(run=run)


PRETRAIN_FLAGS = ("model", "data", "epochs", "batch_size", "lr", "img_size", "output", "seed", "device", "workers",
                  "threads", "compile", "train_samples", "val_samples", "val_split", "skip_corrupt",
                  "method", "mask_ratio", "mask_patch_size")


def requested_fields(args: argparse.Namespace) -> dict:
    """The pre-training fields given on the command line (flags, then --set), as `vitkit train` reads them."""
    from vitkit.cli import train

    return train.requested_fields(args, PRETRAIN_FLAGS)


def run(args: argparse.Namespace) -> int:
    from vitkit.pretrain.runner import build_configs, prepare_resume, pretrain

    if args.nproc is not None:  # the same command in N processes, through torchrun
        from vitkit.cli.train import without_nproc
        from vitkit.train.parallel import launch

        return launch(args.nproc, without_nproc(args.argv))
    fields = requested_fields(args)
    if args.resume:
        if args.output and args.output != args.resume:
            raise ValueError("--resume DIR continues the run in DIR: drop --output or make it the same folder")
        fields.pop("output", None)
        config, pre = prepare_resume(args.resume, fields)
        resume = True
    else:
        config, pre = build_configs(args.recipe, fields, smoke=args.smoke)
        resume = False
    from vitkit.train import parallel

    try:
        result = pretrain(config, pre, resume=resume)
        parallel.barrier()  # leave together
        main = parallel.is_main()
    finally:
        parallel.destroy()
    if not main:
        return 0
    print(f"masked L1 loss: train {result.final_train_loss:.4f}, val {result.final_val_loss:.4f}")
    print(f"encoder: {result.encoder} (fine-tune with `vitkit train --finetune {result.run_dir}`)")
    print(f"reconstructions: {result.run_dir / 'reconstructions.png'}")
    print(f"run folder: {result.run_dir}")
    return 0
