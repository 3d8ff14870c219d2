"""`vitkit train`: train a model from a recipe, flags and `--set key=value` overrides."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (default recipe: fmnist_demo)",
        description="Train a model. Settings come from a recipe (YAML), then these flags, then --set items; "
        "the resolved config is saved in the run folder.",
    )
    p.add_argument("--recipe", help="shipped recipe name or YAML file (default: fmnist_demo; --list-recipes)")
    p.add_argument("--list-recipes", action="store_true", help="print the shipped recipes and exit")
    p.add_argument("--model", help="vitkit model name or torchvision:NAME (default: the recipe's; "
                   "another model drops the recipe's model_args)")
    p.add_argument("--data", help="fashion-mnist, or an image folder with train/ val/ [test/] (default: the recipe's)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (after warm-up)")
    p.add_argument("--img-size", type=int, help="input size (default: the data's native size or the model's)")
    p.add_argument("--patch-size", type=int, help="patch size (ViT family), sets model_args.patch_size")
    p.add_argument("--output", help="run folder (default: runs/<recipe>-<date>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last finished epoch")
    p.add_argument("--seed", type=int, help="seed: makes the run deterministic")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, help="data-loading processes (default: 0 for in-memory data, else up to 4)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train with N processes on this machine: starts torchrun (one process per GPU; gloo on CPU)")
    p.add_argument("--fsdp", action="store_const", const=True,
                   help="with several processes: shard parameters, gradients and optimizer state (FSDP2) "
                   "instead of replicating them (DDP)")
    p.add_argument("--fsdp-offload", action="store_const", const=True,
                   help="with --fsdp: keep parameters and optimizer state in CPU memory between uses (needs CUDA)")
    p.add_argument("--train-samples", type=int, help="train on a fixed random subset of N images")
    p.add_argument("--val-samples", type=int, help="validate on a fixed random subset of N images")
    p.add_argument("--test-samples", type=int, help="test on a fixed random subset of N images")
    p.add_argument("--val-split", type=float, help="fraction of train held out for validation when there is no val/ (0.1)")
    p.add_argument("--skip-corrupt", action="store_const", const=True, help="skip unreadable images (counted in the log)")
    p.add_argument("--teacher", help="distillation teacher: vitkit NAME, torchvision:NAME, a run folder or a .safetensors file")
    p.add_argument("--distillation", choices=("none", "soft", "hard"), help="knowledge distillation (DeiT): none, soft or hard")
    p.add_argument("--distill-alpha", type=float, help="weight of the distillation term (0.5)")
    p.add_argument("--distill-tau", type=float, help="soft distillation temperature (1.0)")
    p.add_argument("--smoke", action="store_true", help="shrink the recipe to seconds: few samples, 1 epoch, tiny model")
    p.add_argument("--finetune", metavar="RUN|FILE",
                   help="start from a `vitkit pretrain` run (its encoder), a `vitkit train` run (best weights) or a "
                   "checkpoint file (any format `vitkit convert` reads); takes its model, model_args, img_size and "
                   "in_chans unless given. A new --img-size resamples position embeddings / Swin position tables; "
                   "a new class count re-initialises the head")
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay in (0, 1]: block i of L trains at "
                   "lr x decay^(L + 1 - i) (SimMIM fine-tuning: 0.9 for Swin, 0.65 for ViT)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set label_smoothing=0.0 --set model_args.depth=6")
    # -- experiment tracking (issue 19; config fields `log`, `mlflow_uri`) -----------------------------
    p.add_argument("--log", help="trackers: tensorboard, mlflow or both (tensorboard,mlflow), none; default auto: "
                   "TensorBoard when installed")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default sqlite:///runs/mlflow.db, artifacts in "
                   "runs/mlruns)")
    p.set_defaults(run=run)


TRAIN_FLAGS = ("model", "data", "epochs", "batch_size", "lr", "img_size", "output", "seed", "device", "workers",
               "threads", "compile", "fsdp", "fsdp_offload", "train_samples", "val_samples", "test_samples",
               "val_split", "skip_corrupt", "finetune", "layer_decay", "teacher", "distillation", "distill_alpha",
               "distill_tau", "log", "mlflow_uri")


def requested_fields(args: argparse.Namespace, names: tuple[str, ...] = TRAIN_FLAGS) -> dict[str, Any]:
    """The config fields given explicitly on the command line: the flags `names` that were set,
    `--patch-size`, then the `--set` items (model_args entries merged)."""
    from vitkit.train.config import parse_set

    fields = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if getattr(args, "patch_size", None) is not None:
        fields["model_args"] = {"patch_size": args.patch_size}
    for key, value in parse_set(args.sets).items():
        if key == "model_args":
            fields.setdefault("model_args", {}).update(value)
        else:
            fields[key] = value
    return fields


def run(args: argparse.Namespace) -> int:
    from vitkit.train.config import build_config, list_recipes, load_recipe
    from vitkit.train.runner import prepare_resume, train

    if args.nproc is not None:  # the same command in N processes, through torchrun
        from vitkit.train.parallel import launch

        return launch(args.nproc, without_nproc(args.argv))
    if args.list_recipes:
        for name in list_recipes():
            print(name)
        return 0
    fields = requested_fields(args)
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
        pretrained = None
        if args.finetune:  # the source's architecture, unless the command line says otherwise
            from vitkit.train.finetune import finetune_fields

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
        resume = False
    from vitkit.train import parallel

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
