"""A training run from a resolved config: data -> model -> epochs of the engine -> run folder.

This is the thin `main` over the engine: it builds everything from the config, owns the run
folder (config.yaml, run.json, metrics.jsonl, weights, state.pt, curves.png) and resumes it.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import math
import os
import random
import secrets
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from vitkit.core.version import __version__
from vitkit.data.augment import MixupCutmix
from vitkit.data.datasets import LoadedData, build_dataset, image_spec, load_data, resolve_data_fields
from vitkit.data.samplers import build_loader, set_loader_epoch
from vitkit.train import parallel
from vitkit.train.checkpoint import capture_rng, load_state, restore_rng, save_state
from vitkit.train.config import RUNTIME_FIELDS, TrainConfig, apply_fields, check_resume_compatible, load_run_config
from vitkit.train.distill import build_distillation
from vitkit.train.engine import NonFiniteLossError, evaluate, train_one_epoch
from vitkit.train.losses import build_criterion
from vitkit.train.modeling import build_model, default_img_size, load_weights, save_weights
from vitkit.train.optim import build_optimizer, build_scheduler
from vitkit.train.plots import plot_curves
from vitkit.train.progress import Progress
from vitkit.train.run_folder import BEST, CONFIG, CURVES, LAST, STATE, RunFolder
from vitkit.train.teacher import load_teacher


@dataclass
class RunResult:
    run_dir: Path
    best_val_top1: float
    best_epoch: int
    best_source: str  # "model" or "ema"
    test: dict[str, float] | None  # top1, top5, loss of best.safetensors on the test split


# -- runtime settings ------------------------------------------------------------------------------


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA, none on CPU; fp16 only on CUDA (it needs a gradient scaler)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp=fp16 needs a CUDA device: use amp=bf16 on the CPU, or amp=off")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def runtime(threads: int | None, deterministic: bool) -> Iterator[None]:
    """Thread count and deterministic algorithms for the run, restored afterwards."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS reductions
        # warn_only: a CUDA op without a deterministic kernel warns instead of ending a long run
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.benchmark = saved[3]


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _command_line() -> str:
    argv = sys.argv
    if argv and (Path(argv[0]).name in ("vitkit", "__main__.py")):
        return shlex.join(["vitkit", *argv[1:]])
    return shlex.join(argv)


def provenance(device: torch.device) -> dict[str, Any]:
    import torchvision

    return {
        "vitkit": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": sys.version.split()[0],
        "git_commit": _git_commit(),
        "command": _command_line(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "world_size": parallel.get_world_size(),
    }


# -- the run -------------------------------------------------------------------------------------


def default_output(config: TrainConfig) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.recipe or config.model.replace(':', '_')}-{stamp}"


def prepare_resume(run_dir: str | os.PathLike, requested: dict[str, Any]) -> TrainConfig:
    """The saved config of `run_dir`, with runtime fields from `requested`; contradictions are errors."""
    saved = load_run_config(run_dir)
    check_resume_compatible(saved, requested)
    runtime_changes = {k: v for k, v in requested.items() if k in RUNTIME_FIELDS and k != "output"}
    return dataclasses.replace(apply_fields(saved, runtime_changes), output=str(run_dir))


def prepare_run(config: TrainConfig, resume: bool) -> tuple[torch.device, Path, TrainConfig, bool]:
    """The start of `vitkit train` and `vitkit pretrain` in every process: join torchrun's process
    group (when launched by it), agree on rank 0's run folder, stop every rank when that folder
    cannot be used, and agree on the seed (an unseeded run records the one rank 0 drew).

    Returns the device, the run folder, the config with both filled in, and whether the run is
    seeded (deterministic).
    """
    device = parallel.init_distributed(config.device)
    run_dir = Path(parallel.broadcast_object(str(config.output or default_output(config))))
    problem = None
    if parallel.is_main() and not resume and (run_dir / CONFIG).exists():
        problem = ValueError(
            f"{run_dir} already holds a run: continue it with --resume {run_dir} or choose another --output"
        )
    if parallel.is_main() and resume and not (run_dir / STATE).is_file():
        problem = FileNotFoundError(f"{run_dir / STATE} does not exist: the run has no finished epoch to resume from")
    problem = parallel.broadcast_object(problem)  # every rank stops, not only rank 0
    if problem is not None:
        raise problem
    config = dataclasses.replace(config, output=str(run_dir))
    deterministic = config.seed is not None
    if config.seed is None:
        config = dataclasses.replace(config, seed=parallel.broadcast_object(secrets.randbelow(2**31)))
    return device, run_dir, config, deterministic


def train(config: TrainConfig, *, resume: bool = False) -> RunResult:
    """Train as `config` says, in the run folder `config.output` (continuing it with `resume`).

    Started by torchrun (or `vitkit train --nproc N`), every process runs this: it joins the
    process group, rank 0 decides the run folder and the seed, and only rank 0 writes.
    """
    device, run_dir, config, deterministic = prepare_run(config, resume)
    with runtime(config.threads, deterministic):
        return _train(config, run_dir, device, resume, parallel.is_main())


@dataclass
class TrainingState:
    """Everything `state.pt` holds besides counters: what `--resume` restores.

    `model` is the module itself (sharded in place under FSDP), `wrapped` what trains (DDP around
    it, or the model), `plain` rank 0's unsharded CPU copy under FSDP, which checkpoints are written
    from. States are full (unsharded) and keyed by parameter names, so a run resumes under another
    process count or strategy.
    """

    model: nn.Module
    wrapped: nn.Module
    plain: nn.Module | None
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler | None

    def state_dict(self) -> dict[str, Any]:
        """Full states on rank 0 (empty elsewhere); a collective under FSDP: every rank calls it."""
        return {
            "model": parallel.full_model_state(self.model),
            "optimizer": parallel.full_optimizer_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "ema": parallel.full_model_state(self.ema) if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parallel.load_full_state(self.model, state["model"], self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            parallel.load_full_state(self.ema, state["ema"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def build_loaders(config: TrainConfig, data: LoadedData, device: torch.device) -> dict[str, DataLoader]:
    """A loader per split the data has: shuffled and augmented for train, in order for val and test."""
    loaders = {}
    for split in ("train", "val", "test"):
        if split in data.splits:
            train = split == "train"
            loaders[split] = build_loader(
                build_dataset(data, split, config),
                train=train,
                batch_size=config.batch_size if train else config.resolved_eval_batch_size,
                seed=config.seed,
                workers=config.workers,
                rank=parallel.get_rank(),
                world_size=parallel.get_world_size(),
                pin_memory=device.type == "cuda",
                repeats=config.repeated_aug if split == "train" else 1,
                repeat_epoch=config.repeated_aug_epoch,
            )
    if "train" not in loaders or "val" not in loaders:
        raise ValueError(f"{data.source} needs a train and a val split to train")
    return loaders


def build_training_state(config: TrainConfig, steps_per_epoch: int, device: torch.device) -> TrainingState:
    """Model (and EMA) wrapped for several processes (DDP, or FSDP2 with `config.fsdp`), the optimiser,
    warm-up + cosine schedule, and a gradient scaler for fp16."""
    model = build_model(config.model, num_classes=config.num_classes, in_chans=config.in_chans,
                        img_size=config.img_size, model_args=config.model_args).to(device)
    if config.finetune:  # pre-trained or trained weights, resampled to this size; a new head if classes differ
        from vitkit.train.finetune import load_finetune_weights

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
        raise ValueError("--fsdp shards the model over several processes: add --nproc N or start with torchrun")
    strategy = "fsdp" if config.fsdp else "ddp"
    plain = copy.deepcopy(model).cpu() if config.fsdp and parallel.is_main() else None
    wrapped = parallel.wrap(model, device, strategy, offload=config.fsdp_offload)  # FSDP shards `model` in place
    parallel.wrap_ema(ema, device, strategy, offload=config.fsdp_offload)
    # lr_batch: the recipe's lr is for that total batch (DeiT: 5e-4 per 512 images)
    lr = config.lr * config.batch_size * parallel.get_world_size() / config.lr_batch if config.lr_batch else config.lr
    if config.layer_decay is not None:
        from vitkit.pretrain.optim import build_adamw

        optimizer = build_adamw(model, lr, config.weight_decay, tuple(config.betas), config.layer_decay)
    else:
        optimizer = build_optimizer(model, lr, config.weight_decay, config.betas, config.optimizer)
    scheduler = build_scheduler(
        optimizer,
        total_steps=config.epochs * steps_per_epoch,
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        warmup_lr=config.warmup_lr,
        min_lr=config.min_lr,
    )
    fp16 = amp_dtype_for(config.amp, device) == torch.float16
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    return TrainingState(model, wrapped, plain, ema, optimizer, scheduler, scaler)


def run_info(folder: RunFolder, resume: bool, device: torch.device, config: TrainConfig, model: nn.Module,
              data: LoadedData, loaders: dict[str, DataLoader]) -> dict[str, Any]:
    """run.json's contents at the start (or resumption) of a run: provenance, model, data."""
    info = folder.read_run_info() if resume else {}
    info.update(provenance(device))
    info.setdefault("start_time", _now())
    if resume:
        info.setdefault("resumed", []).append(_now())
    info.update(
        status="running",
        model={"name": config.model, "params": sum(p.numel() for p in model.parameters())},
        data={
            "source": data.source,
            "classes": data.classes,
            **{split: len(loader.dataset) for split, loader in loaders.items()},
            "skipped_corrupt": len(data.skipped),
            "skipped_files": [str(p) for p in data.skipped[:20]],
        },
    )
    return info


def _train(config: TrainConfig, run_dir: Path, device: torch.device, resume: bool, main: bool) -> RunResult:
    seed_everything(config.seed)
    say = print if main else (lambda *a, **k: None)

    data = load_data(config)
    config = resolve_data_fields(config, data, default_img_size(config.model, config.model_args))
    spec = image_spec(config)
    loaders = build_loaders(config, data, device)
    if data.skipped:
        say(f"skipped {len(data.skipped)} corrupt image(s), e.g. {data.skipped[0]}")
    state = build_training_state(config, math.ceil(len(loaders["train"]) / config.grad_accum), device)
    model, ema = state.model, state.ema
    if parallel.get_world_size() > 1:  # augmentation differs per rank, reproducibly: seed + rank
        seed_everything(parallel.rank_seed(config.seed))
    amp_dtype = amp_dtype_for(config.amp, device)
    criterion = build_criterion(config)
    if config.distillation != "none":  # DeiT: the teacher sees the same (mixed) images
        teacher = load_teacher(config.teacher, num_classes=config.num_classes, in_chans=config.in_chans,
                               device=device, student_mean=tuple(config.mean), student_std=tuple(config.std))
        criterion = build_distillation(criterion, teacher, config.distillation, config.distill_alpha, config.distill_tau)
        if hasattr(model, "set_distilled_training"):  # (class, distillation) outputs in training
            model.set_distilled_training(True)
    mix = None
    if config.mixup > 0 or config.cutmix > 0:
        mix = MixupCutmix(config.num_classes, config.mixup, config.cutmix, config.mixup_switch_prob)
    train_model: nn.Module = torch.compile(state.wrapped) if config.compile else state.wrapped
    # FSDP runs collectives in every forward: all ranks must run as many evaluation batches
    val_loader = parallel.even_batches(loaders["val"]) if config.fsdp else loaders["val"]

    folder = RunFolder(run_dir, enabled=main)
    info = run_info(folder, resume, device, config, model, data, loaders)
    folder.write_config(config)
    folder.write_run_info(info)

    start_epoch, global_step = 1, 0
    best = {"top1": -1.0, "epoch": 0, "source": "model"}
    if resume:
        saved = load_state(run_dir / STATE)
        state.load_state_dict(saved)
        start_epoch, global_step, best = saved["epoch"] + 1, saved["global_step"], dict(saved["best"])
        folder.load_metrics(upto_epoch=saved["epoch"], upto_step=global_step)
        # last: nothing above may draw random numbers afterwards. Each rank continues its own
        # generators; a rank the saved run did not have starts from seed + rank and the epoch
        rngs = saved.get("rng_ranks") or [saved["rng"]]
        if parallel.get_rank() < len(rngs):
            restore_rng(rngs[parallel.get_rank()])
        else:
            seed_everything(parallel.rank_seed(config.seed) * 100_003 + saved["epoch"])
        say(f"resuming {run_dir} after epoch {saved['epoch']}")
    sizes = ", ".join(f"{len(loader.dataset)} {split}" for split, loader in loaders.items())
    say(
        f"model {config.model} ({info['model']['params'] / 1e6:.2f} M parameters), data {data.source}: {sizes} images, "
        f"{config.num_classes} classes, {config.img_size}x{config.img_size}x{config.in_chans}; "
        f"device {device}, {torch.get_num_threads()} threads; run folder {run_dir}"
    )

    for epoch in range(start_epoch, config.epochs + 1):
        set_loader_epoch(loaders["train"], epoch, parallel.rank_seed(config.seed))
        progress = Progress(len(loaders["train"]), f"epoch {epoch}/{config.epochs}", enabled=main,
                            every=config.log_every)
        try:
            stats = train_one_epoch(
                train_model, criterion, loaders["train"], state.optimizer,
                device=device, scheduler=state.scheduler, ema=ema, amp_dtype=amp_dtype, scaler=state.scaler,
                grad_accum=config.grad_accum, clip_grad=config.clip_grad, epoch=epoch, start_step=global_step,
                log_every=config.log_every, on_log=folder.log, progress=progress,
                batch_transform=mix,
            )
        except NonFiniteLossError as err:
            info.update(status=f"stopped: {err}", end_time=_now())
            folder.write_run_info(info)
            kept = f"the checkpoint of epoch {epoch - 1} in {run_dir} is intact" if epoch > 1 else "no checkpoint yet"
            raise RuntimeError(
                f"{err}; training stopped ({kept}): lower the learning rate or set clip_grad, e.g. --set clip_grad=1.0"
            ) from None
        finally:
            progress.close()
        global_step += stats["steps"]

        # validation: the model, and the EMA beside it; the better one competes for best.safetensors
        val = evaluate(model, val_loader, device=device, amp_dtype=amp_dtype, tta=config.tta)
        record = {"epoch": epoch, "train_loss": stats["train_loss"], "lr": stats["lr"],
                  "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]}
        candidates = [("model", val["top1"], model)]
        if ema is not None:
            ema_val = evaluate(ema.module, val_loader, device=device, amp_dtype=amp_dtype, tta=config.tta)
            record.update(ema_val_top1=ema_val["top1"], ema_val_top5=ema_val["top5"], ema_val_loss=ema_val["loss"])
            candidates.append(("ema", ema_val["top1"], ema.module))
        record["images_per_s"] = stats["images_per_s"]
        source, top1, weights = max(candidates, key=lambda c: c[1])  # ties go to the model
        improved = top1 > best["top1"]
        if improved:
            best = {"top1": top1, "epoch": epoch, "source": source}
        # metrics are reduced over ranks, so every rank decides alike; under FSDP the gathers below
        # are collectives (every rank calls them) and only rank 0 writes. Order matters: state.pt
        # last, so everything it claims exists
        if improved:
            full = parallel.full_weights(weights, state.plain)
            if main:
                save_weights(full, run_dir / BEST, spec=spec, classes=data.classes,
                             extra={"source": source, "epoch": str(epoch), "val_top1": repr(top1)})
        full = parallel.full_weights(model, state.plain)
        if main:
            save_weights(full, run_dir / LAST, spec=spec, classes=data.classes,
                         extra={"source": "model", "epoch": str(epoch)})
        saved_state = state.state_dict()
        rngs = parallel.gather_objects(capture_rng())
        if main:
            folder.log(record)
            save_state(run_dir / STATE, {**saved_state, "epoch": epoch, "global_step": global_step,
                                         "best": best, "rng": rngs[0], "rng_ranks": rngs})
        ema_note = f" | EMA val top-1 {record['ema_val_top1']:.2f}%" if ema is not None else ""
        say(
            f"epoch {epoch}/{config.epochs}: train loss {stats['train_loss']:.4f}, lr {stats['lr']:.2e} | "
            f"val top-1 {val['top1']:.2f}% top-5 {val['top5']:.2f}% loss {val['loss']:.4f}{ema_note} | "
            f"{stats['images_per_s']:.0f} img/s",
            flush=True,
        )
    parallel.barrier()

    # the test split, once, with the weights in best.safetensors
    final: dict[str, Any] = {"best_val_top1": best["top1"], "best_epoch": best["epoch"], "best_source": best["source"]}
    test = None
    if "test" in loaders:
        best_model, _ = load_weights(run_dir / BEST, device=device)
        result = evaluate(best_model, loaders["test"], device=device, amp_dtype=amp_dtype, tta=config.tta)
        test = {"top1": result["top1"], "top5": result["top5"], "loss": result["loss"]}
        final.update(test_top1=result["top1"], test_top5=result["top5"], test_loss=result["loss"])
    folder.log(final)
    if main:
        plot_curves(folder.records, run_dir / CURVES, title=f"{config.model} on {data.source}")
    info.update(status="finished", end_time=_now())
    folder.write_run_info(info)
    folder.close()
    return RunResult(run_dir, best["top1"], best["epoch"], best["source"], test)
