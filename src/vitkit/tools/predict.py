"""Top-k class probabilities for image files, with a model's own eval transform and class names.

`iter_predictions` streams: a DataLoader decodes the files in worker processes, one batch at a time,
and each result is yielded as soon as its batch is classified, so memory stays flat however many
files there are (`vitkit predict` over 10,000 files prints the first line after one batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from vitkit.core.errors import UsageError
from vitkit.data.folder import IMAGE_EXTENSIONS, ImageReadError, load_image
from vitkit.data.transforms import ImageSpec, eval_transform
from vitkit.train.config import TTA_MODES
from vitkit.train.engine import mirror_averaged_log_probs

MAX_WORKERS = 64  # decoding processes: more only thrash (and a typo like 10000 would fork 10000)


def expand_images(images: Sequence[str | Path]) -> list[Path]:
    """The image files named: files as given, directories expanded to their images (sorted, recursive).

    A path that does not exist raises FileNotFoundError before any work starts.
    """
    out: list[Path] = []
    for item in images:
        path = Path(item)
        if path.is_dir():
            out.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
                )
            )
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"image {path} does not exist")
    return out


class _Files(Dataset):
    """(image (C, H, W) float, index, read error or "") per file; a bad file raises unless skipped."""

    def __init__(self, paths: list[Path], transform: Callable, mode: str, size: int, skip_corrupt: bool) -> None:
        self.paths, self.transform, self.mode, self.size, self.skip_corrupt = paths, transform, mode, size, skip_corrupt

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = load_image(self.paths[index], self.mode)
        except ImageReadError as err:
            if not self.skip_corrupt:
                raise
            channels = 1 if self.mode == "L" else 3
            return torch.zeros(channels, self.size, self.size), index, str(err)  # a placeholder, dropped later
        return self.transform(TF.pil_to_tensor(image)), index, ""


@dataclass
class PredictStats:
    """What a streaming prediction met: files classified and files skipped (with `skip_corrupt`)."""

    classified: int = 0
    skipped: list[Path] = field(default_factory=list)


def check_options(top_k: int, tta: str, batch_size: int, workers: int) -> None:
    """Raise `UsageError` for an impossible top-k, TTA mode, batch size or worker count."""
    if top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")
    if tta not in TTA_MODES:
        raise UsageError(f"--tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be between 0 and {MAX_WORKERS}, got {workers}")


@torch.no_grad()
def iter_predictions(
    model: nn.Module,
    images: Sequence[str | Path],
    spec: ImageSpec,
    classes: list[str] | None = None,
    *,
    top_k: int = 5,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    tta: str = "none",
    workers: int = 0,
    skip_corrupt: bool = False,
    stats: PredictStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield {"image": path, "top": [{"class", "index", "prob"}, ...]} (best first) per image, in order.

    `images` may name directories (their images, recursively). An unreadable image raises
    `ImageReadError` when its batch is reached (results before it have been yielded); with
    `skip_corrupt` it is left out and listed in `stats.skipped`. `tta="hflip"` averages the
    probabilities of each image and its mirror (as `vitkit eval`).
    """
    check_options(top_k, tta, batch_size, workers)
    stats = PredictStats() if stats is None else stats
    paths = expand_images(images)
    mode = "L" if spec.in_chans == 1 else "RGB"
    files = _Files(paths, eval_transform(spec), mode, spec.img_size, skip_corrupt)
    workers = min(workers, -(-len(paths) // batch_size))  # no more processes than batches
    loader = DataLoader(files, batch_size=batch_size, num_workers=workers, shuffle=False)
    model = model.eval().to(device)
    for batch, indices, errors in loader:
        keep = torch.tensor([not e for e in errors])  # (B,) False for skipped files
        stats.skipped.extend(paths[i] for i, e in zip(indices.tolist(), errors) if e)
        if not keep.any():
            continue
        batch, indices = batch[keep].to(device), indices[keep].tolist()
        if tta == "hflip":
            probs = mirror_averaged_log_probs(model, batch).exp()  # (B, K)
        else:
            probs = model(batch).float().softmax(dim=-1)
        values, top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        for i, vals, idxs in zip(indices, values.tolist(), top.tolist()):
            ranked = [
                {"class": classes[c] if classes and c < len(classes) else str(c), "index": c, "prob": v}
                for v, c in zip(vals, idxs)
            ]
            stats.classified += 1
            yield {"image": str(paths[i]), "top": ranked}


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
    """All of `iter_predictions`' results as a list (for a few images; stream many with it directly)."""
    return list(
        iter_predictions(model, images, spec, classes, top_k=top_k, device=device, batch_size=batch_size, tta=tta)
    )
