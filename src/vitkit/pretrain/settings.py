"""`vitkit pretrain`'s settings: the masked-image-modelling fields (`PretrainConfig`) beside a
`TrainConfig` for the rest, resolved as training configs are (defaults < recipe < --smoke < flags
and --set items), and saved in the run folder as pretrain.yaml beside config.yaml.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vitkit.train.config import RUNTIME_FIELDS, TrainConfig, check_resume_compatible, load_run_config
from vitkit.train.fields import apply_fields, contradictions, field_names, merge_fields, split_fields
from vitkit.train.recipes import load_recipe, shrink_for_smoke

PRETRAIN_CONFIG = "pretrain.yaml"
DEFAULT_RECIPE = "simmim_fmnist"
MASK_RULE = (
    "the mask patch must be a multiple of the model's patch size and divide the image size "
    "(the paper: 32 at 192 px; for 32x32 images use e.g. 8 with Swin's 4x4 patches)"
)


@dataclass
class PretrainConfig:
    """Masked-image-modelling settings (the rest of a run's settings are a `TrainConfig`)."""

    method: Literal["simmim"] = "simmim"  # pre-training method
    mask_ratio: float = 0.6  # fraction of mask patches replaced by the mask token
    mask_patch_size: int = field(default=32, metadata={"help": f"mask patch side in pixels; {MASK_RULE}"})
    lr_schedule: Literal["cosine", "multistep"] = "cosine"  # after the linear warm-up
    milestones: list[int] = field(default_factory=list)  # multistep: epochs where the lr is multiplied by gamma
    gamma: float = 0.1  # multistep: the lr factor at each milestone

    def validate(self) -> None:
        if self.method != "simmim":
            raise ValueError(f"unknown pre-training method {self.method!r}: vitkit offers simmim")
        if self.lr_schedule not in ("cosine", "multistep"):
            raise ValueError(f"lr_schedule must be cosine or multistep, got {self.lr_schedule!r}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


PRETRAIN_FIELDS = tuple(field_names(PretrainConfig))


def make_pretrain_config(fields: dict[str, Any]) -> PretrainConfig:
    """A validated `PretrainConfig` from a mapping whose values may be strings (`--set mask_ratio=0.5`)."""
    config = apply_fields(PretrainConfig(), fields)
    config.validate()
    return config


def build_configs(
    recipe: str | None, fields: dict[str, Any], smoke: bool = False
) -> tuple[TrainConfig, PretrainConfig]:
    """(TrainConfig, PretrainConfig): defaults < recipe < --smoke < flags and --set items."""
    name, recipe_fields = load_recipe(recipe or DEFAULT_RECIPE, kind="pretrain")
    recipe_pre, recipe_train = split_fields(recipe_fields, PretrainConfig)
    given_pre, given_train = split_fields({k: v for k, v in fields.items() if v is not None}, PretrainConfig)
    config = dataclasses.replace(merge_fields(TrainConfig(), recipe_train), recipe=name)
    if given_train.get("model") not in (None, config.model):
        # the recipe's model_args describe the recipe's model
        config = dataclasses.replace(config, model=given_train["model"], model_args={})
    if smoke:
        config = shrink_for_smoke(config)
    config = merge_fields(config, given_train)
    config.validate()
    return config, make_pretrain_config({**recipe_pre, **given_pre})


def load_run_configs(run_dir: str | os.PathLike) -> tuple[TrainConfig, PretrainConfig]:
    """The (TrainConfig, PretrainConfig) saved in a pre-training run folder."""
    path = Path(run_dir) / PRETRAIN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a vitkit pre-training run (no {PRETRAIN_CONFIG})")
    return load_run_config(run_dir), make_pretrain_config(yaml.safe_load(path.read_text()) or {})


def prepare_resume(run_dir: str | os.PathLike, requested: dict[str, Any]) -> tuple[TrainConfig, PretrainConfig]:
    """The saved configs of `run_dir`, with runtime fields from `requested`; contradictions are errors."""
    saved, saved_pre = load_run_configs(run_dir)
    pre_fields, train_fields = split_fields(requested, PretrainConfig)
    check_resume_compatible(saved, train_fields)
    conflicts = contradictions(saved_pre, pre_fields)
    if conflicts:
        raise ValueError(f"--resume: these settings contradict the run's {PRETRAIN_CONFIG}: {'; '.join(conflicts)}")
    runtime = {k: v for k, v in train_fields.items() if k in RUNTIME_FIELDS and k != "output"}
    return dataclasses.replace(apply_fields(saved, runtime), output=str(run_dir)), saved_pre
