"""Helpers shared by the loaders of the paper's datasets (CUB, Stanford Dogs, Stanford Cars)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ProtoKNNError
from .base import DatasetNotFoundError, FileImageDataset, make_splits
from .transforms import IMAGENET_MEAN, IMAGENET_STD, natural_test_transform, natural_train_transform

DEFAULT_IMAGE_SIZE = 224


def require_data_dir(name: str, data_dir, what: str) -> Path:
    """``data_dir`` as an existing folder, else a clear error saying what it should hold."""
    if data_dir is None:
        raise ProtoKNNError(f"{name} needs its folder: pass --data-dir pointing to {what}.")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"{name} not found at {root}; pass --data-dir pointing to {what}.", root)
    return root


def require_file(name: str, path: Path, hint: str) -> Path:
    if not path.is_file():
        raise DatasetNotFoundError(f"{name}: {path.name} not found at {path.parent}; {hint}.", path.parent)
    return path


def check_images_exist(name: str, paths: Sequence[Path]) -> None:
    """Stat every listed image now, so a half-extracted archive fails before training."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ProtoKNNError(f"{name}: {len(missing)} listed image(s) missing, e.g. {missing[0]}; "
                            "extract the full archive into the data folder.")


def load_mat(name: str, path: Path):
    """``scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)`` with clear errors."""
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise ProtoKNNError(f"{name}: reading {path.name} needs scipy; install it with "
                            "`pip install scipy`.") from exc
    try:
        return loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except (OSError, ValueError, TypeError, NotImplementedError) as exc:
        raise ProtoKNNError(f"{name}: cannot read {path} ({exc}); re-download the file.") from exc


def mat_strings(value) -> list:
    """A MATLAB cell array of strings (squeezed by loadmat) -> list of str."""
    flat = np.atleast_1d(np.asarray(value, dtype=object)).ravel()
    out = []
    for item in flat:
        while isinstance(item, np.ndarray):  # nested cells: array(['x'], dtype=object)
            item = item.ravel()[0] if item.size else ""
        out.append(str(item))
    return out


def mat_ints(value) -> list:
    return [int(v) for v in np.atleast_1d(np.asarray(value)).ravel()]


def natural_splits(name: str, train: tuple, test: tuple, classes: Sequence[str], *, augment: bool,
                   image_size: Optional[int], crop: bool):
    """Build ``DatasetSplits`` from (paths, labels, boxes or None) for train and test."""
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size < 16:
        raise ProtoKNNError(f"image_size {size} is too small for {name}; use 224 (the paper) or at least 32.")
    test_tf = natural_test_transform(size, cropped=crop)
    datasets = [FileImageDataset(paths, labels, test_tf, channels=3, boxes=boxes if crop else None)
                for paths, labels, boxes in (train, test)]
    return make_splits(
        name, datasets[0], datasets[1],
        train_transform=natural_train_transform(size, cropped=crop), test_transform=test_tf,
        classes=classes, image_size=size, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        image_transform=test_tf, augment=augment, cropped=crop)
