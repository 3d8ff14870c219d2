"""Fashion-MNIST without a network: find the IDX files, decompress them once, read them with torchvision.

Search order: `$VITKIT_DATA`, the cache (`~/.cache/vitkit/data`), the Debian package's folder
(`apt-get install dataset-fashion-mnist`), then torchvision's download when online.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import socket
from pathlib import Path

import torch

from vitkit.core.files import atomic_path

NAME = "fashion-mnist"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = [0.2860], [0.3530]  # pixel statistics of the 60k training images, in [0, 1]
NATIVE_SIZE = 28


def cache_dir() -> Path:
    """Where decompressed or downloaded data sets are kept: `$XDG_CACHE_HOME/vitkit/data`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vitkit" / "data"


def _raw_dir(root: Path) -> Path:
    # torchvision's FashionMNIST reads root/FashionMNIST/raw/<FILES>
    return root / "FashionMNIST" / "raw"


def _has(folder: Path, suffix: str = "") -> bool:
    return all((folder / f"{name}{suffix}").is_file() for name in FILES)


def _install_into_cache(folder: Path, suffix: str, root: Path) -> Path:
    """Copy (suffix "") or decompress (suffix ".gz") the four files into `root` (in torchvision's layout)."""
    raw = _raw_dir(root)
    raw.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        source = folder / f"{name}{suffix}"
        try:
            with atomic_path(raw / name) as tmp:
                opener = gzip.open if suffix == ".gz" else open
                with opener(source, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as err:
            raise ValueError(f"cannot read {source}: {err}; the file is damaged, get a fresh copy") from err
    return root


def _source_cache(folder: Path) -> Path:
    """The cache root for a `$VITKIT_DATA` folder: its own, keyed by its path, so the data a user points
    at never replaces the shared cache that runs without `$VITKIT_DATA` read."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "from-vitkit-data" / key


def _root_from(folder: Path, cache: Path) -> Path | None:
    """A torchvision root for the data found in `folder` (any of the usual layouts; other layouts are
    copied into `cache`), or None."""
    if _has(_raw_dir(folder)):
        return folder
    for candidate in (folder, folder / "fashion-mnist", folder / "FashionMNIST", _raw_dir(folder)):
        if _has(candidate):
            return _install_into_cache(candidate, "", cache)
        if _has(candidate, ".gz"):
            return _install_into_cache(candidate, ".gz", cache)
    return None


def find_fashion_mnist(download: bool | None = None) -> Path:
    """The root folder holding Fashion-MNIST in torchvision's layout (root/FashionMNIST/raw).

    `download=None` tries torchvision's download unless `VITKIT_OFFLINE=1`.
    Raises FileNotFoundError listing where it looked and how to get the data.
    """
    looked = []
    env = os.environ.get("VITKIT_DATA")
    if env:
        looked.append(f"$VITKIT_DATA={env}")
        folder = Path(env).expanduser()
        root = _root_from(folder, _source_cache(folder))
        if root is not None:
            return root
    else:
        looked.append("$VITKIT_DATA (not set)")
    for folder in (cache_dir(), DEBIAN_DIR):
        looked.append(str(folder))
        if folder.is_dir():
            root = _root_from(folder, cache_dir())
            if root is not None:
                return root
    if download is None:
        download = os.environ.get("VITKIT_OFFLINE", "") in ("", "0")
    reason: str | None = "download off (VITKIT_OFFLINE=1)"
    if download:
        reason = _try_download(cache_dir())
        if reason is None:
            return cache_dir()
    raise FileNotFoundError(
        f"Fashion-MNIST not found; looked in {', '.join(looked)}; {reason}. Get it with "
        f"`apt-get install {DEBIAN_PACKAGE}` (Debian/Ubuntu, as root), or run once with internet access "
        f"(torchvision downloads it into {cache_dir()}); a folder holding the four IDX files also works "
        "through VITKIT_DATA=FOLDER"
    )


def _try_download(root: Path) -> str | None:
    """None on success, else the reason it failed (one line)."""
    from torchvision.datasets import FashionMNIST  # noqa: PLC0415  start-up cost: only when used

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # an offline machine must not hang here
    try:
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
        return None
    except Exception as err:  # noqa: BLE001  (network errors come in many types; we report and move on)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"download failed ({first[:160]})"
    finally:
        socket.setdefaulttimeout(previous)


def load_fashion_mnist(train: bool, root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) of the train (60k) or test (10k) split."""
    from torchvision.datasets import FashionMNIST  # noqa: PLC0415  start-up cost: only when used

    root = root or find_fashion_mnist()
    try:
        ds = FashionMNIST(str(root), train=train, download=False)
    except (RuntimeError, AssertionError, ValueError, OSError) as err:
        raise ValueError(
            f"Fashion-MNIST files in {_raw_dir(root)} are damaged ({err}); delete them and run again"
        ) from err
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()
