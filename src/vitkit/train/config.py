"""The training config: one typed dataclass (its data fields from `DataConfig`) and its validation.

Filled from a recipe (`vitkit.train.recipes`), command-line flags and `--set` (`vitkit.train.fields`).
The run folder's `config.yaml` holds the resolved config, data-derived fields included, so `eval`,
`predict` and `--resume` rebuild exactly what was trained.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vitkit.core.errors import UsageError
from vitkit.data.data_config import DataConfig
from vitkit.train.fields import apply_fields, contradictions
from vitkit.train.tracking import parse_log

AmpMode = Literal["auto", "off", "bf16", "fp16"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
TtaMode = Literal["none", "hflip"]  # evaluation's test-time augmentation
TTA_MODES: tuple[str, ...] = typing.get_args(TtaMode)

# fields that may differ when resuming: they change where and how fast the run goes, not what it computes
RUNTIME_FIELDS = frozenset(
    {
        "device",
        "threads",
        "workers",
        "log_every",
        "output",
        "compile",
        "fsdp",
        "fsdp_offload",
        "log",
        "mlflow_uri",
        "on_nonfinite",
        "max_nonfinite_skips",
    }  # a run stopped by a NaN may resume with --on-nonfinite skip
)


@dataclass
class TrainConfig(DataConfig):
    """Every setting of a training run: the data fields (`DataConfig`) and the rest."""

    # -- model ---------------------------------------------------------------------------------
    # a vitkit name or torchvision:NAME (another model than the recipe's drops the recipe's model_args)
    model: str = "vit_tiny_patch16_224"
    model_args: dict[str, Any] = field(default_factory=dict)  # model config overrides (depth, drop_path_rate, ...)
    # -- evaluation and batch augmentation (data and per-image augmentation: DataConfig) ---------
    tta: TtaMode = "none"  # hflip: evaluation (val, test) averages the probabilities of the image and its mirror
    mixup: float = 0.0  # Mixup alpha (0: off)
    cutmix: float = 0.0  # CutMix alpha (0: off)
    mixup_switch_prob: float = 0.5  # chance of CutMix for a batch when both are on
    repeated_aug: int = 1  # each training image this many times per epoch, augmented independently
    repeated_aug_epoch: Literal["repeated", "dataset"] = "repeated"  # dataset: epoch as long as the data (DeiT)
    # -- loss and distillation -----------------------------------------------------------------
    loss: Literal["ce", "bce"] = "ce"  # bce: per-class sigmoid on (mixed) targets (DeiT III)
    bce_threshold: float | None = None  # bce targets above it become 1 (DeiT III: 0.0)
    distillation: Literal["none", "soft", "hard"] = "none"  # knowledge distillation (DeiT) from the teacher
    teacher: str | None = None  # NAME | torchvision:NAME | RUN_DIR | FILE
    distill_alpha: float = 0.5  # weight of the distillation term
    distill_tau: float = 1.0  # soft distillation temperature
    # -- optimisation --------------------------------------------------------------------------
    epochs: int = 10  # passes over the training data
    batch_size: int = 128  # images per optimiser step and process (x grad_accum)
    eval_batch_size: int | None = None  # None: 2 x batch_size
    lr: float = 1e-3  # peak learning rate (after warm-up)
    lr_batch: int | None = None  # lr is given for this total batch and scaled linearly (DeiT: 512)
    optimizer: Literal["adamw", "lamb"] = "adamw"  # lamb: DeiT III's (apex FusedLAMB's rule)
    min_lr: float = 1e-5  # the cosine schedule's final lr
    warmup_epochs: float = 1.0  # linear warm-up from warmup_lr to lr
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05  # AdamW / LAMB (none on norms, biases, tokens, position tables)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # the optimiser's, e.g. "[0.9, 0.95]"
    label_smoothing: float = 0.1  # cross-entropy targets: 1 - s on the class, s spread evenly
    clip_grad: float | None = None  # max global gradient norm
    # a non-finite loss or gradient: stop (keeping the last checkpoint), or skip the step (counted in metrics.jsonl)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = 20  # with on_nonfinite=skip: the run stops at the next one after this many
    grad_accum: int = 1  # batches per optimiser step
    amp: AmpMode = "auto"  # auto: bf16 on CUDA and on CPUs with AMX or AVX512_BF16, fp32 on other CPUs
    ema: bool = False  # keep an exponential moving average of the weights (evaluated beside the model)
    ema_decay: float = 0.9998  # per optimiser step
    # start from a `vitkit pretrain` run (its encoder), a `vitkit train` run (best weights) or a checkpoint file
    # (any format `vitkit convert` reads); takes its model, model_args, img_size and in_chans unless given. A new
    # img_size resamples position embeddings / Swin position tables; a new class count re-initialises the head
    finetune: str | None = None
    # layer-wise lr decay in (0, 1]: block i of L trains at lr x decay^(L + 1 - i) (SimMIM / BEiT fine-tuning:
    # 0.9 Swin, 0.65 ViT)
    layer_decay: float | None = None
    # -- run -----------------------------------------------------------------------------------
    seed: int | None = None  # makes the run deterministic; None: a random seed is drawn and recorded
    device: DeviceChoice = "auto"  # auto: CUDA when there is one
    threads: int | None = None  # CPU threads for torch
    workers: int | None = None  # data-loading processes; None: 0 for in-memory data, else min(4, cores)
    compile: bool = False  # torch.compile the model
    fsdp: bool = False  # several processes: shard with FSDP2 (per block) instead of DDP
    fsdp_offload: bool = False  # with fsdp: parameters and optimizer state in CPU memory (needs CUDA)
    log_every: int = 50  # a step line in metrics.jsonl every N optimiser steps
    log: str = "auto"  # trackers: tensorboard, mlflow (comma-separated), none; auto: TensorBoard when installed
    mlflow_uri: str | None = None  # MLflow tracking URI; None: sqlite:///runs/mlflow.db, artifacts in runs/mlruns
    output: str | None = None  # run folder (default: runs/<recipe>-<date>-<time>)
    recipe: str | None = None
    smoke: bool = False

    def validate(self) -> None:
        super().validate()
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            value = getattr(self, name)
            if value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value}")
        parse_log(self.log)
        for name in ("eval_batch_size", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"{name} must be a positive integer (or null), got {value}")
        if self.fsdp_offload and not self.fsdp:
            raise UsageError("fsdp_offload needs fsdp: add --fsdp")
        if self.max_nonfinite_skips < 0:
            raise UsageError(f"max_nonfinite_skips must be >= 0, got {self.max_nonfinite_skips}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"workers must be >= 0, got {self.workers}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.ema_decay < 1.0:
            raise UsageError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_lr <= 0 or self.weight_decay < 0:
            raise UsageError("lr and warmup_lr must be > 0, min_lr and weight_decay >= 0")
        if self.warmup_epochs < 0:
            raise UsageError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise UsageError(f"layer_decay must be in (0, 1] (or null for none), got {self.layer_decay}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise UsageError(f"clip_grad must be > 0 (or null for no clipping), got {self.clip_grad}")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        for name in ("mixup_switch_prob",):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.repeated_aug < 1:
            raise UsageError(f"repeated_aug must be >= 1 (1 = off), got {self.repeated_aug}")
        if self.lr_batch is not None and self.lr_batch < 1:
            raise UsageError(f"lr_batch must be a positive integer (or null: lr as given), got {self.lr_batch}")
        if self.distillation != "none" and not self.teacher:
            raise UsageError(
                f"distillation={self.distillation} needs a teacher: --teacher NAME|torchvision:NAME|RUN_DIR|FILE"
            )
        if self.teacher and self.distillation == "none":
            raise UsageError(
                "a teacher is set but distillation is none: add --distillation hard|soft or drop --teacher"
            )
        if not 0.0 <= self.distill_alpha <= 1.0 or self.distill_tau <= 0:
            raise UsageError("distill_alpha must be in [0, 1] and distill_tau > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UsageError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if "img_size" in self.model_args or "num_classes" in self.model_args or "in_chans" in self.model_args:
            raise UsageError("set img_size, num_classes and in_chans as top-level fields, not in model_args")

    # -- derived -----------------------------------------------------------------------------
    @property
    def resolved_eval_batch_size(self) -> int:
        return self.eval_batch_size or 2 * self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def check_resume_compatible(saved: TrainConfig, requested: dict[str, Any]) -> None:
    """`--resume` may repeat the original settings but not contradict them (runtime fields may change)."""
    conflicts = contradictions(saved, requested, RUNTIME_FIELDS)
    if conflicts:
        raise UsageError(
            f"--resume: these settings contradict the run's config.yaml: {'; '.join(conflicts)}. "
            "Drop them to continue the run as it was, or start a new run with another --output"
        )


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved config saved in a run folder."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a vitkit run folder (no config.yaml)")
    fields = yaml.safe_load(path.read_text()) or {}
    return apply_fields(TrainConfig(), fields)
