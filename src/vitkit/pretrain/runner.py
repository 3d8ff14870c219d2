"""A SimMIM pre-training run: data (labels optional) -> SimMIM -> epochs -> run folder.

The run folder is `vitkit train`'s: config.yaml (the training config), pretrain.yaml (the masking
and schedule settings), run.json, metrics.jsonl (epoch lines carry train_loss, val_loss, lr,
images_per_s; step lines as in training), state.pt, curves.png, plus
  encoder.safetensors   the encoder alone (vitkit format, no head): `vitkit train --finetune RUN`
  reconstructions.png   inputs, masks and reconstructions of a few validation images.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from PIL import Image, UnidentifiedImageError

from vitkit.core.files import write_text
from vitkit.pretrain.optim import build_adamw, warmup_schedule
from vitkit.pretrain.simmim import MaskGenerator, build_simmim, evaluate, save_encoder, save_reconstructions
from vitkit.pretrain.simmim import train_one_epoch

ENCODER, RECONSTRUCTIONS, PRETRAIN_CONFIG = "encoder.safetensors", "reconstructions.png", "pretrain.yaml"
DEFAULT_RECIPE = "simmim_fmnist"


@dataclass
class PretrainConfig:
    """Masked-image-modelling settings (the rest of a run's settings are a `TrainConfig`)."""

    method: Literal["simmim"] = "simmim"
    mask_ratio: float = 0.6  # fraction of mask patches replaced by the mask token
    mask_patch_size: int = 32  # a multiple of the model's patch size that divides the image
    lr_schedule: Literal["cosine", "multistep"] = "cosine"  # after the linear warm-up
    milestones: list[int] = field(default_factory=list)  # multistep: epochs where the lr is multiplied by gamma
    gamma: float = 0.1

    def validate(self) -> None:
        if self.method != "simmim":
            raise ValueError(f"unknown pre-training method {self.method!r}: vitkit offers simmim")
        if self.lr_schedule not in ("cosine", "multistep"):
            raise ValueError(f"lr_schedule must be cosine or multistep, got {self.lr_schedule!r}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


PRETRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(PretrainConfig))


def split_fields(fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training-config fields, pre-training fields) of a recipe or command-line mapping."""
    pre = {k: v for k, v in fields.items() if k in PRETRAIN_FIELDS}
    return {k: v for k, v in fields.items() if k not in PRETRAIN_FIELDS}, pre


def make_pretrain_config(fields: dict[str, Any]) -> PretrainConfig:
    """A `PretrainConfig` from a mapping whose values may be strings (`--set mask_ratio=0.5`)."""
    defaults = PretrainConfig()
    changes = {}
    for key, value in fields.items():
        kind = type(getattr(defaults, key))
        try:
            if kind is list:
                value = yaml.safe_load(value) if isinstance(value, str) else value
                value = [_integer(v) for v in ([value] if isinstance(value, (int, float)) else value)]
            elif kind is int:
                value = _integer(value)
            elif kind is float:
                value = float(value)
        except (TypeError, ValueError):
            kind_name = {list: "a list of epochs", int: "an integer", float: "a number"}[kind]
            raise ValueError(f"{key} must be {kind_name}, got {fields[key]!r}") from None
        changes[key] = value
    config = dataclasses.replace(defaults, **changes)
    config.validate()
    return config


def _integer(value: Any) -> int:
    number = float(value)
    if not number.is_integer() or isinstance(value, bool):
        raise ValueError
    return int(number)


def build_configs(recipe: str | None, fields: dict[str, Any], smoke: bool = False):
    """(TrainConfig, PretrainConfig): defaults < recipe < --smoke < flags and --set items."""
    from vitkit.train.config import TrainConfig, load_recipe, merge_fields, shrink_for_smoke

    name, recipe_fields = load_recipe(recipe or DEFAULT_RECIPE, kind="pretrain")
    recipe_train, recipe_pre = split_fields(recipe_fields)
    given_train, given_pre = split_fields({k: v for k, v in fields.items() if v is not None})
    config = dataclasses.replace(merge_fields(TrainConfig(), recipe_train), recipe=name)
    if given_train.get("model") not in (None, config.model):
        # the recipe's model_args describe the recipe's model
        config = dataclasses.replace(config, model=given_train["model"], model_args={})
    if smoke:
        config = shrink_for_smoke(config)
    config = merge_fields(config, given_train)
    config.validate()
    return config, make_pretrain_config({**recipe_pre, **given_pre})


def load_run_configs(run_dir: str | os.PathLike):
    """The (TrainConfig, PretrainConfig) saved in a pre-training run folder."""
    from vitkit.train.config import load_run_config

    path = Path(run_dir) / PRETRAIN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a vitkit pre-training run (no {PRETRAIN_CONFIG})")
    return load_run_config(run_dir), make_pretrain_config(yaml.safe_load(path.read_text()) or {})


def prepare_resume(run_dir: str | os.PathLike, requested: dict[str, Any]):
    """The saved configs of `run_dir`, with runtime fields from `requested`; contradictions are errors."""
    from vitkit.train.config import RUNTIME_FIELDS, apply_fields, check_resume_compatible

    saved, saved_pre = load_run_configs(run_dir)
    train_fields, pre_fields = split_fields(requested)
    check_resume_compatible(saved, train_fields)
    conflicts = [
        f"{k}={v!r} (run has {getattr(saved_pre, k)!r})"
        for k, v in dataclasses.asdict(make_pretrain_config(pre_fields)).items()
        if k in pre_fields and getattr(saved_pre, k) != v
    ]
    if conflicts:
        raise ValueError(f"--resume: these settings contradict the run's {PRETRAIN_CONFIG}: {'; '.join(conflicts)}")
    runtime = {k: v for k, v in train_fields.items() if k in RUNTIME_FIELDS and k != "output"}
    return dataclasses.replace(apply_fields(saved, runtime), output=str(run_dir)), saved_pre


# -- data --------------------------------------------------------------------------------------------
def load_pretrain_data(config):
    """Train and val splits of `config.data`: Fashion-MNIST, a labelled image folder (train/ and
    val/, or train/ with a held-out fraction), or an unlabelled folder of images (any nesting),
    from which `val_split` is held out. Labels are loaded where they exist and ignored."""
    from vitkit.data.datasets import load_data

    root = Path(config.data).expanduser()
    if config.data.lower() in ("fashion-mnist", "fashion_mnist", "fmnist") or (root / "train").is_dir():
        return load_data(config, ("train", "val"))
    return _load_unlabelled(config, root)


def _load_unlabelled(config, root: Path):
    from vitkit.data.datasets import LoadedData, SplitData, holdout, subset
    from vitkit.data.folder import IMAGE_EXTENSIONS, detect_channels
    from vitkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {root} does not exist: give a folder of images (labels not needed) or --data fashion-mnist"
        )
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    samples, skipped = [], []
    for path in files:
        try:
            with Image.open(path) as img:
                if config.skip_corrupt:
                    img.load()  # a full decode also catches truncated files
                else:
                    img.verify()
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            if not config.skip_corrupt:
                raise ValueError(
                    f"cannot read image {path}: {err}; fix or remove the file, or pass --skip-corrupt to skip such files"
                ) from None
            skipped.append(path)
            continue
        samples.append((path, 0))
    if not samples:
        raise ValueError(f"{root} holds no readable images ({', '.join(IMAGE_EXTENSIONS)})")
    if config.val_split <= 0:
        raise ValueError("an unlabelled folder has no val split: hold out part of it with --val-split 0.1")
    pool = SplitData(samples=samples)
    train_idx, val_idx = holdout(len(pool), config.val_split, config.split_seed)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise ValueError(f"{root} has {len(samples)} images: too few to hold out a val split of {config.val_split}")
    splits = {"train": pool.select(train_idx), "val": pool.select(val_idx)}
    counts = {"train": config.train_samples, "val": config.val_samples}
    for name, stream in (("train", 1), ("val", 2)):
        index = subset(len(splits[name]), counts[name], config.split_seed * 1000 + stream)
        if index is not None:
            splits[name] = splits[name].select(index)
    in_chans = detect_channels(samples)
    return LoadedData(
        source=str(root), classes=[], in_chans=in_chans, native_size=None,
        mean=IMAGENET_MEAN if in_chans == 3 else [0.5], std=IMAGENET_STD if in_chans == 3 else [0.5],
        splits=splits, skipped=skipped,
    )


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class PretrainResult:
    run_dir: Path
    encoder: Path
    final_train_loss: float
    final_val_loss: float


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def pretrain(config, pre: PretrainConfig, *, resume: bool = False) -> PretrainResult:
    """Pre-train `config.model` with SimMIM in the run folder `config.output` (continued with `resume`)."""
    from vitkit.train.runner import prepare_run, runtime

    if config.fsdp:
        raise ValueError("vitkit pretrain runs on DDP: drop --fsdp")
    if config.grad_accum != 1:
        raise ValueError("pre-training steps every batch: grad_accum must be 1 (raise batch_size instead)")
    if config.model.startswith("torchvision:"):
        raise ValueError("SimMIM pre-trains vitkit ViT / DeiT / Swin / Swin V2 models, not torchvision ones")
    # several processes (torchrun / --nproc): rank 0 decides the folder and seed, DDP keeps ranks in step
    device, run_dir, config, deterministic = prepare_run(config, resume)
    with runtime(config.threads, deterministic):
        return _pretrain(config, pre, run_dir, device, resume)


def _pretrain(config, pre: PretrainConfig, run_dir: Path, device: torch.device, resume: bool) -> PretrainResult:
    from vitkit.data.datasets import build_dataset, image_spec, resolve_data_fields
    from vitkit.data.samplers import build_loader, set_loader_epoch
    from vitkit.train import parallel as dist
    from vitkit.train.checkpoint import capture_rng, load_state, restore_rng, save_state
    from vitkit.train.modeling import default_img_size
    from vitkit.train.plots import plot_curves
    from vitkit.train.progress import Progress
    from vitkit.train.run_folder import CURVES, STATE, RunFolder
    from vitkit.train.runner import amp_dtype_for, run_info, seed_everything

    main = dist.is_main()
    say = print if main else (lambda *a, **k: None)
    seed_everything(config.seed)

    # -- data: labels ignored ----------------------------------------------------------------------
    data = load_pretrain_data(config)
    config = resolve_data_fields(config, data, default_img_size(config.model, config.model_args))
    spec = image_spec(config)
    loaders = {
        split: build_loader(
            build_dataset(data, split, config),
            train=split == "train",
            batch_size=config.batch_size if split == "train" else config.resolved_eval_batch_size,
            seed=config.seed, workers=config.workers, rank=dist.get_rank(), world_size=dist.get_world_size(),
            pin_memory=device.type == "cuda",
        )
        for split in ("train", "val")
    }

    # -- model, masks, optimisation --------------------------------------------------------------------
    model = build_simmim(config.model, in_chans=config.in_chans, img_size=config.img_size, **config.model_args)
    model = model.to(device)
    dist.broadcast_module(model)  # every rank starts from rank 0's weights
    wrapped = dist.wrap(model, device, "ddp")
    if dist.get_world_size() > 1:  # augmentation and masks differ per rank: seed + rank
        seed_everything(dist.rank_seed(config.seed))
    masks = MaskGenerator(config.img_size, pre.mask_patch_size, model.patch_size, pre.mask_ratio)
    steps_per_epoch = len(loaders["train"])
    if config.optimizer != "adamw":
        raise ValueError(f"SimMIM pre-trains with AdamW: drop optimizer={config.optimizer!r}")
    # lr_batch: lr is given for that total batch (SimMIM: 512) and scaled linearly, as in training
    lr = config.lr * config.batch_size * dist.get_world_size() / config.lr_batch if config.lr_batch else config.lr
    optimizer = build_adamw(model, lr, config.weight_decay, tuple(config.betas))
    scheduler = warmup_schedule(
        optimizer,
        total_steps=config.epochs * steps_per_epoch,
        warmup_steps=min(round(config.warmup_epochs * steps_per_epoch), config.epochs * steps_per_epoch),
        warmup_lr_ratio=min(config.warmup_lr / lr, 1.0),
        min_lr_ratio=min(config.min_lr / lr, 1.0),
        kind=pre.lr_schedule,
        milestones=tuple(m * steps_per_epoch for m in pre.milestones),
        gamma=pre.gamma,
    )
    amp_dtype = amp_dtype_for(config.amp, device)
    if amp_dtype == torch.float16:
        raise ValueError("pre-training supports amp=bf16 or off (fp16 needs a gradient scaler): use --set amp=bf16")
    train_model = torch.compile(wrapped) if config.compile else wrapped

    # -- run folder ------------------------------------------------------------------------------------
    folder = RunFolder(run_dir, enabled=main)
    info = run_info(folder, resume, device, config, model.encoder, data, loaders)
    info.update(task="pretrain", pretrain={"method": pre.method, "masks": repr(masks)})
    folder.write_config(config)
    if main:
        write_text(run_dir / PRETRAIN_CONFIG, pre.to_yaml())
    folder.write_run_info(info)

    start_epoch, global_step = 1, 0
    if resume:
        state = load_state(run_dir / STATE)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        folder.load_metrics(upto_epoch=state["epoch"], upto_step=global_step)
        if dist.get_rank() == 0:  # the other ranks start from seed + rank and the epoch
            restore_rng(state["rng"])
        else:
            seed_everything(dist.rank_seed(config.seed) * 100_003 + state["epoch"])
        say(f"resuming {run_dir} after epoch {state['epoch']}")
    say(
        f"SimMIM pre-training {config.model} ({info['model']['params'] / 1e6:.2f} M encoder parameters) on "
        f"{data.source}: {len(loaders['train'].dataset)} train, {len(loaders['val'].dataset)} val images, "
        f"{config.img_size}x{config.img_size}x{config.in_chans}; {masks}; device {device}; run folder {run_dir}"
    )

    # a few fixed validation images for the figure
    shown = next(iter(loaders["val"]))
    shown = (shown[0] if isinstance(shown, (list, tuple)) else shown)[:6]
    shown_mask = masks(shown.shape[0], torch.Generator().manual_seed(config.seed))

    stats: dict[str, Any] = {}
    val: dict[str, float] = {}
    for epoch in range(start_epoch, config.epochs + 1):
        set_loader_epoch(loaders["train"], epoch, dist.rank_seed(config.seed))
        # masks of an epoch depend on (seed, rank, epoch) alone, so a resumed run draws the same ones
        generator = torch.Generator().manual_seed(dist.rank_seed(config.seed) * 100_003 + epoch + 7)
        progress = Progress(steps_per_epoch, f"epoch {epoch}/{config.epochs}", enabled=main, every=config.log_every)
        try:
            stats = train_one_epoch(
                train_model, loaders["train"], optimizer, masks, device=device, scheduler=scheduler,
                generator=generator, amp_dtype=amp_dtype, clip_grad=config.clip_grad, epoch=epoch,
                start_step=global_step, log_every=config.log_every, on_log=folder.log, progress=progress,
            )
        except RuntimeError as err:
            info.update(status=f"stopped: {err}", end_time=_now())
            folder.write_run_info(info)
            kept = f"the checkpoint of epoch {epoch - 1} is intact" if epoch > 1 else "no checkpoint was written"
            raise RuntimeError(f"{err}; pre-training stopped ({kept})") from None
        finally:
            progress.close()
        global_step += stats["steps"]
        val = evaluate(model, loaders["val"], masks, device=device, seed=config.seed, amp_dtype=amp_dtype)
        record = {"epoch": epoch, "train_loss": stats["train_loss"], "lr": stats["lr"],
                  "val_loss": val["val_loss"], "images_per_s": stats["images_per_s"]}
        if main:
            save_encoder(model, run_dir / ENCODER, {"epoch": str(epoch), "val_loss": repr(val["val_loss"])})
            folder.log(record)
            save_state(run_dir / STATE, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "global_step": global_step,
                "rng": capture_rng(),
            })
            with torch.no_grad():
                model.eval()
                rebuilt = model(shown.to(device), shown_mask.to(device))
            save_reconstructions(run_dir / RECONSTRUCTIONS, shown, shown_mask, rebuilt, model.patch_size,
                                 spec.mean, spec.std)
        say(
            f"epoch {epoch}/{config.epochs}: masked L1 train {stats['train_loss']:.4f}, val {val['val_loss']:.4f}, "
            f"lr {stats['lr']:.2e} | {stats['images_per_s']:.0f} img/s",
            flush=True,
        )
    dist.barrier()
    if main:
        plot_curves(folder.records, run_dir / CURVES, f"SimMIM {config.model} on {data.source}",
                    loss_label="masked L1 loss")
    info.update(status="finished", end_time=_now())
    folder.write_run_info(info)
    folder.close()
    last = folder.epoch_records()[-1] if folder.epoch_records() else {}
    return PretrainResult(run_dir, run_dir / ENCODER, last.get("train_loss", math.nan), last.get("val_loss", math.nan))
