"""A SimMIM pre-training run (`vitkit pretrain`): the masked-image-modelling task on the run skeleton
that `vitkit train` uses (`vitkit.train.run_loop`).

The run folder is `vitkit train`'s: config.yaml (the training config), pretrain.yaml (the masking
and schedule settings), run.json, metrics.jsonl (epoch lines carry train_loss, val_loss, lr,
images_per_s; step lines as in training), state.pt, curves.png, plus
  encoder.safetensors   the encoder alone (vitkit format, no head): `vitkit train --finetune RUN`
  reconstructions.png   inputs, masks and reconstructions of a few validation images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from vitkit.core.errors import UsageError
from vitkit.core.files import write_text
from vitkit.data.datasets import LoadedData, image_spec
from vitkit.data.unlabelled import load_images
from vitkit.pretrain.settings import PRETRAIN_CONFIG, PretrainConfig
from vitkit.pretrain.simmim import (
    MaskedL1Metrics,
    MaskGenerator,
    build_simmim,
    masked_image_loss,
    save_encoder,
    save_reconstructions,
)
from vitkit.registry import count_parameters
from vitkit.train import parallel
from vitkit.train.config import TrainConfig
from vitkit.train.engine import BatchLoss, evaluate
from vitkit.train.optim import build_adamw, scaled_lr, warmup_schedule
from vitkit.train.run_loop import Run, RunTask, TrainingState, build_loaders, run_task

ENCODER, RECONSTRUCTIONS = "encoder.safetensors", "reconstructions.png"


@dataclass
class PretrainResult:
    run_dir: Path
    encoder: Path
    final_train_loss: float
    final_val_loss: float


def pretrain(config: TrainConfig, pre: PretrainConfig, *, resume: bool = False) -> PretrainResult:
    """Pre-train `config.model` with SimMIM in the run folder `config.output` (continued with `resume`)."""
    if config.fsdp:
        raise UsageError("vitkit pretrain runs on DDP: drop --fsdp")
    if config.grad_accum != 1:
        raise UsageError("pre-training steps every batch: grad_accum must be 1 (raise batch_size instead)")
    if config.model.startswith("torchvision:"):
        raise UsageError("SimMIM pre-trains vitkit ViT / DeiT / Swin / Swin V2 models, not torchvision ones")
    # several processes (torchrun / --nproc): rank 0 decides the folder and seed, DDP keeps ranks in step
    return run_task(SimMIMTask(pre), config, resume=resume)


class SimMIMTask(RunTask[PretrainResult]):
    """Masked image modelling: labels ignored, the masked L1 loss trained and validated, the encoder
    saved each epoch with a figure of reconstructions."""

    noun = "pre-training"
    command = "pretrain"

    def __init__(self, pre: PretrainConfig) -> None:
        self.pre = pre
        self.masks: MaskGenerator | None = None  # built in prepare(), once the image size is known
        self.shown = self.shown_mask = torch.empty(0)  # the validation images of the figure, and their masks
        self.mask_rng: torch.Generator | None = None  # the current epoch's mask generator
        self.resumed_mask_rng: torch.Tensor | None = None  # its state in a run stopped mid-epoch

    def load_data(self, config: TrainConfig) -> LoadedData:
        return load_images(config)

    def build_loaders(self, run: Run) -> dict[str, DataLoader]:
        return build_loaders(run.config, run.data, run.device, ("train", "val"))

    def build_state(self, run: Run) -> TrainingState:
        config, pre = run.config, self.pre
        model = build_simmim(config.model, in_chans=config.in_chans, img_size=config.img_size, **config.model_args)
        model = model.to(run.device)
        parallel.broadcast_module(model)  # every rank starts from rank 0's weights
        wrapped = parallel.wrap(model, run.device, "ddp")
        if config.optimizer != "adamw":
            raise UsageError(f"SimMIM pre-trains with AdamW: drop optimizer={config.optimizer!r}")
        # lr_batch: lr is given for that total batch (SimMIM: 512) and scaled linearly, as in training
        lr = scaled_lr(config.lr, config.batch_size, config.lr_batch)
        optimizer = build_adamw(model, lr, config.weight_decay, tuple(config.betas))  # type: ignore[arg-type]
        steps = len(run.loaders["train"])  # per epoch
        scheduler = warmup_schedule(
            optimizer,
            total_steps=config.epochs * steps,
            warmup_steps=min(round(config.warmup_epochs * steps), config.epochs * steps),
            warmup_lr_ratio=min(config.warmup_lr / lr, 1.0),
            min_lr_ratio=min(config.min_lr / lr, 1.0),
            kind=pre.lr_schedule,
            milestones=tuple(m * steps for m in pre.milestones),
            gamma=pre.gamma,
        )
        return TrainingState(model, wrapped, None, None, optimizer, scheduler, None)

    def prepare(self, run: Run) -> None:
        self.masks = MaskGenerator(
            run.config.img_size, self.pre.mask_patch_size, run.state.model.patch_size, self.pre.mask_ratio
        )
        if run.amp_dtype == torch.float16:
            raise UsageError("pre-training supports amp=bf16 or off (fp16 needs a gradient scaler): use --set amp=bf16")
        super().prepare(run)

    def write_files(self, run: Run) -> None:
        run.info["model"]["params"] = count_parameters(run.state.model.encoder)
        run.info.update(task="pretrain", pretrain={"method": self.pre.method, "masks": repr(self.masks)})
        if run.main:
            write_text(run.run_dir / PRETRAIN_CONFIG, self.pre.to_yaml())

    def announce(self, run: Run) -> str:
        config = run.config
        train, val = (len(run.loaders[split].dataset) for split in ("train", "val"))  # type: ignore[arg-type]
        return (
            f"SimMIM pre-training {config.model} ({run.info['model']['params'] / 1e6:.2f} M encoder parameters) on "
            f"{run.data.source}: {train} train, {val} val images, "
            f"{config.img_size}x{config.img_size}x{config.in_chans}; {self.masks}; device {run.device}; "
            f"run folder {run.run_dir}"
        )

    def before_loop(self, run: Run) -> None:
        # a few fixed validation images for the figure
        shown = next(iter(run.loaders["val"]))
        self.shown = (shown[0] if isinstance(shown, (list, tuple)) else shown)[:6]
        assert self.masks is not None  # built in prepare()
        self.shown_mask = self.masks(self.shown.shape[0], torch.Generator().manual_seed(run.config.seed))

    def batch_loss(self, run: Run, epoch: int) -> BatchLoss:
        # masks of an epoch depend on (seed, rank, epoch) alone, so a resumed run draws the same ones
        generator = torch.Generator().manual_seed(parallel.rank_seed(run.config.seed) * 100_003 + epoch + 7)
        if run.position and self.resumed_mask_rng is not None:  # resumed mid-epoch: the masks continue
            generator.set_state(self.resumed_mask_rng)
        self.mask_rng, self.resumed_mask_rng = generator, None
        return masked_image_loss(self.masks, generator, run.device)

    def extra_state(self) -> dict[str, Any]:
        # every rank's mask generator (a collective: every rank calls extra_state)
        states = parallel.gather_objects(self.mask_rng.get_state() if self.mask_rng is not None else None)
        return {"mask_rng_ranks": states}

    def restore(self, saved: dict[str, Any]) -> None:
        states = saved.get("mask_rng_ranks") or []
        rank = parallel.get_rank()
        self.resumed_mask_rng = states[rank] if rank < len(states) else None

    def validate(self, run: Run, epoch: int, stats: dict[str, float]) -> dict[str, Any]:
        metrics = MaskedL1Metrics(self.masks, run.config.seed, run.device)
        val = evaluate(run.state.model, run.loaders["val"], device=run.device, amp_dtype=run.amp_dtype, metrics=metrics)
        return {
            "epoch": epoch,
            "train_loss": stats["train_loss"],
            "lr": stats["lr"],
            "val_loss": val["val_loss"],
            "images_per_s": stats["images_per_s"],
        }

    def save_weights(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        if run.main:
            save_encoder(
                run.state.model, run.run_dir / ENCODER, {"epoch": str(epoch), "val_loss": repr(record["val_loss"])}
            )

    def after_epoch(self, run: Run, epoch: int) -> None:
        if not run.main:
            return
        model = run.state.model
        with torch.no_grad():
            model.eval()
            rebuilt = model(self.shown.to(run.device), self.shown_mask.to(run.device))
        spec = image_spec(run.config)
        save_reconstructions(
            run.run_dir / RECONSTRUCTIONS, self.shown, self.shown_mask, rebuilt, model.patch_size, spec.mean, spec.std
        )

    def epoch_line(self, run: Run, epoch: int, record: dict[str, Any]) -> str:
        return (
            f"epoch {epoch}/{run.config.epochs}: masked L1 train {record['train_loss']:.4f}, "
            f"val {record['val_loss']:.4f}, lr {record['lr']:.2e} | {record['images_per_s']:.0f} img/s"
        )

    def final(self, run: Run) -> None:
        return None

    def curves_title(self, run: Run) -> tuple[str, str]:
        return f"SimMIM {run.config.model} on {run.data.source}", "masked L1 loss"

    def result(self, run: Run) -> PretrainResult:
        epochs = run.folder.epoch_records()
        last = epochs[-1] if epochs else {}
        return PretrainResult(
            run.run_dir, run.run_dir / ENCODER, last.get("train_loss", math.nan), last.get("val_loss", math.nan)
        )
