"""Drive the `vitkit serve` page in a real headless chromium (Debian's, through Playwright's Python
package: no browser download), upload an image, and read back what the page shows.

    python scripts/serve_page.py --run DIR --image PNG [--screenshot docs/img/serve_page.png]

starts `vitkit serve` on 127.0.0.1 and a free port, prints the page's top-1 beside `vitkit predict`'s,
and saves a screenshot. tests/test_serve_page.py calls `read_page` on a server of its own.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"


def browser_unavailable() -> str | None:
    """Why the page cannot be driven here, or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright's Python package is missing: pip install playwright (in vitkit[dev])"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing: apt-get install chromium (`make test` does it as root)"
    return None


@contextmanager
def _page(url: str) -> Iterator[Any]:
    """A fresh headless chromium with the page at `url` loaded."""
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # root needs it
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 520})
            page.goto(url, wait_until="load")
            yield page
        finally:
            browser.close()


def read_page(url: str, image: str | Path, screenshot: str | Path | None = None) -> dict[str, Any]:
    """Open the page at `url`, pick `image`, wait for the answer; what the page shows:
    {"top1": class, "shown": the top-1 line, "bars": [class, ...], "overlay": the map is drawn, "model": header}."""
    with _page(url) as page:
        page.wait_for_function("!document.getElementById('model').textContent.startsWith('loading')")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("body[data-state=done]", timeout=60_000)
        shown = {
            "top1": page.get_attribute("#bars .bar:first-child", "data-class"),
            "shown": page.text_content("#top1"),
            "bars": [b.get_attribute("data-class") for b in page.query_selector_all("#bars .bar")],
            "overlay": page.is_visible("#overlay-toggle") and page.evaluate(_HEAT_DRAWN),
            "model": page.text_content("#model"),
        }
        if screenshot is not None:
            from vitkit.core.files import atomic_path

            with atomic_path(screenshot) as tmp:  # never a half-written picture
                page.screenshot(path=str(tmp), type="png")
    return shown


def read_error(url: str, upload: str | Path) -> str:
    """Open the page at `url`, pick a file the server refuses; the error line the page shows."""
    with _page(url) as page:
        page.set_input_files("#file", str(upload))
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=60_000)
        return page.text_content("#error")


# true when the heat canvas holds painted pixels
_HEAT_DRAWN = """() => {
  const c = document.getElementById('heat');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  for (let i = 3; i < d.length; i += 4) if (d[i] > 0) return true;
  return false;
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, port: int, *extra: str) -> subprocess.Popen:
    """`vitkit serve --run RUN` on 127.0.0.1:port, returned once /healthz answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitkit", "serve", "--run", run, "--port", str(port), "--log-level", "warning", *extra]
    )
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vitkit serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("vitkit serve did not answer /healthz within 120 s") from None
            time.sleep(0.3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder from `vitkit train`")
    parser.add_argument("--image", required=True, help="an image file to upload")
    parser.add_argument("--screenshot", default=None, help="PNG to write")
    args = parser.parse_args()
    reason = browser_unavailable()
    if not Path(args.image).is_file():
        reason = f"image {args.image} does not exist"
    if reason:
        print(f"serve_page: {reason}", file=sys.stderr)
        return 2
    port = _free_port()
    proc = start_server(args.run, port)
    try:
        shown = read_page(f"http://127.0.0.1:{port}/", args.image, args.screenshot)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    printed = subprocess.run(
        [sys.executable, "-m", "vitkit", "predict", args.image, "--run", args.run, "--top-k", "1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(
        f"page: {shown['model']}\npage top-1: {shown['shown']} (bars: {', '.join(shown['bars'])}; "
        f"attention overlay: {shown['overlay']})\nvitkit predict: {printed}"
    )
    if args.screenshot:
        print(f"wrote {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
