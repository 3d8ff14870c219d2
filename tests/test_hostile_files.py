"""Hostile and broken checkpoint files (issue 17, item 8).

Every case is generated here. For each: nothing in the file runs (a pickle's `__reduce__` would
create a marker file), nothing is extracted or changed (the folder's bytes are the same after), and
the user gets one line naming the input, from the library and from `vitkit convert`, whose existing
output file stays as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vitkit
from vitkit.cli import main
from vitkit.core.errors import FileFormatError, VitkitError
from vitkit.factory import load_model

SMALL = dict(depth=1, embed_dim=32, num_heads=2, img_size=32, num_classes=3)
NAME = "vit_tiny_patch16_224"
SET_FLAGS = [f for k, v in SMALL.items() for f in ("--set", f"{k}={v}")]


def _model() -> torch.nn.Module:
    return vitkit.create_model(NAME, **SMALL)


def _state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _model().state_dict().items()}


class Evil:
    """Unpickling it calls `fn(*args)`: the attack a weights_only reader must refuse."""

    def __init__(self, fn: Callable, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _marker(tmp: Path) -> Path:
    return tmp.parent / "PWNED"


# -- builders: each writes one bad input under `tmp` and returns its path ----------------------
def _valid_safetensors(tmp: Path) -> Path:
    path = tmp / "ok.safetensors"
    save_file(_state(), str(path))
    return path


def _empty(suffix: str):
    def build(tmp: Path) -> Path:
        path = tmp / f"empty{suffix}"
        path.write_bytes(b"")
        return path

    return build


def _truncated(suffix: str):
    def build(tmp: Path) -> Path:
        path = tmp / f"whole{suffix}"
        if suffix == ".safetensors":
            save_file(_state(), str(path))
        elif suffix == ".npz":
            np.savez(path, **{k: v.numpy() for k, v in _state().items()})
        else:
            torch.save(_state(), path)
        data = path.read_bytes()
        path.unlink()
        cut = tmp / f"truncated{suffix}"
        cut.write_bytes(data[: len(data) // 2])
        return cut

    return build


def _safetensors_bytes(
    tmp: Path, name: str, header: bytes | None = None, length: int | None = None, data: bytes = b"\0" * 64
) -> Path:
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}' if header is None else header
    path = tmp / name
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def _header_terabytes(tmp: Path) -> Path:
    return _safetensors_bytes(tmp, "terabytes.safetensors", length=2**42)


def _header_past_eof(tmp: Path) -> Path:
    return _safetensors_bytes(tmp, "past_eof.safetensors", length=4096)


def _header_not_json(tmp: Path) -> Path:
    return _safetensors_bytes(tmp, "not_json.safetensors", header=b"{\xff\xfe garbage }")


def _header_a_list(tmp: Path) -> Path:
    return _safetensors_bytes(tmp, "list.safetensors", header=b"[1, 2, 3]")


def _offsets_past_eof(tmp: Path) -> Path:
    header = b'{"w": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}'
    return _safetensors_bytes(tmp, "offsets.safetensors", header=header)


def _wrong_dtype(tmp: Path) -> Path:
    path = tmp / "int_weights.safetensors"
    save_file({k: v.to(torch.int32) if v.is_floating_point() else v for k, v in _state().items()}, str(path))
    return path


def _wrong_shapes(tmp: Path) -> Path:
    path = tmp / "shapes.safetensors"
    save_file({k: torch.zeros(*[d + 1 for d in v.shape]) for k, v in _state().items()}, str(path))
    return path


def _wrong_keys(tmp: Path) -> Path:
    path = tmp / "keys.safetensors"
    save_file({f"bert.layer.{i}": torch.zeros(3) for i in range(4)}, str(path))
    return path


def _torch_obj(name: str, obj) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        path = tmp / name
        torch.save(obj() if callable(obj) else obj, path)
        return path

    return build


def _evil_torch(tmp: Path) -> Path:
    path = tmp / "evil_exec.pth"
    torch.save({"w": torch.zeros(2), "x": Evil(exec, f"open({str(_marker(tmp))!r}, 'w').close()")}, path)
    return path


def _evil_pickle(name: str, fn: Callable, protocol: int):
    def build(tmp: Path) -> Path:
        path = tmp / name
        args = (f"touch {_marker(tmp)}",) if fn is os.system else (str(_marker(tmp)), "w")
        path.write_bytes(pickle.dumps({"w": Evil(fn, *args)}, protocol=protocol))
        return path

    return build


def _zip(tmp: Path, name: str, members: dict[str, bytes]) -> Path:
    path = tmp / name
    with zipfile.ZipFile(path, "w") as z:
        for member, data in members.items():
            z.writestr(member, data)
    return path


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _zip_traversal_pth(tmp: Path) -> Path:
    return _zip(tmp, "traversal.pth", {"archive/data.pkl": b"\x80\x02}q\x00.", "../../escaped.txt": b"owned"})


def _zip_traversal_npz(tmp: Path) -> Path:
    return _zip(tmp, "traversal.npz", {"../escaped.npy": _npy(np.zeros(3, np.float32))})


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _zip_bomb(name: str, member: str, header: bytes = b""):
    def build(tmp: Path) -> Path:
        # 300 MB of zeros deflated to ~1 MB (behind a valid .npy header declaring that size, for .npz)
        path = tmp / name
        info = zipfile.ZipInfo(member)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zipfile.ZipFile(path, "w") as z, z.open(info, "w", force_zip64=True) as f:
            f.write(header)
            for _ in range(300):
                f.write(bytes(2**20))
        return path

    return build


def _npy_declares_terabytes(tmp: Path) -> Path:
    return _zip(tmp, "huge_shape.npz", {"w.npy": _npy_header((2**40,)) + bytes(16)})


def _npz_object_array(tmp: Path) -> Path:
    path = tmp / "objects.npz"
    np.savez(path, w=np.array([{"a": 1}, None], dtype=object))
    return path


def _npz_bad_header(tmp: Path) -> Path:
    return _zip(tmp, "bad_header.npz", {"w.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': oops}   \n"})


def _hf_dir(tmp: Path, name: str, config: str | None, index: str | None = None) -> Path:
    path = tmp / name
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(config)
    if index is None:
        save_file(_state(), str(path / "model.safetensors"))
    else:
        (path / "model.safetensors.index.json").write_text(index)
    return path


def _symlink_loop(tmp: Path) -> Path:
    a, b = tmp / "a.pth", tmp / "b.pth"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


def _dangling(tmp: Path) -> Path:
    link = tmp / "gone.safetensors"
    link.symlink_to(tmp / "nowhere.safetensors")
    return link


def _fifo(tmp: Path) -> Path:
    path = tmp / "pipe.pth"
    os.mkfifo(path)
    return path


def _empty_dir(path: Path) -> Path:
    path.mkdir()
    return path


def _dir_as_file(tmp: Path) -> Path:
    path = tmp / "model.safetensors"
    path.mkdir()
    return path


def _garbage(tmp: Path) -> Path:
    path = tmp / "garbage.pth"
    path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    return path


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    # name: (builder, a phrase the one-line error must contain)
    "empty safetensors": (_empty(".safetensors"), "empty"),
    "empty pth": (_empty(".pth"), "empty"),
    "empty npz": (_empty(".npz"), "empty"),
    "empty, no suffix": (_empty(""), "empty"),
    "truncated safetensors": (_truncated(".safetensors"), "truncated or corrupt"),
    "truncated pth": (_truncated(".pth"), "truncated or corrupt"),
    "truncated npz": (_truncated(".npz"), "truncated or corrupt"),
    "header claims terabytes": (_header_terabytes, "header claims"),
    "header length past EOF": (_header_past_eof, "header claims"),
    "header not JSON": (_header_not_json, "not JSON"),
    "header a JSON list": (_header_a_list, "not a JSON object"),
    "tensor offsets past EOF": (_offsets_past_eof, "outside the file"),
    "wrong dtype (int weights)": (_wrong_dtype, "dtype"),
    "wrong shapes": (_wrong_shapes, "does not fit"),
    "wrong keys": (_wrong_keys, "cannot tell the format"),
    "no tensors": (_torch_obj("epoch_only.pth", {"epoch": 3, "lr": 0.1}), "holds no tensors"),
    "a list, not a dict": (_torch_obj("list.pth", [torch.zeros(2)]), "not a state dict"),
    "non-string keys": (_torch_obj("int_keys.pth", {0: torch.zeros(2), 1: torch.ones(2)}), "non-string names"),
    "torch zip, __reduce__ exec": (_evil_torch, "refuses them"),
    "raw pickle, __reduce__ open": (_evil_pickle("evil_open.pth", open, 2), "refuses them"),
    "raw pickle, __reduce__ os.system": (_evil_pickle("evil_system.bin", os.system, 4), "safe reader"),
    "zip path traversal (pth)": (_zip_traversal_pth, "path traversal"),
    "zip path traversal (npz)": (_zip_traversal_npz, "path traversal"),
    "zip bomb (npz, 300 MB member)": (_zip_bomb("bomb.npz", "w.npy", _npy_header((75 * 2**20,))), "zip bomb"),
    "zip bomb (torch zip, 300 MB storage)": (_zip_bomb("bomb.pth", "archive/data/0"), "zip bomb"),
    "tensor shape disagrees with its offsets": (
        lambda t: _safetensors_bytes(
            t, "shape.safetensors", header=b'{"w": {"dtype": "F32", "shape": [1000000000], "data_offsets": [0, 16]}}'
        ),
        "truncated or corrupt",
    ),
    "npy header declares 4 TB": (_npy_declares_terabytes, "declares"),
    "npz object array": (_npz_object_array, "refuses them"),
    "npz malformed npy header": (_npz_bad_header, "truncated or corrupt"),
    "HF config.json not JSON": (lambda t: _hf_dir(t, "hf_bad", "{model_type: vit"), "not valid JSON"),
    "HF config.json a list": (lambda t: _hf_dir(t, "hf_list", "[]"), "not a JSON object"),
    "HF config.json names BERT": (lambda t: _hf_dir(t, "hf_bert", '{"model_type": "bert"}'), "'bert' model"),
    "HF index not JSON": (lambda t: _hf_dir(t, "hf_idx", None, index="{"), "not valid JSON"),
    "HF shard path traversal": (
        lambda t: _hf_dir(t, "hf_trav", None, index=json.dumps({"weight_map": {"w": "../ok.safetensors"}})),
        "path traversal",
    ),
    "HF shard missing": (
        lambda t: _hf_dir(t, "hf_gone", None, index=json.dumps({"weight_map": {"w": "part1.safetensors"}})),
        "missing",
    ),
    "HF dir without weights": (lambda t: _empty_dir(t / "hf_empty"), "without model weights"),
    "directory named .safetensors": (_dir_as_file, "without model weights"),
    "symlink loop": (_symlink_loop, "symlink loop"),
    "dangling symlink": (_dangling, "broken symlink"),
    "FIFO instead of a file": (_fifo, "not a regular file"),
    "random bytes": (_garbage, "corrupt"),
}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` with a hash of its bytes (links and FIFOs by their kind)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink() or not p.is_file():
            out[str(p)] = "link" if p.is_symlink() else "dir" if p.is_dir() else "special"
        else:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_checkpoint(case, tmp_path, capsys):
    build, phrase = CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    bad = build(inputs)
    before = _snapshot(tmp_path)

    model = _model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((VitkitError, FileNotFoundError)) as caught:
        vitkit.load_checkpoint(model, bad)
    message = str(caught.value)
    assert "\n" not in message and str(bad) in message and phrase in message, message
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # nothing half-loaded

    # the same file through the CLI: exit 1, one line, the existing output untouched
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"the user's earlier output")
    code = main(["convert", str(bad), str(dst), "--model", NAME, *SET_FLAGS])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and str(bad) in err, err
    assert dst.read_bytes() == b"the user's earlier output"

    after = _snapshot(tmp_path)
    after.pop(str(dst))
    assert after == before  # nothing extracted, written or changed beside the input
    assert not _marker(inputs).exists()  # no pickled code ran


def test_case_count():
    assert len(CASES) >= 25


def test_nan_weights_load_with_a_warning(tmp_path):
    state = _state()
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    state["head.bias"][:] = float("inf")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    model = _model()
    with pytest.warns(UserWarning, match=r"2 tensor\(s\) hold NaN or infinite values .*blocks\.0\.attn\.qkv\.weight"):
        report = vitkit.load_checkpoint(model, path)
    assert report.ok and torch.isnan(model.blocks[0].attn.qkv.weight[0, 0])


def test_valid_checkpoint_loads_silently(tmp_path):
    path = _valid_safetensors(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vitkit.load_checkpoint(_model(), path).ok


@pytest.mark.parametrize(
    "meta",
    [
        {"format": "vitkit", "model": NAME, "config": "{not json"},
        {"format": "vitkit", "model": NAME, "config": "[1, 2]"},
        {"format": "vitkit", "model": NAME},
    ],
)
def test_vitkit_file_with_bad_metadata(meta, tmp_path):
    path = tmp_path / "meta.safetensors"
    save_file(_state(), str(path), metadata=meta)
    with pytest.raises(FileFormatError, match="config"):
        load_model(path)


def test_vitkit_file_whose_weights_are_another_model(tmp_path):
    small = _model()
    path = tmp_path / "swapped.safetensors"
    vitkit.weights.save_model(small, path)
    other = vitkit.create_model(NAME, **{**SMALL, "embed_dim": 64})
    save_file(
        {k: v.contiguous() for k, v in other.state_dict().items()},
        str(path),
        metadata={k: v for k, v in vitkit.weights.vitkit_format.read_metadata(path).items()},
    )
    with pytest.raises(FileFormatError, match=f"does not hold the weights of the {NAME}"):
        load_model(path)
