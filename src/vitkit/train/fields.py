"""Filling config dataclasses from text: one coercer for every config (`TrainConfig`, `PretrainConfig`),
`--set key=value` parsing, merging and the `--resume` contradiction check.

Values come from YAML (recipes, config.yaml) or the command line (strings); each is converted to
the type its field declares (int, float, bool, str, Literal, optional, list[...], dict).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import math
import re
import tokenize
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, TypeVar

import yaml

from vitkit.core.errors import UsageError

C = TypeVar("C")


def field_names(cls: type) -> list[str]:
    """The field names of config dataclass `cls`."""
    return [f.name for f in dataclasses.fields(cls)]


def unknown_field(key: str, cls: type) -> ValueError:
    """The error for a key that is no field of `cls`, with the closest names."""
    close = difflib.get_close_matches(key, field_names(cls), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown config field {key!r}{hint}")


def coerce(cls: type, name: str, value: Any) -> Any:
    """`value` converted to the type of field `name` of `cls` (strings from the command line included)."""
    return _coerce(name, typing.get_type_hints(cls)[name], value)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        for arg in (a for a in args if a is not type(None)):
            return _coerce(name, arg, value)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads off / on / no / yes as booleans: `--set amp=off`
            spellings = ("true", "yes", "on") if value else ("false", "no", "off")
            return next((a for a in args if isinstance(a, str) and a.lower() in spellings), value)
        return value
    if hint is bool:
        return _boolean(name, value)
    if hint in (int, float):
        return _number(name, hint, value)
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


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
        return value.lower() in ("true", "yes", "1", "on")
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be true or false, got {value!r}")


INT_LIMIT = 2**31 - 1  # sizes, counts and seeds: anything larger is a typo, and overflows torch's int32 sizes


def _number(name: str, hint: type, value: Any) -> int | float:
    kind = "an integer" if hint is int else "a finite number"
    if isinstance(value, bool) or value is None:
        raise UsageError(f"{name} must be {kind}, got {value!r}")
    try:
        number = float(value) if hint is float else int(value) if isinstance(value, (int, str)) else value
        if hint is int and isinstance(number, float):
            if not number.is_integer():
                raise ValueError
            number = int(number)
        if not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{name} must be {kind}, got {value!r}") from None
    if hint is int and abs(number) > INT_LIMIT:
        raise UsageError(f"{name}={number} is out of range: at most {INT_LIMIT} in size")
    return number


def apply_fields(config: C, fields: dict[str, Any]) -> C:
    """A copy of `config` with `fields` replaced (values coerced to the fields' types)."""
    cls = type(config)
    names = set(field_names(cls))
    changes = {}
    for key, value in fields.items():
        if key not in names:
            raise unknown_field(key, cls)
        changes[key] = coerce(cls, key, value)
    return dataclasses.replace(config, **changes)  # type: ignore[type-var]


def merge_fields(base: C, fields: dict[str, Any]) -> C:
    """Like `apply_fields`, but `model_args` entries are merged into the existing ones."""
    fields = dict(fields)
    if "model_args" in fields:
        given = coerce(type(base), "model_args", fields["model_args"])
        fields["model_args"] = {**base.model_args, **given}  # type: ignore[attr-defined]
    return apply_fields(base, fields)


def split_fields(fields: dict[str, Any], cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the fields of `cls`, the rest) of a recipe or command-line mapping."""
    own = set(field_names(cls))
    return {k: v for k, v in fields.items() if k in own}, {k: v for k, v in fields.items() if k not in own}


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
        elif head == "model_args":
            if not isinstance(value, dict):
                raise UsageError(f"--set model_args needs a mapping, got {text!r}: e.g. --set model_args.depth=6")
            fields.setdefault("model_args", {}).update(value)
        else:
            fields[head] = value
    return fields


def contradictions(saved: Any, requested: dict[str, Any], runtime: Iterable[str] = ()) -> list[str]:
    """The `requested` settings that differ from `saved` (a config dataclass), as `key=value (run has
    ...)` lines; `runtime` fields may change and `model_args` is compared entry by entry."""
    cls, skip, conflicts = type(saved), set(runtime), []
    for key, value in requested.items():
        if key in skip:
            continue
        if key == "model_args":
            for sub, v in coerce(cls, "model_args", value).items():
                if saved.model_args.get(sub) != v:
                    conflicts.append(f"model_args.{sub}={v!r} (run has {saved.model_args.get(sub)!r})")
            continue
        if key not in set(field_names(cls)):
            raise unknown_field(key, cls)
        v = coerce(cls, key, value)
        if getattr(saved, key) != v:
            conflicts.append(f"{key}={v!r} (run has {getattr(saved, key)!r})")
    return conflicts


def field_help(cls: type) -> dict[str, str]:
    """Each field's description: `metadata={"help": ...}`, else the comment at the end of its line,
    else the comment lines just above it (section lines `# -- ...` excepted); "" when there is none."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_comments(klass))
    for f in dataclasses.fields(cls):
        out[f.name] = f.metadata.get("help") or out.get(f.name, "")
    return out


def _comments(klass: type) -> dict[str, str]:
    try:
        lines = inspect.getsource(klass).splitlines()
    except (OSError, TypeError):  # no source (a frozen or generated class): no comments
        return {}
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0] - 1] = token.string.lstrip("#").strip()
    own = set(klass.__dict__.get("__annotations__", {}))
    out: dict[str, str] = {}
    for i, line in enumerate(lines):
        match = re.match(r"\s+(\w+)\s*:", line)
        if not match or match.group(1) not in own or line.lstrip().startswith("#"):
            continue
        if i in comments:
            out[match.group(1)] = comments[i]
            continue
        above: list[str] = []
        for j in range(i - 1, -1, -1):  # the comment block right above the field
            if not lines[j].lstrip().startswith("#") or comments.get(j, "").startswith("--"):
                break
            above.insert(0, comments[j])
        out[match.group(1)] = " ".join(above)
    return out
