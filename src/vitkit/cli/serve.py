"""`vitkit serve (--run DIR | --checkpoint FILE)`: an HTTP service and a web page for one model."""

from __future__ import annotations

import argparse
import socket

from vitkit.core.errors import VitkitError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a trained model over HTTP, with a web page to try it (needs vitkit[serve])",
        description="Start an HTTP service: POST /v1/predict (images as multipart field 'image' or JSON base64; "
        "answers like `vitkit predict --json`), GET /v1/model, GET /healthz, and a page at / to drop an image and "
        "see the top-5 classes and the attention map. Requests arriving within --max-wait-ms share one forward pass.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", dest="run_dir", metavar="DIR", help="a run folder from `vitkit train` (its best weights)")
    src.add_argument("--checkpoint", metavar="FILE", help="a .safetensors file written by vitkit")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--max-batch", type=int, default=32, help="most images in one forward pass (1: no batching)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long the first request of a batch waits for others to join it",
    )
    p.add_argument(
        "--buckets",
        choices=("pow2", "none"),
        default="pow2",
        help="pad each batch to the next power of two (up to --max-batch), so the model sees few shapes and "
        "memory stays flat; the padding rows are dropped (none: every size 1..--max-batch). The model runs each "
        "size once at start, before the server listens",
    )
    p.add_argument(
        "--decode-threads",
        type=int,
        default=2,
        help="threads that decode uploads (few: each thread's malloc arena keeps its own memory)",
    )
    p.add_argument("--max-queue", type=int, default=256, help="images waiting at most; past it, 503 with Retry-After")
    p.add_argument("--max-bytes", type=int, default=10 * 2**20, help="largest request body (413 past it)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=25_000_000,
        help="largest decoded image (width x height); past it, 413 (decompression bombs)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the forward pass (default: torch's)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: PLC0415  the optional serve extra, and fast CLI start-up

        from vitkit.serve.app import create_app  # noqa: PLC0415  the optional serve extra, and fast CLI start-up
    except ImportError as err:
        raise RuntimeError(f"vitkit serve needs FastAPI and uvicorn ({err}): pip install 'vitkit[serve]'") from None
    import torch  # noqa: PLC0415  fast CLI start-up

    from vitkit.serve import Predictor, load_served_model  # noqa: PLC0415  fast CLI start-up
    from vitkit.tools.inference import inference_device  # noqa: PLC0415  fast CLI start-up

    if args.max_bytes < 1:
        raise ValueError(f"--max-bytes must be >= 1, got {args.max_bytes}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    sock = _listen(args.host, args.port)  # before loading the model: a taken port fails at once
    with sock:
        device = inference_device(args.device, args.checkpoint)  # an int8 file: the CPU
        served = load_served_model(run=args.run_dir, checkpoint=args.checkpoint, device=device)
        predictor = Predictor(
            served,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue,
            max_pixels=args.max_pixels,
            buckets=args.buckets,
            decode_threads=args.decode_threads,
            device=device,
        )
        app = create_app(predictor, max_bytes=args.max_bytes)
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        print(
            f"serving {served.name} ({served.source}) on {url} "
            f"(batches of up to {args.max_batch}, {args.max_wait_ms:g} ms wait)",
            flush=True,
        )
        config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level == "debug")
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shuts down gracefully, then raises the Ctrl-C it caught again
            pass
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port); port 0 picks a free one."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as err:
        raise ValueError(f"cannot resolve --host {host!r} ({err}): give an address such as 127.0.0.1") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise VitkitError(f"cannot listen on {host}:{port} ({err.strerror}): pick another --port or --host") from None
    return sock
