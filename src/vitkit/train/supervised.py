"""Supervised training (`vitkit train`): the classification task on the shared run skeleton.

The task builds the data, model, EMA, optimiser, loss (with distillation) and Mixup / CutMix from
the config; validates the model (and its EMA) each epoch and keeps best.safetensors and
last.safetensors; and scores best.safetensors on the test split at the end. The run folder holds
config.yaml, run.json, metrics.jsonl, the weights, state.pt and curves.png (`vitkit.train.run_loop`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from vitkit.core.errors import UsageError
from vitkit.data.datasets import LoadedData, image_spec, load_data
from vitkit.data.mixup import MixupCutmix
from vitkit.data.samplers import even_batches
from vitkit.train import parallel
from vitkit.train.config import RUNTIME_FIELDS, TrainConfig, check_resume_compatible, load_run_config
from vitkit.train.distill import build_distillation
from vitkit.train.engine import BatchLoss, evaluate, supervised_loss
from vitkit.train.fields import apply_fields
from vitkit.train.finetune import load_finetune_weights
from vitkit.train.losses import build_criterion
from vitkit.train.modeling import build_model, load_weights, save_weights
from vitkit.train.optim import build_optimizer, build_scheduler, scaled_lr
from vitkit.train.run_folder import BEST, LAST
from vitkit.train.run_loop import Run, RunTask, TrainingState, build_loaders, run_task
from vitkit.train.runtime import amp_dtype_for
from vitkit.train.teacher import load_teacher


@dataclass
class RunResult:
    run_dir: Path
    best_val_top1: float
    best_epoch: int
    best_source: str  # "model" or "ema"
    test: dict[str, float] | None  # top1, top5, loss of best.safetensors on the test split


def train(config: TrainConfig, *, resume: bool = False) -> RunResult:
    """Train as `config` says, in the run folder `config.output` (continuing it with `resume`).

    Started by torchrun (or `vitkit train --nproc N`), every process runs this: it joins the
    process group, rank 0 decides the run folder and the seed, and only rank 0 writes.
    """
    return run_task(SupervisedTask(), config, resume=resume)


def prepare_resume(run_dir: str | os.PathLike, requested: dict[str, Any]) -> TrainConfig:
    """The saved config of `run_dir`, with runtime fields from `requested`; contradictions are errors."""
    saved = load_run_config(run_dir)
    check_resume_compatible(saved, requested)
    runtime_changes = {k: v for k, v in requested.items() if k in RUNTIME_FIELDS and k != "output"}
    return dataclasses.replace(apply_fields(saved, runtime_changes), output=str(run_dir))


def build_training_state(config: TrainConfig, steps_per_epoch: int, device: torch.device) -> TrainingState:
    """Model (and EMA) wrapped for several processes (DDP, or FSDP2 with `config.fsdp`), the optimiser,
    warm-up + cosine schedule, and a gradient scaler for fp16."""
    model = build_model(
        config.model,
        num_classes=config.num_classes,
        in_chans=config.in_chans,
        img_size=config.img_size,
        model_args=config.model_args,
    ).to(device)
    if config.finetune:  # pre-trained or trained weights, resampled to this size; a new head if classes differ
        said = load_finetune_weights(model, config.finetune)
        if parallel.is_main():
            print(said)
    parallel.broadcast_module(model)  # every rank starts from rank 0's weights
    ema = None
    if config.ema:  # from the unsharded model; under FSDP it is sharded beside it
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    if config.fsdp_offload:  # before the world-size check: more processes would not help
        parallel.check_offload(device)
    if config.fsdp and parallel.get_world_size() == 1:
        raise UsageError("--fsdp shards the model over several processes: add --nproc N or start with torchrun")
    strategy = "fsdp" if config.fsdp else "ddp"
    plain = copy.deepcopy(model).cpu() if config.fsdp and parallel.is_main() else None
    wrapped = parallel.wrap(model, device, strategy, offload=config.fsdp_offload)  # FSDP shards `model` in place
    parallel.wrap_ema(ema, device, strategy, offload=config.fsdp_offload)
    lr = scaled_lr(config.lr, config.batch_size, config.lr_batch)
    # layer decay: AdamW or LAMB over per-layer groups, each scheduled on its own lr
    optimizer = build_optimizer(model, lr, config.weight_decay, config.betas, config.optimizer, config.layer_decay)
    scheduler = build_scheduler(
        optimizer,
        total_steps=config.epochs * steps_per_epoch,
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        warmup_lr=config.warmup_lr,
        min_lr=config.min_lr,
        peak_lr=lr,
    )
    fp16 = amp_dtype_for(config.amp, device) == torch.float16
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    return TrainingState(model, wrapped, plain, ema, optimizer, scheduler, scaler)


class SupervisedTask(RunTask[RunResult]):
    """Classification: cross-entropy / BCE (with distillation), Mixup / CutMix, model and EMA validated
    each epoch; the better of them competes for best.safetensors."""

    def __init__(self) -> None:
        self.best: dict[str, Any] = {"top1": -1.0, "epoch": 0, "source": "model"}
        self.loss: BatchLoss | None = None
        self.val_loader: DataLoader | None = None
        self.candidates: list[tuple[str, float, nn.Module]] = []  # (source, val top-1, weights) of this epoch
        self.test: dict[str, float] | None = None

    def load_data(self, config: TrainConfig) -> LoadedData:
        return load_data(config)

    def build_loaders(self, run: Run) -> dict[str, DataLoader]:
        return build_loaders(run.config, run.data, run.device)

    def build_state(self, run: Run) -> TrainingState:
        steps_per_epoch = math.ceil(len(run.loaders["train"]) / run.config.grad_accum)
        return build_training_state(run.config, steps_per_epoch, run.device)

    def prepare(self, run: Run) -> None:
        config, model = run.config, run.state.model
        criterion = build_criterion(config)
        if config.distillation != "none":  # DeiT: the teacher sees the same (mixed) images
            teacher = load_teacher(
                config.teacher,
                num_classes=config.num_classes,
                in_chans=config.in_chans,
                device=run.device,
                student_mean=tuple(config.mean),
                student_std=tuple(config.std),
            )
            criterion = build_distillation(
                criterion, teacher, config.distillation, config.distill_alpha, config.distill_tau
            )
            if hasattr(model, "set_distilled_training"):  # (class, distillation) outputs in training
                model.set_distilled_training(True)
        mix = None
        if config.mixup > 0 or config.cutmix > 0:
            mix = MixupCutmix(config.num_classes, config.mixup, config.cutmix, config.mixup_switch_prob)
        self.loss = supervised_loss(criterion, run.device, mix)
        super().prepare(run)
        # FSDP runs collectives in every forward: all ranks must run as many evaluation batches
        val = run.loaders["val"]
        self.val_loader = even_batches(val, parallel.get_world_size()) if config.fsdp else val

    def restore(self, saved: dict[str, Any]) -> None:
        self.best = dict(saved["best"])

    def announce(self, run: Run) -> str:
        config = run.config
        sizes = ", ".join(f"{len(loader.dataset)} {split}" for split, loader in run.loaders.items())  # type: ignore
        return (
            f"model {config.model} ({run.info['model']['params'] / 1e6:.2f} M parameters), data {run.data.source}: "
            f"{sizes} images, {config.num_classes} classes, {config.img_size}x{config.img_size}x{config.in_chans}; "
            f"device {run.device}, {torch.get_num_threads()} threads; run folder {run.run_dir}"
        )

    def batch_loss(self, run: Run, epoch: int) -> BatchLoss:
        assert self.loss is not None, "prepare() builds the loss"
        return self.loss

    def validate(self, run: Run, epoch: int, stats: dict[str, float]) -> dict[str, Any]:
        """The model, and the EMA beside it; the better one competes for best.safetensors."""
        model, ema = run.state.model, run.state.ema
        val = evaluate(model, self.val_loader, device=run.device, amp_dtype=run.amp_dtype, tta=run.config.tta)
        record = {
            "epoch": epoch,
            "train_loss": stats["train_loss"],
            "lr": stats["lr"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "val_loss": val["loss"],
        }
        self.candidates = [("model", val["top1"], model)]
        if ema is not None:
            ema_val = evaluate(
                ema.module, self.val_loader, device=run.device, amp_dtype=run.amp_dtype, tta=run.config.tta
            )
            record.update(ema_val_top1=ema_val["top1"], ema_val_top5=ema_val["top5"], ema_val_loss=ema_val["loss"])
            self.candidates.append(("ema", ema_val["top1"], ema.module))
        record["images_per_s"] = stats["images_per_s"]
        return record

    def save_weights(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        source, top1, weights = max(self.candidates, key=lambda c: c[1])  # ties go to the model
        spec, classes = image_spec(run.config), run.data.classes
        if top1 > self.best["top1"]:
            self.best = {"top1": top1, "epoch": epoch, "source": source}
            full = parallel.full_weights(weights, run.state.plain)
            if run.main:
                save_weights(
                    full,
                    run.run_dir / BEST,
                    spec=spec,
                    classes=classes,
                    extra={"source": source, "epoch": str(epoch), "val_top1": repr(top1)},
                )
        full = parallel.full_weights(run.state.model, run.state.plain)
        if run.main:
            save_weights(
                full, run.run_dir / LAST, spec=spec, classes=classes, extra={"source": "model", "epoch": str(epoch)}
            )

    def extra_state(self) -> dict[str, Any]:
        return {"best": self.best}

    def epoch_line(self, run: Run, epoch: int, record: dict[str, Any]) -> str:
        ema_note = f" | EMA val top-1 {record['ema_val_top1']:.2f}%" if "ema_val_top1" in record else ""
        return (
            f"epoch {epoch}/{run.config.epochs}: train loss {record['train_loss']:.4f}, lr {record['lr']:.2e} | "
            f"val top-1 {record['val_top1']:.2f}% top-5 {record['val_top5']:.2f}% loss {record['val_loss']:.4f}"
            f"{ema_note} | {record['images_per_s']:.0f} img/s"
        )

    def final(self, run: Run) -> dict[str, Any]:
        """The test split, once, with the weights in best.safetensors."""
        best = self.best
        final: dict[str, Any] = {
            "best_val_top1": best["top1"],
            "best_epoch": best["epoch"],
            "best_source": best["source"],
        }
        if "test" in run.loaders:
            best_model, _ = load_weights(run.run_dir / BEST, device=run.device)
            result = evaluate(
                best_model, run.loaders["test"], device=run.device, amp_dtype=run.amp_dtype, tta=run.config.tta
            )
            self.test = {"top1": result["top1"], "top5": result["top5"], "loss": result["loss"]}
            final.update(test_top1=result["top1"], test_top5=result["top5"], test_loss=result["loss"])
        return final

    def curves_title(self, run: Run) -> tuple[str, str]:
        return f"{run.config.model} on {run.data.source}", "loss"

    def result(self, run: Run) -> RunResult:
        return RunResult(run.run_dir, self.best["top1"], self.best["epoch"], self.best["source"], self.test)
