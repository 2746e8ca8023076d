"""Shared pieces of every dataset: the registry, ``DatasetSplits``, the two dataset
classes (images held in memory, images read from files), stratified splitting and
image loading.

Every dataset item is ``(image: float Tensor (C, H, W), label: int)``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import ProtoKNNError, check
from ..registry import Registry

DATASETS: Registry = Registry("dataset", entry_point_group="protoknn_plugin.datasets")
"""Name -> loader ``fn(data_dir=None, *, augment, image_size, strict, crop) -> DatasetSplits``."""

register_dataset = DATASETS.register

SPLIT_SEED = 0
"""Seed of every 80/20 stratified split made here (animals, flat image folders) and of ``limit``."""

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

# PIL raises a zoo of exception types for unreadable files; all mean "bad image".
_IMAGE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError,
                 Image.DecompressionBombError)

PathLike = Union[str, Path]


class DatasetNotFoundError(ProtoKNNError):
    """The dataset's files are not where we looked; ``path`` is that place."""

    def __init__(self, message: str, path: PathLike):
        super().__init__(message)
        self.path = Path(path)


class DatasetWarning(UserWarning):
    """Something was skipped while building a dataset (e.g. corrupt images)."""


# --------------------------------------------------------------------------- images

def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite transparent images onto white so transparent pixels do not turn black."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img


def convert_channels(img: Image.Image, channels: int) -> Image.Image:
    """PIL image in any mode -> mode "L" (channels=1) or "RGB" (channels=3)."""
    check(channels in (1, 3), f"channels must be 1 or 3, got {channels}; fix the dataset definition.")
    img = _flatten_alpha(img)
    if img.mode.startswith("I") or img.mode == "F":
        # 16-bit or float greys: PIL's convert("L") clips them, so rescale to 0..255 first.
        values = np.asarray(img, dtype=np.float32)
        top = float(values.max()) if values.size else 0.0
        if top > 255.0:
            values = values * (255.0 / top)
        img = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    return img.convert("L" if channels == 1 else "RGB")


def open_image(path: PathLike, channels: int = 3) -> Image.Image:
    """Read an image file fully (so truncation is detected now) as mode "L" or "RGB".

    Missing, unreadable, corrupt or truncated files raise ``ProtoKNNError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ProtoKNNError(f"image file not found: {path}; check the path.")
    try:
        with Image.open(path) as img:
            img.load()
            return convert_channels(img, channels)
    except _IMAGE_ERRORS as exc:
        raise ProtoKNNError(
            f"cannot read image {path}: {exc}; replace or delete the file.") from exc


def load_image(path: PathLike, channels: int = 3,
               transform: Optional[Callable[[Image.Image], torch.Tensor]] = None):
    """Read any image file as ``channels`` (1 or 3) channels.

    Returns the PIL image, or ``transform(image)`` (usually a Tensor (C, H, W)) when a
    transform is given. ``DatasetSplits.load_image`` passes the dataset's test transform.
    """
    img = open_image(path, channels)
    return transform(img) if transform is not None else img


def image_problem(path: PathLike) -> Optional[str]:
    """Why ``path`` is not a readable image, or None when it is.

    ``verify()`` checks headers and PNG checksums; the decode that follows catches
    truncated JPEGs, which ``verify()`` lets through. JPEGs decode in draft mode (1/8
    scale), which still reads every byte but is several times faster.
    """
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except _IMAGE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# (magic bytes at the start, end marker that must appear in the last kilobyte)
_MARKERS = ((b"\xff\xd8\xff", b"\xff\xd9"), (b"\x89PNG\r\n\x1a\n", b"IEND"))
_TAIL_BYTES = 1024


def quick_image_problem(path: PathLike) -> Optional[str]:
    """Like ``image_problem`` but cheap for intact JPEG and PNG files: no decode, no parse.

    A JPEG or PNG passes when it starts with its magic bytes and its last kilobyte holds
    the format's end marker (JPEG EOI, PNG IEND), which a truncated file lacks. Any other
    file, or one that fails the test, gets the full check (``image_problem``), so an intact
    file with trailing data is still accepted. Costs one open and two small reads.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - _TAIL_BYTES))
            tail = handle.read()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    for magic, end in _MARKERS:
        if head.startswith(magic) and end in tail:
            return None
    return image_problem(path)


# --------------------------------------------------------------------------- splits

def _class_permutations(labels: torch.Tensor, seed: int) -> List[torch.Tensor]:
    """For each class present (ascending), its sample indices in a seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    result = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        result.append(members[torch.randperm(len(members), generator=generator)])
    return result


def stratified_split(labels: Sequence[int], test_fraction: float = 0.2,
                     seed: int = SPLIT_SEED) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split indices so each class keeps ``test_fraction`` of its samples for testing.

    Returns (train_indices, test_indices), each sorted ascending so the original order is
    kept. A class with at least 2 samples always has at least one in each split.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    check(0.0 < test_fraction < 1.0, f"test_fraction must be in (0, 1), got {test_fraction}.")
    train, test = [], []
    for members in _class_permutations(labels, seed):
        n = len(members)
        n_test = round(n * test_fraction)
        if n >= 2:
            n_test = min(max(n_test, 1), n - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values


def stratified_pick(labels: Sequence[int], limit: int, seed: int = SPLIT_SEED) -> torch.Tensor:
    """Indices of ``limit`` samples with classes as balanced as the data allow.

    Classes take turns (round-robin over seeded per-class orders), so per-class counts
    differ by at most one unless a class runs out. Returned sorted ascending.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if limit >= len(labels):
        return torch.arange(len(labels))
    per_class = _class_permutations(labels, seed)
    longest = max(len(m) for m in per_class)
    # Column r holds the r-th pick of every class; reading row-major by rank interleaves them.
    order = [m[r] for r in range(longest) for m in per_class if r < len(m)]
    return torch.sort(torch.stack(order[:limit])).values


# --------------------------------------------------------------------------- datasets

class TensorImageDataset(Dataset):
    """Grey images kept in memory as one uint8 tensor (N, H, W).

    ``transform`` maps a uint8 Tensor (1, H, W) to a float Tensor (1, S, S).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor]):
        check(images.dtype == torch.uint8 and images.dim() == 3,
              f"images must be a uint8 tensor (N, H, W), got {images.dtype} {tuple(images.shape)}.")
        check(len(images) == len(labels), f"{len(images)} images but {len(labels)} labels.")
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.transform(self.images[index].unsqueeze(0)), int(self.labels[index])

    def raw_image(self, index: int) -> Image.Image:
        """The stored image as a PIL "L" image, before any transform."""
        return Image.fromarray(self.images[index].numpy())

    def subset(self, indices: torch.Tensor) -> "TensorImageDataset":
        return TensorImageDataset(self.images[indices], self.labels[indices], self.transform)

    def with_transform(self, transform) -> "TensorImageDataset":
        """The same samples in the same order with another transform."""
        return TensorImageDataset(self.images, self.labels, transform)


Box = Tuple[float, float, float, float]
"""(left, upper, right, lower) in pixels, as for ``PIL.Image.crop``."""


class FileImageDataset(Dataset):
    """Images read from files on each access, optionally cropped to a box first.

    ``boxes[i]`` is a box or a zero-argument callable returning one (so annotation files
    are read only when needed); ``transform`` maps the (cropped) PIL image to a Tensor (C, S, S).
    """

    def __init__(self, paths: Sequence[PathLike], labels: Sequence[int], transform,
                 channels: int = 3, boxes: Optional[Sequence] = None):
        check(len(paths) == len(labels), f"{len(paths)} image paths but {len(labels)} labels.")
        check(boxes is None or len(boxes) == len(paths), "need one box per image when cropping.")
        self.paths = [p if isinstance(p, Path) else Path(p) for p in paths]  # 20,000 Path() calls cost seconds
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.transform = transform
        self.channels = channels
        self.boxes = list(boxes) if boxes is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def box(self, index: int) -> Optional[Box]:
        if self.boxes is None:
            return None
        box = self.boxes[index]
        return box() if callable(box) else box

    def raw_image(self, index: int) -> Image.Image:
        """The image as read (mode "L" or "RGB"), cropped to its box in crop mode."""
        img = open_image(self.paths[index], self.channels)
        box = self.box(index)
        if box is not None:
            img = crop_to_box(img, box, self.paths[index])
        return img

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.transform(self.raw_image(index)), int(self.labels[index])

    def subset(self, indices: torch.Tensor) -> "FileImageDataset":
        idx = [int(i) for i in indices]
        boxes = [self.boxes[i] for i in idx] if self.boxes is not None else None
        return FileImageDataset([self.paths[i] for i in idx], self.labels[idx].tolist(),
                                self.transform, self.channels, boxes)

    def with_transform(self, transform) -> "FileImageDataset":
        """The same samples in the same order with another transform."""
        return FileImageDataset(self.paths, self.labels.tolist(), transform, self.channels, self.boxes)


def crop_to_box(img: Image.Image, box: Box, path: PathLike = "") -> Image.Image:
    """Crop to ``box`` rounded to whole pixels and clipped to the image."""
    left, upper, right, lower = (int(round(v)) for v in box)
    left, upper = max(left, 0), max(upper, 0)
    right, lower = min(right, img.width), min(lower, img.height)
    if right <= left or lower <= upper:
        raise ProtoKNNError(f"bounding box {tuple(box)} of {path} is empty inside the "
                            f"{img.width}x{img.height} image; fix the annotation or run without crop.")
    return img.crop((left, upper, right, lower))


# --------------------------------------------------------------------------- splits bundle

@dataclass
class DatasetSplits:
    """A dataset's train/test splits and what is needed to show its images.

    ``train`` carries the training augmentation; ``train_plain`` holds the same samples in
    the same order with the test transform (prototype projection, kNN memory).
    """

    name: str
    train: Dataset
    train_plain: Dataset
    test: Dataset
    classes: List[str]
    image_size: int
    channels: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    image_transform: Optional[Callable[[Image.Image], torch.Tensor]] = None
    """PIL image ("L"/"RGB") -> normalised Tensor (C, S, S); used by ``load_image``."""
    cropped: bool = False
    skipped: List[str] = field(default_factory=list)
    """Image files left out because they could not be read (see ``imagefolder``)."""
    val: Optional[Dataset] = None
    """A validation split carved from the training set (test transform), or None."""
    val_labels: Optional[torch.Tensor] = None
    val_fraction: float = 0.0
    """The share of each training class held out as ``val`` (0: none)."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation: Tensor (C, H, W) or (B, C, H, W) -> values in [0, 1]."""
        check(isinstance(x, torch.Tensor) and x.dim() in (3, 4),
              f"denormalize expects a tensor (C, H, W) or (B, C, H, W), got "
              f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.")
        check(x.shape[-3] == self.channels,
              f"denormalize: {self.name} images have {self.channels} channel(s), got {x.shape[-3]}.")
        shape = (self.channels, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x * std + mean).clamp(0.0, 1.0)

    def load_image(self, path: PathLike) -> torch.Tensor:
        """Read any image file as this dataset's test input: Tensor (C, S, S)."""
        check(self.image_transform is not None,
              f"dataset {self.name} has no image transform; its loader must set image_transform.")
        return load_image(path, self.channels, self.image_transform)


def make_splits(name: str, train: Dataset, test: Dataset, *, train_transform, test_transform,
                classes: Sequence[str], image_size: int, channels: int, mean, std,
                image_transform, augment: bool = True, cropped: bool = False,
                skipped: Sequence[str] = ()) -> DatasetSplits:
    """Bundle base datasets (built with ``test_transform``) into ``DatasetSplits``.

    ``train``/``test`` must offer ``with_transform`` and ``labels``.
    """
    return DatasetSplits(
        name=name,
        train=train.with_transform(train_transform if augment else test_transform),
        train_plain=train.with_transform(test_transform),
        test=test.with_transform(test_transform),
        classes=list(classes), image_size=int(image_size), channels=int(channels),
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        train_labels=train.labels.clone(), test_labels=test.labels.clone(),
        image_transform=image_transform, cropped=cropped, skipped=list(skipped),
    )


def limit_splits(splits: DatasetSplits, limit: int) -> DatasetSplits:
    """Keep ``limit`` samples per split, picked stratified (classes balanced)."""
    check(isinstance(limit, int) and not isinstance(limit, bool) and limit > 0,
          f"limit must be a positive integer, got {limit!r}.")
    train_idx = stratified_pick(splits.train_labels, limit)
    test_idx = stratified_pick(splits.test_labels, limit)
    for part in ("train", "train_plain", "test"):
        check(hasattr(getattr(splits, part), "subset"),
              f"dataset {splits.name} does not support limit (its {part} has no subset method).")
    splits.train = splits.train.subset(train_idx)
    splits.train_plain = splits.train_plain.subset(train_idx)
    splits.test = splits.test.subset(test_idx)
    splits.train_labels = splits.train_labels[train_idx]
    splits.test_labels = splits.test_labels[test_idx]
    return splits


def carve_validation(splits: DatasetSplits, fraction: float, seed: int = SPLIT_SEED) -> DatasetSplits:
    """Hold out ``fraction`` of each class of the training set as ``splits.val``.

    Stratified and seeded; the rest stays ``train``/``train_plain``. The validation images
    use the test transform. Returns a new ``DatasetSplits``; the test split is untouched, so
    choices made on validation accuracy never look at it.
    """
    check(0.0 < fraction < 1.0, f"--val-fraction must be in (0, 1), got {fraction}; e.g. 0.1.")
    for part in ("train", "train_plain"):
        check(hasattr(getattr(splits, part), "subset"),
              f"dataset {splits.name} cannot hold out a validation split (its {part} has no subset method).")
    keep, held = stratified_split(splits.train_labels, fraction, seed)
    check(len(held) > 0 and len(keep) > 0,
          f"--val-fraction {fraction} leaves no validation or no training images in {splits.name}; change it.")
    return replace(splits, train=splits.train.subset(keep), train_plain=splits.train_plain.subset(keep),
                   train_labels=splits.train_labels[keep], val=splits.train_plain.subset(held),
                   val_labels=splits.train_labels[held], val_fraction=fraction)


def warn_skipped(name: str, skipped: Sequence[str]) -> None:
    """One warning for all unreadable files, naming the first few."""
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(f"{name}: skipped {len(skipped)} unreadable image(s): {shown}{more} "
                      f"(listed in DatasetSplits.skipped; strict=True makes this an error).",
                      DatasetWarning, stacklevel=3)
