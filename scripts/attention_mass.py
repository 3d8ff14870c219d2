"""How much of `vitkit attention`'s map lies on the garment, over Fashion-MNIST test images.

For each method: the mean share of the (upsampled, normalised) map on non-background pixels (> 0),
and how often the map's brightest pixel is on the garment. `untrained` compares with a freshly
initialised model of the same architecture. Usage:
`python scripts/attention_mass.py runs/fmnist_best/best.safetensors [--images 1000]`
"""

from __future__ import annotations

import argparse

import torch

from vitkit.data.fashion_mnist import load_fashion_mnist
from vitkit.tools.attention_maps import attention_map, upsample
from vitkit.train.modeling import input_spec, load_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, meta = load_weights(args.weights)
    recorded = input_spec(meta)
    if recorded is None:
        raise SystemExit(f"{args.weights} records no input spec: give a file written by vitkit train")
    spec, _ = recorded
    images, _ = load_fashion_mnist(train=False)
    images = images[: args.images]
    x = (images.float() / 255 - spec.mean[0]) / spec.std[0]
    garment = images[:, 0] > 0
    print(f"garment pixels: {garment.float().mean():.3f} of the image on average")
    untrained = type(model)(model.config)
    for label, net, method in (
        ("last", model, "last"),
        ("rollout", model, "rollout"),
        ("untrained rollout", untrained, "rollout"),
    ):
        maps = [upsample(m.heat, tuple(images.shape[-2:])) for m in attention_map(net, x, method)]
        mass = torch.stack([(m * garment[i]).sum() for i, m in enumerate(maps)]).mean()
        peak = torch.stack([garment[i].flatten()[m.flatten().argmax()] for i, m in enumerate(maps)]).float().mean()
        print(f"{label:18s} mass on the garment {mass:.3f}, peak on the garment {peak:.1%}")


if __name__ == "__main__":
    main()
