"""The resumable training state (`state.pt`) and the random-number-generator states inside it.

Everything is tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)` and never runs pickled code.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.core.errors import VitkitError
from vitkit.core.files import atomic_path


def capture_rng() -> dict[str, Any]:
    """The torch (CPU and CUDA), Python and NumPy generator states, as tensors."""
    version, py_state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the global RandomState is an MT19937: always the legacy tuple
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_gauss": [int(np_has_gauss), float(np_gauss)],
        "numpy_name": str(np_name),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(
        (state["numpy_name"], state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], int(has_gauss), gauss)
    )


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save `state` atomically: a crash, a kill or a full disk leaves the previous file intact.
    A full disk (or a file size limit) is a one-line VitkitError naming the file."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: write errors keep their errno
            torch.save(state, f)
    except (OSError, RuntimeError) as err:
        full = _no_space(err)
        if full is None:
            raise
        raise VitkitError(
            f"cannot write {path}: {full.strerror} (disk full or over a file size limit); "
            f"the previous {Path(path).name} is intact: free space and resume the run"
        ) from None


def _no_space(err: BaseException | None) -> OSError | None:
    # torch's zip writer reports a failed write as a RuntimeError whose context is the OSError
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return err
        err = err.__cause__ or err.__context__
    return None


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (`.NAME.*.tmp`) that writes killed mid-way left in `folder`; returns them."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run has no finished epoch to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (unpickling errors come in many types)
        raise ValueError(f"cannot load {path}: {err}") from err
