"""Layer-wise lr decay with the training schedule: each group follows the schedule on its own lr, and
the optimiser the config names is the one that trains (issue 17, item 1)."""

from __future__ import annotations

import random

import pytest
import torch

import vitkit
from vitkit.train.config import TrainConfig
from vitkit.train.lamb import Lamb
from vitkit.train.optim import build_optimizer, build_scheduler
from vitkit.train.supervised import build_training_state

CPU = torch.device("cpu")
DEPTH = 6
LR, MIN_LR, WARMUP_LR, DECAY = 5e-4, 1e-6, 1e-7, 0.65  # min_lr > 0, the ViT decay of the issue
LOW_LR = 2e-6  # 2e-6 x 0.65^2 < min_lr: from the third layer from the top down, groups start below the floor


def deep_vit() -> torch.nn.Module:
    return vitkit.create_model(
        "vit_tiny_patch16_224",
        img_size=28,
        patch_size=7,
        in_chans=1,
        num_classes=10,
        embed_dim=16,
        depth=DEPTH,
        num_heads=2,
    )


def run_schedule(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[list]:
    """lrs[step][group] over `steps` optimiser steps (the lr each step is taken with)."""
    lrs = []
    for _ in range(steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    lrs.append([g["lr"] for g in opt.param_groups])  # after the last step
    return lrs


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_every_group_follows_the_schedule_on_its_own_lr(name):
    opt = build_optimizer(deep_vit(), LOW_LR, 0.05, name=name, layer_decay=DECAY)
    peaks = [g["lr"] for g in opt.param_groups]
    assert max(peaks) == pytest.approx(LOW_LR) and min(peaks) == pytest.approx(LOW_LR * DECAY ** (DEPTH + 1))
    assert sum(p < MIN_LR for p in peaks) > 4  # the case of the bug: group lrs below the floor
    total, warmup = 40, 5
    sched = build_scheduler(opt, total_steps=total, warmup_steps=warmup, warmup_lr=WARMUP_LR, min_lr=MIN_LR)
    lrs = run_schedule(opt, sched, total)
    for g, peak in enumerate(peaks):
        column = [row[g] for row in lrs]
        assert column[0] == pytest.approx(peak * WARMUP_LR / LOW_LR, rel=1e-9)  # warm-up starts at its ratio
        assert column[warmup] == pytest.approx(peak, rel=1e-9)
        after = column[warmup:]
        assert all(b <= a * (1 + 1e-12) for a, b in zip(after, after[1:])), f"group {g} rises: {after}"
        assert column[-1] == pytest.approx(peak * MIN_LR / LOW_LR, rel=1e-9)  # ends at lr x min_lr / lr


def test_warmup_start_does_not_depend_on_the_order_of_groups():
    ordered = build_optimizer(deep_vit(), LR, 0.05, layer_decay=DECAY)
    shuffled_groups = list(ordered.param_groups)
    random.Random(0).shuffle(shuffled_groups)
    while shuffled_groups[0]["lr"] == max(g["lr"] for g in shuffled_groups):  # the top group not first
        shuffled_groups.append(shuffled_groups.pop(0))
    shuffled = torch.optim.AdamW([{k: v for k, v in g.items() if k != "initial_lr"} for g in shuffled_groups])
    starts = []
    for opt in (ordered, shuffled):
        build_scheduler(opt, total_steps=10, warmup_steps=4, warmup_lr=WARMUP_LR, min_lr=MIN_LR)
        starts.append(sorted(g["lr"] for g in opt.param_groups))
    assert starts[0] == pytest.approx(starts[1], rel=1e-12)
    assert max(starts[0]) == pytest.approx(WARMUP_LR, rel=1e-9)  # the top group starts at warmup_lr


def test_the_schedule_without_layer_decay_is_unchanged():
    opt = build_optimizer(deep_vit(), LR, 0.05)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=4, warmup_lr=WARMUP_LR, min_lr=MIN_LR)
    lrs = [row[0] for row in run_schedule(opt, sched, 20)]
    assert lrs[0] == pytest.approx(WARMUP_LR) and lrs[4] == pytest.approx(LR) and lrs[-1] == pytest.approx(MIN_LR)


def test_lamb_with_layer_decay_trains_with_lamb():
    config = TrainConfig(
        model="vit_tiny_patch16_224",
        num_classes=10,
        in_chans=1,
        img_size=28,
        optimizer="lamb",
        layer_decay=DECAY,
        lr=LR,
        min_lr=MIN_LR,
        epochs=2,
        device="cpu",
        model_args={"patch_size": 7, "embed_dim": 16, "depth": DEPTH, "num_heads": 2},
    )
    state = build_training_state(config, steps_per_epoch=3, device=CPU)
    assert isinstance(state.optimizer, Lamb)  # was silently AdamW
    lrs = sorted({round(g["lr"] / LR, 12) for g in state.optimizer.param_groups})
    assert lrs[-1] == pytest.approx(config.warmup_lr / LR) and len(lrs) == DEPTH + 2  # warm-up, one lr per layer


def test_layer_decay_on_a_model_without_layers_is_a_one_line_error():
    from vitkit.core.errors import VitkitError

    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    with pytest.raises(VitkitError, match="drop --layer-decay"):
        build_optimizer(cnn, LR, 0.05, layer_decay=DECAY)


def test_a_run_saved_with_the_earlier_schedule_resumes_on_the_same_lrs():
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    def old_schedule(opt):  # vitkit's schedule before the per-group ratios (one group: the same lrs)
        cosine = CosineAnnealingLR(opt, T_max=16, eta_min=MIN_LR)
        return SequentialLR(opt, [LinearLR(opt, WARMUP_LR / LR, 1.0, total_iters=4), cosine], milestones=[4])

    model = deep_vit()
    old = torch.optim.AdamW(model.parameters(), lr=LR)
    sched = old_schedule(old)
    run_schedule(old, sched, 7)
    saved = {"optimizer": old.state_dict(), "scheduler": sched.state_dict()}
    rest_old = run_schedule(old, sched, 13)

    new = torch.optim.AdamW(model.parameters(), lr=LR)
    resumed = build_scheduler(new, total_steps=20, warmup_steps=4, warmup_lr=WARMUP_LR, min_lr=MIN_LR)
    new.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    lrs = [row[0] for row in run_schedule(new, resumed, 13)]
    assert lrs == pytest.approx([row[0] for row in rest_old], rel=1e-9)
