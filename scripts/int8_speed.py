"""Inference speed of vitkit's int8 models over vitkit's own fp32 eager models (docs/PERFORMANCE.md).

For each model: fp32 eager and the dynamic int8 model of `vitkit quantize` (per-channel and
per-tensor weight scales), same random weights and inputs, batch 8, 2 threads, alternating rounds in
one process; prints img/s medians and the int8/fp32 ratio per round's median. Also the largest
logit difference int8 vs fp32 on the random input, as a sanity check (accuracy is `vitkit quantize`'s gate).

    python scripts/int8_speed.py deit_small_patch16_224 swin_tiny_patch4_window7_224
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from vitkit.factory import create_model
from vitkit.tools.bench import images_per_s
from vitkit.tools.quantize import SCHEMES, quantize_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="forward passes per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, "
        f"median of {args.rounds} alternating rounds of {args.steps} steps"
    )
    for name in args.models:
        fp32 = create_model(name).eval()
        models = {"fp32": fp32, **{f"int8 {s}": quantize_model(fp32, s) for s in SCHEMES}}
        config: Any = fp32.config  # a dataclass (Module types attributes as Tensor | Module)
        size = config.img_size
        x = torch.randn(args.batch_size, 3, *size)
        speeds: dict[str, list[float]] = {k: [] for k in models}
        with torch.inference_mode():
            ref = fp32(x)
            diffs = {k: (m(x) - ref).abs().max().item() for k, m in models.items()}  # also a warm-up
            for _ in range(args.rounds):
                for key, model in models.items():
                    speeds[key].append(images_per_s(model, x, args.steps))
        base = statistics.median(speeds["fp32"])
        for key, values in speeds.items():
            rate = statistics.median(values)
            ratios = [v / f for v, f in zip(values, speeds["fp32"])]
            print(
                f"{name:<32} {key:<18} {rate:8.1f} img/s  x{statistics.median(ratios):.2f} of fp32 "
                f"(x{rate / base:.2f} of medians)  max |logit diff| {diffs[key]:.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
