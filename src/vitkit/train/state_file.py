"""The resumable training state (`state.pt`) and the random-number-generator states inside it.

Everything is tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)` and never runs pickled code.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.core.files import atomic_path


def capture_rng() -> dict[str, Any]:
    """The torch (CPU and CUDA), Python and NumPy generator states, as tensors."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
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
    """torch.save `state` atomically (a crash leaves the previous file intact)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run has no finished epoch to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (unpickling errors come in many types)
        raise ValueError(f"cannot load {path}: {err}") from err
