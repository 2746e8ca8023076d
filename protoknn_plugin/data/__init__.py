"""Datasets by name: ``create_dataset(name, data_dir, ...) -> DatasetSplits``.

Built in: ``animals`` (embedded default), ``fashion-mnist``, ``cifar10``, ``imagefolder``, and the
paper's ``cub200``, ``stanford-dogs`` and ``stanford-cars``. Other packages add datasets
with ``@register_dataset("name")`` or the entry-point group ``protoknn_plugin.datasets``;
a loader is ``fn(data_dir=None, *, augment, image_size, strict, crop) -> DatasetSplits``.
Every item is ``(image: float Tensor (C, H, W), label: int)``.
"""
from .base import (DATASETS, SPLIT_SEED, DatasetNotFoundError, DatasetSplits, DatasetWarning,
                   FileImageDataset, TensorImageDataset, load_image, register_dataset,
                   stratified_pick, stratified_split)
from .catalog import create_dataset, describe_dataset, list_datasets
from . import animals, cars, cifar10, cub, dogs, idx, imagefolder  # noqa: F401  (registers the loaders)

__all__ = [
    "DATASETS", "register_dataset", "create_dataset", "list_datasets", "describe_dataset",
    "DatasetSplits", "load_image", "DatasetNotFoundError", "DatasetWarning", "SPLIT_SEED",
    "TensorImageDataset", "FileImageDataset", "stratified_split", "stratified_pick",
]
