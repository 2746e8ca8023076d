"""``stanford-cars``: the Stanford Cars dataset in its devkit layout.

``data_dir`` holds ``cars_train/``, ``cars_test/`` and ``devkit/`` with ``cars_meta.mat``
(``class_names``), ``cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat`` (the
latter may also sit in ``data_dir`` itself, where the separate download puts it). Each
annotation has ``bbox_x1, bbox_y1, bbox_x2, bbox_y2, class`` (1-based) and ``fname``.
Official split: 8,144 train / 8,041 test, 196 classes. Reading .mat needs scipy.
``crop=True`` crops to (bbox_x1, bbox_y1, bbox_x2, bbox_y2) before the transforms.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ProtoKNNError
from .base import DatasetNotFoundError, register_dataset
from .official import check_images_exist, load_mat, mat_strings, natural_splits, require_data_dir

WHAT = "the Stanford Cars folder (cars_train/, cars_test/, devkit/)"
FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def _find(root: Path, candidates, what: str) -> Path:
    for path in candidates:
        if path.is_file():
            return path
    raise DatasetNotFoundError(f"stanford-cars: {what} not found at {root}; pass --data-dir pointing to "
                               f"{WHAT} (with the labelled test annotations).", root)


def read_annotations(path: Path, images_dir: Path, n_classes: int):
    """(paths, 0-based labels, boxes) from a devkit ``*_annos*.mat``."""
    content = load_mat("stanford-cars", path)
    if "annotations" not in content:
        raise ProtoKNNError(f"stanford-cars: {path} has no 'annotations'; re-download the devkit.")
    records = np.atleast_1d(content["annotations"]).ravel()
    paths, labels, boxes = [], [], []
    for i, rec in enumerate(records):
        missing = [f for f in FIELDS if not hasattr(rec, f)]
        if missing:
            hint = ("use cars_test_annos_withlabels.mat, which has the test labels"
                    if missing == ["class"] else "re-download the devkit")
            raise ProtoKNNError(f"stanford-cars: annotation {i} in {path} lacks {', '.join(missing)}; {hint}.")
        label = int(getattr(rec, "class"))
        if not 1 <= label <= n_classes:
            raise ProtoKNNError(f"stanford-cars: annotation {i} in {path} has class {label}, outside "
                                f"1..{n_classes}; re-download the devkit.")
        paths.append(images_dir / mat_strings(rec.fname)[0])
        labels.append(label - 1)
        boxes.append(tuple(float(getattr(rec, f)) for f in FIELDS[:4]))
    return paths, labels, boxes


@register_dataset("stanford-cars")
def stanford_cars(data_dir=None, *, augment: bool = True, image_size=None, strict: bool = False,
                  crop: bool = False):
    """Stanford Cars with the official split; ``crop`` uses the devkit bounding boxes."""
    root = require_data_dir("stanford-cars", data_dir, WHAT)
    devkit = root / "devkit"
    meta = _find(root, [devkit / "cars_meta.mat", root / "cars_meta.mat"], "devkit/cars_meta.mat")
    train_annos = _find(root, [devkit / "cars_train_annos.mat", root / "cars_train_annos.mat"],
                        "devkit/cars_train_annos.mat")
    test_annos = _find(root, [devkit / "cars_test_annos_withlabels.mat", root / "cars_test_annos_withlabels.mat"],
                       "cars_test_annos_withlabels.mat")
    meta_content = load_mat("stanford-cars", meta)
    if "class_names" not in meta_content:
        raise ProtoKNNError(f"stanford-cars: {meta} has no class_names; re-download the devkit.")
    classes = mat_strings(meta_content["class_names"])
    parts = []
    for annos, folder in ((train_annos, "cars_train"), (test_annos, "cars_test")):
        if not (root / folder).is_dir():
            raise DatasetNotFoundError(f"stanford-cars: {folder}/ not found at {root}; extract "
                                       f"{folder}.tgz into the data folder.", root)
        parts.append(read_annotations(annos, root / folder, len(classes)))
        if not parts[-1][0]:
            raise ProtoKNNError(f"stanford-cars: {annos} lists no images; re-download the devkit.")
    check_images_exist("stanford-cars", parts[0][0] + parts[1][0])
    return natural_splits("stanford-cars", parts[0], parts[1], classes,
                          augment=augment, image_size=image_size, crop=crop)
