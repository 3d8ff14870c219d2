"""Throughput, latency and peak memory of a model, alone or against timm's model of the same name.

Every step is timed on its own after a warm-up (CUDA events on the GPU, `perf_counter` on the CPU);
reports give the median step time, its 10th-90th percentile spread and images/s =
batch size / median step time. `mode="train"` times forward + cross-entropy + backward +
optimizer step: each library's own AdamW (vitkit: `train.optim.build_optimizer`, fused where the
parameters allow; timm: `create_optimizer_v2`, torch's defaults, a per-tensor loop on the CPU).

Mixed precision (`amp`: off | bf16 | auto, resolved by `vitkit.core.hardware.resolve_amp`): timm's
model runs under autocast, as its users run it; ours, in inference, holds its weights in bf16
(`cast_for_inference`) unless `cast_weights=False`, so both sides are timed as a user would run them.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.core.hardware import AMP_CHOICES, resolve_amp
from vitkit.factory import create_model, get_variant
from vitkit.layers.precision import cast_for_inference
from vitkit.registry import to_2tuple
from vitkit.train.optim import build_optimizer

Mode = Literal["infer", "train"]
Amp = Literal["off", "bf16", "auto"]


@dataclass(frozen=True)
class BenchOptions:
    batch_size: int = 8
    img_size: tuple[int, int] | None = None  # None: the model's own
    mode: Mode = "infer"
    device: str = "cpu"
    amp: Amp | None = "off"
    cast_weights: bool = True  # infer with amp: our weights held in bf16 (timm's autocast casts per step)
    compile: bool = False
    channels_last: bool = False
    warmup: int = 5
    steps: int = 20

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.mode not in ("infer", "train"):
            raise ValueError(f"mode must be infer or train, got {self.mode!r}")
        if self.amp is not None and self.amp not in AMP_CHOICES:  # None: off, as before amp took auto
            raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.warmup < 0 or self.steps < 1:
            raise ValueError(f"need warmup >= 0 and steps >= 1, got {self.warmup} and {self.steps}")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda requested but no CUDA GPU is visible: use --device cpu")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class BenchResult:
    model: str
    impl: str  # "vitkit" or "timm"
    device: str
    mode: str
    batch_size: int
    img_size: tuple[int, int]
    amp: str | None  # what ran: "bf16" or None (fp32)
    weights: str  # the dtype the weights were held in during the steps
    compile: bool
    channels_last: bool
    steps: int
    step_ms: float  # median time of one step (one batch)
    step_ms_p10: float
    step_ms_p90: float
    throughput: float  # images/s at the median step time
    peak_memory_mb: float | None  # CUDA only: the CPU allocator has no honest per-model peak

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["img_size"] = list(self.img_size)
        return out


def amp_dtype(opts: BenchOptions) -> tuple[torch.dtype | None, dict[str, Any]]:
    """The autocast dtype that `opts.amp` resolves to on `opts.device`, and the record of why."""
    return resolve_amp(opts.amp or "off", opts.device)


@dataclass(frozen=True)
class Comparison:
    ours: BenchResult
    timm: BenchResult
    ratio: float  # median over rounds of our throughput / timm's
    ratio_low: float  # lowest and highest round
    ratio_high: float
    rounds: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "ours": self.ours.to_dict(),
            "timm": self.timm.to_dict(),
            "ratio": self.ratio,
            "ratio_low": self.ratio_low,
            "ratio_high": self.ratio_high,
            "rounds": self.rounds,
        }


def _optimizer(model: nn.Module, impl: str) -> torch.optim.Optimizer:
    # each library's own training optimiser, as its users get it: vitkit's build_optimizer (AdamW,
    # fused where the parameters allow) against timm's create_optimizer_v2 (torch's AdamW defaults)
    if impl == "timm":
        from timm.optim import create_optimizer_v2  # noqa: PLC0415  # timm is optional, imported when compared

        return create_optimizer_v2(model, "adamw", lr=1e-6, weight_decay=0.05)
    return build_optimizer(model, lr=1e-6, weight_decay=0.05)


# -- one model, ready to step ---------------------------------------------------------------------
class _Runner:
    """A model on its device with its input, in the chosen mode; `step()` runs one batch."""

    def __init__(self, model: nn.Module, name: str, impl: str, opts: BenchOptions, img_size: tuple[int, int]) -> None:
        self.name, self.impl, self.opts, self.img_size = name, impl, opts, img_size
        device = torch.device(opts.device)
        self.device = device
        self.amp, _ = amp_dtype(opts)
        cast = self.amp is not None and opts.cast_weights and impl == "vitkit" and opts.mode == "infer"
        self.weights = self.amp if cast else torch.float32
        memory_format = torch.channels_last if opts.channels_last else torch.contiguous_format
        model = model.to(device=device, memory_format=memory_format)  # type: ignore[call-overload]  # torch accepts both
        if cast:
            cast_for_inference(model, self.amp)
        model.train(opts.mode == "train")
        in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
        self.x = torch.randn(opts.batch_size, in_chans, *img_size, device=device, dtype=self.weights).contiguous(
            memory_format=memory_format
        )
        num_classes = _num_classes(model)
        self.target = torch.randint(0, max(num_classes, 1), (opts.batch_size,), device=device)
        self.model = model
        self.forward: Callable[[torch.Tensor], Any] = torch.compile(model) if opts.compile else model
        self.optimizer = _optimizer(model, impl) if opts.mode == "train" else None
        self.autocast = (
            torch.autocast(device_type=device.type, dtype=self.amp) if self.amp and not cast else nullcontext()
        )

    def step(self) -> None:
        if self.optimizer is None:
            with torch.inference_mode(), self.autocast:
                self.forward(self.x)
            return
        with self.autocast:
            out = self.forward(self.x)
            out = out[0] if isinstance(out, tuple) else out  # DeiT distillation heads in training
            loss = F.cross_entropy(out.float(), self.target) if out.ndim == 2 else out.float().mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def time_steps(self, n: int) -> list[float]:
        """Seconds per step, each step timed on its own."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):  # events time the current stream of the model's GPU
                events = [
                    (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)
                ]
                for start, end in events:
                    start.record()
                    self.step()
                    end.record()
                torch.cuda.synchronize(self.device)
            return [start.elapsed_time(end) / 1e3 for start, end in events]
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - t0)
        return times

    def warm_up(self) -> None:
        for _ in range(self.opts.warmup):
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def result(self, times: list[float], peak_memory_mb: float | None) -> BenchResult:
        med = statistics.median(times)
        return BenchResult(
            model=self.name,
            impl=self.impl,
            device=str(self.device),
            mode=self.opts.mode,
            batch_size=self.opts.batch_size,
            img_size=self.img_size,
            amp={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp),
            weights=str(self.weights).removeprefix("torch."),
            compile=self.opts.compile,
            channels_last=self.opts.channels_last,
            steps=len(times),
            step_ms=1e3 * med,
            step_ms_p10=1e3 * _quantile(times, 0.1),
            step_ms_p90=1e3 * _quantile(times, 0.9),
            throughput=self.opts.batch_size / med,
            peak_memory_mb=peak_memory_mb,
        )


def _num_classes(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None:
        return config.num_classes
    return getattr(model, "num_classes", 0)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _peak_memory(device: torch.device, run: Callable[[], Any]) -> tuple[Any, float | None]:
    if device.type != "cuda":
        return run(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = run()
    torch.cuda.synchronize(device)
    return out, torch.cuda.max_memory_allocated(device) / 2**20


def _img_size(name: str, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
    return to_2tuple(img_size) if img_size is not None else tuple(get_variant(name).config.img_size)


# -- public API ----------------------------------------------------------------------------------
def median_call_s(fn: Callable[[], Any], calls: int) -> float:
    """Median wall seconds of `calls` calls of fn(), after one untimed call (allocation, kernel selection):
    the op-level timings of scripts/perf_table.py (matmul peak) and kernel_speed.py (--op)."""
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def images_per_s(model: nn.Module | Callable[[torch.Tensor], Any], x: torch.Tensor, steps: int) -> float:
    """Images per second of `steps` back-to-back calls model(x), wall clock, nothing synchronised: the
    CPU A/B scripts (scripts/swin_vs_deit.py, kernel_speed.py, int8_speed.py) alternate it between peers."""
    start = time.perf_counter()
    for _ in range(steps):
        model(x)
    return steps * x.shape[0] / (time.perf_counter() - start)


def benchmark(
    model: nn.Module | str, opts: BenchOptions | None = None, name: str | None = None, **overrides: Any
) -> BenchResult:
    """Time a model (or a registered name, built with random weights and config `overrides`)
    for `opts.steps` steps after `opts.warmup` steps."""
    opts = opts or BenchOptions()
    opts.validate()
    if isinstance(model, str):
        name = model
        img_size = _img_size(model, opts.img_size)
        model = create_model(model, img_size=img_size, **overrides)
    else:
        name = name or getattr(model, "variant_name", type(model).__name__)
        img_size = to_2tuple(opts.img_size or tuple(model.config.img_size))
    runner = _Runner(model, name, "vitkit", opts, img_size)

    def run() -> list[float]:
        runner.warm_up()
        return runner.time_steps(opts.steps)

    times, peak = _peak_memory(runner.device, run)
    return runner.result(times, peak)


def timm_pair(name: str, img_size: tuple[int, int], **overrides: Any) -> tuple[nn.Module, nn.Module]:
    """Our model and timm's model of the same name, holding the same (random) weights.

    `overrides` (e.g. `depth=2`) go to both builders: the config fields share timm's names."""
    try:
        import timm  # noqa: PLC0415  optional (dev extra): only for --vs timm
    except ImportError as err:
        raise RuntimeError("--vs timm needs timm: pip install timm") from err
    try:
        ref = timm.create_model(name, pretrained=False, img_size=img_size, **overrides)
    except RuntimeError as err:  # timm's "Unknown model"
        raise ValueError(f"timm has no model {name!r} to compare with ({err})") from err
    ours = create_model(name, img_size=img_size, **overrides)
    try:
        ours.load_state_dict(ref.state_dict(), strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"timm's {name} weights do not load into ours: {str(err).splitlines()[0]}") from err
    return ours, ref


def compare_with_timm(name: str, opts: BenchOptions | None = None, rounds: int = 5, **overrides: Any) -> Comparison:
    """Time our model and timm's (same name, same weights) alternately in `rounds` rounds of
    `opts.steps` steps each, so that drifts of the machine (clocks, other processes) hit both."""
    opts = opts or BenchOptions()
    opts.validate()
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    img_size = _img_size(name, opts.img_size)
    ours_model, ref_model = timm_pair(name, img_size, **overrides)
    ours = _Runner(ours_model, name, "vitkit", opts, img_size)
    ref = _Runner(ref_model, name, "timm", opts, img_size)
    ours.warm_up()
    ref.warm_up()
    times: dict[str, list[float]] = {"vitkit": [], "timm": []}
    ratios = []
    for r in range(rounds):
        # alternate who goes first, so neither always follows the other's cache state
        order = (ours, ref) if r % 2 == 0 else (ref, ours)
        this_round = {runner.impl: runner.time_steps(opts.steps) for runner in order}
        for impl, t in this_round.items():
            times[impl] += t
        ratios.append(statistics.median(this_round["timm"]) / statistics.median(this_round["vitkit"]))
    peaks = {}
    for runner in (ours, ref):  # one extra timed round each for the peak memory
        _, peaks[runner.impl] = _peak_memory(runner.device, functools.partial(runner.time_steps, 1))
    return Comparison(
        ours=ours.result(times["vitkit"], peaks["vitkit"]),
        timm=ref.result(times["timm"], peaks["timm"]),
        ratio=statistics.median(ratios),
        ratio_low=min(ratios),
        ratio_high=max(ratios),
        rounds=rounds,
    )


def largest_batch(
    name: str, opts: BenchOptions | None = None, start: int = 64, limit: int = 16384, vs_timm: bool = False
) -> int:
    """The DeiT paper's throughput setting: the largest batch that fits in GPU memory (CUDA only).

    Doubles the batch from `start` until a step runs out of memory, then bisects. `vs_timm`: the
    largest batch at which ours and timm's model fit together, as `compare_with_timm` holds them.
    """
    opts = replace(opts or BenchOptions(device="cuda"), warmup=1, steps=1)
    if torch.device(opts.device).type != "cuda":
        raise ValueError(
            "the largest-batch throughput preset needs a CUDA GPU: on the CPU the kernel kills a process "
            "that runs out of memory instead of raising an error, so the search cannot be done there; "
            "pass --batch-size instead"
        )
    opts.validate()

    def fits(batch: int) -> bool:
        try:
            if vs_timm:
                compare_with_timm(name, replace(opts, batch_size=batch), rounds=1)
            else:
                benchmark(name, replace(opts, batch_size=batch))
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        except RuntimeError as err:  # cuBLAS / cuDNN report running out of memory as a plain error
            if "out of memory" not in str(err).lower() and "CUBLAS_STATUS_ALLOC_FAILED" not in str(err):
                raise
            return False
        finally:
            gc.collect()  # the failed step's tensors, then the cached blocks
            torch.cuda.empty_cache()

    try:
        return search_largest(fits, start, limit)
    except RuntimeError as err:
        raise RuntimeError(f"{name} {err}") from err


def search_largest(fits: Callable[[int], bool], start: int = 64, limit: int = 16384) -> int:
    """The largest n <= limit with fits(n) (to within ~3%), for a monotone `fits`: powers of two
    from `start` up or down until one fits and the next does not, then bisection."""
    if fits(start):
        lo, hi = start, None
        while hi is None:
            if lo * 2 > limit:
                return lo
            lo, hi = (lo * 2, None) if fits(lo * 2) else (lo, lo * 2)
    else:
        lo, hi = start // 2, start
        while True:
            if lo == 0:
                raise RuntimeError("does not fit in GPU memory even at batch size 1")
            if fits(lo):
                break
            lo, hi = lo // 2, lo
    while hi - lo > max(1, lo // 32):  # throughput is flat near the limit
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
