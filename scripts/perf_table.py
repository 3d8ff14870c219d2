"""Regenerate docs/PERFORMANCE.md's table in one run: vitkit against timm (same weights, same process,
alternating rounds), images/s, and GFLOP/s as a share of this machine's measured matmul peak.

    python scripts/perf_table.py                      # the full table (about an hour on 2 cores)
    python scripts/perf_table.py --batch-sizes 8 --modes infer --steps 3   # a few minutes

fp32 rows run with amp off; bf16 rows with amp bf16 on both sides (timm autocasts, vitkit holds its
inference weights in bf16). The ratio is the median over rounds of timm's median step time / ours.
GFLOP/s count 2 FLOPs per multiply-add of the forward pass (x3 for a training step: forward, and
backward through inputs and weights), so the share of peak is a share of what matmuls reach here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import torch

from vitkit.core.files import write_text
from vitkit.core.hardware import bf16_flags, cpu_info, reported_flags
from vitkit.layers.linear import onednn_linear_supports
from vitkit.tools.bench import BenchOptions, compare_with_timm, median_call_s
from vitkit.tools.flops import model_macs

MODELS = ("deit_small_patch16_224", "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256")
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
DOC = Path(__file__).resolve().parents[1] / "docs" / "PERFORMANCE.md"


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n matmul in `dtype` on this machine's threads (median of `reps`), the faster
    of torch's matmul and the oneDNN kernel vitkit's linear layers use (MKL's is slow on AMD CPUs)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    kernels = [lambda: a @ b]
    if onednn_linear_supports(dtype):
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    return max(2 * n**3 / median_call_s(run, reps) / 1e9 for run in kernels)


def measure(args: argparse.Namespace) -> tuple[list[dict], dict[str, float]]:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {amp: matmul_peak(dtypes[amp], args.peak_size) for amp in args.amps}
    rows = []
    for name in args.models:
        macs = model_macs(name, args.img_size)
        for mode in args.modes:
            for amp in args.amps:
                for batch in args.batch_sizes:
                    opts = BenchOptions(
                        batch_size=batch,
                        mode=mode,
                        device="cpu",
                        warmup=args.warmup,
                        img_size=(args.img_size,) * 2 if args.img_size else None,
                        steps=args.steps,
                        amp="bf16" if amp == "bf16" else "off",
                    )
                    cmp = compare_with_timm(name, opts, rounds=args.rounds)
                    flops = 2 * macs * batch * (3 if mode == "train" else 1)
                    gflops = flops / (cmp.ours.step_ms / 1e3) / 1e9
                    rows.append(
                        dict(
                            model=name,
                            mode=mode,
                            amp=amp,
                            batch=batch,
                            ours=cmp.ours.throughput,
                            timm=cmp.timm.throughput,
                            ratio=cmp.ratio,
                            low=cmp.ratio_low,
                            high=cmp.ratio_high,
                            gflops=gflops,
                        )
                    )
                    print(rows[-1], flush=True)
    # the peak again at the end, keeping the better: on a shared machine a single reading can be low
    peaks = {amp: max(peak, matmul_peak(dtypes[amp], args.peak_size)) for amp, peak in peaks.items()}
    for r in rows:
        r["share"] = r["gflops"] / peaks[r["amp"]]
    return rows, peaks


def _row(r: dict) -> str:
    return (
        f"| {r['model']} | {r['mode']} | {r['amp']} | {r['batch']} | {r['ours']:.1f} | {r['timm']:.1f} | "
        f"**{r['ratio']:.2f}** ({r['low']:.2f}-{r['high']:.2f}) | {r['gflops']:.0f} | {100 * r['share']:.0f}% |"
    )


def swin_vs_deit(rows: list[dict]) -> list[str]:
    """Swin-T's images/s over DeiT-S's (about the same MACs), per setting measured for both."""
    out = []
    for r in rows:
        if r["model"] != "swin_tiny_patch4_window7_224":
            continue
        key = (r["mode"], r["amp"], r["batch"])
        deit = [d for d in rows if d["model"] == "deit_small_patch16_224" and (d["mode"], d["amp"], d["batch"]) == key]
        if deit:
            out.append(
                f"{r['mode']} {r['amp']} batch {r['batch']}: {r['ours'] / deit[0]['ours']:.2f}x "
                f"(timm: {r['timm'] / deit[0]['timm']:.2f}x)"
            )
    return out


def render(rows: list[dict], peaks: dict[str, float], args: argparse.Namespace, seconds: float) -> str:
    info = cpu_info()
    lines = [
        START,
        f"Measured {dt.date.today().isoformat()} with `{' '.join(['python', 'scripts/perf_table.py', *sys.argv[1:]])}` "
        f"({seconds / 60:.1f} min): {args.rounds} alternating rounds of {args.steps} steps after {args.warmup} "
        f"warm-up steps, torch threads: {torch.get_num_threads()}.",
        "",
        f"- CPU: {info['model']}; flags: {', '.join(reported_flags(info)) or 'none reported'} "
        f"(bf16 units: {', '.join(bf16_flags(info)) or 'none'})",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- matmul peak ({args.peak_size}², measured here): "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()),
        "",
        "| model | mode | amp | batch | vitkit img/s | timm img/s | ratio (low-high) | vitkit GFLOP/s | of peak |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[_row(r) for r in rows],
    ]
    ratios = swin_vs_deit(rows)
    if ratios:
        lines += ["", "Swin-T images/s over DeiT-S images/s (about the same MACs): " + "; ".join(ratios) + "."]
    return "\n".join([*lines, END])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--modes", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    p.add_argument(
        "--amps",
        nargs="+",
        choices=("fp32", "bf16"),
        default=None,
        help="default: fp32 and bf16 on a CPU with bf16 units, fp32 alone elsewhere (bf16 is emulated there)",
    )
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32])
    p.add_argument("--img-size", type=int, default=None, help="square input size (default: each model's own)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (the ratio is their median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--peak-size", type=int, default=2048, help="n of the n x n matmul that measures the peak")
    p.add_argument("--out", type=Path, default=DOC, help="the markdown file whose table is replaced")
    args = p.parse_args()
    if args.peak_size < 64:
        p.error(f"--peak-size must be at least 64 (a matmul that small times nothing), got {args.peak_size}")
    if args.amps is None:
        args.amps = ["fp32", "bf16"] if bf16_flags() else ["fp32"]
    text = args.out.read_text() if args.out.exists() else f"# Performance\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        raise SystemExit(f"{args.out} has no {START} ... {END} markers to replace: add them where the table goes")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows, peaks = measure(args)
    table = render(rows, peaks, args, time.perf_counter() - t0)
    text = args.out.read_text() if args.out.exists() else text  # edits made while measuring are kept
    head, rest = text.split(START, 1)
    write_text(args.out, head + table + rest.split(END, 1)[1])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
