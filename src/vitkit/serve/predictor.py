"""The predictor behind `vitkit serve`: it owns the model, decodes images safely, and runs requests
that arrive within a few milliseconds of each other as one forward pass (dynamic batching).

One worker thread runs every forward pass, so the model is never used from two threads at once
(attention maps switch recording on in its modules). The queue is bounded in images: past it,
`submit` raises `Busy` and the service answers 503.

Batches are padded to a few bucket sizes (powers of two up to max_batch) and `start` runs one
forward pass of each before serving. The CPU kernels keep memory per batch shape (oneDNN's primitive
cache and more): measured on fmnist_demo, batches of every size 1..32 grew RSS by ~75 MiB over the
first few hundred batches, buckets by ~12 MiB, all of it reached during the warm-up.

Uploads are decoded on a small pool of `decode_threads` threads, not one thread per request: each
thread that allocates gets its own glibc malloc arena, which keeps its freed memory. Measured with
deit_small at 224 (256x256 JPEG uploads, batches of 32): 32 decoding threads grew RSS by ~150 MiB over
60 batches, 2 threads by ~15 MiB, after which it stayed flat.

Once the queue has been empty for IDLE_TRIM_S after serving, the worker asks glibc to return freed
memory to the system (`malloc_trim`): what requests in flight held (decoded images, batches, bodies)
otherwise stays in the process. deit_small at 224, 2,000 requests from 32 clients: +4.8-6.4% RSS at the
last answer, +0.9% (batching off) and -17.5% (on) once idle for 1 s (docs/RESULTS.md).
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from vitkit.core.errors import VitkitError
from vitkit.core.heap import release_memory
from vitkit.data.transforms import eval_transform
from vitkit.serve.loading import ServedModel
from vitkit.tools.attention_maps import attention_map
from vitkit.train.engine import mirror_averaged_log_probs

# the decoders an upload may reach: no EPS (it runs Ghostscript) nor other rarely used plugins
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
Buckets = Literal["pow2", "none"]
IDLE_TRIM_S = 0.2  # how long the queue stays empty before freed memory is handed back


def bucket_sizes(max_batch: int, buckets: Buckets = "pow2") -> tuple[int, ...]:
    """The batch sizes the model ever sees: powers of two below max_batch, and max_batch ("pow2");
    every size 1..max_batch ("none")."""
    if buckets == "none":
        return tuple(range(1, max_batch + 1))
    return tuple(sorted({2**i for i in range(max_batch.bit_length()) if 2**i < max_batch} | {max_batch}))


def rss_mib() -> float | None:
    """This process's resident set size in MiB (Linux /proc), None where there is no /proc."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return None if kib is None else round(int(kib) / 1024, 1)


class RequestError(VitkitError):
    """Bad input from a client: answered with `status` and a one-line JSON error."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class Busy(Exception):
    """The queue is full: answered with 503 and Retry-After."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy (queue full): retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Decoded:
    """One image as the model sees it, and where that crop lies in the original picture."""

    name: str
    pixels: torch.Tensor  # (C, H, W), normalised
    crop: tuple[float, float, float, float]  # left, top, width, height in original pixels


@dataclass
class _Job:
    images: list[Decoded]
    top_k: int
    attention: bool
    future: Future = field(default_factory=Future)


class Predictor:
    """Dynamic batching over one model: `submit` queues a request, a worker thread answers it."""

    def __init__(
        self,
        served: ServedModel,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        max_pixels: int = 25_000_000,
        buckets: Buckets = "pow2",
        decode_threads: int = 2,
        device: torch.device | str = "cpu",
    ) -> None:
        if buckets not in ("pow2", "none"):
            raise ValueError(f"--buckets must be pow2 or none, got {buckets!r}")
        if decode_threads < 1:
            raise ValueError(f"--decode-threads must be >= 1, got {decode_threads}")
        if max_batch < 1 or max_queue < max_batch or max_wait_ms < 0 or max_pixels < 1:
            raise ValueError(
                f"need --max-batch >= 1, --max-queue >= --max-batch, --max-wait-ms >= 0 and --max-pixels >= 1; got "
                f"{max_batch}, {max_queue}, {max_wait_ms}, {max_pixels}"
            )
        self.served = served
        self.model = served.model.eval().to(device)
        self.device = torch.device(device)
        self.max_batch, self.max_wait_ms = max_batch, max_wait_ms
        self.max_queue, self.max_pixels = max_queue, max_pixels
        self.buckets, self.batch_sizes = buckets, bucket_sizes(max_batch, buckets)
        self.decode_threads = decode_threads
        self._decoder, self._closed_decoder = ThreadPoolExecutor(decode_threads, "vitkit-decode"), False
        self.num_classes = len(served.classes) if served.classes else None
        self.model_lock = threading.Lock()  # held by the worker around every forward pass
        self._transform = eval_transform(served.spec)
        self._mode = "L" if served.spec.in_chans == 1 else "RGB"
        self._queue: deque[_Job] = deque()
        self._pending = 0  # images waiting in the queue
        self._cond = threading.Condition()
        self._closed = False
        self._served_since_trim = False  # a batch ran since memory was last handed back
        self._thread: threading.Thread | None = None
        self.stats = {
            "requests": 0,
            "images": 0,
            "batches": 0,
            "rejected_busy": 0,
            "largest_batch": 0,
            "memory_trims": 0,
        }
        self.warmup: dict[str, Any] | None = None  # what `warm_up` did, once it has run

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread and return once it has warmed the model up (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._closed = False
            if self._closed_decoder:  # started again after close
                self._decoder, self._closed_decoder = ThreadPoolExecutor(self.decode_threads, "vitkit-decode"), False
            warmed: Future = Future()
            self._thread = threading.Thread(target=self._work, args=(warmed,), name="vitkit-serve-worker", daemon=True)
            self._thread.start()
            warmed.result()  # the warm-up's own error, with its traceback

    def close(self) -> None:
        """Finish what is queued, then stop the worker and the decoding threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._decoder.shutdown(wait=True)
        self._closed_decoder = True

    @torch.inference_mode()
    def warm_up(self) -> dict[str, Any]:
        """One forward pass at each batch size the model can see, so that the kernels' per-shape memory
        is taken before the first request rather than during serving; records RSS before and after."""
        spec, before, start = self.served.spec, rss_mib(), time.perf_counter()
        with self.model_lock:
            for size in self.batch_sizes:  # through the serving path: the same allocations, the same shapes
                self._probs(self._batch([torch.zeros(spec.in_chans, spec.img_size, spec.img_size)] * size))
        self.warmup = {
            "batch_sizes": list(self.batch_sizes),
            "seconds": round(time.perf_counter() - start, 3),
            "rss_mib_before": before,
            "rss_mib_after": rss_mib(),
        }
        return self.warmup

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._pending

    # -- decoding (on the decode pool) --------------------------------------------------------------
    def decode_files(self, files: list[tuple[str, bytes]]) -> Future:
        """Decode one request's (name, bytes) files on the decode pool; the future gives `Decoded`s."""
        return self._decoder.submit(lambda: [self.decode(data, name) for name, data in files])

    def decode(self, data: bytes, name: str) -> Decoded:
        """Decode one image file's bytes; a RequestError names what is wrong with it."""
        if not data:
            raise RequestError(f"image {name!r} is empty: send the bytes of an image file", 400)
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                width, height = img.size  # from the header, before any pixel is decompressed
                if width * height > self.max_pixels:
                    raise RequestError(
                        f"image {name!r} is {width}x{height} pixels, over the limit of {self.max_pixels} "
                        "(a decompression bomb?): send a smaller image",
                        413,
                    )
                img.load()
                if img.mode in ("I", "I;16") and self._mode == "L":  # 16-bit greyscale: scale, don't clip
                    img = img.point(lambda v: v / 256)
                img = img.convert(self._mode)
        except RequestError:
            raise
        except Image.DecompressionBombError as err:  # PIL's own limit, checked in Image.open
            raise RequestError(f"image {name!r}: {err} (a decompression bomb?): send a smaller image", 413) from None
        except UnidentifiedImageError:
            raise RequestError(
                f"{name!r} is not an image vitkit can read: send a PNG, JPEG, WebP, BMP, GIF, TIFF or PPM file", 415
            ) from None
        except (OSError, ValueError, SyntaxError) as err:
            raise RequestError(f"cannot decode image {name!r} ({err}): the file is damaged or truncated", 422) from None
        return Decoded(name, self._transform(TF.pil_to_tensor(img)), self._crop_box(width, height))

    def _crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        # eval transform: resize the short side to floor(img_size / crop_pct), centre-crop img_size
        spec = self.served.spec
        scale = min(width, height) / math.floor(spec.img_size / spec.crop_pct)
        w, h = min(width, spec.img_size * scale), min(height, spec.img_size * scale)
        return ((width - w) / 2, (height - h) / 2, w, h)

    # -- the queue ---------------------------------------------------------------------------------
    def submit(self, images: list[Decoded], *, top_k: int = 5, attention: bool = False) -> Future:
        """Queue one request; its future gives one `vitkit predict --json` entry per image."""
        if not images:
            raise RequestError("no image in the request: send at least one", 400)
        if len(images) > self.max_batch:
            raise RequestError(
                f"{len(images)} images in one request, over --max-batch {self.max_batch}: split the request", 413
            )
        if not 1 <= top_k <= 1000:
            raise RequestError(f"top_k must be between 1 and 1000, got {top_k}")
        if attention and self.served.attention is None:
            attention = False  # models without a map (torchvision, int8) answer with the bars alone
        job = _Job(images, top_k, attention)
        with self._cond:
            if self._closed:
                raise Busy(retry_after=5)
            if self._pending + len(images) > self.max_queue:
                self.stats["rejected_busy"] += 1
                raise Busy(retry_after=1)
            self._queue.append(job)
            self._pending += len(images)
            self.stats["requests"] += 1
            self._cond.notify()
        return job.future

    def _next_batch(self) -> list[_Job] | None:
        """Block for a first request, then gather more until max_batch images or max_wait_ms."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                if not self._served_since_trim:
                    self._cond.wait()
                elif not self._cond.wait(IDLE_TRIM_S) and not self._queue:  # idle after serving
                    self._served_since_trim = False
                    self.stats["memory_trims"] += int(release_memory())
            jobs = [self._queue.popleft()]
            size = len(jobs[0].images)
            deadline = time.monotonic() + self.max_wait_ms / 1000
            while size < self.max_batch:
                if self._queue:
                    if size + len(self._queue[0].images) > self.max_batch:
                        break
                    jobs.append(self._queue.popleft())
                    size += len(jobs[-1].images)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            self._pending -= size
        return jobs

    def _work(self, warmed: Future) -> None:
        # the warm-up runs here, not in the caller's thread: glibc gives each thread its own malloc arena,
        # and the one the forward passes use is the one that must reach its high-water mark before serving
        try:
            warmed.set_result(self.warmup or self.warm_up())
        except BaseException as err:
            warmed.set_exception(err)
            return
        while (jobs := self._next_batch()) is not None:
            # a request whose client went away was cancelled: drop it; the rest can no longer be cancelled
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            try:
                with self.model_lock:
                    answers = self._forward(jobs)
            # a real bug: every waiting request gets it, and a 500 with its traceback in the server's log
            except Exception as err:  # noqa: BLE001
                for job in jobs:
                    job.future.set_exception(err)
                continue
            for job, answer in zip(jobs, answers):
                job.future.set_result(answer)
            self._served_since_trim = True

    # -- the forward pass (worker thread) ------------------------------------------------------------
    def _batch(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        # B (C, H, W) images -> (bucket size, C, H, W), in one allocation whose size is a bucket's too.
        # Padding repeats the last image, not zeros: an int8 model's dynamic quantisation takes its scale
        # from the whole batch, and copies add no new values to it
        size = next(n for n in self.batch_sizes if n >= len(pixels))
        x = torch.empty((size, *pixels[0].shape), dtype=pixels[0].dtype, device=self.device)
        for row, image in enumerate(pixels):
            x[row].copy_(image)
        x[len(pixels) :] = x[len(pixels) - 1]
        return x

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) images -> (B, K) class probabilities, as `vitkit predict` computes them
        if self.served.tta == "hflip":
            return mirror_averaged_log_probs(self.model, x).exp()
        return self.model(x).float().softmax(dim=-1)

    @torch.inference_mode()
    def _forward(self, jobs: list[_Job]) -> list[list[dict[str, Any]]]:
        images = [d for job in jobs for d in job.images]
        x = self._batch([d.pixels for d in images])  # (bucket size, C, H, W): the first B rows are the images
        probs = self._probs(x)[: len(images)]  # (B, K): the padding rows dropped
        self.stats["batches"] += 1
        self.stats["images"] += len(images)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(images))
        answers, start = [], 0
        for job in jobs:
            rows = probs[start : start + len(job.images)]
            entries = [{"image": d.name, "top": self._top(p, job.top_k)} for d, p in zip(job.images, rows)]
            if job.attention:
                self._add_maps(entries, job.images, x[start : start + len(job.images)])
            answers.append(entries)
            start += len(job.images)
        return answers

    def _top(self, probs: torch.Tensor, k: int) -> list[dict[str, Any]]:
        values, indices = probs.topk(min(k, probs.shape[-1]))
        classes = self.served.classes
        return [
            {"class": classes[i] if classes and i < len(classes) else str(i), "index": i, "prob": v}
            for v, i in zip(values.tolist(), indices.tolist())
        ]

    def _add_maps(self, entries: list[dict[str, Any]], images: list[Decoded], x: torch.Tensor) -> None:
        with torch.inference_mode(False), torch.no_grad():  # recording attention writes module state
            maps = attention_map(self.model, x.clone(), self.served.attention)
        for entry, decoded, amap in zip(entries, images, maps):
            heat = amap.heat / amap.heat.max().clamp(min=1e-12)  # (h, w), peak 1
            entry["attention"] = {
                "method": amap.method,
                "grid": list(heat.shape),
                "heat": [round(v, 4) for v in heat.flatten().tolist()],
                "crop": [round(v, 2) for v in decoded.crop],
            }
