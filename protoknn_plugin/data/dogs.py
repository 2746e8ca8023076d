"""``stanford-dogs``: the Stanford Dogs dataset in its official archive layout.

``data_dir`` holds ``Images/<wnid-name>/*.jpg`` (images.tar), ``Annotation/<wnid-name>/<file>``
(annotation.tar: PASCAL VOC XML, file name = image name without ``.jpg``) and the split lists
``train_list.mat`` / ``test_list.mat`` (lists.tar: ``file_list`` relative to ``Images/``,
``labels`` 1-based). Reading .mat needs scipy; without it, plain-text lists
``train_list.txt`` / ``test_list.txt`` are accepted: one ``<wnid-name>/<file>.jpg`` per line,
optionally followed by its 1-based label (otherwise the label is the rank of its folder
among the sorted ``Images/`` folders, which is how the official labels are numbered).
Official split: 12,000 train / 8,580 test, 120 classes.

Classes are the sorted ``Images/`` folder names; display names drop the WordNet id
("n02085620-Chihuahua" -> "Chihuahua"). ``crop=True`` crops to the largest annotated
box (xmin, ymin, xmax, ymax); annotations are read when an image is loaded.
"""
from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List, Tuple

from ..errors import ProtoKNNError
from .base import DatasetNotFoundError, register_dataset
from .official import (check_images_exist, load_mat, mat_ints, mat_strings, natural_splits,
                       require_data_dir)

WHAT = "the Stanford Dogs folder (Images/, Annotation/, train_list.mat, test_list.mat)"


def _class_name(folder: str) -> str:
    return folder.split("-", 1)[-1].replace("_", " ")


def read_voc_box(path: Path) -> Tuple[float, float, float, float]:
    """The largest ``object/bndbox`` of a PASCAL VOC file as (xmin, ymin, xmax, ymax)."""
    try:
        root = ET.parse(path).getroot()
        boxes = []
        for bndbox in root.iter("bndbox"):
            boxes.append(tuple(float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
    except FileNotFoundError:
        raise ProtoKNNError(f"stanford-dogs: annotation {path} not found; extract annotation.tar into "
                            "the data folder or run without crop.") from None
    except (OSError, ET.ParseError, TypeError, ValueError) as exc:
        raise ProtoKNNError(f"stanford-dogs: cannot read annotation {path} ({exc}); re-extract "
                            "annotation.tar or run without crop.") from None
    if not boxes:
        raise ProtoKNNError(f"stanford-dogs: annotation {path} has no bndbox; re-extract annotation.tar "
                            "or run without crop.")
    return max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))


def _read_list(root: Path, split: str, folder_rank: dict) -> Tuple[List[str], List[int]]:
    """(relative image paths, 1-based labels) of ``split`` ("train" or "test")."""
    mat, txt = root / f"{split}_list.mat", root / f"{split}_list.txt"
    if mat.is_file():
        try:
            import scipy.io  # noqa: F401
        except ImportError:
            if not txt.is_file():
                raise ProtoKNNError(f"stanford-dogs: reading {mat.name} needs scipy; install it with "
                                    f"`pip install scipy` (or provide {txt.name}).") from None
        else:
            content = load_mat("stanford-dogs", mat)
            if "file_list" not in content or "labels" not in content:
                raise ProtoKNNError(f"stanford-dogs: {mat} lacks file_list/labels; re-extract lists.tar.")
            files, labels = mat_strings(content["file_list"]), mat_ints(content["labels"])
            if len(files) != len(labels):
                raise ProtoKNNError(f"stanford-dogs: {mat} has {len(files)} files but {len(labels)} labels; "
                                    "re-extract lists.tar.")
            return files, labels
    if not txt.is_file():
        raise ProtoKNNError(f"stanford-dogs: {split}_list.mat (or {split}_list.txt) not found in {root}; "
                            "extract lists.tar into the data folder.")
    files, labels = [], []
    for number, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        folder = parts[0].replace("\\", "/").split("/")[0]
        try:
            label = int(parts[1]) if len(parts) > 1 else folder_rank[folder] + 1
        except (ValueError, KeyError):
            raise ProtoKNNError(f"stanford-dogs: {txt}:{number} {line.strip()!r} names no known class "
                                "folder or label; lines are '<wnid-name>/<file>.jpg [label]'.") from None
        files.append(parts[0])
        labels.append(label)
    return files, labels


@register_dataset("stanford-dogs")
def stanford_dogs(data_dir=None, *, augment: bool = True, image_size=None, strict: bool = False,
                  crop: bool = False):
    """Stanford Dogs with the official split; ``crop`` uses the VOC bounding boxes."""
    root = require_data_dir("stanford-dogs", data_dir, WHAT)
    images_dir = root / "Images"
    if not images_dir.is_dir():
        raise DatasetNotFoundError(f"stanford-dogs: Images/ not found at {root}; pass --data-dir pointing to "
                                   f"{WHAT}.", root)
    folders = sorted(p.name for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ProtoKNNError(f"stanford-dogs: {images_dir} has no class folders; extract images.tar there.")
    rank = {name: i for i, name in enumerate(folders)}
    classes = [_class_name(f) for f in folders]
    parts = []
    for split in ("train", "test"):
        files, labels = _read_list(root, split, rank)
        bad = [y for y in labels if not 1 <= y <= len(classes)]
        if bad:
            raise ProtoKNNError(f"stanford-dogs: {split} list has label {bad[0]} outside 1..{len(classes)}; "
                                "the list does not match Images/.")
        paths = [images_dir / f for f in files]
        boxes = [functools.partial(read_voc_box, root / "Annotation" / Path(f).with_suffix(""))
                 for f in files]
        parts.append((paths, [y - 1 for y in labels], boxes))
    check_images_exist("stanford-dogs", parts[0][0] + parts[1][0])
    for (paths, _, _), split in zip(parts, ("train", "test")):
        if not paths:
            raise ProtoKNNError(f"stanford-dogs: the {split} list is empty; re-extract lists.tar.")
    return natural_splits("stanford-dogs", parts[0], parts[1], classes,
                          augment=augment, image_size=image_size, crop=crop)
