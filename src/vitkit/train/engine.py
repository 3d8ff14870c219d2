"""One epoch of training and one pass of evaluation: typed functions that return metric dicts.

Nothing here knows a recipe or a task: the caller builds the model, the batch loss
(`supervised_loss`, or SimMIM's), the metrics, the optimiser, scheduler and loaders and passes
them in. Sums are reduced over ranks, so the same code runs under DDP.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel

from vitkit.core.errors import NonFiniteError, VitkitError
from vitkit.train.config import TTA_MODES
from vitkit.train.parallel import all_reduce_sum, clip_grad_norm, unwrap

Criterion = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets, images) -> loss
# (model, batch) -> (loss, images in the batch): moves the batch to the device and runs the model
BatchLoss = Callable[[nn.Module, Any], tuple[torch.Tensor, int]]


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> AbstractContextManager:
    """bf16/fp16 autocast on `device`, or nothing when `amp_dtype` is None."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def supervised_loss(
    criterion: Criterion,
    device: torch.device,
    batch_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> BatchLoss:
    """The `BatchLoss` of classification: `criterion(model(images), targets, images)` on (images,
    targets) batches; `batch_transform(images, targets)` runs on the device first (Mixup, CutMix)."""

    def loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        images, targets = batch
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if batch_transform is not None:
            images, targets = batch_transform(images, targets)
        return criterion(model(images), targets, images), images.shape[0]

    return loss


@dataclass
class _Window:
    """Loss and image counts since the last step line, and over the epoch."""

    loss_sum: float = 0.0
    images: float = 0.0
    window_loss: float = 0.0
    window_images: float = 0.0
    window_start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, n: int) -> None:
        self.loss_sum += loss * n
        self.images += n
        self.window_loss += loss * n
        self.window_images += n

    def add_step(self, group: list[tuple[float, int]]) -> None:
        """The (loss, images) of the micro-batches of one optimiser step."""
        for loss, n in group:
            self.add(loss, n)

    def line(self, step: int, epoch: int, lr: float) -> dict[str, float]:
        now = time.perf_counter()
        out = {
            "step": step,
            "epoch": epoch,
            "train_loss": self.window_loss / self.window_images,
            "lr": lr,
            "images_per_s": self.window_images / max(now - self.window_start, 1e-9),
        }
        self.window_loss = self.window_images = 0.0
        self.window_start = now
        return out


@dataclass
class Stepper:
    """How the optimiser steps: accumulation, clipping, fp16 scaling, then the scheduler and EMA.

    Before a step it checks the loss and gradients: a non-finite one raises NonFiniteError with a
    diagnosis, or with `on_nonfinite="skip"` the step is skipped (the schedule moves on), up to
    `max_skips` times. Under fp16 the scaler deals with non-finite gradients (it skips the step
    and lowers the scale); only a non-finite loss counts then.
    """

    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler | None = None
    ema: AveragedModel | None = None
    scaler: torch.amp.GradScaler | None = None
    grad_accum: int = 1
    clip_grad: float | None = None
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skips: int = 0
    device: torch.device | None = None  # of the flag all ranks reduce (the compute device: FSDP may offload grads)
    skipped: int = 0

    def backward(self, loss: torch.Tensor) -> None:
        scaled = loss / self.grad_accum
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def step(self, model: nn.Module, bad_loss: float | None, where: Callable[[], str]) -> bool:
        """Step the optimiser; False when a non-finite step was skipped. `bad_loss` is a non-finite
        loss of the step's batches (None: all finite); `where()` names the step."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = clip_grad_norm(model, self.clip_grad) if self.clip_grad is not None else None
        if not self._finite(model, bad_loss is None, norm):
            self._nonfinite(model, bad_loss, where())
            return False
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(unwrap(model))
        return True

    def _finite(self, model: nn.Module, loss_finite: bool, norm: torch.Tensor | None) -> bool:
        # one flag for all ranks: losses differ per rank, and under FSDP each rank holds a shard
        bad = torch.tensor([0.0 if loss_finite else 1.0], device=self.device or _grad_device(model))
        if self.scaler is None:
            norm = norm if norm is not None else grad_norm(model)
            bad += (~torch.isfinite(norm)).float().to(bad.device)
        return float(all_reduce_sum(bad)) == 0

    def _nonfinite(self, model: nn.Module, bad_loss: float | None, where: str) -> None:
        what = f"the training loss became {bad_loss}" if bad_loss is not None else "gradients became non-finite"
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        scale = f"{self.scaler.get_scale():.4g}" if self.scaler is not None else "none (fp32/bf16)"
        diagnosis = (
            f"{what} at {where}: lr {max(lrs):.3g}, loss scale {scale}; "
            f"{nonfinite_gradients(unwrap(model), self.optimizer)}"
        )
        self.optimizer.zero_grad(set_to_none=True)
        if self.on_nonfinite == "stop" or self.skipped >= self.max_skips:
            spent = f"; {self.skipped} step(s) skipped in this epoch, max_nonfinite_skips reached"
            raise NonFiniteError(diagnosis + (spent if self.on_nonfinite == "skip" else ""))
        self.skipped += 1
        if self.scaler is not None:  # unscale_ was called: close the scaler's step
            self.scaler.update()
        if self.scheduler is not None:  # the schedule keeps its length: a skipped step is a step
            self.scheduler.step()
        warnings.warn(f"skipped a step: {diagnosis}", stacklevel=2)


def grad_norm(model: nn.Module) -> torch.Tensor:
    """The global norm of `model`'s gradients (a plain tensor; over all shards under FSDP)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def nonfinite_gradients(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Which parameters (and optimiser groups) have non-finite gradients, in words."""
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    names, groups = [], set()
    for name, p in model.named_parameters():
        grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # FSDP: this rank's shard
        if grad is not None and not bool(torch.isfinite(grad).all()):
            names.append(name)
            groups.add(group_of.get(id(p), -1))
    if not names:
        return "every gradient is finite"
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"non-finite gradients in {len(names)} parameter(s) of group(s) {sorted(groups)}: {shown}"


def _grad_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def train_one_epoch(
    model: nn.Module,
    batch_loss: BatchLoss,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    scheduler: LRScheduler | None = None,
    ema: AveragedModel | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_accum: int = 1,
    clip_grad: float | None = None,
    epoch: int = 0,
    start_step: int = 0,
    log_every: int = 50,
    on_log: Callable[[dict[str, float]], None] | None = None,
    progress: Callable[..., None] | None = None,
    on_nonfinite: Literal["stop", "skip"] = "stop",
    max_skips: int = 0,
) -> dict[str, float]:
    """Train `model` for one pass over `loader`, the loss of each batch from `batch_loss(model, batch)`
    (`supervised_loss` for classification, SimMIM's masked L1 for pre-training).

    The optimiser steps every `grad_accum` batches (and after the last one); the scheduler and
    the EMA step with it. `on_log` gets a step line every `log_every` optimiser steps;
    `progress(images=, loss=, lr=)` is called per batch. Returns train_loss (mean over images,
    over all ranks), lr, images_per_s, steps, images and nonfinite_skips. A non-finite loss or
    gradient raises NonFiniteError before the step (see `Stepper`), or with `on_nonfinite="skip"`
    skips up to `max_skips` such steps."""
    model.train()
    num_batches = len(loader)  # type: ignore[arg-type]
    stepper = Stepper(optimizer, scheduler, ema, scaler, grad_accum, clip_grad, on_nonfinite, max_skips, device)
    optimizer.zero_grad(set_to_none=True)
    counts, steps, start = _Window(), 0, time.perf_counter()
    group: list[tuple[float, int]] = []  # (loss, images) of the micro-batches of this step
    for i, batch in enumerate(loader):
        boundary = (i + 1) % grad_accum == 0 or i + 1 == num_batches
        # DDP: all-reduce gradients only on the micro-batch that completes an accumulation group
        sync = model.no_sync() if not boundary and hasattr(model, "no_sync") else nullcontext()
        with sync:
            with autocast(device, amp_dtype):
                loss, n = batch_loss(model, batch)
            loss_value = loss.item()
            stepper.backward(loss)  # even when not finite: under DDP every rank joins the all-reduce
        group.append((loss_value, n))
        lr = optimizer.param_groups[0]["lr"]
        if boundary:
            bad_loss = next((v for v, _ in group if not math.isfinite(v)), None)
            if stepper.step(model, bad_loss, partial(_where, start_step + steps + 1, epoch, i, num_batches)):
                counts.add_step(group)  # a skipped step's losses are not averaged in
            group, steps = [], steps + 1
        if progress is not None:
            progress(images=n, loss=loss_value, lr=lr)
        if boundary and on_log is not None and (start_step + steps) % log_every == 0 and counts.window_images:
            on_log(counts.line(start_step + steps, epoch, lr))
    return {
        **_epoch_stats(counts, steps, time.perf_counter() - start, optimizer, device),
        "nonfinite_skips": stepper.skipped,
    }


def _where(step: int, epoch: int, batch: int, num_batches: int) -> str:
    return f"epoch {epoch}, batch {batch + 1}/{num_batches} (step {step})"


def _epoch_stats(
    counts: _Window, steps: int, elapsed: float, optimizer: torch.optim.Optimizer, device: torch.device
) -> dict[str, float]:
    totals = all_reduce_sum(torch.tensor([counts.loss_sum, counts.images], dtype=torch.float64, device=device))
    if totals[1] == 0:
        raise VitkitError("the training loader yielded no images: use more samples or a smaller batch size")
    return {
        "train_loss": float(totals[0] / totals[1]),
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_s": float(totals[1]) / max(elapsed, 1e-9),
        "steps": steps,
        "images": int(totals[1]),
    }


def mirror_averaged_log_probs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Log of the mean class probabilities of `images` (B, C, H, W) and their horizontal mirrors: (B, K)."""
    both = torch.stack([model(images).float().log_softmax(-1), model(images.flip(-1)).float().log_softmax(-1)])
    return both.logsumexp(0) - math.log(2)


class Metrics(Protocol):
    """What `evaluate` measures: `update(model, batch)` per batch (under no_grad and autocast),
    then `compute(elapsed)`, which reduces over ranks and returns the metric dict."""

    def update(self, model: nn.Module, batch: Any) -> None: ...

    def compute(self, elapsed: float) -> dict[str, Any]: ...


class ClassificationMetrics:
    """Top-1, top-5 (percent), mean cross-entropy, images and images_per_s; with `num_classes`, a
    confusion matrix (true class, predicted class) as an int64 tensor. `tta="hflip"` scores each image
    by the mean of the class probabilities of the image and its horizontal mirror; the loss is then
    that mean's negative log-likelihood."""

    def __init__(self, device: torch.device, num_classes: int | None = None, tta: str = "none") -> None:
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")
        self.device, self.num_classes, self.tta = device, num_classes, tta
        # [loss sum, top-1 hits, top-5 hits, images], float64 so sums are exact and order-independent
        self.totals = torch.zeros(4, dtype=torch.float64, device=device)
        self.confusion = torch.zeros(num_classes or 0, num_classes or 0, dtype=torch.int64, device=device)

    def update(self, model: nn.Module, batch: Any) -> None:
        images, targets = (t.to(self.device, non_blocking=True) for t in batch)
        # with hflip, log-probabilities: their cross-entropy is the NLL of the mean probability
        logits = mirror_averaged_log_probs(model, images) if self.tta == "hflip" else model(images)
        logits = logits.float()  # (B, K)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(targets[:, None])  # (B, k)
        self.totals += torch.stack(
            [
                F.cross_entropy(logits, targets, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=self.device),
            ]
        )
        if self.num_classes:
            pairs = targets * self.num_classes + logits.argmax(dim=1)
            counts = torch.bincount(pairs, minlength=self.num_classes**2)
            self.confusion += counts.view(self.num_classes, self.num_classes)

    def compute(self, elapsed: float) -> dict[str, Any]:
        totals = all_reduce_sum(self.totals)
        n = max(float(totals[3]), 1.0)
        out: dict[str, Any] = {
            "top1": 100.0 * float(totals[1]) / n,
            "top5": 100.0 * float(totals[2]) / n,
            "loss": float(totals[0]) / n,
            "samples": int(totals[3]),
            "images_per_s": float(totals[3]) / max(elapsed, 1e-9),
        }
        if self.num_classes:
            out["confusion"] = all_reduce_sum(self.confusion).cpu()
        return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    num_classes: int | None = None,
    tta: str = "none",
    metrics: Metrics | None = None,
) -> dict[str, Any]:
    """`metrics` of `model` over `loader` (reduced over ranks); by default `ClassificationMetrics`
    (top-1, top-5, loss; a confusion matrix with `num_classes`; `tta`: see there)."""
    metrics = metrics if metrics is not None else ClassificationMetrics(device, num_classes, tta)
    model.eval()
    start = time.perf_counter()
    for batch in loader:
        with autocast(device, amp_dtype):
            metrics.update(model, batch)
    return metrics.compute(time.perf_counter() - start)
