"""Top-k class probabilities for image files, with a model's own eval transform and class names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from vitkit.data.folder import load_image
from vitkit.data.transforms import ImageSpec, eval_transform
from vitkit.train.config import TTA_MODES
from vitkit.train.engine import mirror_averaged_log_probs


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Sequence[str | Path],
    spec: ImageSpec,
    classes: list[str] | None = None,
    *,
    top_k: int = 5,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    tta: str = "none",
) -> list[dict[str, Any]]:
    """One entry per image: {"image": path, "top": [{"class", "index", "prob"}, ...]} (best first).

    `tta="hflip"`: the probabilities are the mean of the image's and its mirror's (as `vitkit eval`).
    """
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    if tta not in TTA_MODES:
        raise ValueError(f"--tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")
    transform = eval_transform(spec)
    mode = "L" if spec.in_chans == 1 else "RGB"
    model = model.eval().to(device)
    out = []
    for start in range(0, len(images), batch_size):
        paths = [Path(p) for p in images[start : start + batch_size]]
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"image {path} does not exist")
        batch = torch.stack([transform(TF.pil_to_tensor(load_image(p, mode))) for p in paths]).to(device)
        if tta == "hflip":
            probs = mirror_averaged_log_probs(model, batch).exp()  # (B, K)
        else:
            probs = model(batch).float().softmax(dim=-1)
        values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        for path, vals, idxs in zip(paths, values.tolist(), indices.tolist()):
            top = [
                {"class": classes[i] if classes and i < len(classes) else str(i), "index": i, "prob": v}
                for v, i in zip(vals, idxs)
            ]
            out.append({"image": str(path), "top": top})
    return out
