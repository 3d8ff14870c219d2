"""`vitkit attention IMAGE (--run DIR | --checkpoint FILE | --model NAME) [--method ...] [--out PNG]`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitkit.data.transforms import ImageSpec


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attention",
        help="where the model looks: attention rollout / last-layer attention (ViT, DeiT) or CAM (Swin), as a PNG",
        description=(
            "Overlay a map of where the model looks on the image, after the model's own eval transform. "
            "ViT / DeiT: 'rollout' (Abnar & Zuidema: head-averaged attention plus identity, row-normalised, "
            "multiplied through the layers; the class token's row, with DeiT's distillation token averaged in) "
            "or 'last' (the last layer's class-token attention). Swin: 'cam', class activation mapping through "
            "the linear head on the average-pooled last stage (W_c . features at each position, clipped at 0), "
            "for the predicted class or --class-index."
        ),
    )
    p.add_argument("image", metavar="IMAGE")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", dest="run_dir", metavar="DIR", help="a run folder from `vitkit train` (its best weights)")
    src.add_argument("--checkpoint", metavar="FILE", help="a .safetensors file written by vitkit")
    src.add_argument("--model", metavar="NAME", help="a registered model (random weights unless --pretrained)")
    p.add_argument(
        "--pretrained",
        nargs="?",
        const=True,
        default=False,
        metavar="SOURCE",
        help="with --model: its default pretrained weights, or a local file",
    )
    p.add_argument(
        "--method",
        choices=("rollout", "last", "cam"),
        default=None,
        help="default: last for ViT / DeiT (the sharper map on trained models), cam for Swin",
    )
    p.add_argument("--class-index", type=int, default=None, help="cam only: the class to map (default: predicted)")
    p.add_argument("--out", default=None, metavar="PNG", help="output file (default: IMAGE's name + _METHOD.png here)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415  fast CLI start-up
    from torchvision.transforms.v2 import functional as TF  # noqa: PLC0415  fast CLI start-up

    from vitkit.data.folder import load_image  # noqa: PLC0415  fast CLI start-up
    from vitkit.data.transforms import eval_transform  # noqa: PLC0415  fast CLI start-up
    from vitkit.tools.attention_maps import attention_map, default_method, save_overlay  # noqa: PLC0415  fast CLI start-up
    from vitkit.train.parallel import resolve_device  # noqa: PLC0415  fast CLI start-up

    if args.pretrained and args.model is None:
        raise ValueError("--pretrained goes with --model NAME")
    device = resolve_device(args.device)
    model, spec, classes, note = _load(args, device)
    image = Path(args.image)
    if not image.is_file():
        raise FileNotFoundError(f"image {image} does not exist")
    pixels = TF.pil_to_tensor(load_image(image, "L" if spec.in_chans == 1 else "RGB"))
    x = eval_transform(spec)(pixels)[None].to(device)  # (1, C, H, W), normalised
    method = args.method or default_method(model)
    (amap,) = attention_map(model, x, method, args.class_index)

    # the picture the model saw: undo the normalisation
    mean = torch.tensor(spec.mean if len(spec.mean) == spec.in_chans else spec.mean * spec.in_chans)
    std = torch.tensor(spec.std if len(spec.std) == spec.in_chans else spec.std * spec.in_chans)
    seen = x[0].cpu() * std[:, None, None] + mean[:, None, None]
    k = amap.class_index
    name = classes[k] if classes and k < len(classes) else str(k)
    prob = amap.logits.softmax(-1)[k].item()
    out = Path(args.out) if args.out else Path(f"{image.stem}_{method}.png")
    save_overlay(seen, amap, out, title=f"{method}: {name} ({100 * prob:.1f}%)")
    print(f"wrote {out}: {method} map of {image}, predicted {name} ({100 * prob:.1f}%){note}")
    return 0


def _load(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, ImageSpec, list[str] | None, str]:
    from vitkit.tools.inference import default_spec, load_inference  # noqa: PLC0415  fast CLI start-up

    if args.model is None or args.pretrained:
        inf = load_inference(
            run=args.run_dir, checkpoint=args.checkpoint, model=args.model, pretrained=args.pretrained, device=device
        )
        return inf.model.eval(), inf.spec, inf.classes, ""
    from vitkit.factory import create_model  # noqa: PLC0415  fast CLI start-up

    model = create_model(args.model).to(device).eval()
    return model, default_spec(model), None, " [random weights: the map shows nothing learned]"
