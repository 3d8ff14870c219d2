"""Export a model to ONNX (the dynamo exporter) or a `torch.export` program (.pt2), and check it.

Both formats are traced by `torch.export` with optional dynamic batch and dynamic height / width
(for models built with `dynamic_img_size=True`: ViT resamples its position embedding, Swin pads
to whole windows). The export is then run on random inputs (two batch sizes; two image sizes when
dynamic) by onnxruntime or by the loaded program, and compared with the eager model: the largest
difference must stay within `rtol` times the output's largest magnitude. The output file appears
only when the check passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.export import Dim

from vitkit.factory import create_model, load_model

Format = Literal["onnx", "torch-export"]
Runner = Callable[[torch.Tensor], torch.Tensor]  # an exported model, called like the eager one
EXPORT_EXTRA = "pip install 'vitkit[export]'"


@dataclass(frozen=True)
class ExportCheck:
    shape: tuple[int, ...]  # input (B, C, H, W)
    max_diff: float  # largest |export - eager|
    scale: float  # largest |eager output|


@dataclass(frozen=True)
class ExportReport:
    path: Path
    format: str
    dynamic_batch: bool
    dynamic_size: bool
    rtol: float
    checks: list[ExportCheck] = field(default_factory=list)

    @property
    def max_diff(self) -> float:
        return max((c.max_diff for c in self.checks), default=0.0)

    @property
    def ok(self) -> bool:
        return all(c.max_diff <= self.rtol * c.scale for c in self.checks)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "format": self.format,
            "dynamic_batch": self.dynamic_batch,
            "dynamic_size": self.dynamic_size,
            "rtol": self.rtol,
            "max_diff": self.max_diff,
            "ok": self.ok,
            "checks": [{"shape": list(c.shape), "max_diff": c.max_diff, "scale": c.scale} for c in self.checks],
        }


# -- the model -------------------------------------------------------------------------------------
def load_for_export(
    name: str | None = None, checkpoint: str | os.PathLike | None = None, dynamic_size: bool = False
) -> nn.Module:
    """A model by registered name (random weights) or from a vitkit checkpoint, in eval mode;
    `dynamic_size` builds it with `dynamic_img_size=True` (same parameters)."""
    if (name is None) == (checkpoint is None):
        raise ValueError("give a model name or --checkpoint FILE (exactly one)")
    extra = {"dynamic_img_size": True} if dynamic_size else {}
    if name is not None:
        return _create(name, extra).eval()
    model = load_model(checkpoint)
    config: Any = getattr(model, "config", None)  # ViTConfig or SwinConfig
    if not dataclasses.is_dataclass(config):
        raise ValueError(f"{checkpoint} holds {model.variant_name}: export takes vitkit models only")
    if dynamic_size:  # the same weights in a model built for any input size
        dynamic = _create(model.variant_name, dataclasses.asdict(config) | extra)
        dynamic.load_state_dict(model.state_dict(), strict=True)
        model = dynamic
    return model.eval()


def _create(name: str, fields: dict) -> nn.Module:
    try:
        return create_model(name, **fields)
    except ValueError as err:
        if "dynamic_img_size" in str(err) and "unknown option" in str(err):
            raise ValueError(f"{name} cannot take dynamic image sizes: export it without --dynamic-size") from err
        raise


def _stride(model: nn.Module) -> int:
    """Pixels per token of the last stage: the patch for ViT, patch * 2^(stages - 1) for Swin."""
    config: Any = model.config  # ViTConfig or SwinConfig
    return config.patch_size * 2 ** (len(config.depths) - 1) if hasattr(config, "depths") else config.patch_size


# -- export ----------------------------------------------------------------------------------------
def _dynamic_shapes(patch: int, dynamic_batch: bool, dynamic_size: bool) -> tuple[dict[int, Dim]] | None:
    dims: dict[int, Dim] = {}
    if dynamic_batch:
        dims[0] = Dim("batch", min=1, max=4096)
    if dynamic_size:  # height and width stay multiples of the patch
        dims[2] = patch * Dim("grid_h", min=1, max=8192 // patch)
        dims[3] = patch * Dim("grid_w", min=1, max=8192 // patch)
    return (dims,) if dims else None


def export_model(
    model: nn.Module,
    output: str | os.PathLike,
    format: Format = "onnx",
    dynamic_batch: bool = False,
    dynamic_size: bool = False,
    rtol: float = 1e-4,
    opset: int | None = None,
) -> ExportReport:
    """Export `model` (eval mode) to `output` and check it against the eager model.

    Raises RuntimeError (and writes nothing) when the check fails.
    """
    if format not in ("onnx", "torch-export"):
        raise ValueError(f"format must be onnx or torch-export, got {format!r}")
    config = model.config
    if dynamic_size and not getattr(config, "dynamic_img_size", False):
        raise ValueError("dynamic image size needs a model built with dynamic_img_size=True (see load_for_export)")
    if format == "onnx":
        require_onnx()
    model = model.eval()
    output = Path(output)
    size = tuple(config.img_size)
    # batch 2 as the example: torch.export specialises a dynamic size of 1
    example = torch.randn(2 if dynamic_batch else 1, config.in_chans, *size)
    dynamic_shapes = _dynamic_shapes(config.patch_size, dynamic_batch, dynamic_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    # a private folder beside the output: ONNX may add an external-data file named after it
    workdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        target = workdir / output.name
        # the math attention kernel while tracing: the fused CPU kernel's output layout lets export
        # record views that other kernels (and the ONNX passes) cannot replay
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), torch.no_grad():
            if format == "onnx":
                _export_onnx(model, example, dynamic_shapes, target, opset)
            else:
                program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
                torch.export.save(program, str(target))
        run = _onnx_runner(target) if format == "onnx" else _program_runner(target)
        checks = [
            _check(model, run, shape)
            for shape in _check_shapes(config.in_chans, size, _stride(model), dynamic_batch, dynamic_size, example)
        ]
        report = ExportReport(output, format, dynamic_batch, dynamic_size, rtol, checks)
        if not report.ok:
            worst = max(report.checks, key=lambda c: c.max_diff / max(c.scale, 1e-30))
            raise RuntimeError(
                f"the {format} export differs from the model by {worst.max_diff:.3g} at input "
                f"{'x'.join(map(str, worst.shape))} (output scale {worst.scale:.3g}, allowed {rtol:g} of it): "
                f"{output} was not written"
            )
        for item in workdir.iterdir():  # the model file, and its external data if any
            os.replace(item, output.parent / item.name)
        return report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def require_onnx() -> None:
    """Raise a one-line RuntimeError naming the install command when the export extra is missing."""
    try:
        import onnx  # noqa: F401, PLC0415  the optional export extra: imported only to check it is there
        import onnxruntime  # noqa: F401, PLC0415
        import onnxscript  # noqa: F401, PLC0415
    except ImportError as err:
        raise RuntimeError(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({err.name} is missing): {EXPORT_EXTRA}"
        ) from err


def _export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    dynamic_shapes: tuple[dict[int, Dim]] | None,
    target: Path,
    opset: int | None,
) -> None:
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # the exporter reports its progress on stdout
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=["image"],
            output_names=["logits"],
            opset_version=opset,
            verbose=False,
        )
        program.save(str(target))


def _onnx_runner(path: Path) -> Runner:
    import onnxruntime as ort  # noqa: PLC0415  the optional export extra

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _program_runner(path: Path) -> Runner:
    module = torch.export.load(str(path)).module()
    return lambda x: module(x)


def _check_shapes(
    in_chans: int, size: tuple[int, int], stride: int, dynamic_batch: bool, dynamic_size: bool, example: torch.Tensor
) -> list[tuple[int, ...]]:
    batches = (1, 3) if dynamic_batch else (example.shape[0],)
    shapes: list[tuple[int, ...]] = [(b, in_chans, *size) for b in batches]
    if dynamic_size:
        # one last-stage cell smaller: for Swin the same stages still fit in one window, which a
        # torch.export program is specialised on (ONNX is not)
        other = tuple(max(s - stride, stride) for s in size)
        shapes.append((batches[0], in_chans, *other))
    return shapes


def _check(model: nn.Module, run: Runner, shape: tuple[int, ...]) -> ExportCheck:
    x = torch.randn(*shape)
    with torch.no_grad():
        want = model(x)
        got = run(x)
    return ExportCheck(tuple(shape), (got - want).abs().max().item(), want.abs().max().item())


def describe(report: ExportReport) -> str:
    """One line per check and a verdict, for the CLI."""
    lines = []
    for c in report.checks:
        lines.append(
            f"  input {'x'.join(map(str, c.shape))}: max |diff| {c.max_diff:.3g} "
            f"(output scale {c.scale:.3g}, allowed {report.rtol * c.scale:.3g})"
        )
    kind = "ONNX (onnxruntime)" if report.format == "onnx" else "torch.export program"
    dyn = [n for n, on in (("batch", report.dynamic_batch), ("height/width", report.dynamic_size)) if on]
    head = f"wrote {report.path} [{kind}; dynamic {', '.join(dyn) or 'nothing'}]; max difference {report.max_diff:.3g}"
    return "\n".join([head, *lines])
