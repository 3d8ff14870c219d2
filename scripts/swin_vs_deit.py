"""Swin-T's inference images/s over DeiT-S's, the two models side by side in one process (docs/PERFORMANCE.md).

The two have about the same MACs (4.5 G and 4.6 G at 224x224). Both run vitkit's own eager inference path,
fp32 or bf16 (weights held in bf16, as `vitkit bench --amp bf16` does). They alternate for `--rounds`
rounds, so that both models see the same process and machine state. The script prints the median
per-round ratio and its range.

    python scripts/swin_vs_deit.py --amp fp32 bf16 --batch-sizes 8 32 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics

import torch

from vitkit.factory import create_model
from vitkit.layers.precision import cast_for_inference
from vitkit.tools.bench import images_per_s

MODELS = ("deit_small_patch16_224", "swin_tiny_patch4_window7_224")


def compare(amp: str, batch: int, rounds: int, steps: int) -> str:
    dtype = torch.bfloat16 if amp == "bf16" else None
    models = {name: cast_for_inference(create_model(name).eval(), dtype) for name in MODELS}
    x = torch.randn(batch, 3, 224, 224)
    speeds: dict[str, list[float]] = {name: [] for name in MODELS}
    with torch.inference_mode():
        for model in models.values():
            images_per_s(model, x, 1)  # warm-up
        for r in range(rounds):
            for name in MODELS if r % 2 == 0 else MODELS[::-1]:
                speeds[name].append(images_per_s(models[name], x, steps))
    deit, swin = (speeds[name] for name in MODELS)
    ratios = [s / d for s, d in zip(swin, deit)]
    return (
        f"{amp} batch {batch}: DeiT-S {statistics.median(deit):.1f} img/s, Swin-T {statistics.median(swin):.1f} "
        f"img/s, Swin-T/DeiT-S {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amp", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="forward passes per model and round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} alternating rounds")
    for amp in args.amp:
        for batch in args.batch_sizes:
            print(compare(amp, batch, args.rounds, args.steps), flush=True)


if __name__ == "__main__":
    main()
