"""`vitkit bench MODEL [...]`: throughput, latency and peak memory, alone or against timm."""

from __future__ import annotations

import argparse
import dataclasses
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput (images/s), latency and peak memory; --vs timm compares with timm",
        description=(
            "Time a model with random weights: every step is timed on its own after a warm-up (CUDA events "
            "on the GPU); images/s = batch size / median step time, with the 10th-90th percentile step "
            "times as spread. Peak memory is measured on CUDA only (the CPU allocator gives no honest "
            "per-model peak inside one process)."
        ),
    )
    p.add_argument("model", help="registered model name (see `vitkit models`)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    p.add_argument("--img-size", type=int, default=None, help="square input size (default: the model's own)")
    p.add_argument(
        "--mode",
        choices=("infer", "train"),
        default="infer",
        help="infer: forward under inference_mode; train: forward + cross-entropy + backward + AdamW step",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compilation is in the warm-up)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format for input and weights")
    p.add_argument(
        "--amp",
        choices=("off", "bf16", "auto"),
        default="off",
        help="bf16: timm autocasts, vitkit holds its inference weights in bf16 (see --autocast-only); "
        "auto: bf16 on CUDA and on CPUs with AMX or AVX512_BF16, else fp32 (default off)",
    )
    p.add_argument(
        "--autocast-only",
        action="store_true",
        help="with --amp bf16: run vitkit under autocast too, its weights in fp32 (as timm)",
    )
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    p.add_argument("--steps", type=int, default=30, help="timed steps (per round with --vs timm; default 30)")
    p.add_argument(
        "--vs",
        choices=("timm",),
        default=None,
        help="also time timm's model of the same name with the same weights, alternating rounds, "
        "and print the throughput ratio (ours / timm) with its spread",
    )
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds for --vs timm (default 5)")
    p.add_argument(
        "--preset",
        choices=("deit",),
        default=None,
        help="deit: the DeiT paper's throughput setting, 224x224 at the largest batch that fits "
        "in GPU memory (CUDA only)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415  fast CLI start-up

    from vitkit.core.hardware import describe_amp  # noqa: PLC0415  fast CLI start-up
    from vitkit.factory import get_variant  # noqa: PLC0415  fast CLI start-up
    from vitkit.layers import kernels  # noqa: PLC0415  fast CLI start-up
    from vitkit.tools.bench import BenchOptions, amp_dtype, benchmark, compare_with_timm, largest_batch  # noqa: PLC0415  fast CLI start-up

    get_variant(args.model)  # unknown names fail before anything is built
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts = BenchOptions(
        batch_size=args.batch_size,
        img_size=(args.img_size, args.img_size) if args.img_size else None,
        mode=args.mode,
        device=device,
        amp=args.amp,
        cast_weights=not args.autocast_only,
        compile=args.compile,
        channels_last=args.channels_last,
        warmup=args.warmup,
        steps=args.steps,
    )
    opts.validate()
    _, amp_info = amp_dtype(opts)
    # which of vitkit's own kernels run (Swin's window attention in CPU inference), or why none do
    kernel_line = kernels.status() if device.startswith("cpu") else "vitkit kernels: none off the CPU"
    if not args.json:
        print(describe_amp(amp_info))
        print(kernel_line)
    if args.preset == "deit":
        opts = dataclasses.replace(opts, img_size=(224, 224))
        batch = largest_batch(args.model, opts, vs_timm=args.vs == "timm")
        opts = dataclasses.replace(opts, batch_size=batch)
        if not args.json:
            both = " (ours and timm's together)" if args.vs == "timm" else ""
            print(f"deit preset: largest batch that fits at 224x224 on {device}{both}: {batch}")
    if args.vs == "timm":
        cmp = compare_with_timm(args.model, opts, rounds=args.rounds)
        if args.json:
            print(json.dumps({**cmp.to_dict(), "amp_choice": amp_info, "kernels": kernel_line}, indent=2))
            return 0
        _table([cmp.ours, cmp.timm])
        print(
            f"throughput ratio vitkit/timm: {cmp.ratio:.3f} (spread {cmp.ratio_low:.3f}-{cmp.ratio_high:.3f} "
            f"over {cmp.rounds} alternating rounds of {opts.steps} steps)"
        )
        return 0
    result = benchmark(args.model, opts)
    if args.json:
        print(json.dumps({**result.to_dict(), "amp_choice": amp_info, "kernels": kernel_line}, indent=2))
        return 0
    _table([result])
    return 0


def _table(results: list) -> None:
    width = max(len(r.model) for r in results)
    print(
        f"{'model':<{width}}  {'impl':<6} {'device':<6} {'mode':<5} {'batch':>5} {'input':>9}  "
        f"{'weights':>8} {'step ms':>9} {'p10-p90 ms':>15}  {'images/s':>9}  {'peak MB':>8}"
    )
    for r in results:
        size = "x".join(str(s) for s in r.img_size)
        peak = f"{r.peak_memory_mb:.0f}" if r.peak_memory_mb is not None else "-"
        spread = f"{r.step_ms_p10:.1f}-{r.step_ms_p90:.1f}"
        print(
            f"{r.model:<{width}}  {r.impl:<6} {r.device:<6} {r.mode:<5} {r.batch_size:>5} {size:>9}  "
            f"{r.weights:>8} {r.step_ms:>9.2f} {spread:>15}  {r.throughput:>9.1f}  {peak:>8}"
        )
