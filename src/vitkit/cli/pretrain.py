"""`vitkit pretrain`: self-supervised SimMIM pre-training; the run saves the encoder for fine-tuning."""

from __future__ import annotations

import argparse

from vitkit.cli.config_flags import add_config_flags, add_run_flags, requested_fields
from vitkit.cli.train import without_nproc
from vitkit.pretrain.settings import MASK_RULE, PretrainConfig, build_configs, prepare_resume
from vitkit.train.config import TrainConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pre-training (SimMIM masked image modelling); labels are not needed",
        description="Pre-train a ViT / DeiT / Swin / Swin V2 encoder with SimMIM: random mask patches are "
        "replaced by a learned mask token and a light head regresses their pixels (L1). The run folder holds "
        "encoder.safetensors (the encoder alone) for `vitkit train --finetune RUN`, reconstructions.png and "
        f"the usual training files. Rule: {MASK_RULE}.",
    )
    p.add_argument("--recipe", help="shipped recipe name or YAML file (default: simmim_fmnist)")
    add_run_flags(
        p,
        nproc_help="pre-train with N processes on this machine (DDP through torchrun; gloo on CPU)",
        set_help="override any config field: training fields as `vitkit train`, and mask_ratio, "
        "mask_patch_size, lr_schedule (cosine|multistep), milestones, gamma",
    )
    # --mask-ratio, --mask-patch-size, ... and the training fields (--model, --data, --epochs, ...)
    add_config_flags(p, PretrainConfig, TrainConfig)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vitkit.pretrain.pretraining import pretrain  # noqa: PLC0415  fast CLI start-up

    if args.nproc is not None:  # the same command in N processes, through torchrun
        from vitkit.train.parallel import launch  # noqa: PLC0415  fast CLI start-up

        return launch(args.nproc, without_nproc(args.argv))
    fields = requested_fields(args, PretrainConfig, TrainConfig)
    if args.resume:
        if args.output and args.output != args.resume:
            raise ValueError("--resume DIR continues the run in DIR: drop --output or make it the same folder")
        fields.pop("output", None)
        config, pre = prepare_resume(args.resume, fields)
        resume = True
    else:
        config, pre = build_configs(args.recipe, fields, smoke=args.smoke)
        resume = False
    from vitkit.train import parallel  # noqa: PLC0415  fast CLI start-up

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
