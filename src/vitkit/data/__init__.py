"""Data sets, transforms and samplers: Fashion-MNIST found offline, image folders, seeded splits."""

from vitkit.data.datasets import LoadedData, TensorImageDataset, build_dataset, load_data
from vitkit.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist
from vitkit.data.samplers import ShardedSampler, build_loader, build_sampler, set_loader_epoch
from vitkit.data.transforms import Augment, ImageSpec, eval_transform, train_transform

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
