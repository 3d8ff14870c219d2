"""One epoch of training and one pass of evaluation: typed functions that return metric dicts.

Nothing here knows a recipe: the caller builds the model, criterion, optimiser, scheduler and
loaders and passes them in. Sums are reduced over ranks, so the same code runs under DDP.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel

from vitkit.train.config import TTA_MODES
from vitkit.train.parallel import all_reduce_sum, clip_grad_norm, unwrap

Criterion = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets, images) -> loss


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the step that produced it was not applied."""


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """bf16/fp16 autocast on `device`, or nothing when `amp_dtype` is None."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def train_one_epoch(
    model: nn.Module,
    criterion: Criterion,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    scheduler: LRScheduler | None = None,
    ema: AveragedModel | None = None,
    batch_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_accum: int = 1,
    clip_grad: float | None = None,
    epoch: int = 0,
    start_step: int = 0,
    log_every: int = 50,
    on_log: Callable[[dict[str, float]], None] | None = None,
    progress: Callable[..., None] | None = None,
) -> dict[str, float]:
    """Train `model` for one pass over `loader`.

    The optimiser steps every `grad_accum` batches (and after the last one); the scheduler and
    the EMA step with it. `batch_transform(images, targets)` runs on the device (Mixup, CutMix).
    `on_log` gets a step line every `log_every` optimiser steps; `progress(images=, loss=, lr=)`
    is called per batch. Returns train_loss (mean over images), lr, images_per_s, steps, images.
    Raises NonFiniteLossError before applying a step whose loss is not finite.
    """
    model.train()
    num_batches = len(loader)  # type: ignore[arg-type]
    optimizer.zero_grad(set_to_none=True)
    loss_sum = images_seen = 0.0
    window_loss = window_images = 0.0
    steps = 0
    start = window_start = time.perf_counter()
    for i, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if batch_transform is not None:
            images, targets = batch_transform(images, targets)
        boundary = (i + 1) % grad_accum == 0 or i + 1 == num_batches
        # DDP: all-reduce gradients only on the micro-batch that completes an accumulation group
        sync = model.no_sync() if not boundary and hasattr(model, "no_sync") else nullcontext()
        with sync:
            with autocast(device, amp_dtype):
                outputs = model(images)
                loss = criterion(outputs, targets, images)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    f"the training loss became {loss_value} at epoch {epoch}, batch {i + 1}/{num_batches} "
                    f"(lr {optimizer.param_groups[0]['lr']:.3g})"
                )
            scaled = loss / grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        lr = optimizer.param_groups[0]["lr"]
        if boundary:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip_grad is not None:
                clip_grad_norm(model, clip_grad)  # the global norm, over all shards under FSDP
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            if ema is not None:
                ema.update_parameters(unwrap(model))
            steps += 1
        n = images.shape[0]
        loss_sum += loss_value * n
        images_seen += n
        window_loss += loss_value * n
        window_images += n
        if progress is not None:
            progress(images=n, loss=loss_value, lr=lr)
        if boundary and on_log is not None and (start_step + steps) % log_every == 0:
            now = time.perf_counter()
            on_log(
                {
                    "step": start_step + steps,
                    "epoch": epoch,
                    "train_loss": window_loss / window_images,
                    "lr": lr,
                    "images_per_s": window_images / max(now - window_start, 1e-9),
                }
            )
            window_loss = window_images = 0.0
            window_start = now
    elapsed = time.perf_counter() - start
    totals = all_reduce_sum(torch.tensor([loss_sum, images_seen], dtype=torch.float64, device=device))
    return {
        "train_loss": float(totals[0] / max(totals[1], 1)),
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_s": float(totals[1]) / max(elapsed, 1e-9),
        "steps": steps,
        "images": int(totals[1]),
    }


def mirror_averaged_log_probs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Log of the mean class probabilities of `images` (B, C, H, W) and their horizontal mirrors: (B, K)."""
    both = torch.stack([model(images).float().log_softmax(-1), model(images.flip(-1)).float().log_softmax(-1)])
    return both.logsumexp(0) - math.log(2)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    num_classes: int | None = None,
    tta: str = "none",
) -> dict[str, Any]:
    """Top-1, top-5 (percent) and mean cross-entropy of `model` over `loader`.

    With `num_classes`, also a confusion matrix (true class, predicted class) as an int64 tensor.
    `tta="hflip"` scores each image by the mean of the class probabilities of the image and of its
    horizontal mirror (test-time augmentation); the loss is then that mean's negative log-likelihood.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")
    model.eval()
    # [loss sum, top-1 hits, top-5 hits, images], float64 so sums are exact and order-independent
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes or 0, num_classes or 0, dtype=torch.int64, device=device)
    start = time.perf_counter()
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            # with hflip, log-probabilities: their cross-entropy is the NLL of the mean probability
            logits = mirror_averaged_log_probs(model, images) if tta == "hflip" else model(images)
        logits = logits.float()  # (B, K)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(targets[:, None])  # (B, k)
        totals += torch.stack(
            [
                F.cross_entropy(logits, targets, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=device),
            ]
        )
        if num_classes:
            pairs = targets * num_classes + logits.argmax(dim=1)
            confusion += torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)
    elapsed = time.perf_counter() - start
    totals = all_reduce_sum(totals)
    n = max(float(totals[3]), 1.0)
    out: dict[str, Any] = {
        "top1": 100.0 * float(totals[1]) / n,
        "top5": 100.0 * float(totals[2]) / n,
        "loss": float(totals[0]) / n,
        "samples": int(totals[3]),
        "images_per_s": float(totals[3]) / max(elapsed, 1e-9),
    }
    if num_classes:
        out["confusion"] = all_reduce_sum(confusion).cpu()
    return out
