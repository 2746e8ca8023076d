"""``imagefolder``: any folder of images with one sub-folder per class.

Two layouts:
- ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` (``val/`` is accepted for
  ``test/``): the given split; every test class must also exist in train.
- ``data_dir/<class>/*``: split 80/20 per class with ``SPLIT_SEED`` (``base.stratified_split``).

Classes are the sub-folder names, sorted; hidden entries (".name") are ignored, and so
are files whose suffix is not an image suffix (README, .txt, ...).

Start-up lists files and labels and decodes nothing: each file's header is parsed and,
for JPEG and PNG, its last kilobyte must hold the end marker that a truncated file lacks
(``base.quick_image_problem``; other formats and suspicious files get a full decode check).
Images are decoded in ``__getitem__``. By default unreadable files are left out,
listed in ``DatasetSplits.skipped`` and reported in one ``DatasetWarning``;
``strict=True`` raises ``ProtoKNNError`` naming the first one instead.
Grey, palette and RGBA images are converted to RGB (transparency onto white).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import ProtoKNNError
from .base import (IMAGE_SUFFIXES, SPLIT_SEED, DatasetNotFoundError, FileImageDataset, quick_image_problem,
                   make_splits, register_dataset, stratified_split, warn_skipped)
from .transforms import IMAGENET_MEAN, IMAGENET_STD, natural_test_transform, natural_train_transform

DEFAULT_IMAGE_SIZE = 224


def _visible_dirs(folder: Path) -> List[Path]:
    return sorted(p for p in _listing(folder) if not p.name.startswith(".") and p.is_dir())


def _listing(folder: Path) -> List[Path]:
    try:
        return list(folder.iterdir())
    except OSError as err:
        raise ProtoKNNError(f"imagefolder: cannot list {folder} ({err.strerror or err}); make it readable or "
                            "remove it.") from None


def _image_files(folder: Path, unreadable: List[str]) -> List[Path]:
    """The image files of ``folder``, sorted; entries that cannot be inspected (a symlink loop, a
    dangling link, no permission) are appended to ``unreadable``."""
    names = []
    # os.scandir knows file types from the directory listing: no stat per image.
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or os.path.splitext(entry.name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            try:
                is_file = entry.is_file()
                if is_file and entry.is_symlink():
                    os.stat(entry.path)  # a link's target must be readable too
            except OSError:
                unreadable.append(str(folder / entry.name))
                continue
            if is_file:
                names.append(entry.name)
            elif entry.is_symlink():  # dangling: it names an image that is not there
                unreadable.append(str(folder / entry.name))
    return [folder / name for name in sorted(names)]


def scan_class_folders(root: Path, unreadable: Optional[List[str]] = None) -> Dict[str, List[Path]]:
    """Class name -> its image files, for a folder holding one sub-folder per class; entries that
    cannot be read go to ``unreadable`` (a list the caller reports) instead of stopping the walk."""
    unreadable = [] if unreadable is None else unreadable
    class_dirs = _visible_dirs(root)
    if not class_dirs:
        raise ProtoKNNError(f"imagefolder: {root} has no class sub-folders; put each class's images "
                            "in its own sub-folder (root/<class>/<image>).")
    files = {}
    for folder in class_dirs:
        try:
            files[folder.name] = _image_files(folder, unreadable)
        except OSError as err:
            raise ProtoKNNError(f"imagefolder: cannot list class folder {folder} ({err.strerror or err}); make it "
                                "readable or remove it.") from None
    empty = [name for name, paths in files.items() if not paths]
    if empty:
        raise ProtoKNNError(f"imagefolder: class folder {root / empty[0]} has no images "
                            f"({len(empty)} empty class folder(s)); add images or remove the folder.")
    return files


def _check_images(paths: Sequence[Path], strict: bool) -> Tuple[List[Path], List[str]]:
    """(readable paths, unreadable paths); strict mode raises on the first unreadable one."""
    good, bad = [], []
    for path in paths:
        problem = quick_image_problem(path)
        if problem is None:
            good.append(path)
        elif strict:
            raise ProtoKNNError(f"imagefolder: cannot read image {path} ({problem}); fix or delete it, "
                                "or run without strict to skip unreadable images.")
        else:
            bad.append(str(path))
    return good, bad


def _flatten(files: Dict[str, List[Path]], classes: Sequence[str]) -> Tuple[List[Path], List[int]]:
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for name in classes:
        for p in files.get(name, []):
            paths.append(p)
            labels.append(index[name])
    return paths, labels


def _find_test_folder(root: Path):
    for name in ("test", "val"):
        if (root / name).is_dir():
            return root / name
    return None


def build_file_lists(root: Path, strict: bool):
    """((train_paths, train_labels), (test_paths, test_labels), classes, skipped)."""
    test_root = _find_test_folder(root)
    unlisted: List[str] = []  # entries of the walk that could not be inspected: skipped like bad images
    has_train = (root / "train").is_dir()
    if has_train != (test_root is not None):
        present = "train/" if has_train else f"{test_root.name}/"
        raise ProtoKNNError(f"imagefolder: {root} has {present} but not its partner (train/ and test/); "
                            "add the missing split or use a flat folder of class sub-folders.")
    if has_train:
        train_files, test_files = scan_class_folders(root / "train", unlisted), scan_class_folders(test_root, unlisted)
        unknown = sorted(set(test_files) - set(train_files))
        if unknown:
            raise ProtoKNNError(f"imagefolder: class folder {test_root / unknown[0]} has no partner in "
                                f"{root / 'train'}; every test class needs training images.")
        classes = sorted(train_files)
        train_paths, train_labels = _flatten(train_files, classes)
        test_paths, test_labels = _flatten(test_files, classes)
    else:
        files = scan_class_folders(root, unlisted)
        classes = sorted(files)
        all_paths, all_labels = _flatten(files, classes)
        train_paths, train_labels, test_paths, test_labels = all_paths, all_labels, [], []
    if unlisted and strict:
        raise ProtoKNNError(f"imagefolder: cannot read {unlisted[0]} (a broken or looping link, or no permission); "
                            "fix or delete it, or run without strict to skip unreadable entries.")
    checked = {}
    skipped: List[str] = list(unlisted)
    for paths, labels, key in ((train_paths, train_labels, "train"), (test_paths, test_labels, "test")):
        good, bad = _check_images(paths, strict)
        skipped += bad
        keep = set(good)
        checked[key] = ([p for p in paths if p in keep], [y for p, y in zip(paths, labels) if p in keep])
    if not has_train:
        paths, labels = checked["train"]
        present = set(labels)
        lost = [c for i, c in enumerate(classes) if i not in present]
        if lost:
            raise ProtoKNNError(f"imagefolder: class folder {root / lost[0]} has no readable images; "
                                "add images or remove the folder.")
        train_idx, test_idx = stratified_split(labels, 0.2, SPLIT_SEED)
        checked["train"] = ([paths[i] for i in train_idx], [labels[i] for i in train_idx])
        checked["test"] = ([paths[i] for i in test_idx], [labels[i] for i in test_idx])
    for key in ("train", "test"):
        if not checked[key][0]:
            raise ProtoKNNError(f"imagefolder: no readable {key} images under {root}; add images.")
    return checked["train"], checked["test"], classes, skipped


@register_dataset("imagefolder")
def imagefolder(data_dir=None, *, augment: bool = True, image_size=None, strict: bool = False,
                crop: bool = False):
    """RGB images from ``data_dir`` (see the module docstring for the layouts)."""
    if data_dir is None:
        raise ProtoKNNError("imagefolder needs a folder: pass --data-dir FOLDER (one sub-folder per class, "
                            "or train/ and test/ each holding class sub-folders).")
    if crop:
        raise ProtoKNNError("imagefolder has no bounding boxes; run without crop "
                            "(crop your images beforehand if needed).")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"imagefolder: not found at {root}; pass --data-dir pointing to an "
                                   "existing folder of class sub-folders.", root)
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size < 16:
        raise ProtoKNNError(f"image_size {size} is too small for imagefolder; use 32 or more (224 default).")
    (train_paths, train_labels), (test_paths, test_labels), classes, skipped = build_file_lists(root, strict)
    warn_skipped(f"imagefolder {root}", skipped)
    test_tf = natural_test_transform(size, cropped=False)
    return make_splits(
        "imagefolder",
        FileImageDataset(train_paths, train_labels, test_tf, channels=3),
        FileImageDataset(test_paths, test_labels, test_tf, channels=3),
        train_transform=natural_train_transform(size, cropped=False), test_transform=test_tf,
        classes=classes, image_size=size, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        image_transform=test_tf, augment=augment, skipped=skipped)
