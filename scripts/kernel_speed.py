"""Swin with vitkit's window attention kernel against the same model on its torch path, in one process
(docs/PERFORMANCE.md, items 16 and 17).

The kernel is switched on and off around alternating rounds (`vitkit.layers.kernels.set_kernels`), so
both see the same process and machine state. Inference: fp32, or bf16 with the weights held in bf16
as `vitkit bench --amp bf16` does. Training (`--mode train`): a step of forward, cross-entropy,
backward and vitkit's AdamW, in fp32 or under bf16 autocast, as `vitkit bench --mode train` times it.
Prints the median per-round speed-up and its range, and which build ran.

    python -m vitkit.layers.kernels          # build the kernel for this CPU first (the Makefile does)
    python scripts/kernel_speed.py --threads 2
    python scripts/kernel_speed.py --threads 2 --mode train
    python scripts/kernel_speed.py --threads 2 --op     # the attention op alone against torch's SDPA, fp32

`--op` times `torch.ops.vitkit.window_attention` and `F.scaled_dot_product_attention` on the same q, k, v
and bias at the shapes of Swin-T's stages, Swin V2's larger windows and ViT's 197 tokens (batch 8): q, k, v
are views of one qkv projection, as the models pass them, and SDPA's time includes the reshape Swin's torch
path makes of them (a copy where the windows have several bias groups).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vitkit.core.hardware import cpu_info, reported_flags
from vitkit.factory import create_model, default_img_size
from vitkit.layers import kernels
from vitkit.layers.precision import cast_for_inference
from vitkit.tools.bench import images_per_s, median_call_s
from vitkit.train.optim import build_optimizer

MODELS = ("swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256")


def training_step(model: torch.nn.Module, dtype: torch.dtype | None) -> Callable[[torch.Tensor], None]:
    """One training step on a batch x (random targets), under bf16 autocast when `dtype` is bf16."""
    optimizer = build_optimizer(model, lr=1e-6, weight_decay=0.05)

    def step(x: torch.Tensor) -> None:
        target = torch.randint(0, 1000, (x.shape[0],))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def compare(name: str, amp: str, batch: int, rounds: int, steps: int, mode: str = "infer") -> str:
    dtype = torch.bfloat16 if amp == "bf16" else None
    size = default_img_size(name)
    if mode == "train":
        run = training_step(create_model(name).train(), dtype)
        x = torch.randn(batch, 3, size, size)
        grad: contextlib.AbstractContextManager = torch.enable_grad()
    else:
        run = cast_for_inference(create_model(name).eval(), dtype)
        x = torch.randn(batch, 3, size, size, dtype=dtype or torch.float32)
        grad = torch.inference_mode()
    speeds: dict[bool, list[float]] = {True: [], False: []}
    try:
        with grad:
            for on in (True, False):  # warm-up: caches, packed weights, the optimiser's state
                kernels.set_kernels(on)
                images_per_s(run, x, 1)
            for r in range(rounds):
                for on in (True, False) if r % 2 == 0 else (False, True):
                    kernels.set_kernels(on)
                    speeds[on].append(images_per_s(run, x, steps))
    finally:
        kernels.set_kernels(True)
    ratios = [a / b for a, b in zip(speeds[True], speeds[False])]
    return (
        f"{name} {mode} {amp} batch {batch}: torch path {statistics.median(speeds[False]):.1f} img/s, kernel "
        f"{statistics.median(speeds[True]):.1f} img/s, {statistics.median(ratios):.2f}x "
        f"({min(ratios):.2f}-{max(ratios):.2f})"
    )


# (windows, heads, tokens, head_dim, bias groups): Swin-T batch 8 stages 1 (shifted: 64 groups) and 3, Swin V2
# windows of 8, 12 and 16, ViT-S / DeiT-S (197 tokens of 64) and a ViT of head_dim 32
OP_SHAPES = (
    (512, 3, 49, 32, 64),
    (32, 12, 49, 32, 4),
    (512, 3, 64, 32, 64),
    (32, 12, 144, 32, 4),
    (32, 12, 256, 32, 4),
    (8, 6, 197, 64, 1),
    (8, 12, 197, 32, 1),
)


def compare_op(windows: int, heads: int, n: int, d: int, groups: int, rounds: int) -> str:
    """The kernel against SDPA for one shape: median ms of `rounds` calls each, and the kernel's GFLOP/s."""
    qkv = torch.randn(windows, n, 3, heads, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (windows, heads, n, d) views, as the models pass them
    bias = torch.randn(groups, heads, n, n)
    scale = d**-0.5
    # SDPA as Swin's torch path calls it: windows batch-major, (images, groups * heads) against one bias; the
    # reshape of the strided views (a copy where groups > 1) is part of that path, so it is timed with it
    images = windows // groups
    mask = bias.view(1, groups * heads, n, n)

    def sdpa() -> torch.Tensor:
        qs, ks, vs = (t.reshape(images, groups * heads, n, d) for t in (q, k, v))
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)

    with torch.inference_mode():
        ours = median_call_s(lambda: kernels.window_attention(q, k, v, bias, scale), rounds) * 1e3
        torch_ms = median_call_s(sdpa, rounds) * 1e3
    gflop = 4 * windows * heads * n * n * d / 1e9
    return (
        f"windows {windows} heads {heads} tokens {n} head_dim {d} bias groups {groups}: kernel {ours:.1f} ms "
        f"({gflop / ours * 1e3:.0f} GFLOP/s), torch SDPA {torch_ms:.1f} ms, kernel / torch time {ours / torch_ms:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--amp", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mode", choices=("infer", "train"), default="infer")
    parser.add_argument("--steps", type=int, default=2, help="forward passes (or training steps) per setting and round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--op", action="store_true", help="the attention op alone against SDPA (fp32), not models")
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
    if args.op:
        for shape in OP_SHAPES:
            print(compare_op(*shape, rounds=args.rounds), flush=True)
        return
    for name in args.models:
        for amp in args.amp:
            for batch in args.batch_sizes:
                print(compare(name, amp, batch, args.rounds, args.steps, args.mode), flush=True)


if __name__ == "__main__":
    main()
