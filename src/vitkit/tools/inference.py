"""Load a model for inference (a trained run, a checkpoint file or a pretrained model) with how to
feed it, and evaluate it on a data split.

With a run folder everything comes from the run: best weights, transforms, split seed and subsets,
batch size and precision, so the numbers equal the ones the run logged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.core.errors import UsageError
from vitkit.core.hardware import describe_amp, resolve_amp
from vitkit.data.data_config import DataConfig, is_fashion_mnist
from vitkit.data.datasets import LoadedData, build_dataset, image_spec, load_data
from vitkit.data.samplers import build_loader
from vitkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageSpec
from vitkit.factory import create_model
from vitkit.layers.precision import cast_for_inference
from vitkit.train.config import TTA_MODES, AmpMode, TrainConfig, TtaMode, load_run_config
from vitkit.train.engine import evaluate
from vitkit.train.modeling import input_spec, load_weights
from vitkit.train.parallel import resolve_device
from vitkit.train.run_folder import BEST
from vitkit.train.runtime import amp_dtype_for, runtime
from vitkit.weights.quantized import is_quantized_file


@dataclass(frozen=True)
class EvalSettings:
    """How evaluation runs: a run's own settings, else the training defaults in fp32 (a checkpoint or a
    named model is scored exactly unless `--amp` says otherwise)."""

    batch_size: int = 2 * TrainConfig.batch_size  # the default eval batch: twice the training batch
    amp: AmpMode = "off"
    threads: int | None = None
    seed: int | None = None  # set: deterministic algorithms
    tta: TtaMode = "none"

    @classmethod
    def of_run(cls, config: TrainConfig) -> EvalSettings:
        """A training run's own evaluation settings."""
        return cls(config.resolved_eval_batch_size, config.amp, config.threads, config.seed, config.tta)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"eval_batch_size must be a positive integer (or null), got {self.batch_size}")
        if self.tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}; got {self.tta!r}")


@dataclass
class Inference:
    """A model and how to feed it: input spec, class names, the data config it came with (a run's
    TrainConfig, else one holding the input spec) and the evaluation settings."""

    model: nn.Module
    spec: ImageSpec
    classes: list[str] | None
    config: DataConfig
    source: str  # what was loaded, for reports
    settings: EvalSettings = EvalSettings()


def default_spec(model: nn.Module) -> ImageSpec:
    """The input spec of a model without a vitkit run: its pretrained record's, else ImageNet defaults."""
    config = getattr(model, "config", None)
    size = getattr(config, "img_size", (224, 224))
    in_chans = getattr(config, "in_chans", 3)
    record = getattr(model, "pretrained_record", None)  # set by vitkit.weights.pretrained.load_pretrained
    if record is not None:
        return ImageSpec(
            int(size[0]), in_chans, tuple(record.mean), tuple(record.std), record.crop_pct, record.interpolation
        )
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ([0.5], [0.5])
    return ImageSpec(int(size[0]), in_chans, tuple(mean), tuple(std), 0.875)


def load_inference(
    *,
    run: str | Path | None = None,
    checkpoint: str | Path | None = None,
    model: str | None = None,
    pretrained: bool | str = False,
    device: torch.device | str = "cpu",
) -> Inference:
    """Load exactly one of: a run folder (its best.safetensors), a checkpoint file, or a named model."""
    if sum(x is not None for x in (run, checkpoint, model)) != 1:
        raise ValueError("give exactly one of --run DIR, --checkpoint FILE or --model NAME --pretrained")
    if run is not None:
        run_config = load_run_config(run)
        net, meta = load_weights(Path(run) / BEST, device=device)
        recorded = input_spec(meta)
        spec = image_spec(run_config)
        return Inference(
            net,
            spec,
            recorded[1] if recorded else None,
            run_config,
            str(Path(run) / BEST),
            EvalSettings.of_run(run_config),
        )
    settings = EvalSettings()
    if checkpoint is not None:
        net, meta = load_weights(checkpoint, device=device)
        recorded = input_spec(meta)
        spec, classes = recorded if recorded else (default_spec(net), None)
        if is_quantized_file(checkpoint):  # torch's int8 layers refuse bf16 autocast
            settings = dataclasses.replace(settings, amp="off")
    else:
        if not pretrained:
            raise ValueError("--model NAME evaluates pretrained weights: add --pretrained (or give --run/--checkpoint)")
        net = create_model(model, pretrained=pretrained).to(device)
        spec, classes = default_spec(net), None
    config = DataConfig(
        img_size=spec.img_size,
        in_chans=spec.in_chans,
        mean=list(spec.mean),
        std=list(spec.std),
        crop_pct=spec.crop_pct,
        interpolation=spec.interpolation,
    )
    return Inference(net, spec, classes, config, str(checkpoint or model), settings)


def apply_amp(
    inference: Inference, amp: str, device: torch.device, say: Callable[[str], Any] | None = None
) -> dict[str, Any]:
    """Resolve `--amp` for evaluation and prediction (`say` gets the choice); bf16 holds the model's
    weights in bf16 (`layers.precision.cast_for_inference`) and autocast goes off, since a bf16 model needs
    none (and autocast would keep its linear layers off the oneDNN path, `layers.linear`). An int8 model
    (`vitkit quantize`) runs as it is: torch's int8 layers refuse bf16."""
    if getattr(inference.model, "int8_metadata", None) is not None:
        if amp == "bf16":
            raise UsageError(f"{inference.source} is an int8 model, which runs without amp: drop --amp bf16")
        amp = "off"
    dtype, record = resolve_amp(amp, device)
    if say is not None:
        say(describe_amp(record))
    cast_for_inference(inference.model, dtype)
    inference.settings = dataclasses.replace(inference.settings, amp="off")
    return record


def inference_device(choice: str, checkpoint: str | Path | None = None) -> torch.device:
    """The device `--device` names; an int8 checkpoint (`vitkit quantize`) runs on the CPU under `auto`."""
    if choice == "auto" and checkpoint is not None and is_quantized_file(checkpoint):
        return torch.device("cpu")
    return resolve_device(choice)


def evaluate_split(
    inference: Inference,
    *,
    data: str | None = None,
    split: str | None = None,
    samples: int | None = None,
    img_size: int | None = None,
    crop_pct: float | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    workers: int | None = None,
    confusion: bool = False,
    tta: str | None = None,
) -> dict[str, Any]:
    """top1, top5 (percent), loss, images_per_s, split, samples [, confusion, classes] on one split.

    `split` defaults to test when the data has one, else val; `samples` takes that split's seeded
    subset (the run's own subset when None and evaluating a run). `tta` (none | hflip) defaults to
    the run's own, so the figures equal those it logged.
    """
    device = torch.device(device)
    config = _with_changes(inference.config, data=data, img_size=img_size, crop_pct=crop_pct)
    settings = _with_changes(inference.settings, batch_size=batch_size, tta=tta)
    if split is None:
        split = "test" if _has_test(config.data) else "val"
    if split not in ("val", "test"):
        raise ValueError(f"--split must be val or test, got {split!r}")
    if samples is not None:
        config = dataclasses.replace(config, **{f"{split}_samples": samples})
    config.validate()
    settings.validate()
    model = inference.model
    if config.img_size != inference.spec.img_size:
        if not hasattr(model, "set_input_size"):
            raise ValueError(f"{type(model).__name__} cannot change its input size: drop --img-size")
        model.set_input_size(config.img_size)

    with runtime(settings.threads, deterministic=settings.seed is not None):
        loaded = load_data(config, splits=(split,))
        outputs = _check_classes(inference, model, loaded)
        dataset = build_dataset(loaded, split, config, train=False)
        loader = build_loader(
            dataset, train=False, batch_size=settings.batch_size, seed=settings.seed or 0, workers=workers
        )
        result = evaluate(
            model,
            loader,
            device=device,
            amp_dtype=amp_dtype_for(settings.amp, device),
            num_classes=(outputs or len(loaded.classes)) if confusion else None,
            tta=settings.tta,
        )
    result.update(split=split, data=loaded.source, checkpoint=inference.source, tta=settings.tta)
    if confusion:
        k = len(loaded.classes)
        result["confusion"] = result["confusion"][:k, :k]
        result["classes"] = loaded.classes
    return result


def _check_classes(inference: Inference, model: nn.Module, loaded: LoadedData) -> int | None:
    """The model's output count, after checking the data's classes fit it."""
    if inference.classes is not None and loaded.classes != inference.classes:
        raise ValueError(
            f"the classes of {loaded.source} ({len(loaded.classes)}) differ from the ones the model was trained "
            f"on ({len(inference.classes)}): evaluate on data with the same class folders"
        )
    outputs = _num_outputs(model)
    if outputs is not None and outputs < len(loaded.classes):
        raise ValueError(f"the model predicts {outputs} classes but {loaded.source} has {len(loaded.classes)}")
    return outputs


def _with_changes(obj: Any, **changes: Any) -> Any:
    """`obj` with the fields given (not None) replaced."""
    return dataclasses.replace(obj, **{k: v for k, v in changes.items() if v is not None})


def _has_test(data: str) -> bool:
    return is_fashion_mnist(data) or (Path(data).expanduser() / "test").is_dir()


def _num_outputs(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_classes", None):
        return int(config.num_classes)
    args = getattr(model, "torchvision_args", None)
    return int(args["num_classes"]) if args else None
