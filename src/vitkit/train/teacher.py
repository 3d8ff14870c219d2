"""Distillation teachers: `--teacher NAME | torchvision:NAME | RUN_DIR | FILE`, frozen.

- RUN_DIR: a `vitkit train` run folder; its `best.safetensors` (else `last.safetensors`).
- FILE: a vitkit .safetensors file (a vitkit model, or a torchvision model that vitkit trained).
- torchvision:NAME: torchvision's ImageNet weights for NAME (from torch's cache when offline).
- NAME: a vitkit model name with its default pretrained weights.
Weight files written by `vitkit train` record the inputs their model expects (size, mean/std);
the teacher converts the student's batch to those, so it sees the same images however they
were normalised or sized.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.factory import create_model, list_models
from vitkit.train.modeling import input_spec, load_weights

RUN_WEIGHTS = ("best.safetensors", "last.safetensors")


@dataclass(frozen=True)
class TeacherInputs:
    """How the teacher wants its input: size and normalisation (None: as the student's)."""

    img_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


class FrozenTeacher(nn.Module):
    """A teacher that stays in eval mode, takes no gradients and adapts the student's batch
    (normalised with `student_mean/std`) to its own input size and normalisation."""

    def __init__(
        self,
        model: nn.Module,
        inputs: TeacherInputs | None = None,
        student_mean: tuple[float, ...] | None = None,
        student_std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.img_size = inputs.img_size if inputs else None
        renorm = inputs and inputs.mean is not None and student_mean is not None
        if renorm and (tuple(inputs.mean), tuple(inputs.std)) != (tuple(student_mean), tuple(student_std)):
            # x_teacher = (x * std_s + mean_s - mean_t) / std_t, per channel
            s_m, s_s = torch.tensor(student_mean), torch.tensor(student_std)
            t_m, t_s = torch.tensor(inputs.mean), torch.tensor(inputs.std)
            self.register_buffer("scale", (s_s / t_s).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("shift", ((s_m - t_m) / t_s).view(1, -1, 1, 1), persistent=False)
        else:
            self.scale = self.shift = None

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # a teacher never trains (no dropout, no drop-path)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach()
        if self.scale is not None:
            x = x * self.scale + self.shift
        if self.img_size is not None and tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            x = F.interpolate(
                x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False, antialias=True
            )
        out = self.model(x)
        if isinstance(out, (tuple, list)):  # a distilled teacher: its heads' mean, as at inference
            out = (out[0] + out[1]) / 2
        return out.float()


def _inputs_from_metadata(meta: dict[str, str]) -> TeacherInputs:
    found = input_spec(meta)
    if found is None:
        return TeacherInputs()
    spec, _ = found
    return TeacherInputs(spec.img_size, tuple(spec.mean), tuple(spec.std))


def _from_file(path: Path, device: torch.device) -> tuple[nn.Module, TeacherInputs]:
    if path.suffix != ".safetensors":
        raise ValueError(
            f"teacher file {path} must be a vitkit .safetensors file (written by vitkit train or save_model)"
        )
    model, meta = load_weights(path, device=device)
    return model, _inputs_from_metadata(meta)


def _from_torchvision(name: str) -> nn.Module:
    import torchvision  # noqa: PLC0415  a second of start-up: only when a torchvision teacher is asked for

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ValueError(f"unknown torchvision classification model {name!r} for --teacher torchvision:{name}")
    try:
        return torchvision.models.get_model(name, weights="DEFAULT")
    except Exception as err:  # noqa: BLE001  (a failed download surfaces as many error types)
        raise RuntimeError(
            f"cannot get torchvision's pretrained weights for {name} ({type(err).__name__}): offline machines need "
            "them in torch's cache (~/.cache/torch/hub/checkpoints); or train a teacher on your data with "
            f"`vitkit train --model torchvision:{name}` and pass its run folder as --teacher"
        ) from None


def load_teacher(
    spec: str,
    *,
    num_classes: int,
    in_chans: int,
    device: str | torch.device = "cpu",
    student_mean: tuple[float, ...] | None = None,
    student_std: tuple[float, ...] | None = None,
) -> FrozenTeacher:
    """The frozen teacher named by `spec` (see the module docstring), checked against the student's
    classes and channels."""
    device = torch.device(device)
    path = Path(spec).expanduser()
    inputs = TeacherInputs()
    if path.is_dir():
        weights = next((path / f for f in RUN_WEIGHTS if (path / f).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"teacher run folder {path} has no {' or '.join(RUN_WEIGHTS)}")
        model, inputs = _from_file(weights, device)
    elif path.is_file():
        model, inputs = _from_file(path, device)
    elif spec.startswith("torchvision:"):
        model = _from_torchvision(spec[len("torchvision:") :])
    elif spec.endswith(".safetensors") or "/" in spec:
        raise FileNotFoundError(f"teacher {spec} does not exist (a run folder or a .safetensors file was expected)")
    else:
        if spec not in list_models():
            raise ValueError(f"teacher {spec!r} is not a file, a run folder, a vitkit model name or torchvision:NAME")
        model = create_model(spec, pretrained=True)
    classes, chans = _classes_and_channels(model)
    if classes != num_classes:
        raise ValueError(
            f"teacher {spec} predicts {classes} classes, the student {num_classes}: "
            "train a teacher on the same data (`vitkit train --model torchvision:NAME`) and pass its run folder"
        )
    if chans is not None and chans != in_chans:
        raise ValueError(f"teacher {spec} takes {chans}-channel images, the student's data has {in_chans}")
    teacher = FrozenTeacher(model.to(device), inputs, student_mean, student_std)
    return teacher.to(device)


def _classes_and_channels(model: nn.Module) -> tuple[int, int | None]:
    """(number of outputs, input channels): a vitkit model's config, else the first Conv2d and last Linear."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_classes") and hasattr(config, "in_chans"):
        return int(config.num_classes), int(config.in_chans)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"cannot tell how many classes the teacher {type(model).__name__} predicts (no Linear layer)")
    return last[-1].out_features, first.in_channels if first is not None else None
