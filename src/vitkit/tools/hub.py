"""`vitkit export --format hub`: a run as a folder timm and the Hugging Face Hub understand.

OUT/config.json (timm's nested form), OUT/model.safetensors (the run's best weights, with vitkit's
metadata too) and OUT/README.md (a model card from run.json and config.yaml). The folder is built
beside OUT and moved in, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vitkit.core.errors import VitkitError
from vitkit.core.files import write_folder
from vitkit.core.version import __version__
from vitkit.train.config import TrainConfig, load_run_config
from vitkit.train.modeling import input_spec, load_weights
from vitkit.train.run_folder import BEST, CONFIG, RUN_INFO, read_metrics
from vitkit.weights.timm_hub import CONFIG as HUB_CONFIG
from vitkit.weights.timm_hub import WEIGHTS as HUB_WEIGHTS
from vitkit.weights.timm_hub import timm_config
from vitkit.weights.vitkit_format import save_model

LICENSE = "apache-2.0"


def export_hub(run_dir: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the hub folder of a finished run (its best.safetensors) to `output`; returns the folder."""
    run = Path(run_dir)
    best = run / BEST
    if not (run / CONFIG).is_file() or not best.is_file():
        raise FileNotFoundError(f"{run} is not a finished vitkit run (needs {CONFIG} and {BEST}): train one first")
    config = load_run_config(run)
    info = json.loads((run / RUN_INFO).read_text()) if (run / RUN_INFO).is_file() else {}
    model, meta = load_weights(best)
    recorded = input_spec(meta)
    if recorded is None:
        raise VitkitError(f"{best} has no input spec in its metadata: re-save it with this vitkit version")
    spec, classes = recorded
    hub = timm_config(
        model,
        input_size=(spec.in_chans, spec.img_size, spec.img_size),
        mean=list(spec.mean),
        std=list(spec.std),
        crop_pct=spec.crop_pct,
        interpolation=spec.interpolation,
        label_names=classes,
    )
    card = model_card(config, info, hub, run)
    extra = {k: v for k, v in meta.items() if k not in ("format", "format_version", "model", "config")}
    extra["source_run"] = str(run.resolve())
    files = {
        HUB_CONFIG: lambda p: p.write_text(json.dumps(hub, indent=2) + "\n"),
        HUB_WEIGHTS: lambda p: save_model(model, p, metadata=extra),
        "README.md": lambda p: p.write_text(card),
    }
    write_folder(Path(output), files)
    return Path(output)


def _percent(value: Any) -> str:
    return f"{value:.2f}%" if isinstance(value, (int, float)) else "not measured"


def _final_record(run: Path) -> dict[str, Any]:
    try:
        records = read_metrics(run)
    except FileNotFoundError:
        return {}
    return next((r for r in reversed(records) if "best_val_top1" in r), {})


def model_card(config: TrainConfig, info: dict[str, Any], hub: dict[str, Any], run: Path) -> str:
    """README.md for the Hub: model, data and splits, recipe, results with their command, use, limits, licence."""
    name = hub["architecture"]
    source = info.get("data", {}).get("source", config.data)
    head = [
        "---",
        "library_name: timm",
        f"license: {LICENSE}",
        "tags: [image-classification, timm, vitkit]",
        "---",
        f"# {name} trained with vitkit on {source}",
        "",
        (
            f"A {name} ({info.get('model', {}).get('params', '?')} parameters) trained from the vitkit run "
            f"`{run.name}` (vitkit {info.get('vitkit', __version__)})."
        ),
        "",
    ]
    sections = (
        _model_section(hub),
        _data_section(config, info),
        _recipe_section(config),
        _results_section(config, run),
        _use_section(hub, source),
    )
    return "\n".join(head + [line for section in sections for line in section])


def _model_section(hub: dict[str, Any]) -> list[str]:
    pre, classes = hub["pretrained_cfg"], hub["label_names"]
    return [
        "## Model",
        f"- architecture: `{hub['architecture']}`, changed arguments: `{json.dumps(hub['model_args'])}`",
        (
            f"- input: {pre['input_size'][0]} channel(s), {pre['input_size'][1]}x{pre['input_size'][2]} pixels, "
            f"mean {pre['mean']}, std {pre['std']}, crop_pct {pre['crop_pct']}, {pre['interpolation']} resize"
        ),
        f"- classes ({len(classes)}): {', '.join(classes)}",
        "",
    ]


def _data_section(config: TrainConfig, info: dict[str, Any]) -> list[str]:
    data = info.get("data", {})
    splits = ", ".join(f"{s} {data[s]}" for s in ("train", "val", "test") if s in data) or "not recorded"
    held = f"held out {config.val_split} of train (split seed {config.split_seed}) when the data has no val split"
    return [
        "## Data",
        f"- source: `{data.get('source', config.data)}`; images per split: {splits}",
        f"- validation: {held}",
        "",
    ]


def _recipe_section(config: TrainConfig) -> list[str]:
    keys = (
        "epochs",
        "batch_size",
        "lr",
        "min_lr",
        "warmup_epochs",
        "weight_decay",
        "optimizer",
        "label_smoothing",
        "mixup",
        "cutmix",
        "crop",
        "hflip",
        "auto_augment",
        "reprob",
        "ema",
        "amp",
        "seed",
    )
    return [
        "## Recipe",
        f"From `{config.recipe or 'the command line'}`; the full config is the run's config.yaml.",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {getattr(config, k)} |" for k in keys if hasattr(config, k)],
        "",
    ]


def _results_section(config: TrainConfig, run: Path) -> list[str]:
    final = _final_record(run)
    subset = f" --test-samples {config.test_samples}" if config.test_samples else ""
    return [
        "## Results",
        f"- best validation top-1: {_percent(final.get('best_val_top1'))} (epoch {final.get('best_epoch', '?')})",
        f"- test top-1: {_percent(final.get('test_top1'))}, top-5: {_percent(final.get('test_top5'))}",
        "",
        "Reproduce the test figure from this folder:",
        "```",
        f"vitkit eval --checkpoint THIS_FOLDER --data {config.data} --split test{subset}",
        "```",
        "",
    ]


def _use_section(hub: dict[str, Any], source: str) -> list[str]:
    classes = hub["label_names"]
    return [
        "## Use",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True).eval()',
        '# or: vitkit.load_model("THIS_FOLDER")',
        "```",
        "Intended for classifying images like those of its training data, and as a starting point for fine-tuning.",
        "",
        "## Limits",
        (
            f"- It knows only its {len(classes)} classes and the images of `{source}`; images from elsewhere "
            "(other sizes, colours, framing) can be misclassified with high confidence."
        ),
        "- The figures above come from one run and one seed; they carry the noise of that run.",
        "- Not evaluated for fairness, robustness or safety-critical use.",
        "",
        "## Licence",
        f"The weights are released under {LICENSE}; the training data keeps its own licence.",
        "",
    ]
