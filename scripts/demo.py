"""Helpers for `make demo` (the training, evaluation and prediction themselves are `vitkit` commands).

python scripts/demo.py data             find Fashion-MNIST; else install the Debian package (as root)
python scripts/demo.py samples DIR [N]  write N test images (one per class) as PNG files
python scripts/demo.py summary RUN      print the test accuracy and where the run folder is
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from vitkit.data import fashion_mnist


def ensure_data() -> int:
    try:
        root = fashion_mnist.find_fashion_mnist(download=False)
    except FileNotFoundError:
        root = None
    if root is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing the Debian package {fashion_mnist.DEBIAN_PACKAGE} ...", flush=True)
        # apt's own Python (package scripts) compiles into the system's folders, not the Makefile's venv cache
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPYCACHEPREFIX"}
        env["DEBIAN_FRONTEND"] = "noninteractive"
        install = ["apt-get", "install", "-y", "-q", fashion_mnist.DEBIAN_PACKAGE]
        if subprocess.run(install, env=env).returncode != 0:  # the package lists may be stale
            subprocess.run(["apt-get", "update", "-q"], env=env)
            subprocess.run(install, env=env)
    if root is None:
        try:
            root = fashion_mnist.find_fashion_mnist()  # the Debian folder, else torchvision's download
        except FileNotFoundError as err:
            print(f"demo: error: {err}", file=sys.stderr)
            return 2
    print(f"Fashion-MNIST: {root / 'FashionMNIST' / 'raw'}")
    return 0


def write_samples(folder: Path, count: int) -> int:
    from PIL import Image

    images, labels = fashion_mnist.load_fashion_mnist(train=False)
    folder.mkdir(parents=True, exist_ok=True)
    for label in range(min(count, len(fashion_mnist.CLASSES))):
        index = int((labels == label).nonzero()[0])  # the first test image of each class
        name = fashion_mnist.CLASSES[label].replace("/", "-").replace(" ", "-")
        Image.fromarray(images[index, 0].numpy(), mode="L").save(folder / f"test{index:05d}_{name}.png")
    return 0


def summary(run: Path) -> int:
    test = json.loads((run / "test.json").read_text())
    print(f"Fashion-MNIST test top-1: {test['top1']:.2f}% ({test['samples']} images)")
    print(f"run folder: {run}")
    print(f"curves: {run / 'curves.png'}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["data"]:
        return ensure_data()
    if argv[:1] == ["samples"] and len(argv) in (2, 3):
        return write_samples(Path(argv[1]), int(argv[2]) if len(argv) == 3 else 5)
    if argv[:1] == ["summary"] and len(argv) == 2:
        return summary(Path(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
