"""The `vitkit serve` page in a real headless chromium (Debian's, driven by Playwright): upload a
Fashion-MNIST test image; the page's top-1 equals what `vitkit predict` prints for that file."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="vitkit serve needs the serve extra: pip install 'vitkit[serve]'")

from test_serve import serve, tiny_run
from vitkit.cli import main
from vitkit.data import fashion_mnist

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "serve_page.py"


def _page_driver():
    spec = importlib.util.spec_from_file_location("serve_page", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fmnist_image(tmp_path_factory) -> Path:
    """The first Fashion-MNIST test image as a PNG (before `run` points VITKIT_DATA at its tiny files).

    The Debian folder comes first: a cache folder on a shared machine may hold some test's tiny files."""
    with pytest.MonkeyPatch.context() as mp:
        if fashion_mnist.DEBIAN_DIR.is_dir():
            mp.setenv("VITKIT_DATA", str(fashion_mnist.DEBIAN_DIR))
        try:
            images, _ = fashion_mnist.load_fashion_mnist(train=False, root=fashion_mnist.find_fashion_mnist(False))
        except FileNotFoundError:
            images = None
    if images is None or len(images) != 10_000:
        pytest.skip(
            f"Fashion-MNIST is not installed: apt-get install {fashion_mnist.DEBIAN_PACKAGE} "
            "(`make test` does it as root)"
        )
    path = tmp_path_factory.mktemp("fmnist") / "test00000.png"
    Image.fromarray(images[0, 0].numpy(), mode="L").save(path)
    return path


@pytest.fixture(scope="module")
def run(fmnist_image, tmp_path_factory) -> Iterator[Path]:
    with tiny_run(tmp_path_factory.mktemp("serve")) as out:
        yield out


def test_the_page_shows_the_top1_that_vitkit_predict_prints(fmnist_image, run, tmp_path, capsys):
    driver = _page_driver()
    reason = driver.browser_unavailable()
    if reason:
        pytest.skip(reason)
    server, predictor = serve(run)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("a text file with an image's name")
    with server:
        shown = driver.read_page(f"{server.url}/", fmnist_image, tmp_path / "page.png")
        error = driver.read_error(f"{server.url}/", not_an_image)
    capsys.readouterr()
    assert main(["predict", str(fmnist_image), "--run", str(run), "--top-k", "1"]) == 0
    printed = capsys.readouterr().out.strip()  # "PATH: CLASS 12.3%"
    label = printed.split(": ", 1)[1].rsplit(" ", 1)[0]
    assert shown["top1"] == label and shown["shown"].startswith(label)
    assert len(shown["bars"]) == 5 and set(shown["bars"]) <= set(fashion_mnist.CLASSES)
    assert shown["overlay"]  # a ViT: the `last` attention map is drawn over the image
    assert "vit_tiny_patch16_224" in shown["model"] and "test top-1" in shown["model"]
    assert predictor.stats["images"] == 1
    assert "'notes.png' is not an image" in error  # the server's one-line error, shown as it came
    assert (tmp_path / "page.png").stat().st_size > 10_000
