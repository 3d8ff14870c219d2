"""Command-line flags generated from config dataclasses: field `batch_size` becomes `--batch-size`,
its type and choices come from the annotation and its help from the field's comment (see
`vitkit.train.fields.field_help`), so adding a field adds its flag."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal

from vitkit.train.fields import field_help, parse_set

# set by other means: --recipe NAME loads a recipe, --smoke shrinks it, model_args by --set / --patch-size
NOT_FLAGS = frozenset({"recipe", "smoke", "model_args"})


def _plain_type(hint: Any) -> Any:
    """`X` of `X | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def _flag_options(hint: Any) -> dict[str, Any]:
    """argparse keywords for a field of type `hint`; values stay None unless given."""
    hint = _plain_type(hint)
    if hint is bool:
        return {"action": "store_const", "const": True}
    if typing.get_origin(hint) is Literal:
        return {"choices": typing.get_args(hint)}
    if hint in (int, float):
        return {"type": hint}
    if typing.get_origin(hint) is list:  # YAML text, e.g. "[0.9, 0.95]", read by the config coercer
        return {"metavar": "LIST"}
    return {}


def add_config_flags(parser: argparse.ArgumentParser, *classes: type) -> None:
    """A `--kebab-name` flag for every field of the config dataclasses `classes` (but `NOT_FLAGS`)."""
    for cls in classes:
        hints, helps = typing.get_type_hints(cls), field_help(cls)
        for f in dataclasses.fields(cls):
            if f.name in NOT_FLAGS:
                continue
            flag = "--" + f.name.replace("_", "-")
            parser.add_argument(
                flag,
                dest=f.name,
                default=None,
                help=helps[f.name].replace("%", "%%") or None,
                **_flag_options(hints[f.name]),
            )


def config_field_names(*classes: type) -> list[str]:
    """The fields of `classes` that have flags."""
    return [f.name for cls in classes for f in dataclasses.fields(cls) if f.name not in NOT_FLAGS]


def requested_fields(args: argparse.Namespace, *classes: type) -> dict[str, Any]:
    """The config fields given explicitly on the command line: the flags of `classes` that were set,
    `--patch-size`, then the `--set` items (model_args entries merged)."""
    fields = {name: getattr(args, name) for name in config_field_names(*classes) if getattr(args, name) is not None}
    if getattr(args, "patch_size", None) is not None:
        fields["model_args"] = {"patch_size": args.patch_size}
    for key, value in parse_set(args.sets).items():
        if key == "model_args":
            fields.setdefault("model_args", {}).update(value)
        else:
            fields[key] = value
    return fields


def add_run_flags(p: argparse.ArgumentParser, *, nproc_help: str, set_help: str) -> None:
    """The flags `train` and `pretrain` share that are not config fields: --resume, --nproc, --smoke,
    --patch-size and --set."""
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR where it stopped")
    p.add_argument("--nproc", type=int, metavar="N", help=nproc_help)
    p.add_argument(
        "--smoke", action="store_true", help="shrink the recipe to seconds: few samples, 1 epoch, tiny model"
    )
    p.add_argument("--patch-size", type=int, help="patch size (ViT family), sets model_args.patch_size")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help=set_help)
