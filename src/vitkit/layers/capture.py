"""Whether a graph is being captured: torch.compile / torch.export (dynamo) or TorchScript tracing.

The CPU fast paths (oneDNN linears, batch slicing, caches, bf16 attention cores, Swin's one-gather
window order) step aside then, so what is captured is the plain ops every backend and exporter knows.
"""

from __future__ import annotations

import torch


def capturing() -> bool:
    """True inside torch.compile, torch.export or torch.jit.trace."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()
