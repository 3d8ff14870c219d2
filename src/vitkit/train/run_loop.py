"""The run skeleton shared by `vitkit train` and `vitkit pretrain`: start-up, run folder, resume,
the epoch loop over `engine.train_one_epoch`, checkpoints (state.pt) and the final pass.

A task (`RunTask`) supplies what differs: its data, model and optimiser, its batch loss, how it
validates and which weights it writes each epoch, and its closing pass and result.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from vitkit.core.errors import NonFiniteError, VitkitError
from vitkit.core.hardware import describe_amp, resolve_amp
from vitkit.core.heap import heap_kept
from vitkit.data.datasets import LoadedData, build_dataset, resolve_data_fields
from vitkit.data.samplers import build_loader, set_loader_epoch, set_loader_position
from vitkit.train import parallel
from vitkit.train.config import TrainConfig
from vitkit.train.engine import BatchLoss, train_one_epoch
from vitkit.train.modeling import default_img_size
from vitkit.train.plots import plot_curves
from vitkit.train.preemption import Preempted, StopRequest, resume_command
from vitkit.train.progress import Progress
from vitkit.train.run_folder import CURVES, STATE, RunFolder
from vitkit.train.runtime import now, prepare_run, provenance, runtime, seed_everything
from vitkit.train.state_file import capture_rng, load_state, remove_stale_temporaries, restore_rng, save_state

R = TypeVar("R")


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
        """Restore what `state_dict` returned (or what an older vitkit wrote: see below)."""
        groups = state["optimizer"].get("param_groups", [])
        if groups and groups[0]["params"] and isinstance(groups[0]["params"][0], int):
            # `vitkit pretrain` before the shared run skeleton saved plain, position-keyed states
            parallel.unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            parallel.load_full_state(self.model, state["model"], self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            parallel.load_full_state(self.ema, state["ema"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


@dataclass
class Run:
    """One process's view of a run in progress: what the skeleton builds and the task reads."""

    config: TrainConfig
    run_dir: Path
    device: torch.device
    resume: bool
    main: bool = field(default_factory=parallel.is_main)
    data: LoadedData = field(init=False)
    loaders: dict[str, DataLoader] = field(default_factory=dict)
    state: TrainingState = field(init=False)
    train_model: nn.Module = field(init=False)  # what trains: `state.wrapped`, torch.compile'd with `compile`
    amp_dtype: torch.dtype | None = None
    folder: RunFolder = field(init=False)
    info: dict[str, Any] = field(default_factory=dict)
    global_step: int = 0
    nonfinite_skips: int = 0  # steps skipped so far (on_nonfinite=skip), over the whole run
    stop: StopRequest = field(default_factory=StopRequest)
    position: int = 0  # batches of the current epoch already trained (a run resumed mid-epoch)
    partial: dict[str, float] | None = None  # those batches' loss sum, images and steps

    def say(self, *args: Any, **kwargs: Any) -> None:
        """print, on rank 0 only."""
        if self.main:
            print(*args, **kwargs)


class RunTask(ABC, Generic[R]):
    """What a kind of run adds to the skeleton; hooks are called in the order listed."""

    noun = "training"  # in messages: "training stopped"
    command = "train"  # `vitkit COMMAND --resume DIR` continues a stopped run

    @abstractmethod
    def load_data(self, config: TrainConfig) -> LoadedData: ...

    @abstractmethod
    def build_loaders(self, run: Run) -> dict[str, DataLoader]: ...

    @abstractmethod
    def build_state(self, run: Run) -> TrainingState:
        """Model (wrapped for several processes), optimiser, schedule: before the per-rank seed."""

    def prepare(self, run: Run) -> None:
        """After the per-rank seed, before the run folder: losses, teachers, masks; sets `run.train_model`."""
        wrapped = run.state.wrapped
        # torch types torch.compile(module) as a callable; it is an OptimizedModule (a Module)
        run.train_model = torch.compile(wrapped) if run.config.compile else wrapped  # type: ignore[assignment]

    def write_files(self, run: Run) -> None:
        """Files beside config.yaml and run.json at the start (rank 0; `run.info` may still change)."""

    def restore(self, saved: dict[str, Any]) -> None:
        """Task counters from state.pt when resuming (see `extra_state`)."""

    @abstractmethod
    def announce(self, run: Run) -> str:
        """The line printed before the first epoch."""

    def before_loop(self, run: Run) -> None:
        """After resuming, before the first epoch."""

    @abstractmethod
    def batch_loss(self, run: Run, epoch: int) -> BatchLoss: ...

    @abstractmethod
    def validate(self, run: Run, epoch: int, stats: dict[str, float]) -> dict[str, Any]:
        """The epoch's metrics.jsonl line, from the training `stats` and a validation pass."""

    @abstractmethod
    def save_weights(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        """Write the epoch's weights (every rank calls it: gathers under FSDP are collectives)."""

    def extra_state(self) -> dict[str, Any]:
        """Task counters to keep in state.pt."""
        return {}

    def after_epoch(self, run: Run, epoch: int) -> None:
        """After state.pt is written: figures and the like."""

    @abstractmethod
    def epoch_line(self, run: Run, epoch: int, record: dict[str, Any]) -> str: ...

    @abstractmethod
    def final(self, run: Run) -> dict[str, Any] | None:
        """The closing metrics.jsonl line (every rank calls it), or None for none."""

    @abstractmethod
    def curves_title(self, run: Run) -> tuple[str, str]:
        """(title, loss label) of curves.png."""

    @abstractmethod
    def result(self, run: Run) -> R: ...


def run_info(run: Run, model: nn.Module) -> dict[str, Any]:
    """run.json's contents at the start (or resumption) of a run: provenance, model, data."""
    info = run.folder.read_run_info() if run.resume else {}
    info.update(provenance(run.device))
    info.setdefault("start_time", now())
    if run.resume:
        info.setdefault("resumed", []).append(now())
    info.update(
        status="running",
        model={"name": run.config.model, "params": sum(p.numel() for p in model.parameters())},
        data={
            "source": run.data.source,
            "classes": run.data.classes,
            **{split: len(loader.dataset) for split, loader in run.loaders.items()},  # type: ignore[arg-type]
            "skipped_corrupt": len(run.data.skipped),
            "skipped_files": [str(p) for p in run.data.skipped[:20]],
        },
    )
    return info


def build_loaders(
    config: TrainConfig, data: LoadedData, device: torch.device, splits: tuple[str, ...] = ("train", "val", "test")
) -> dict[str, DataLoader]:
    """A loader per split of `splits` the data has: shuffled and augmented for train, in order for val
    and test. Train and val are required."""
    loaders = {}
    for split in splits:
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


def run_task(task: RunTask[R], config: TrainConfig, *, resume: bool = False) -> R:
    """Run `task` as `config` says, in the run folder `config.output` (continuing it with `resume`).

    Started by torchrun (or `--nproc N`), every process runs this: it joins the process group,
    rank 0 decides the run folder and the seed, and only rank 0 writes.
    """
    device, run_dir, config, deterministic = prepare_run(config, resume)
    # a run killed before its first checkpoint has a config but no state.pt: it restarts in place
    restart = resume and not parallel.broadcast_object((run_dir / STATE).is_file())
    # on the CPU the heap keeps freed memory for the next step (vitkit.core.heap: fewer page faults)
    with runtime(config.threads, deterministic), heap_kept(device.type == "cpu"):
        run = Run(config, run_dir, device, resume and not restart)
        if run.main and resume:
            remove_stale_temporaries(run_dir)  # what a killed write left beside its target
        _start(task, run)
        if restart:
            run.folder.load_metrics(upto_epoch=0, upto_step=0)  # lines the killed run logged
            run.say(f"{run_dir} has no checkpoint yet: starting it again from the beginning")
        start_epoch = _resume(task, run) if run.resume else 1
        run.say(task.announce(run))
        task.before_loop(run)
        try:
            with run.stop.installed():
                for epoch in range(start_epoch, run.config.epochs + 1):
                    _epoch(task, run, epoch)
            parallel.barrier()
            return _finish(task, run)
        except BaseException:  # a tracker never stays RUNNING: stops and errors closed it already
            run.folder.close("FAILED")
            raise


def _start(task: RunTask, run: Run) -> None:
    seed_everything(run.config.seed)
    run.data = task.load_data(run.config)
    default_size = default_img_size(run.config.model, run.config.model_args)
    run.config = resolve_data_fields(run.config, run.data, default_size)  # type: ignore[assignment]
    run.loaders = task.build_loaders(run)
    if run.data.skipped:
        run.say(f"skipped {len(run.data.skipped)} corrupt image(s), e.g. {run.data.skipped[0]}")
    run.state = task.build_state(run)
    if parallel.get_world_size() > 1:  # augmentation (and masks) differ per rank, reproducibly: seed + rank
        seed_everything(parallel.rank_seed(run.config.seed))
    run.amp_dtype, amp = resolve_amp(run.config.amp, run.device)
    run.say(describe_amp(amp))  # what `amp` chose, and the CPU flags that decided it
    task.prepare(run)
    run.folder = RunFolder(run.run_dir, enabled=run.main)
    run.info = run_info(run, run.state.model)
    run.info["amp"] = amp
    task.write_files(run)
    run.folder.write_config(run.config)
    run.folder.write_run_info(run.info)


def _resume(task: RunTask, run: Run) -> int:
    """Restore state.pt; returns the first epoch to run."""
    saved = load_state(run.run_dir / STATE)
    run.state.load_state_dict(saved)
    task.restore(saved)
    run.global_step = saved["global_step"]
    run.nonfinite_skips = saved.get("nonfinite_skips", 0)
    run.position, run.partial = saved.get("epoch_position", 0), saved.get("epoch_partial")
    saved_world = len(saved.get("rng_ranks") or [saved["rng"]])
    if run.position and saved_world != parallel.get_world_size():  # positions count this many ranks' batches
        raise VitkitError(
            f"{run.run_dir} stopped mid-epoch with {saved_world} process(es): resume it with "
            f"--nproc {saved_world} (the process count may change at an epoch boundary)"
        )
    run.folder.load_metrics(upto_epoch=saved["epoch"], upto_step=run.global_step)
    # last: nothing above may draw random numbers afterwards. Each rank continues its own
    # generators; a rank the saved run did not have starts from seed + rank and the epoch
    rngs = saved.get("rng_ranks") or [saved["rng"]]
    if parallel.get_rank() < len(rngs):
        restore_rng(rngs[parallel.get_rank()])
    else:
        seed_everything(parallel.rank_seed(run.config.seed) * 100_003 + saved["epoch"])
    where = (
        f"in epoch {saved['epoch'] + 1}, after {run.position} batches"
        if run.position
        else f"after epoch {saved['epoch']}"
    )
    run.say(f"resuming {run.run_dir} {where}")
    return saved["epoch"] + 1


class StoppableBatches:
    """The training loader's batches for one epoch, from `position` on, ending early when a stop is
    agreed at an optimiser step boundary (before the next group's first batch is drawn, so the saved
    random state is the one the next batch would have used)."""

    def __init__(self, loader: DataLoader, run: Run, position: int) -> None:
        self.loader, self.run, self.start = loader, run, position
        self.skips_itself = set_loader_position(loader, position)  # a stream drops its first batches below
        self.trained, self.stopped = 0, 0  # batches yielded; the signal that ended the epoch early (0: none)

    def __len__(self) -> int:
        return len(self.loader) - (0 if self.skips_itself else self.start)

    def __iter__(self) -> Any:
        batches = iter(self.loader)
        if not self.skips_itself:
            rng = capture_rng()  # the dropped batches' augmentation must not draw from the saved state
            for _ in range(self.start):
                next(batches)
            restore_rng(rng)
        total, accum = len(self), self.run.config.grad_accum
        for i in range(total):
            # i > 0: the engine trains at least one step per call (a stop before it is `_epoch`'s)
            if i > 0 and i % accum == 0:
                signum = self.run.stop.agreed(self.run.device)
                if signum:
                    self.stopped = self.run.stop.signum or signum  # a peer's signal when not this rank's own
                    return
            yield next(batches)
            self.trained += 1


def _train_epoch(task: RunTask, run: Run, epoch: int) -> tuple[dict[str, float], StoppableBatches]:
    config, state = run.config, run.state
    set_loader_epoch(run.loaders["train"], epoch, parallel.rank_seed(config.seed))
    batches = StoppableBatches(run.loaders["train"], run, run.position)
    progress = Progress(len(batches), f"epoch {epoch}/{config.epochs}", enabled=run.main, every=config.log_every)
    try:
        return train_one_epoch(
            run.train_model,
            task.batch_loss(run, epoch),
            batches,
            state.optimizer,
            device=run.device,
            scheduler=state.scheduler,
            ema=state.ema,
            amp_dtype=run.amp_dtype,
            scaler=state.scaler,
            grad_accum=config.grad_accum,
            clip_grad=config.clip_grad,
            epoch=epoch,
            start_step=run.global_step,
            log_every=config.log_every,
            on_log=run.folder.log,
            progress=progress,
            on_nonfinite=config.on_nonfinite,
            max_skips=config.max_nonfinite_skips - run.nonfinite_skips,
        ), batches
    except NonFiniteError as err:
        run.info.update(status=f"stopped: {err}", end_time=now())
        run.folder.write_run_info(run.info)
        run.folder.close("FAILED")  # metrics.jsonl and the trackers
        kept = f"the checkpoint of epoch {epoch - 1} in {run.run_dir} is intact" if epoch > 1 else "no checkpoint yet"
        raise NonFiniteError(
            f"{err}; {task.noun} stopped ({kept}): lower the learning rate, set clip_grad (e.g. --set clip_grad=1.0) "
            f"or skip such steps: --resume {run.run_dir} --on-nonfinite skip"
        ) from None
    finally:
        progress.close()


def _epoch(task: RunTask, run: Run, epoch: int) -> None:
    signum = run.stop.agreed(run.device)
    if signum:  # stopped between epochs (in validation or a save): nothing new to train on
        _save_stopped(task, run, epoch, run.stop.signum or signum, run.position, run.partial)  # always raises
    stats, batches = _train_epoch(task, run, epoch)
    run.global_step += int(stats["steps"])
    stats = _with_partial(run, stats)
    run.nonfinite_skips += int(stats["nonfinite_skips"])
    if batches.stopped:
        partial = {
            "loss_sum": stats["train_loss"] * stats["images"],
            "images": stats["images"],
            "steps": stats["steps"],
        }
        _save_stopped(task, run, epoch, batches.stopped, batches.start + batches.trained, partial)
    run.position, run.partial = 0, None
    record = task.validate(run, epoch, stats)
    _record_decode_skips(run)
    if run.config.on_nonfinite == "skip":
        record["nonfinite_skips"] = int(stats["nonfinite_skips"])
    # metrics are reduced over ranks, so every rank decides alike; under FSDP the gathers are
    # collectives (every rank calls them) and only rank 0 writes. Order matters: state.pt last,
    # so everything it claims exists
    task.save_weights(run, epoch, record)
    saved_state = {**run.state.state_dict(), **task.extra_state()}
    rngs = parallel.gather_objects(capture_rng())
    if run.main:
        run.folder.log(record)
        save_state(
            run.run_dir / STATE,
            {
                **saved_state,
                "epoch": epoch,
                "global_step": run.global_step,
                "rng": rngs[0],
                "rng_ranks": rngs,
                "nonfinite_skips": run.nonfinite_skips,
            },
        )
    task.after_epoch(run, epoch)
    run.say(task.epoch_line(run, epoch, record), flush=True)


def _record_decode_skips(run: Run) -> None:
    """Files that passed the scan's header check but failed to decode when read (`--skip-corrupt`): every
    rank's, listed per split in run.json at each epoch end (a collective: every rank calls it)."""
    found = {split: [str(p) for p in getattr(loader.dataset, "skipped", [])] for split, loader in run.loaders.items()}
    ranks = parallel.gather_objects(found)
    merged = {split: sorted({p for rank in ranks for p in rank.get(split, [])}) for split in found}
    listed = {split: {"count": len(paths), "files": paths[:20]} for split, paths in merged.items() if paths}
    if listed and run.main:
        run.info["data"]["skipped_when_read"] = listed
        run.folder.write_run_info(run.info)


def _with_partial(run: Run, stats: dict[str, float]) -> dict[str, float]:
    """The epoch's stats, counting the batches trained before a mid-epoch resume."""
    if run.partial is None:
        return stats
    done = run.partial
    images = stats["images"] + done["images"]
    loss_sum = stats["train_loss"] * stats["images"] + done["loss_sum"]
    return {**stats, "train_loss": loss_sum / images, "images": images, "steps": stats["steps"] + done["steps"]}


def _save_stopped(
    task: RunTask, run: Run, epoch: int, signum: int, position: int, partial: dict[str, float] | None
) -> None:
    """Save a mid-epoch state.pt (every rank calls it: gathers are collectives), then raise Preempted."""
    saved_state = {**run.state.state_dict(), **task.extra_state()}
    rngs = parallel.gather_objects(capture_rng())
    if run.main:
        save_state(
            run.run_dir / STATE,
            {
                **saved_state,
                "epoch": epoch - 1,
                "global_step": run.global_step,
                "epoch_position": position,
                "epoch_partial": partial,
                "rng": rngs[0],
                "rng_ranks": rngs,
                "nonfinite_skips": run.nonfinite_skips,
            },
        )
    parallel.barrier()  # every rank leaves after the file is complete
    name = {2: "SIGINT", 15: "SIGTERM"}.get(signum, f"signal {signum}")
    where = f"in epoch {epoch} after {position} batches"
    run.info.update(status=f"stopped by {name} {where}", end_time=now())
    run.folder.write_run_info(run.info)
    run.folder.close("KILLED")
    command = resume_command(task.command, run.run_dir)
    message = f"{task.noun} stopped by {name} {where}, state saved; continue with: {command}"
    run.say(message, file=sys.stderr, flush=True)
    raise Preempted(signum, message)


def _finish(task: RunTask[R], run: Run) -> R:
    final = task.final(run)
    if final is not None:
        run.folder.log(final)
    if run.main:
        title, loss_label = task.curves_title(run)
        plot_curves(run.folder.records, run.run_dir / CURVES, title=title, loss_label=loss_label)
    run.info.update(status="finished", end_time=now())
    run.folder.write_run_info(run.info)
    run.folder.close()
    return task.result(run)
