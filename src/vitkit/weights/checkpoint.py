"""Load a checkpoint of any supported format into a vitkit model, and save one in vitkit, timm or
HuggingFace format.

Loading runs three steps: read (file, HF directory or in-memory dict; never executes pickled code),
convert (the format's pure key mapping, `vitkit.weights.convert`), fit (adapt shapes to the model:
position embeddings, Swin window tables, patch kernels, input channels, classifier). Every change
is recorded in the returned `LoadReport`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vitkit.core.errors import FileFormatError, UsageError, VitkitError
from vitkit.core.files import atomic_path, write_folder
from vitkit.layers import resample_abs_pos_embed
from vitkit.layers.rel_pos import resize_rel_pos_bias_table
from vitkit.weights import convert as converters
from vitkit.weights.resample import adapt_input_conv, resample_patch_embed
from vitkit.weights.vitkit_format import read_metadata, save_model

StateDict = dict[str, torch.Tensor]
Format = Literal["auto", "vitkit", "timm", "deit", "swin", "hf", "torchvision", "mmpretrain", "jax"]
Source = str | os.PathLike | Mapping[str, Any]

# buffers that models compute from their configuration; old checkpoints saved them
_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask", "k_bias")
_CLASSIFIER = re.compile(r"^(head|head_dist)\.(fc\.)?(weight|bias)$")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class LoadReport:
    """What `load_checkpoint` did. Keys are the model's parameter names unless said otherwise."""

    source: str
    format: str
    loaded: int = 0  # tensors copied into the model
    renamed: dict[str, str] = field(default_factory=dict)  # model key -> source key
    merged: list[str] = field(default_factory=list)  # built from several source tensors (q, k, v -> qkv)
    resampled: dict[str, str] = field(default_factory=dict)  # key -> old -> new shape and how
    adapted: dict[str, str] = field(default_factory=dict)  # key -> what changed (input channels)
    reinitialised: dict[str, str] = field(default_factory=dict)  # key -> why the model's init was kept
    dropped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it was not needed
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys (after conversion) the model lacks
    mismatched: dict[str, str] = field(default_factory=dict)  # key -> checkpoint vs model shape

    @property
    def ok(self) -> bool:
        """True when everything the model needs came from the checkpoint or was adapted to fit."""
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self, limit: int = 8) -> str:
        """The missing / unexpected / mismatched keys in one line."""
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} ({_clip(keys, limit)})")
        if self.mismatched:
            items = [f"{k} {v}" for k, v in self.mismatched.items()]
            parts.append(f"{len(items)} with other shapes ({_clip(items, limit)})")
        return "; ".join(parts)

    def __str__(self) -> str:
        lines = [f"{self.source}: format {self.format}, {self.loaded} tensors loaded"]
        if self.renamed:
            pairs = [f"{v} -> {k}" for k, v in self.renamed.items()]
            lines.append(f"  renamed: {len(pairs)} (e.g. {_clip(pairs, 3)})")
        if self.merged:
            lines.append(f"  merged from several source tensors: {len(self.merged)} (e.g. {_clip(self.merged, 3)})")
        for label, items in (
            ("resampled", self.resampled),
            ("adapted", self.adapted),
            ("re-initialised", self.reinitialised),
            ("dropped", self.dropped),
            ("mismatched", self.mismatched),
        ):
            for k, v in items.items():
                lines.append(f"  {label}: {k}: {v}")
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"  {label}: {_clip(keys, 10)}")
        return "\n".join(lines)


def _clip(items: list[str], limit: int) -> str:
    items = list(items)
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# -- reading --------------------------------------------------------------------------------------
# Every reader treats the file as untrusted: nothing in it is executed (pickles go through
# torch.load(weights_only=True), numpy with allow_pickle=False), nothing is extracted to disk, sizes
# it declares are checked against its real size before anything is allocated, and every failure is
# one FileFormatError naming the file.
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on its JSON header
_BOMB_RATIO, _BOMB_FLOOR = 100, 256 * 2**20  # a zip whose members inflate past both is refused
_HF_MODEL_TYPES = ("vit", "deit", "swin", "swinv2")


def _refuse_pickle(path: Path, err: Exception) -> FileFormatError:
    found = re.search(r"GLOBAL (\S+)", str(err))
    lines = [line.strip() for line in str(err).splitlines() if re.search("Unsupported|Trying", line)]
    if found:
        reason = f"it refers to {found.group(1)}"
    elif "allow_pickle" in str(err):
        reason = "a numpy object array"
    else:
        reason = (lines or ["objects the safe reader does not allow"])[0][:200]
    return FileFormatError(
        f"{path} holds pickled Python objects besides tensors and plain containers ({reason}); vitkit reads "
        "pickles with torch.load(weights_only=True) and refuses them because unpickling can run arbitrary "
        "code. If you trust its author, load it yourself and pass the state dict: "
        "vitkit.load_checkpoint(model, state_dict)"
    )


def _corrupt(path: Path, err: Exception | str) -> FileFormatError:
    if not isinstance(err, str):
        err = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
    detail = err
    return FileFormatError(f"{path} is truncated or corrupt ({detail}); download or copy it again")


def _check_safetensors(path: Path, size: int) -> None:
    """The 8-byte header length and the JSON header's tensor offsets fit inside the file."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(_MAX_HEADER, size - 8):
            raise _corrupt(path, f"its header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _corrupt(path, f"its header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    data = size - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data
        ):
            raise _corrupt(path, f"tensor {key!r} lies outside the file's {data} data bytes")


def _check_zip(path: Path, size: int) -> list[zipfile.ZipInfo]:
    """The members of a zip (torch or numpy archive), refused when a name escapes or it inflates like a bomb."""
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise _corrupt(path, err) from None
    for m in members:
        name = m.filename.replace("\\", "/")
        if name.startswith("/") or ".." in name.split("/") or ":" in name.split("/")[0]:
            raise FileFormatError(
                f"{path} has an archive member named {m.filename!r} outside the archive "
                "(path traversal): not a checkpoint vitkit wrote or can trust"
            )
    inflated = sum(m.file_size for m in members)
    if inflated > max(_BOMB_FLOOR, _BOMB_RATIO * size):
        raise FileFormatError(
            f"{path} is a {size}-byte archive whose members inflate to {inflated} bytes "
            "(a zip bomb, or corrupt): refused"
        )
    return members


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # the safe reader refuses globals (code); an unknown opcode just means the bytes are not a pickle
        operand = re.search(r"Unsupported operand \d+", str(err))
        if operand:
            raise FileFormatError(
                f"{path} is corrupt, or a pickle torch's safe reader cannot parse ({operand.group(0)}); download "
                "it again, or if you trust its author load it yourself and pass vitkit.load_checkpoint the state dict"
            ) from None
        if "weights only load failed" in str(err).lower():
            raise _refuse_pickle(path, err) from None
        raise _corrupt(path, err) from None
    except Exception as err:  # noqa: BLE001 - any failure to parse these bytes is the file's, not a bug
        raise _corrupt(path, err) from None


def _read_safetensors(path: Path, size: int) -> tuple[StateDict, dict[str, str]]:
    _check_safetensors(path, size)
    try:
        return load_file(str(path)), read_metadata(path)
    except FileFormatError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as err:
        raise _corrupt(path, err) from None


def _check_npy_sizes(path: Path, members: list[zipfile.ZipInfo]) -> None:
    """Each .npy member's declared shape matches its size, so no array is allocated past the data."""
    with zipfile.ZipFile(path) as z:
        for m in members:
            with z.open(m) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    fmt = np.lib.format
                    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                    shape, _, dtype = read_header(f)
                except Exception as err:  # noqa: BLE001 - a malformed .npy header is the file's fault
                    raise _corrupt(path, f"member {m.filename}: {err}") from None
                if dtype.hasobject:
                    raise _refuse_pickle(path, ValueError("allow_pickle: object arrays"))
                need = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                if need > m.file_size:
                    raise _corrupt(path, f"member {m.filename} declares {need} bytes of data but holds {m.file_size}")


def _read_npz(path: Path, size: int) -> StateDict:
    members = _check_zip(path, size)
    _check_npy_sizes(path, members)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise _refuse_pickle(path, err) from None
        raise _corrupt(path, err) from None
    except (zipfile.BadZipFile, EOFError, OSError, TypeError, MemoryError) as err:
        raise _corrupt(path, err) from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FileFormatError(f"{path} is not valid JSON ({err}); download or copy it again") from None


def _check_hf_config(path: Path) -> None:
    """A config.json beside the weights must be a JSON object naming a ViT / DeiT / Swin model."""
    file = path / "config.json"
    if not file.is_file():
        return
    config = _read_json(file)
    if not isinstance(config, dict):
        raise FileFormatError(f"{file} is not a JSON object: expected a HuggingFace model config")
    kind = config.get("model_type")
    if kind is not None and kind not in _HF_MODEL_TYPES:
        raise FileFormatError(
            f"{file} describes a HuggingFace {kind!r} model, not one of "
            f"{', '.join(_HF_MODEL_TYPES)}: vitkit loads ViT, DeiT and Swin checkpoints only"
        )


def _shard_files(path: Path, index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names; each must be a file inside `path`."""
    weight_map = _read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FileFormatError(f"{index} has no weight_map of tensor names to shard files; download it again")
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = path / name
        if Path(name).name != name or not shard.resolve().is_relative_to(path.resolve()):
            raise FileFormatError(f"{index} names shard {name!r} outside {path} (path traversal): refused")
        if not shard.is_file():
            raise FileFormatError(f"{index} names shard {name!r}, which is missing from {path}")
        shards.append(shard)
    return shards


def _read_hf_dir(path: Path) -> tuple[Any, dict[str, str]]:
    _check_hf_config(path)
    for name in _HF_WEIGHTS:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):  # sharded: {"weight_map": {key: shard file}}
            state: dict = {}
            for shard in _shard_files(path, file):
                state.update(_unwrap(_read_file(shard)[0], str(shard)))
            return state, {}
        return _read_file(file)
    raise FileNotFoundError(
        f"{path} is a directory without model weights: expected one of {', '.join(_HF_WEIGHTS)} "
        "(a HuggingFace model directory) or pass the weights file itself"
    )


def _read_file(path: Path) -> tuple[Any, dict[str, str]]:
    if not path.is_file():
        raise FileFormatError(f"{path} is not a regular file (a FIFO, socket or device?): pass the checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise FileFormatError(f"{path} is empty (0 bytes): download or copy it again")
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):
        return _read_safetensors(path, size)  # 8-byte little-endian header size, then a JSON header
    if path.suffix == ".npz":
        return _read_npz(path, size), {}
    if head.startswith(b"PK"):
        # numpy's archive holds .npy members, torch's a data.pkl and storages
        members = _check_zip(path, size)
        if members and all(m.filename.endswith(".npy") for m in members):
            return _read_npz(path, size), {}
    return _read_torch(path), {}


def _unwrap(obj: Any, where: str) -> StateDict:
    """The state dict inside a training checkpoint ({"model": ...}, {"state_dict": ...})."""
    while isinstance(obj, Mapping) and not any(isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "model", "module") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise FileFormatError(f"{where} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    state = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in obj.items()}
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        keys = ", ".join(list(map(str, obj))[:8])
        raise FileFormatError(f"{where} holds no tensors (top-level keys: {keys or 'none'}): is it a model checkpoint?")
    odd = [repr(k) for k in state if not isinstance(k, str)]
    if odd:
        raise FileFormatError(f"{where} has tensors under non-string names ({_clip(odd, 4)}): not a state dict")
    # DDP and torch.compile wrap the model: drop their prefix when every key has it
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def read_state_dict(source: Source) -> tuple[StateDict, dict[str, str], str]:
    """(tensors, safetensors metadata, description) of a checkpoint file, HF directory or dict."""
    if isinstance(source, Mapping):
        return _unwrap(source, "the state dict"), {}, "state dict"
    path = Path(source)
    if path.is_symlink() and not path.exists():  # exists() follows links: False for a loop or a dangling one
        raise FileFormatError(f"checkpoint {path} is a broken symlink or a symlink loop: point it at the file")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    obj, meta = _read_hf_dir(path) if path.is_dir() else _read_file(path)
    return _unwrap(obj, str(path)), meta, str(path)


def _warn_nonfinite(state: StateDict, where: str) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        warnings.warn(
            f"{where}: {len(bad)} tensor(s) hold NaN or infinite values ({_clip(bad, 4)}); "
            "the model will output NaN: was the run that saved them diverging?",
            stacklevel=3,
        )


# -- fitting to the model -------------------------------------------------------------------------
def _storage(t: torch.Tensor) -> int | None:
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return ptr or None


def _trace(source: StateDict, converted: StateDict, report: LoadReport) -> None:
    """Renamed keys (the converted tensor is, or is a view of, one source tensor) and merged ones."""
    origin: dict[int, str] = {}
    for k, v in source.items():
        if (s := _storage(v)) is not None:
            origin.setdefault(s, k)
    for k, v in converted.items():
        src = origin.get(_storage(v)) if _storage(v) is not None else None
        if src is None:
            if k not in source:
                report.merged.append(k)
        elif src != k:
            report.renamed[k] = src


def _num_classes(state: Mapping[str, torch.Tensor], keys: set[str]) -> int | None:
    weights = [state[k] for k in keys if k.endswith("weight")]
    return int(weights[0].shape[0]) if weights else None


def _fit_classifier(model_state: StateDict, state: StateDict, report: LoadReport) -> set[str]:
    """Decide the classifier (head, head_dist) as a whole; returns the checkpoint keys it handled."""
    ckpt = {k for k in state if _CLASSIFIER.match(k)}
    model = {k for k in model_state if _CLASSIFIER.match(k)}
    if not model:
        for k in sorted(ckpt):
            report.dropped[k] = "the model has no classifier (num_classes=0)"
        return ckpt
    if not ckpt:
        for k in sorted(model):
            report.reinitialised[k] = "the checkpoint has no classifier"
        return ckpt
    if ckpt != model:
        return set()  # different heads (e.g. distilled vs not): reported as missing / unexpected
    if all(state[k].shape == model_state[k].shape for k in ckpt):
        return set()  # loads as is
    same_width = all(state[k].shape[1:] == model_state[k].shape[1:] for k in ckpt)
    if not same_width:
        return set()  # another feature width: reported as a shape mismatch
    n_ckpt, n_model = _num_classes(state, ckpt), _num_classes(model_state, model)
    for k in sorted(model):
        report.reinitialised[k] = f"the checkpoint has {n_ckpt} classes, the model {n_model}"
    return ckpt


def _window_of_table(rows: int) -> tuple[int, int] | None:
    side = int(round(rows**0.5))
    return ((side + 1) // 2,) * 2 if side * side == rows and side % 2 else None


def _fit_tensor(model: nn.Module, key: str, v: torch.Tensor, target: torch.Tensor, resample: dict, report: LoadReport):
    """`v` reshaped to `target`'s shape by a known adaptation, or None (a mismatch)."""
    config: Any = model.config  # a ViTConfig or SwinConfig (Module types attributes as Tensor | Module)
    shape = f"{tuple(v.shape)} -> {tuple(target.shape)}"
    if key == "pos_embed" and v.ndim == 3 and v.shape[-1] == target.shape[-1]:
        prefix = 0 if getattr(config, "no_embed_class", False) else model.num_prefix_tokens
        side = int(round((v.shape[1] - prefix) ** 0.5))
        if prefix > v.shape[1] or side * side != v.shape[1] - prefix:
            return None
        out = resample_abs_pos_embed(v, config.grid_size, (side, side), prefix, **resample)
        how = "bicubic, antialiased" if resample["antialias"] else resample["interpolation"]
        report.resampled[key] = f"{shape} (grid {side}x{side} -> {config.grid_size[0]}x{config.grid_size[1]}, {how})"
        return out
    if key.endswith("relative_position_bias_table") and v.shape[1] == target.shape[1]:
        old = _window_of_table(v.shape[0])
        new = tuple(model.get_submodule(key.rsplit(".", 1)[0]).window_size)
        if old is None:
            return None
        out = resize_rel_pos_bias_table(v, old, new)
        report.resampled[key] = f"{shape} (window {old[0]}x{old[1]} -> {new[0]}x{new[1]})"
        return out
    if key == "patch_embed.proj.weight" and v.ndim == 4 and v.shape[0] == target.shape[0]:
        if v.shape[1] != target.shape[1]:
            how = "summed" if target.shape[1] == 1 else "repeated and rescaled"
            report.adapted[key] = (
                f"{v.shape[1]} -> {target.shape[1]} input channels ({how}, as timm's adapt_input_conv)"
            )
            v = adapt_input_conv(v, target.shape[1])
        if v.shape[-2:] != target.shape[-2:]:
            report.resampled[key] = f"{shape} (patch kernel, pseudo-inverse resize)"
            v = resample_patch_embed(v, tuple(target.shape[-2:]), **resample)
        return v
    return None


def _fit(model: nn.Module, state: StateDict, fmt: str, report: LoadReport) -> StateDict:
    """The tensors to load, each of the model's shape; the rest is reported."""
    model_state = model.state_dict()
    resample = converters.resample_options(fmt)
    handled = _fit_classifier(model_state, state, report)
    new_head = any(_CLASSIFIER.match(k) for k in [*report.reinitialised, *report.dropped])
    out: StateDict = {}
    for k, v in state.items():
        if k in handled:
            continue
        if k not in model_state:
            if k.rsplit(".", 1)[-1] in _BUFFERS:
                report.dropped[k] = "a buffer the model computes itself"
            elif k == "pos_embed" and getattr(model.config, "pos_embed", "learned") != "learned":
                report.dropped[k] = f"the model computes its position embedding (pos_embed={model.config.pos_embed!r})"
            elif k.startswith("pre_logits.") and new_head:
                report.dropped[k] = (
                    "pre-logits layer: the model has none (representation_size=None) and a new classifier"
                )
            else:
                report.unexpected.append(k)
            continue
        target = model_state[k]
        if v.is_floating_point() != target.is_floating_point() or v.is_complex():
            report.mismatched[k] = f"checkpoint dtype {v.dtype} vs model {target.dtype}"
            continue
        if v.shape == target.shape:
            out[k] = v
            continue
        fitted = _fit_tensor(model, k, v, target, resample, report)
        if fitted is None or fitted.shape != target.shape:
            report.mismatched[k] = f"checkpoint {tuple(v.shape)} vs model {tuple(target.shape)}"
        else:
            out[k] = fitted
    accounted = out.keys() | report.reinitialised.keys() | report.mismatched.keys()
    report.missing = [k for k in model_state if k not in accounted]
    return out


def _hint(report: LoadReport) -> str:
    keys = report.missing + report.unexpected + list(report.mismatched)
    if any("dist_token" in k or "head_dist" in k for k in keys):
        return " (distilled and plain DeiT checkpoints differ: use the matching *_distilled_* model or not)"
    if any(".ls1." in k or ".ls2." in k for k in keys):
        return " (LayerScale weights: DeiT III models have them, others do not)"
    if any(k.startswith("pre_logits.") for k in keys):
        return " (the tanh pre-logits layer: use a *_in21k model, or a new head via num_classes)"
    return " (is it the right model? `vitkit models` lists the variants)"


def _check_encoder(model: nn.Module, meta: dict[str, str], where: str, report: LoadReport) -> None:
    """A pre-trained encoder (`vitkit pretrain`, saved with num_classes=0) fits exactly: only the
    classifier may be new. Anything resampled, adapted or missing is one error, before loading."""
    head = {k for k in report.reinitialised if _CLASSIFIER.match(k)}
    for key in head:
        report.reinitialised[key] = f"new: the encoder was pre-trained ({meta['pretrained_with']}) without a classifier"
    changed = [f"{k} {v}" for k, v in (report.resampled | report.adapted | report.mismatched).items()]
    other = [k for k in report.reinitialised if k not in head]
    if changed or other or report.missing or report.unexpected:
        missing = report.missing + other
        raise ValueError(
            f"{where} ({meta.get('model', 'unknown model')}) does not fit this model: missing "
            f"{_clip(missing, 5) or 'none'}, unexpected {_clip(report.unexpected, 5) or 'none'}, other shapes "
            f"{_clip(changed, 3) or 'none'}; fine-tune the model that was pre-trained, with its model_args, "
            "img_size and in_chans"
        )


def load_checkpoint(model: nn.Module, source: Source, *, format: Format = "auto", strict: bool = True) -> LoadReport:
    """Load weights from a file, a HuggingFace model directory or a state dict into `model`.

    Files: .safetensors, .pth/.pt/.bin (read with `torch.load(weights_only=True)`), Google's .npz.
    `format="auto"` tells the source library from the key names: vitkit / timm, official DeiT III,
    official Swin, hf, torchvision, mmpretrain, jax. Position embeddings, Swin V1 window tables and
    patch kernels are resampled to the model, input channels adapted, and the classifier kept
    fresh when the class counts differ. With `strict=True` anything else that does not fit raises
    one VitkitError and nothing is loaded; with `strict=False` the fitting tensors are loaded. An
    unreadable, corrupt or unsafe source raises `FileFormatError`; NaN weights load with a warning.
    A pre-trained encoder file (`vitkit pretrain`) must fit exactly, its missing classifier aside.
    """
    if format != "auto" and format not in converters.FORMATS:
        raise UsageError(f"unknown checkpoint format {format!r}; choose auto, {', '.join(converters.FORMATS)}")
    if not hasattr(model, "config"):
        raise UsageError(f"{type(model).__name__} is not a vitkit model: build it with vitkit.create_model(NAME)")
    if any(p.is_meta for p in model.parameters()):
        raise UsageError(
            "the model is on the meta device: build it on a real device, or call model.to_empty(device=...) first"
        )
    state, meta, where = read_state_dict(source)
    fmt: str | None = format
    if fmt == "auto":
        fmt = "vitkit" if meta.get("format") == "vitkit" else converters.detect_format(state)
        if fmt is None:
            raise FileFormatError(
                f"cannot tell the format of {where} from its keys (e.g. {_clip(list(state), 4)}): pass "
                f"format= one of {', '.join(converters.FORMATS)}"
            )
    converted = converters.convert(state, fmt)
    report = LoadReport(source=where, format=fmt)
    _trace(state, converted, report)
    fitted = _fit(model, converted, fmt, report)
    if fmt == "vitkit" and "pretrained_with" in meta:
        _check_encoder(model, meta, where, report)
    if strict and not report.ok:
        name = getattr(model, "variant_name", type(model).__name__)
        raise VitkitError(
            f"{where} (format {fmt}) does not fit {name}: {report.problems()}{_hint(report)}; "
            "pass strict=False to load the rest"
        )
    _warn_nonfinite(fitted, where)
    with torch.no_grad():
        model.load_state_dict(fitted, strict=False)
    report.loaded = len(fitted)
    return report


# -- saving ---------------------------------------------------------------------------------------
def _plain_state(state: Mapping[str, torch.Tensor]) -> StateDict:
    # independent contiguous CPU copies: safetensors refuses shared storage, pickles stay small
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, format: Literal["vitkit", "timm", "hf"] = "vitkit"
) -> None:
    """Save `model`'s weights atomically.

    vitkit: safetensors with the model name, config and format version in its metadata
    (`vitkit.load_model` rebuilds the model). timm: a plain state dict, `torch.save`d, or
    safetensors when `path` ends in .safetensors. hf: a directory (config.json + model.safetensors)
    that `transformers.AutoModelForImageClassification.from_pretrained` loads.
    """
    path = Path(path)
    if format == "vitkit":
        save_model(model, path)
    elif format == "timm":
        state = _plain_state(model.state_dict())
        with atomic_path(path) as tmp:
            if path.suffix == ".safetensors":
                save_file(state, str(tmp), metadata={"format": "pt"})
            else:
                torch.save(state, tmp)
    elif format == "hf":
        missing = converters.hf.unsupported(model)
        if missing:
            name = getattr(model, "variant_name", type(model).__name__)
            raise UsageError(
                f"HuggingFace transformers has no equivalent for {'; '.join(missing)} in {name}: "
                "save it with format='vitkit' or format='timm'"
            )
        config, state = converters.hf.export(model)
        state = _plain_state(state)
        write_folder(
            path,
            {
                "model.safetensors": lambda p: save_file(state, str(p), metadata={"format": "pt"}),
                "config.json": lambda p: p.write_text(json.dumps(config, indent=2) + "\n"),
            },
        )
    else:
        raise UsageError(f"unknown save format {format!r}; choose vitkit, timm or hf")
