"""``cifar10``: CIFAR-10 (Krizhevsky, 2009), 60,000 RGB 32x32 photographs in 10 classes.

``data_dir`` (or its sub-folder ``cifar10/``) holds either layout:

- torchvision's ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``, ``test_batch``;
  ``data_dir`` may also be that folder itself). The batches are Python pickles, read with
  ``safe_pickle.NumpyOnlyUnpickler``, so a tampered file cannot run code. ``--download``
  (``download_cifar10``) fetches and extracts them when there is internet.
- ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` with the 10 class names as folders.
  Files are read when used (an unreadable one stops with a one-line error naming it), so
  listing 60,000 files costs no decoding.

Both give the official split (50,000 train / 10,000 test) and the same labels: the class
names are in alphabetical order, which is also CIFAR-10's own label order. Images stay
32 px unless ``image_size`` asks for more: a pretrained backbone of stride 32 needs 128 px
for a 4x4 map. Normalisation: ImageNet mean/std, as for every RGB dataset here.
"""
from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ProtoKNNError
from .base import DatasetNotFoundError, FileImageDataset, make_splits, register_dataset
from .imagefolder import scan_class_folders
from .safe_pickle import safe_loads
from .transforms import IMAGENET_MEAN, IMAGENET_STD, small_rgb_test_transform, small_rgb_train_transform

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCHES_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
NATIVE_SIZE = 32
FIX = ("pass --data-dir FOLDER holding cifar-10-batches-py/ (add --download to fetch it) or "
       "train/<class>/*.jpg and test/<class>/*.jpg")

_download_allowed = False


def allow_download(allowed: bool = True) -> None:
    """Let the ``cifar10`` loader download the batches when they are absent (the CLI's --download)."""
    global _download_allowed
    _download_allowed = bool(allowed)


class RGBArrayDataset(Dataset):
    """RGB images kept in memory as one uint8 array (N, H, W, 3); ``transform`` takes a PIL image."""

    def __init__(self, images: np.ndarray, labels, transform):
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def raw_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index], mode="RGB")

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.transform(self.raw_image(index)), int(self.labels[index])

    def subset(self, indices) -> "RGBArrayDataset":
        idx = np.asarray([int(i) for i in indices], dtype=np.int64)
        return RGBArrayDataset(self.images[idx], self.labels[torch.as_tensor(idx)], self.transform)

    def with_transform(self, transform) -> "RGBArrayDataset":
        return RGBArrayDataset(self.images, self.labels, transform)


# --------------------------------------------------------------------------- locating

def locate(data_dir) -> Tuple[str, Path]:
    """("batches", folder) or ("jpeg", folder) for ``data_dir`` or ``data_dir/cifar10``."""
    if data_dir is None:
        raise ProtoKNNError(f"cifar10 needs its folder: {FIX}.")
    root = Path(data_dir).expanduser()
    for base in (root, root / "cifar10"):
        if (base / BATCHES_FOLDER).is_dir():
            return "batches", base / BATCHES_FOLDER
        if (base / TRAIN_BATCHES[0]).is_file() or (base / TEST_BATCH).is_file():
            return "batches", base
        if (base / "train").is_dir() or (base / "test").is_dir():
            return "jpeg", base
    raise DatasetNotFoundError(f"cifar10 not found at {root}; {FIX}.", root)


def download_cifar10(data_dir) -> Path:
    """Download and extract ``cifar-10-batches-py`` into ``data_dir``; returns that folder.

    Uses torchvision's URL and MD5 for CIFAR10 but not its dataset class, whose constructor
    unpickles the batches without restriction.
    """
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    root = Path(data_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad MD5 a RuntimeError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ProtoKNNError(f"cannot download CIFAR-10 into {root} ({first}); download "
                            f"{CIFAR10.url} by hand and extract it there, or use the JPEG layout "
                            "train/<class>/*.jpg and test/<class>/*.jpg.") from exc
    return root / BATCHES_FOLDER


# --------------------------------------------------------------------------- python batches

def read_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """One batch file -> images uint8 (N, 32, 32, 3) and labels int64 (N,)."""
    if not path.is_file():
        raise DatasetNotFoundError(f"cifar10: {path.name} not found in {path.parent}; extract the whole "
                                   "cifar-10-python.tar.gz there (or pass --download).", path.parent)
    try:
        batch = safe_loads(path.read_bytes(), encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ProtoKNNError(f"cifar10: cannot read {path} ({exc}); replace it with the file from "
                            "cifar-10-python.tar.gz.") from exc
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = np.asarray(batch.get("labels", []) if isinstance(batch, dict) else [])
    side = NATIVE_SIZE * NATIVE_SIZE * 3
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != side \
            or labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        shape = getattr(data, "shape", None)
        raise ProtoKNNError(f"cifar10: {path} is not a CIFAR-10 batch (data {shape}, {labels.shape} labels; "
                            f"expected uint8 (N, {side}) and N labels in 0..9); replace it.")
    images = data.reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


@functools.lru_cache(maxsize=2)
def _read_batches(folder: Path, names: Tuple[str, ...], _stamp) -> Tuple[np.ndarray, np.ndarray]:
    parts = [read_batch(folder / name) for name in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _check_meta(folder: Path) -> None:
    """batches.meta, when present, must list CIFAR-10's classes (CIFAR-100 has other files)."""
    meta = folder / "batches.meta"
    if not meta.is_file():
        return
    try:
        names = safe_loads(meta.read_bytes(), encoding="latin1").get("label_names")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ProtoKNNError(f"cifar10: cannot read {meta} ({exc}); replace it.") from exc
    if names is not None and tuple(names) != CIFAR10_CLASSES:
        raise ProtoKNNError(f"cifar10: {meta} lists classes {list(names)[:3]}..., not CIFAR-10's; "
                            "point --data-dir at CIFAR-10.")


def load_batches(folder: Path, names: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Images and labels of the named batches, concatenated, read once per process."""
    paths = [folder / n for n in names]
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None for p in paths)
    return _read_batches(folder, tuple(names), stamp)


# --------------------------------------------------------------------------- JPEG folders

def _jpeg_split(base: Path, split: str):
    folder = base / split
    if not folder.is_dir():
        raise DatasetNotFoundError(f"cifar10: {folder} not found; the JPEG layout needs train/<class>/ and "
                                   "test/<class>/ side by side.", folder)
    files = scan_class_folders(folder)
    if set(files) != set(CIFAR10_CLASSES):
        odd = sorted(set(files) ^ set(CIFAR10_CLASSES))
        raise ProtoKNNError(f"cifar10: {folder} must hold the 10 class folders {', '.join(CIFAR10_CLASSES)}; "
                            f"{odd[0]!r} is {'extra' if odd[0] in files else 'missing'}.")
    paths, labels = [], []
    for label, name in enumerate(CIFAR10_CLASSES):
        paths += files[name]
        labels += [label] * len(files[name])
    return paths, labels


# --------------------------------------------------------------------------- loader

@register_dataset("cifar10")
def cifar10(data_dir=None, *, augment: bool = True, image_size=None, strict: bool = False, crop: bool = False):
    """CIFAR-10 from ``data_dir`` (see the module docstring); ``image_size`` upsamples (default 32)."""
    if crop:
        raise ProtoKNNError("cifar10 has no bounding boxes; run without crop.")
    size = NATIVE_SIZE if image_size is None else int(image_size)
    if size < 16:
        raise ProtoKNNError(f"image_size {size} is too small for cifar10; use 32 (native) or more.")
    try:
        kind, folder = locate(data_dir)
    except DatasetNotFoundError:
        if not _download_allowed:
            raise
        kind, folder = "batches", download_cifar10(data_dir)
    test_tf = small_rgb_test_transform(size)
    if kind == "batches":
        _check_meta(folder)
        train = RGBArrayDataset(*load_batches(folder, TRAIN_BATCHES), test_tf)
        test = RGBArrayDataset(*load_batches(folder, (TEST_BATCH,)), test_tf)
    else:
        train = FileImageDataset(*_jpeg_split(folder, "train"), test_tf, channels=3)
        test = FileImageDataset(*_jpeg_split(folder, "test"), test_tf, channels=3)
    return make_splits(
        "cifar10", train, test, train_transform=small_rgb_train_transform(NATIVE_SIZE, size), test_transform=test_tf,
        classes=CIFAR10_CLASSES, image_size=size, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        image_transform=test_tf, augment=augment)
