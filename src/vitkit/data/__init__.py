"""Data sets, transforms and samplers: Fashion-MNIST found offline, image folders, seeded splits.

The names below load on first use (PEP 562): `vitkit.data.data_config` is read when the CLI builds its flags,
and importing it must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vitkit.core.lazy import lazy_attributes

if TYPE_CHECKING:
    from vitkit.data.datasets import LoadedData, TensorImageDataset, build_dataset, load_data
    from vitkit.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist
    from vitkit.data.samplers import ShardedSampler, build_loader, build_sampler, set_loader_epoch
    from vitkit.data.transforms import Augment, ImageSpec, eval_transform, train_transform

_HOMES = {
    "LoadedData": "datasets",
    "TensorImageDataset": "datasets",
    "build_dataset": "datasets",
    "load_data": "datasets",
    "find_fashion_mnist": "fashion_mnist",
    "load_fashion_mnist": "fashion_mnist",
    "ShardedSampler": "samplers",
    "build_loader": "samplers",
    "build_sampler": "samplers",
    "set_loader_epoch": "samplers",
    "Augment": "transforms",
    "ImageSpec": "transforms",
    "eval_transform": "transforms",
    "train_transform": "transforms",
}

__all__ = [
    "Augment",
    "ImageSpec",
    "LoadedData",
    "ShardedSampler",
    "TensorImageDataset",
    "build_dataset",
    "build_loader",
    "build_sampler",
    "eval_transform",
    "find_fashion_mnist",
    "load_data",
    "load_fashion_mnist",
    "set_loader_epoch",
    "train_transform",
]


__getattr__, __dir__ = lazy_attributes(__name__, _HOMES)
