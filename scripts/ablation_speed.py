"""Training speed of the Fashion-MNIST ablation's configurations (docs/RESULTS.md).

Images/s of a training step (forward, label-smoothed loss, backward, gradient clipping, AdamW step) on
random 28x28x1 images with 2 threads, median of 5 interleaved rounds of 1,024 images each. The distilled
row adds the frozen teacher's forward pass: `python scripts/ablation_speed.py --teacher runs/teacher`.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import vitkit
from vitkit.train.modeling import load_weights

BEST = dict(patch_size=7, embed_dim=128, depth=4, num_heads=4)


def vit(name: str = "vit_tiny_patch16_224", **overrides) -> torch.nn.Module:
    return vitkit.create_model(name, img_size=28, in_chans=1, num_classes=10, mlp_ratio=2.0, **overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="a run folder or weight file of the distillation teacher")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # name: (model, teacher, compiled, bf16, batch size)
    cases: dict[str, tuple] = {
        "fmnist_best (patch 7, width 128, depth 4, batch 128)": (vit(**BEST), None, False, False, 128),
        "fmnist_best, batch 256": (vit(**BEST), None, False, False, 256),
        "fmnist_best, batch 64": (vit(**BEST), None, False, False, 64),
        "fmnist_demo (depth 3, batch 128)": (vit(**{**BEST, "depth": 3}), None, False, False, 128),
        "patch 4, width 64, depth 6, batch 256": (
            vit(patch_size=4, embed_dim=64, depth=6, num_heads=2),
            None,
            False,
            False,
            256,
        ),
        "patch 4 ... + PatchDropout 0.5": (
            vit(patch_size=4, embed_dim=64, depth=6, num_heads=2, patch_drop_rate=0.5),
            None,
            False,
            False,
            256,
        ),
        "fmnist_best, torch.compile": (vit(**BEST), None, True, False, 128),
        "fmnist_best, bf16 autocast": (vit(**BEST), None, False, True, 128),
    }
    if args.teacher:
        path = Path(args.teacher)
        teacher, _ = load_weights(path / "best.safetensors" if path.is_dir() else path)
        cases["distilled fmnist_best + teacher forward"] = (
            vit("deit_tiny_distilled_patch16_224", **BEST),
            teacher.eval(),
            False,
            False,
            256,
        )
        cases["teacher training step"] = (copy.deepcopy(teacher), None, False, False, 256)
    steps = {}
    for name, (model, teacher, compiled, bf16, batch) in cases.items():
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
        run = torch.compile(model) if compiled else model

        def step(run=run, model=model, teacher=teacher, optimizer=optimizer, bf16=bf16, x=x, y=y) -> None:
            if teacher is not None:
                with torch.no_grad():
                    teacher(x)
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                out = run(x)
                out = out[0] if isinstance(out, tuple) else out
                loss = torch.nn.functional.cross_entropy(out.float(), y, label_smoothing=0.1)
            loss.item()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(3):  # warm-up (and compilation)
            step()
        steps[name] = (step, batch)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(5):
        for name, (step, batch) in steps.items():
            start = time.perf_counter()
            for _ in range(1024 // batch):
                step()
            rates[name].append(1024 / (time.perf_counter() - start))
    for name, values in rates.items():
        values.sort()
        print(f"{name:44s} {values[2]:6.0f} images/s  (range {values[0]:.0f}-{values[-1]:.0f})")


if __name__ == "__main__":
    main()
