"""Swin inference with vitkit's window attention kernel against the same model on its torch path, in one
process (docs/PERFORMANCE.md, item 16).

The kernel is switched on and off around alternating rounds (`vitkit.layers.kernels.set_kernels`), so
both see the same process and machine state; fp32, or bf16 with the weights held in bf16 as
`vitkit bench --amp bf16` does. Prints the median per-round speed-up and its range, and which build ran.

    python -m vitkit.layers.kernels          # build the kernel for this CPU first (the Makefile does)
    python scripts/kernel_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics

import torch

from vitkit.core.hardware import cpu_info, reported_flags
from vitkit.factory import create_model, default_img_size
from vitkit.layers import kernels
from vitkit.layers.precision import cast_for_inference
from vitkit.tools.bench import images_per_s

MODELS = ("swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256")


def compare(name: str, amp: str, batch: int, rounds: int, steps: int) -> str:
    dtype = torch.bfloat16 if amp == "bf16" else None
    model = cast_for_inference(create_model(name).eval(), dtype)
    size = default_img_size(name)
    x = torch.randn(batch, 3, size, size, dtype=dtype or torch.float32)
    speeds: dict[bool, list[float]] = {True: [], False: []}
    try:
        with torch.inference_mode():
            for on in (True, False):  # warm-up: caches, packed weights
                kernels.set_kernels(on)
                images_per_s(model, x, 1)
            for r in range(rounds):
                for on in (True, False) if r % 2 == 0 else (False, True):
                    kernels.set_kernels(on)
                    speeds[on].append(images_per_s(model, x, steps))
    finally:
        kernels.set_kernels(True)
    ratios = [a / b for a, b in zip(speeds[True], speeds[False])]
    return (
        f"{name} {amp} batch {batch}: torch path {statistics.median(speeds[False]):.1f} img/s, kernel "
        f"{statistics.median(speeds[True]):.1f} img/s, {statistics.median(ratios):.2f}x "
        f"({min(ratios):.2f}-{max(ratios):.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--amp", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="forward passes per setting and round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit(f"{kernels.status()}: nothing to compare")
    info = cpu_info()
    print(
        f"{info['model']} ({', '.join(reported_flags(info))}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.rounds} alternating rounds; {kernels.status()}"
    )
    for name in args.models:
        for amp in args.amp:
            for batch in args.batch_sizes:
                print(compare(name, amp, batch, args.rounds, args.steps), flush=True)


if __name__ == "__main__":
    main()
