"""A bounded load test of `vitkit serve` on loopback: N requests from C concurrent clients, with dynamic
batching on and off. Client and server share the machine (the clients' CPU time competes with the
server's), so figures are a lower bound on what the server does alone.

    python scripts/load_test.py --run runs/fmnist_best                 # a trained run, its test images
    python scripts/load_test.py --model deit_small_patch16_224         # random weights at 224
    options: --requests 2000 --clients 32 --max-batch 32 --max-wait-ms 5 --buckets pow2 --threads N --out report.json

Per mode: errors (non-200 answers or failed connections; must be 0), p50 / p99 latency, throughput,
and the server's RSS: before and after its own start-up warm-up (as /healthz reports them), when it
first answers (ready), just before the requests, at the end, and idle 1 s later. Growth is from "before the requests"
(the issue's measure), which is the ready figure unless --client-warmup sends requests first.
Nothing outside 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
MODES = {
    "on": ("--max-batch", "{max_batch}", "--max-wait-ms", "{max_wait_ms}", "--buckets", "{buckets}"),
    "off": ("--max-batch", "1", "--max-wait-ms", "0"),
}


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(
    source: list[str], settings: list[str], threads: int | None
) -> tuple[subprocess.Popen, int, dict[str, Any]]:
    """Start `vitkit serve`; return once /healthz answers, which it does only after the warm-up."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vitkit",
        "serve",
        *source,
        "--host",
        HOST,
        "--port",
        str(port),
        "--log-level",
        "warning",
        *settings,
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vitkit serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=5) as r:
                return proc, port, json.loads(r.read())
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("vitkit serve did not start within 180 s") from None
            time.sleep(0.3)


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of one request uploading (filename, bytes) files in the field `image`."""
    boundary = "vitkit-load-test"
    parts = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def client(
    port: int,
    bodies: list[tuple[bytes, dict[str, str]]],
    jobs: list[int],
    lock: threading.Lock,
    latencies: list[float],
    errors: list[str],
) -> None:
    """One client: a keep-alive connection, taking request numbers from `jobs` until none are left."""
    conn = http.client.HTTPConnection(HOST, port, timeout=300)
    while True:
        with lock:
            if not jobs:
                break
            i = jobs.pop()
        body, headers = bodies[i % len(bodies)]
        start = time.perf_counter()
        try:
            conn.request("POST", "/v1/predict", body=body, headers=headers)
            response = conn.getresponse()
            answer = response.read()
            if response.status != 200 or not json.loads(answer)[0]["top"]:
                errors.append(f"{response.status}: {answer[:200]!r}")
        except (OSError, http.client.HTTPException, ValueError) as err:
            errors.append(f"{type(err).__name__}: {err}")
            conn.close()
            conn = http.client.HTTPConnection(HOST, port, timeout=300)
        latencies.append(time.perf_counter() - start)
    conn.close()


def load(
    port: int, bodies: list[tuple[bytes, dict[str, str]]], requests: int, clients: int, pid: int | None = None
) -> dict[str, Any]:
    """Send `requests` requests from `clients` threads; latency percentiles, throughput, errors, and
    (given the server's pid) its RSS after every 1,000 requests."""
    jobs, lock = list(range(requests)), threading.Lock()
    latencies: list[float] = []  # seconds per request
    errors: list[str] = []
    threads = [
        threading.Thread(target=client, args=(port, bodies, jobs, lock, latencies, errors)) for _ in range(clients)
    ]
    rss_by_thousand: list[float] = []
    start = time.perf_counter()
    for t in threads:
        t.start()
    while pid is not None and any(t.is_alive() for t in threads):
        if len(latencies) >= 1000 * (len(rss_by_thousand) + 1):
            rss_by_thousand.append(round(rss_mb(pid), 1))
        time.sleep(0.02)
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()

    def pick(q: float) -> float:  # the q-quantile latency, ms
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {
        "requests": requests,
        "clients": clients,
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50_ms": round(pick(0.50), 1),
        "p99_ms": round(pick(0.99), 1),
        "seconds": round(wall, 2),
        "requests_per_s": round(requests / wall, 1),
        "rss_mb_every_1000": rss_by_thousand,
    }


def run_mode(mode: str, source: list[str], files: list[tuple[str, bytes]], args: argparse.Namespace) -> dict[str, Any]:
    settings = [
        s.format(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, buckets=args.buckets) for s in MODES[mode]
    ]
    proc, port, ready_health = start_server(source, settings, args.threads)
    bodies = [multipart([f]) for f in files]
    try:
        ready = rss_mb(proc.pid)  # the server has warmed up: it answers nothing before
        if args.client_warmup:
            load(port, bodies, args.client_warmup, args.clients)
        before = rss_mb(proc.pid)
        result = load(port, bodies, args.requests, args.clients, proc.pid)
        after = rss_mb(proc.pid)
        time.sleep(1.0)  # idle: the server hands freed memory back after 0.2 s without requests
        after_idle = rss_mb(proc.pid)
        with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=30) as r:
            health = json.loads(r.read())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    batches = max(health["batches"], 1)
    warmup = ready_health.get("warmup") or {}
    return {
        "batching": mode,
        "settings": " ".join(settings),
        **result,
        "warmup_batch_sizes": warmup.get("batch_sizes"),
        "warmup_s": warmup.get("seconds"),
        "rss_before_warmup_mb": warmup.get("rss_mib_before"),
        "rss_after_warmup_mb": warmup.get("rss_mib_after"),
        "rss_ready_mb": round(ready, 1),
        "client_warmup_requests": args.client_warmup,
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after, 1),
        "rss_growth_pct": round(100 * (after - before) / before, 2),
        "rss_after_idle_mb": round(after_idle, 1),  # 1 s after the last answer
        "rss_growth_idle_pct": round(100 * (after_idle - before) / before, 2),
        "memory_trims": health.get("memory_trims"),
        "mean_batch": round(health["images"] / batches, 2),
        "largest_batch": health["largest_batch"],
    }


def fmnist_files(count: int) -> list[tuple[str, bytes]]:
    """The first `count` Fashion-MNIST test images as PNG uploads."""
    from PIL import Image

    from vitkit.data import fashion_mnist

    images, _ = fashion_mnist.load_fashion_mnist(train=False)
    out = []
    for i in range(min(count, len(images))):
        buf = io.BytesIO()
        Image.fromarray(images[i, 0].numpy(), mode="L").save(buf, format="PNG")
        out.append((f"test{i:05d}.png", buf.getvalue()))
    return out


def photo_files(count: int, size: int) -> list[tuple[str, bytes]]:
    """`count` random RGB JPEGs of size x size (the model resizes and centre-crops them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        out.append((f"random{i}.jpg", buf.getvalue()))
    return out


def random_checkpoint(model: str, folder: Path) -> Path:
    """`model` with random weights, saved with an ImageNet input record, for `--checkpoint`."""
    from vitkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageSpec
    from vitkit.factory import create_model
    from vitkit.train.modeling import save_weights

    net: Any = create_model(model)  # a vitkit model: its config is a dataclass
    classes = [f"class {i}" for i in range(net.config.num_classes)]
    spec = ImageSpec(int(net.config.img_size[0]), 3, tuple(IMAGENET_MEAN), tuple(IMAGENET_STD), 0.875, "bicubic")
    path = folder / f"{model}.safetensors"
    save_weights(net, path, spec=spec, classes=classes)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a trained Fashion-MNIST run folder (uploads its test images)")
    src.add_argument("--model", help="a registered model, served with random weights (uploads random photos)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--buckets", choices=("pow2", "none"), default="pow2", help="the server's --buckets (on)")
    parser.add_argument(
        "--client-warmup", type=int, default=0, help="requests sent after readiness, before RSS 'before'"
    )
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    parser.add_argument("--batching", choices=("both", "on", "off"), default="both")
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            source, files, what = ["--run", args.run], fmnist_files(64), f"run {args.run}"
        else:
            source = ["--checkpoint", str(random_checkpoint(args.model, Path(tmp)))]
            files, what = photo_files(16, 256), f"{args.model} (random weights)"
        modes = ("on", "off") if args.batching == "both" else (args.batching,)
        report: dict[str, Any] = {
            "model": what,
            "cpus": os.cpu_count(),
            "note": "client and server share this machine",
            "modes": [run_mode(mode, source, files, args) for mode in modes],
        }
    for r in report["modes"]:
        print(
            f"{what} | batching {r['batching']:3} ({r['settings']}): {r['requests']} requests, {r['clients']} "
            f"clients, errors {r['errors']}, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
            f"{r['requests_per_s']} req/s, mean batch {r['mean_batch']}; RSS MiB: warm-up {r['rss_before_warmup_mb']} "
            f"-> {r['rss_after_warmup_mb']} ({r['warmup_s']} s, sizes {r['warmup_batch_sizes']}), ready "
            f"{r['rss_ready_mb']}, before {r['rss_before_mb']} -> after {r['rss_after_mb']} "
            f"({r['rss_growth_pct']:+.2f}%), idle 1 s later {r['rss_after_idle_mb']} "
            f"({r['rss_growth_idle_pct']:+.2f}%); "
            f"every 1,000 requests {r['rss_mb_every_1000']}",
            flush=True,
        )
    if args.out:
        from vitkit.core.files import write_text

        write_text(args.out, json.dumps(report, indent=2) + "\n")
    return 1 if any(r["errors"] for r in report["modes"]) else 0


if __name__ == "__main__":
    sys.exit(main())
