"""Batch slicing for CPU inference: run a stretch of a network over slices of the batch whose
activations fit in the CPU's cache, instead of streaming the whole batch's activations through memory
at every layer.

Exact: every op of a ViT or Swin block in eval mode works per image, so a slice's outputs are the
rows of the whole batch's (`tests/test_slicing.py` checks it). Only where it pays: on the CPU, without
gradients, outside export and compilation, and when the batch is larger than one slice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vitkit.layers.capture import capturing

# Activations per slice, in bytes: the (tokens, channels) map of one image times the images in a
# slice. On an AMD EPYC (1 MiB of L2 per core, 32 MiB of L3, 2 threads), 4-8 MiB ran Swin-T at batch
# 32 1.53-1.57x (fp32) and 1.14-1.16x (bf16) as fast as unsliced, DeiT-S 1.15-1.19x (fp32), and cost
# nothing at batch 8 (docs/PERFORMANCE.md). None turns slicing off.
SLICE_BYTES: int | None = 8 << 20


def set_slice_bytes(value: int | None) -> int | None:
    """Set the activation bytes per slice (None: off); returns the previous setting."""
    global SLICE_BYTES
    previous, SLICE_BYTES = SLICE_BYTES, value
    return previous


def slicing_applies(x: torch.Tensor, training: bool) -> bool:
    """CPU inference without gradients, outside torch.compile / export / tracing."""
    if SLICE_BYTES is None or training or x.device.type != "cpu" or torch.is_grad_enabled():
        return False
    return not capturing()


def slice_size(x: torch.Tensor) -> int:
    """Images per slice for the batch-first activation `x`: at least 1, at most the batch."""
    per_image = x[0].numel() * x.element_size()
    return max(1, min(x.shape[0], (SLICE_BYTES or 0) // max(per_image, 1)))


def in_slices(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, training: bool) -> torch.Tensor:
    """`fn(x)`, computed over slices of x's batch (dim 0) where slicing applies and pays."""
    if not slicing_applies(x, training):
        return fn(x)
    step = slice_size(x)
    if step >= x.shape[0]:
        return fn(x)
    return torch.cat([fn(x[i : i + step]) for i in range(0, x.shape[0], step)])
