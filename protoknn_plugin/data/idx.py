"""``fashion-mnist``: Zalando's 28x28 grey clothing images in the IDX format.

Default folder: ``/usr/share/datasets/fashion-mnist`` (Debian package
``dataset-fashion-mnist``, which ships ``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``).
Each file may also be uncompressed (no ``.gz``). Official split: 60,000 train / 10,000 test.

IDX layout (big-endian): two zero bytes, a type byte (0x08 = uint8), the number of
dimensions, one uint32 per dimension, then the values.
"""
from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from ..errors import ProtoKNNError
from .base import DatasetNotFoundError, TensorImageDataset, make_splits, register_dataset
from .transforms import grey_file_transform, grey_test_transform, grey_train_transform

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` or pass --data-dir"
NATIVE_SIZE = 28
# Mean and std of the 60,000 official training images in [0, 1].
MEAN = (0.2860,)
STD = (0.3530,)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file of uint8 values (gzipped or not) with ``ndim`` dimensions."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # includes gzip.BadGzipFile and truncated gzip streams
        raise ProtoKNNError(f"cannot read IDX file {path} ({exc}); re-download or reinstall it.") from exc
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] != ndim:
        raise ProtoKNNError(
            f"{path} is not a uint8 IDX file with {ndim} dimension(s) (bad magic "
            f"{raw[:4].hex() or 'empty'}); re-download or reinstall it.")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise ProtoKNNError(f"{path} is truncated or padded: {len(raw)} bytes, the header announces "
                            f"{expected} for shape {dims}; re-download or reinstall it.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def find_idx_file(folder: Path, stem: str) -> Optional[Path]:
    """``stem`` or ``stem.gz`` in ``folder`` (also the ``train-images.idx3-ubyte`` spelling)."""
    spellings = {stem, stem.replace("-idx", ".idx")}
    for name in sorted(spellings):
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
    return None


@functools.lru_cache(maxsize=4)
def _load_pair(images_path: Path, labels_path: Path, _stamp) -> Tuple[torch.Tensor, torch.Tensor]:
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise ProtoKNNError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                            f"{len(labels)} labels; re-download the pair.")
    if labels.size and labels.max() >= len(FASHION_CLASSES):
        raise ProtoKNNError(f"{labels_path} has label {labels.max()}, expected 0..9; is it Fashion-MNIST?")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_idx_split(folder: Path, prefix: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N, H, W) and labels int64 (N,) of ``prefix`` ("train" or "t10k"), cached."""
    paths = []
    for kind, ndim in (("images", 3), ("labels", 1)):
        stem = f"{prefix}-{kind}-idx{ndim}-ubyte"
        found = find_idx_file(folder, stem)
        if found is None:
            raise DatasetNotFoundError(f"fashion-mnist: {stem}[.gz] not found at {folder}; {INSTALL_HINT}.",
                                       folder)
        paths.append(found)
    # The cache key includes size and mtime, so a replaced file is read again.
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    return _load_pair(paths[0], paths[1], stamp)


@register_dataset("fashion-mnist")
def fashion_mnist(data_dir=None, *, augment: bool = True, image_size=None, strict: bool = False,
                  crop: bool = False):
    """Fashion-MNIST from IDX files in ``data_dir`` (default ``/usr/share/datasets/fashion-mnist``)."""
    if crop:
        raise ProtoKNNError("fashion-mnist has no bounding boxes; run without crop (--crop is for "
                            "cub200, stanford-dogs and stanford-cars).")
    folder = Path(data_dir).expanduser() if data_dir is not None else FASHION_MNIST_DIR
    if not folder.is_dir():
        raise DatasetNotFoundError(f"fashion-mnist not found at {folder}; {INSTALL_HINT}.", folder)
    size = NATIVE_SIZE if image_size is None else int(image_size)
    if size < 8:
        raise ProtoKNNError(f"image_size {size} is too small for fashion-mnist; use 28 or more.")
    train_images, train_labels = load_idx_split(folder, "train")
    test_images, test_labels = load_idx_split(folder, "t10k")
    for images, what in ((train_images, "train"), (test_images, "t10k")):
        if images.shape[1:] != (NATIVE_SIZE, NATIVE_SIZE):
            raise ProtoKNNError(f"fashion-mnist {what} images in {folder} are {tuple(images.shape[1:])}, "
                                "expected 28x28; is this Fashion-MNIST?")
    test_tf = grey_test_transform(NATIVE_SIZE, size, MEAN, STD)
    return make_splits(
        "fashion-mnist",
        TensorImageDataset(train_images, train_labels, test_tf),
        TensorImageDataset(test_images, test_labels, test_tf),
        # Clothes are close to mirror-symmetric, so flipping is a safe augmentation.
        train_transform=grey_train_transform(NATIVE_SIZE, size, MEAN, STD, flip=True),
        test_transform=test_tf, classes=FASHION_CLASSES, image_size=size, channels=1,
        mean=MEAN, std=STD, image_transform=grey_file_transform(size, MEAN, STD), augment=augment)
