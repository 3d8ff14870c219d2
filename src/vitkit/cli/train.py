"""`vitkit train`: train a model from a recipe, flags and `--set key=value` overrides."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from vitkit.cli.config_flags import add_config_flags, add_run_flags, requested_fields
from vitkit.train.config import TrainConfig
from vitkit.train.recipes import build_config, list_recipes, load_recipe


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (default recipe: fmnist_demo)",
        description="Train a model. Settings come from a recipe (YAML), then these flags, then --set items; "
        "the resolved config is saved in the run folder.",
    )
    p.add_argument("--recipe", help="shipped recipe name or YAML file (default: fmnist_demo; --list-recipes)")
    p.add_argument("--list-recipes", action="store_true", help="print the shipped recipes and exit")
    add_run_flags(
        p,
        nproc_help="train with N processes on this machine: starts torchrun (one process per GPU; gloo on CPU)",
        set_help="override any config field, e.g. --set label_smoothing=0.0 --set model_args.depth=6",
    )
    add_config_flags(p, TrainConfig)  # --model, --data, --epochs, --batch-size, --lr, ...: one per field
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vitkit.train.supervised import prepare_resume, train  # noqa: PLC0415  fast CLI start-up

    if args.nproc is not None:  # the same command in N processes, through torchrun
        from vitkit.train.parallel import launch  # noqa: PLC0415  fast CLI start-up

        return launch(args.nproc, without_nproc(args.argv))
    if args.list_recipes:
        for name in list_recipes():
            print(name)
        return 0
    fields = requested_fields(args, TrainConfig)
    if args.resume:
        if args.recipe:
            fields["recipe"] = load_recipe(args.recipe)[0]
        if args.output and args.output != args.resume:
            raise ValueError("--resume DIR continues the run in DIR: drop --output or make it the same folder")
        fields.pop("output", None)
        config = prepare_resume(args.resume, fields)
        if args.smoke and not config.smoke:
            raise ValueError("--smoke contradicts the run being resumed (it was not a smoke run)")
        resume = True
    else:
        config, resume = new_run_config(args, fields), False
    from vitkit.train import parallel  # noqa: PLC0415  fast CLI start-up

    try:
        result = train(config, resume=resume)
        parallel.barrier()  # leave together: gloo aborts a rank whose peer left while it still talks
        main = parallel.is_main()
    finally:
        parallel.destroy()
    if not main:  # rank 0 reports
        return 0
    print(f"best val top-1 {result.best_val_top1:.2f}% (epoch {result.best_epoch}, {result.best_source} weights)")
    if result.test is not None:
        t = result.test
        print(f"test top-1 {t['top1']:.2f}%  top-5 {t['top5']:.2f}%  loss {t['loss']:.4f}")
    print(f"run folder: {result.run_dir}")
    print(f"curves: {result.run_dir / 'curves.png'}")
    return 0


def new_run_config(args: argparse.Namespace, fields: dict[str, Any]) -> TrainConfig:
    """The config of a new run: recipe, --smoke, the given fields, and with --finetune the source's
    architecture unless the command line says otherwise."""
    pretrained = None
    if args.finetune:
        from vitkit.train.finetune import finetune_fields  # noqa: PLC0415  fast CLI start-up

        pretrained = finetune_fields(args.finetune) or None
        if pretrained is None and "model" not in fields:
            raise ValueError(f"{args.finetune} does not name its model (not written by vitkit): add --model NAME")
        for key in ("model", "img_size", "in_chans"):
            if pretrained is not None:
                fields.setdefault(key, pretrained[key])
    config = build_config(args.recipe, fields, smoke=args.smoke)
    if config.recipe == "finetune" and not config.finetune:
        raise ValueError("the finetune recipe starts from trained weights: add --finetune RUN|FILE")
    if pretrained is not None and config.model == pretrained["model"]:
        # the recipe's architecture overrides give way to the encoder's; its regularisation stays
        kept = {k: v for k, v in config.model_args.items() if "drop" in k}
        model_args = {**kept, **pretrained["model_args"], **fields.get("model_args", {})}
        config = dataclasses.replace(config, model_args=model_args)
        config.validate()
    return config


def without_nproc(argv: list[str]) -> list[str]:
    """`argv` without `--nproc N` / `--nproc=N` (the processes it starts must not start more)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
