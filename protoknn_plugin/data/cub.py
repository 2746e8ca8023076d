"""``cub200``: Caltech-UCSD Birds-200-2011 in its official archive layout.

``data_dir`` is the ``CUB_200_2011`` folder or the folder holding it. Used files:
``images.txt`` (id, relative path), ``image_class_labels.txt`` (id, class 1..200),
``train_test_split.txt`` (id, 1 = train), ``bounding_boxes.txt`` (id, x, y, width, height),
``classes.txt`` (id, "001.Black_footed_Albatross") and ``images/<class>/<file>.jpg``.
Official split: 5,994 train / 5,794 test. ``crop=True`` crops each image to its box
(x, y, x + width, y + height) before the transforms. Class names drop the number prefix
and use spaces ("Black footed Albatross").

Part annotations (``parts/parts.txt``: id, name; ``parts/part_locs.txt``: image id, part id,
x, y, visible) are read on demand by ``parts_in_test_images`` (faithfulness: consistency).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from PIL import Image

from ..errors import ProtoKNNError
from .base import register_dataset
from .transforms import natural_test_points
from .official import check_images_exist, natural_splits, require_data_dir, require_file

FOLDER = "CUB_200_2011"
WHAT = "the folder holding CUB_200_2011/ (or CUB_200_2011/ itself)"


def _read_table(path: Path, columns: int) -> Dict[int, List[str]]:
    """``id value...`` lines -> {id: [values]}, with the offending line named on error."""
    rows: Dict[int, List[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns)
        try:
            if len(parts) != columns + 1:
                raise ValueError
            rows[int(parts[0])] = parts[1:]
        except ValueError:
            raise ProtoKNNError(f"cub200: {path}:{number} should hold an id and {columns} value(s), got "
                                f"{line.strip()!r}; re-extract the CUB archive.") from None
    return rows


def find_cub_root(data_dir) -> Path:
    root = require_data_dir("cub200", data_dir, WHAT)
    if (root / FOLDER).is_dir():
        root = root / FOLDER
    require_file("cub200", root / "images.txt", f"pass --data-dir pointing to {WHAT}")
    return root


def _class_name(raw: str) -> str:
    """"001.Black_footed_Albatross" -> "Black footed Albatross"."""
    return raw.split(".", 1)[-1].replace("_", " ")


@register_dataset("cub200")
def cub200(data_dir=None, *, augment: bool = True, image_size=None, strict: bool = False,
           crop: bool = False):
    """CUB-200-2011 with the official train/test split; ``crop`` uses the bounding boxes."""
    root = find_cub_root(data_dir)
    hint = "re-extract the CUB_200_2011 archive"
    images = _read_table(root / "images.txt", 1)
    labels = _read_table(require_file("cub200", root / "image_class_labels.txt", hint), 1)
    is_train = _read_table(require_file("cub200", root / "train_test_split.txt", hint), 1)
    class_rows = _read_table(require_file("cub200", root / "classes.txt", hint), 1)
    boxes = _read_table(require_file("cub200", root / "bounding_boxes.txt", hint), 4) if crop else {}

    class_ids = sorted(class_rows)
    if class_ids != list(range(1, len(class_ids) + 1)):
        raise ProtoKNNError(f"cub200: class ids in {root / 'classes.txt'} must run 1..N; {hint}.")
    classes = [_class_name(class_rows[i][0]) for i in class_ids]

    splits = {True: ([], [], []), False: ([], [], [])}
    for image_id in sorted(images):
        for table, file in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")) + (
                ((boxes, "bounding_boxes.txt"),) if crop else ()):
            if image_id not in table:
                raise ProtoKNNError(f"cub200: image id {image_id} is missing from {root / file}; {hint}.")
        label = int(labels[image_id][0])
        if not 1 <= label <= len(classes):
            raise ProtoKNNError(f"cub200: image id {image_id} has class {label}, outside 1..{len(classes)}; {hint}.")
        paths, ys, bxs = splits[is_train[image_id][0] == "1"]
        paths.append(root / "images" / images[image_id][0])
        ys.append(label - 1)
        if crop:
            try:
                x, y, w, h = (float(v) for v in boxes[image_id])
            except ValueError:
                raise ProtoKNNError(f"cub200: box of image id {image_id} in {root / 'bounding_boxes.txt'} "
                                    f"is not numeric ({boxes[image_id]}); {hint}.") from None
            bxs.append((x, y, x + w, y + h))
    check_images_exist("cub200", splits[True][0] + splits[False][0])
    if not splits[True][0] or not splits[False][0]:
        raise ProtoKNNError(f"cub200: {root / 'train_test_split.txt'} leaves a split empty; {hint}.")
    return natural_splits("cub200", splits[True], splits[False], classes,
                          augment=augment, image_size=image_size, crop=crop)


def read_part_locations(data_dir) -> Tuple[List[str], Dict[Path, torch.Tensor]]:
    """Part names and, per image path, its parts (K, 3): x, y in original pixels and visible (0/1)."""
    root = find_cub_root(data_dir)
    hint = "the part annotations come with the full CUB_200_2011 archive; re-extract it"
    names = _read_table(require_file("cub200", root / "parts" / "parts.txt", hint), 1)
    part_ids = sorted(names)
    if part_ids != list(range(1, len(part_ids) + 1)):
        raise ProtoKNNError(f"cub200: part ids in {root / 'parts' / 'parts.txt'} must run 1..K; {hint}.")
    images = _read_table(root / "images.txt", 1)
    locations = {image_id: torch.zeros(len(part_ids), 3, dtype=torch.float64) for image_id in images}
    path = require_file("cub200", root / "parts" / "part_locs.txt", hint)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            image_id, part_id, x, y, visible = line.split()
            row = locations[int(image_id)][int(part_id) - 1]
            row.copy_(torch.tensor([float(x), float(y), float(int(float(visible)) == 1)], dtype=torch.float64))
        except (ValueError, KeyError, IndexError):
            raise ProtoKNNError(f"cub200: {path}:{number} should read 'image part x y visible' for a listed image "
                                f"and part, got {line.strip()!r}; {hint}.") from None
    by_path = {(root / "images" / images[i][0]).resolve(): parts for i, parts in locations.items()}
    return [names[i][0] for i in part_ids], by_path


def parts_in_test_images(data_dir, dataset, indices: Sequence[int], image_size: int,
                        crop: bool = False) -> Tuple[List[str], torch.Tensor]:
    """Parts of ``dataset`` items ``indices`` where they land in the test tensors: (N, K, 3) x, y, visible.

    ``dataset`` is the run's ``test`` (a ``FileImageDataset`` of cub200 images); a part counts as
    visible only if annotated visible and inside the transformed image.
    """
    names, by_path = read_part_locations(data_dir)
    out = torch.zeros(len(indices), len(names), 3, dtype=torch.float64)
    for row, index in enumerate(indices):
        path = Path(dataset.paths[int(index)]).resolve()
        if path not in by_path:
            raise ProtoKNNError(f"cub200: {path} has no part annotations in parts/part_locs.txt; re-extract the archive.")
        parts = by_path[path]
        with Image.open(path) as img:  # reads the header only
            size = img.size
        moved = natural_test_points(parts[:, :2], size, image_size, cropped=crop,
                                    box=dataset.box(int(index)) if crop else None)
        moved[:, 2] *= parts[:, 2]
        out[row] = moved
    return names, out
