"""Training curves and confusion matrices as PNG files (matplotlib, Agg backend, atomic writes)."""

from __future__ import annotations

import os
from typing import Any

import torch

from vitkit.core.files import save_figure


def _pyplot() -> Any:
    import matplotlib  # noqa: PLC0415  about a second of start-up: only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  after matplotlib.use

    return plt


def plot_curves(
    records: list[dict[str, Any]], path: str | os.PathLike, title: str = "", loss_label: str = "loss"
) -> None:
    """Loss, accuracy (when the records have val_top1) and learning rate against epochs, from
    metrics.jsonl records (`vitkit train`'s, or `vitkit pretrain`'s masked L1 loss)."""
    plt = _pyplot()
    epochs = [r for r in records if "step" not in r and "epoch" in r and "train_loss" in r]
    steps = [r for r in records if "step" in r]
    accuracy = any("val_top1" in r for r in epochs)
    fig, axes = plt.subplots(1, 3 if accuracy else 2, figsize=(14 if accuracy else 10, 4))
    ax_loss, ax_lr = axes[0], axes[-1]
    x = [r["epoch"] for r in epochs]
    ax_loss.plot(x, [r["train_loss"] for r in epochs], "o-", label="train")
    ax_loss.plot(x, [r["val_loss"] for r in epochs], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel=loss_label, title=loss_label)
    if accuracy:
        ax_acc = axes[1]
        ax_acc.plot(x, [r["val_top1"] for r in epochs], "o-", label="val top-1")
        if any("ema_val_top1" in r for r in epochs):
            ax_acc.plot(x, [r.get("ema_val_top1") for r in epochs], "o-", label="EMA val top-1")
        test = [r for r in records if "test_top1" in r]
        if test and x:
            ax_acc.axhline(
                test[-1]["test_top1"], color="k", ls="--", lw=1, label=f"test top-1 {test[-1]['test_top1']:.2f}"
            )
        ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    if steps and epochs:  # steps -> fractional epochs
        per_epoch = max(s["step"] for s in steps) / max(x)
        ax_lr.plot([s["step"] / per_epoch for s in steps], [s["lr"] for s in steps], "-")
    else:
        ax_lr.plot(x, [r["lr"] for r in epochs], "o-")
    ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    for ax in axes[:-1]:
        ax.legend()
        ax.grid(alpha=0.3)
    ax_lr.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_confusion(confusion: torch.Tensor, classes: list[str], path: str | os.PathLike, title: str = "") -> None:
    """A (true, predicted) count matrix as a heat map with row-normalised percentages."""
    plt = _pyplot()
    counts = confusion.double()
    rates = 100 * counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    k = len(classes)
    size = max(5.0, 0.55 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(k), classes, rotation=60, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion (% of each true class)")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                value = rates[i, j].item()
                ax.text(
                    j, i, f"{value:.0f}", ha="center", va="center", fontsize=8, color="white" if value > 50 else "black"
                )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
