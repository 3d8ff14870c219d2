"""The training config: one typed dataclass, filled from a recipe file, command-line flags and `--set`.

Resolution order: dataclass defaults < recipe YAML < `--smoke` shrinking < explicit flags <
`--set key=value` (left to right).
The run folder's `config.yaml` holds the resolved config, data-derived fields included, so `eval`,
`predict` and `--resume` rebuild exactly what was trained.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from vitkit.data.config import CropMode, DataConfig

AmpMode = Literal["auto", "off", "bf16", "fp16"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
TtaMode = Literal["none", "hflip"]  # evaluation's test-time augmentation
TTA_MODES: tuple[str, ...] = typing.get_args(TtaMode)

DEFAULT_RECIPE = "fmnist_demo"

# fields that may differ when resuming: they change where and how fast the run goes, not what it computes
RUNTIME_FIELDS = frozenset(
    {"device", "threads", "workers", "log_every", "output", "compile", "fsdp", "fsdp_offload", "log", "mlflow_uri"}
)


@dataclass
class TrainConfig(DataConfig):
    """Every setting of a training run: the data fields (`DataConfig`) and the rest."""

    # -- model ---------------------------------------------------------------------------------
    model: str = "vit_tiny_patch16_224"  # a vitkit name or torchvision:NAME
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
    distillation: Literal["none", "soft", "hard"] = "none"
    teacher: str | None = None  # NAME | torchvision:NAME | RUN_DIR | FILE
    distill_alpha: float = 0.5  # weight of the distillation term
    distill_tau: float = 1.0  # soft distillation temperature
    # -- optimisation --------------------------------------------------------------------------
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int | None = None  # None: 2 x batch_size
    lr: float = 1e-3
    lr_batch: int | None = None  # lr is given for this total batch and scaled linearly (DeiT: 512)
    optimizer: Literal["adamw", "lamb"] = "adamw"  # lamb: DeiT III's (apex FusedLAMB's rule)
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    label_smoothing: float = 0.1
    clip_grad: float | None = None  # max global gradient norm
    grad_accum: int = 1
    amp: AmpMode = "auto"  # auto: bf16 on CUDA, off on CPU
    ema: bool = False
    ema_decay: float = 0.9998
    finetune: str | None = None  # a `vitkit pretrain` run folder (or its encoder.safetensors) to start from
    layer_decay: float | None = None  # layer-wise lr decay (SimMIM / BEiT fine-tuning: 0.9 Swin, 0.65 ViT)
    # -- run -----------------------------------------------------------------------------------
    seed: int | None = None  # set: deterministic mode; None: a random seed is drawn and recorded
    device: DeviceChoice = "auto"
    threads: int | None = None
    workers: int | None = None  # None: 0 for in-memory data, else min(4, cores)
    compile: bool = False
    fsdp: bool = False  # several processes: shard with FSDP2 (per block) instead of DDP
    fsdp_offload: bool = False  # with fsdp: parameters and optimizer state in CPU memory (needs CUDA)
    log_every: int = 50
    log: str = "auto"  # trackers: tensorboard, mlflow (comma-separated), none; auto: TensorBoard when installed
    mlflow_uri: str | None = None  # None: sqlite:///runs/mlflow.db, artifacts in runs/mlruns
    output: str | None = None
    recipe: str | None = None
    smoke: bool = False

    def validate(self) -> None:
        super().validate()
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        from vitkit.train.tracking import parse_log

        parse_log(self.log)
        for name in ("eval_batch_size", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer (or null), got {value}")
        if self.fsdp_offload and not self.fsdp:
            raise ValueError("fsdp_offload needs fsdp: add --fsdp")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_lr <= 0 or self.weight_decay < 0:
            raise ValueError("lr and warmup_lr must be > 0, min_lr and weight_decay >= 0")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1] (or null for none), got {self.layer_decay}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be > 0 (or null for no clipping), got {self.clip_grad}")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        for name in ("mixup_switch_prob",):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.repeated_aug < 1:
            raise ValueError(f"repeated_aug must be >= 1 (1 = off), got {self.repeated_aug}")
        if self.lr_batch is not None and self.lr_batch < 1:
            raise ValueError(f"lr_batch must be a positive integer (or null: lr as given), got {self.lr_batch}")
        if self.distillation != "none" and not self.teacher:
            raise ValueError(f"distillation={self.distillation} needs a teacher: --teacher NAME|torchvision:NAME|RUN_DIR|FILE")
        if self.teacher and self.distillation == "none":
            raise ValueError("a teacher is set but distillation is none: add --distillation hard|soft or drop --teacher")
        if not 0.0 <= self.distill_alpha <= 1.0 or self.distill_tau <= 0:
            raise ValueError("distill_alpha must be in [0, 1] and distill_tau > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if "img_size" in self.model_args or "num_classes" in self.model_args or "in_chans" in self.model_args:
            raise ValueError("set img_size, num_classes and in_chans as top-level fields, not in model_args")

    # -- derived -----------------------------------------------------------------------------
    @property
    def resolved_eval_batch_size(self) -> int:
        return self.eval_batch_size or 2 * self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- recipes -----------------------------------------------------------------------------------


RecipeKind = Literal["train", "pretrain"]
# shipped recipes: training ones in vitkit/recipes, pre-training ones (vitkit pretrain) in recipes/pretrain
_RECIPE_FOLDERS = {"train": ("recipes",), "pretrain": ("recipes", "pretrain")}
# fields only a pre-training recipe sets (vitkit.pretrain.runner.PretrainConfig)
PRETRAIN_ONLY_FIELDS = ("method", "mask_ratio", "mask_patch_size", "lr_schedule", "milestones", "gamma")


def _recipe_folder(kind: RecipeKind):
    folder = resources.files("vitkit")
    for part in _RECIPE_FOLDERS[kind]:
        folder = folder / part
    return folder


def list_recipes(kind: RecipeKind = "train") -> list[str]:
    """Names of the shipped training (or pre-training) recipes."""
    folder = _recipe_folder(kind)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str, kind: RecipeKind = "train") -> tuple[str, dict[str, Any]]:
    """(recipe name, its fields) from a shipped recipe name or a YAML file path; a recipe of the
    other kind (training vs `vitkit pretrain`) is an error that names the right command."""
    other: RecipeKind = "pretrain" if kind == "train" else "train"
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        text, name = path.read_text(), path.stem
    else:
        resource = _recipe_folder(kind) / f"{name_or_path}.yaml"
        if not resource.is_file():
            if (_recipe_folder(other) / f"{name_or_path}.yaml").is_file():
                raise ValueError(f"{name_or_path} is a {other} recipe: run it with `vitkit {other} --recipe {name_or_path}`")
            raise ValueError(
                f"unknown recipe {name_or_path!r}: shipped {kind} recipes are {', '.join(list_recipes(kind))}, "
                "or give the path of a YAML file"
            )
        text, name = resource.read_text(), name_or_path
    try:
        fields = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {name_or_path} is not valid YAML: {err}") from err
    if not isinstance(fields, dict):
        raise ValueError(f"recipe {name_or_path} must be a YAML mapping of config fields")
    pretrain_fields = [k for k in fields if k in PRETRAIN_ONLY_FIELDS]
    if kind == "train" and pretrain_fields:
        raise ValueError(
            f"recipe {name_or_path} sets pre-training fields ({', '.join(pretrain_fields)}): "
            f"run it with `vitkit pretrain --recipe {name_or_path}`"
        )
    return name, fields


# -- building a config -------------------------------------------------------------------------


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _unknown(key: str) -> ValueError:
    close = difflib.get_close_matches(key, _field_names(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown config field {key!r}{hint}")


def coerce(name: str, value: Any) -> Any:
    """`value` converted to the type of field `name` (strings from the command line included)."""
    hint = _hints()[name]
    return _coerce(name, hint, value)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        for arg in (a for a in args if a is not type(None)):
            return _coerce(name, arg, value)
    if origin is Literal:
        return value
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value) if hint is float else value
            if hint is int:
                number = int(value) if isinstance(value, (int, str)) else value
                if isinstance(number, float):
                    if not number.is_integer():
                        raise ValueError
                    number = int(number)
            return number
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {'an integer' if hint is int else 'a number'}, got {value!r}") from None
    if hint is str:
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, (int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return [_coerce(name, args[0], v) for v in value]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    return value


def apply_fields(config: TrainConfig, fields: dict[str, Any]) -> TrainConfig:
    """A copy of `config` with `fields` replaced (values coerced to the fields' types)."""
    names = set(_field_names())
    changes = {}
    for key, value in fields.items():
        if key not in names:
            raise _unknown(key)
        changes[key] = coerce(key, value)
    return dataclasses.replace(config, **changes)


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set key=value` items as fields; `model_args.depth=6` sets one model override."""
    fields: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        head, dot, sub = key.partition(".")
        if dot:
            if head != "model_args":
                raise ValueError(f"--set {key}: only model_args takes dotted keys (model_args.depth=6)")
            fields.setdefault("model_args", {})[sub] = value
        else:
            if head == "model_args" and isinstance(value, dict):
                fields.setdefault("model_args", {}).update(value)
            else:
                fields[head] = value
    return fields


def merge_fields(base: TrainConfig, fields: dict[str, Any]) -> TrainConfig:
    """Like `apply_fields`, but `model_args` entries are merged into the existing ones."""
    fields = dict(fields)
    if "model_args" in fields:
        fields["model_args"] = {**base.model_args, **coerce("model_args", fields["model_args"])}
    return apply_fields(base, fields)


def build_config(recipe: str | None = None, fields: dict[str, Any] | None = None, smoke: bool = False) -> TrainConfig:
    """Defaults < recipe < `--smoke` shrinking < `fields` (flags and --set items, see `parse_set`)."""
    name, recipe_fields = load_recipe(recipe or DEFAULT_RECIPE)
    config = merge_fields(TrainConfig(), recipe_fields)
    config = dataclasses.replace(config, recipe=name)
    fields = dict(fields or {})
    if fields.get("model") not in (None, config.model):
        # the recipe's model_args describe the recipe's model: another model starts from its own config
        config = dataclasses.replace(config, model=fields["model"], model_args={})
    if smoke:
        config = shrink_for_smoke(config)
    config = merge_fields(config, fields)
    config.validate()
    return config


def shrink_for_smoke(config: TrainConfig) -> TrainConfig:
    """A run of seconds with the same code path: few samples, one epoch, a tiny model."""

    def cap(value: int | None, limit: int) -> int:
        return limit if value is None else min(value, limit)

    return dataclasses.replace(
        config,
        smoke=True,
        epochs=1,
        train_samples=cap(config.train_samples, 64),
        val_samples=cap(config.val_samples, 32),
        test_samples=cap(config.test_samples, 32),
        batch_size=min(config.batch_size, 16),
        eval_batch_size=min(config.resolved_eval_batch_size, 32),
        warmup_epochs=0.0,
        log_every=min(config.log_every, 2),
        model_args={**config.model_args, **smoke_model_args(config.model)},
    )


def smoke_model_args(model: str) -> dict[str, Any]:
    """Overrides that make the named model tiny (depth 1, narrow); none for torchvision models."""
    if model.startswith("torchvision:"):
        return {}
    from vitkit.registry import get_variant

    variant_config = get_variant(model).config
    fields = {f.name: getattr(variant_config, f.name) for f in dataclasses.fields(variant_config)}
    out: dict[str, Any] = {}
    if isinstance(fields.get("depth"), int):
        out.update(depth=1, embed_dim=32, num_heads=2)
    elif isinstance(fields.get("depths"), (tuple, list)):  # hierarchical (Swin): one block per stage
        stages = len(fields["depths"])
        out.update(depths=(1,) * stages, embed_dim=16)
        if isinstance(fields.get("num_heads"), (tuple, list)):
            out["num_heads"] = (1,) * stages
    if "representation_size" in fields and fields["representation_size"]:
        out["representation_size"] = 32
    return out


def check_resume_compatible(saved: TrainConfig, requested: dict[str, Any]) -> None:
    """`--resume` may repeat the original settings but not contradict them (runtime fields may change)."""
    conflicts = []
    for key, value in requested.items():
        if key in RUNTIME_FIELDS:
            continue
        if key == "model_args":
            for sub, v in coerce("model_args", value).items():
                if saved.model_args.get(sub) != v:
                    conflicts.append(f"model_args.{sub}={v!r} (run has {saved.model_args.get(sub)!r})")
            continue
        if key not in set(_field_names()):
            raise _unknown(key)
        v = coerce(key, value)
        if getattr(saved, key) != v:
            conflicts.append(f"{key}={v!r} (run has {getattr(saved, key)!r})")
    if conflicts:
        raise ValueError(
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
