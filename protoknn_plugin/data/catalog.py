"""Building datasets by name and describing them for the ``protoknn datasets`` table."""
from __future__ import annotations

from typing import List, Optional

from ..errors import ProtoKNNError, UnknownNameError
from .base import DATASETS, DatasetNotFoundError, DatasetSplits, limit_splits

# Official sizes, shown by describe_dataset when the files are absent:
# (classes, train, test, default image size).
KNOWN_SIZES = {
    "animals": (10, 8000, 2000, 28),
    "fashion-mnist": (10, 60000, 10000, 28),
    "cifar10": (10, 50000, 10000, 32),
    "cub200": (200, 5994, 5794, 224),
    "stanford-dogs": (120, 12000, 8580, 224),
    "stanford-cars": (196, 8144, 8041, 224),
    "imagefolder": (None, None, None, 224),
}


def list_datasets() -> List[str]:
    """Registered dataset names, sorted."""
    return DATASETS.names()


def create_dataset(name: str, data_dir: Optional[str] = None, *, augment: bool = True,
                   image_size: Optional[int] = None, strict: bool = False, crop: bool = False,
                   limit: Optional[int] = None) -> DatasetSplits:
    """Build the named dataset's splits.

    ``augment=False`` gives ``train`` the test transform. ``limit`` keeps that many samples
    per split, picked stratified so classes stay balanced (for tiny runs).
    Unknown names raise ``UnknownNameError``; absent or broken data ``ProtoKNNError``.
    """
    loader = DATASETS.get(name)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size <= 0):
        raise ProtoKNNError(f"image_size must be a positive integer, got {image_size!r}.")
    splits = loader(data_dir, augment=augment, image_size=image_size, strict=strict, crop=crop)
    if limit is not None:
        splits = limit_splits(splits, limit)
    return splits


def rebuild_run_data(dataset: str, info: dict, data_dir: Optional[str] = None, image_size: Optional[int] = None,
                     augment: bool = False) -> DatasetSplits:
    """A run's data as it was trained, from the ``data`` record of its checkpoint: the same folder
    (unless ``data_dir`` overrides it), limit, crop, image size and validation hold-out, so that
    training indices (projection sources, kNN memory rows) point at the same images."""
    from .base import carve_validation

    splits = create_dataset(dataset, data_dir or info.get("data_dir"), augment=augment, limit=info.get("limit"),
                            crop=bool(info.get("crop")), image_size=image_size or info.get("image_size"))
    if info.get("val_fraction"):
        splits = carve_validation(splits, float(info["val_fraction"]))
    return splits


def describe_dataset(name: str, data_dir: Optional[str] = None) -> dict:
    """{name, classes, train, test, image_size, status}; never raises for absent data.

    ``status`` is "ok", "not found at PATH" (the folder is absent) or a one-line reason
    (e.g. which file of a partly extracted dataset is missing). When the data are not
    loadable the counts are the official ones (None for ``imagefolder``).
    Unknown names still raise ``UnknownNameError``.
    """
    DATASETS.get(name)  # unknown names are a caller error, not a status
    classes, train, test, size = KNOWN_SIZES.get(name, (None, None, None, None))
    info = {"name": name, "classes": classes, "train": train, "test": test, "image_size": size}
    try:
        splits = create_dataset(name, data_dir, augment=False)
    except UnknownNameError:
        raise
    except DatasetNotFoundError as exc:
        if not exc.path.exists():
            return {**info, "status": f"not found at {exc.path}"}
        return {**info, "status": " ".join(str(exc).split())}  # partly there: say which file lacks
    except ProtoKNNError as exc:
        return {**info, "status": " ".join(str(exc).split())}
    except Exception as exc:  # a third-party loader's bug must not break the whole table
        return {**info, "status": f"error: {type(exc).__name__}: {' '.join(str(exc).split())}"}
    return {"name": name, "classes": len(splits.classes), "train": len(splits.train),
            "test": len(splits.test), "image_size": splits.image_size, "status": "ok"}
