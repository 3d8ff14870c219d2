"""Recipes: small YAML files of config fields shipped as package data (`--recipe NAME`) or given as a
path, and the resolution of a training config from them.

Resolution order: dataclass defaults < recipe YAML < `--smoke` shrinking < explicit flags <
`--set key=value` (left to right).
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml

from vitkit.core.errors import UsageError
from vitkit.train.config import TrainConfig
from vitkit.train.fields import merge_fields

DEFAULT_RECIPE = "fmnist_demo"

RecipeKind = Literal["train", "pretrain"]
# shipped recipes: training ones in vitkit/recipes, pre-training ones (vitkit pretrain) in recipes/pretrain
_RECIPE_FOLDERS = {"train": ("recipes",), "pretrain": ("recipes", "pretrain")}
# fields only a pre-training recipe sets (vitkit.pretrain.settings.PretrainConfig; a test keeps them equal)
PRETRAIN_ONLY_FIELDS = ("method", "mask_ratio", "mask_patch_size", "lr_schedule", "milestones", "gamma")


def _recipe_folder(kind: RecipeKind) -> Traversable:
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
        try:
            text, name = path.read_text(), path.stem
        except UnicodeDecodeError:
            raise UsageError(f"recipe file {path} is not text (UTF-8 YAML): give a YAML recipe") from None
    else:
        resource = _recipe_folder(kind) / f"{name_or_path}.yaml"
        if not resource.is_file():
            if (_recipe_folder(other) / f"{name_or_path}.yaml").is_file():
                raise ValueError(
                    f"{name_or_path} is a {other} recipe: run it with `vitkit {other} --recipe {name_or_path}`"
                )
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
    from vitkit.factory import get_variant  # noqa: PLC0415  imports torch: only when used

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
