"""Image transforms, reusable by any dataset.

Natural images follow the paper (appendix, after ProtoTree): RandomPerspective,
ColorJitter, RandomHorizontalFlip and RandomAffine for training, plus
RandomResizedCrop(scale=(0.6, 1)) on full images or RandomCrop on bounding-box crops.
Testing: full images are resized (short side 256/224 * size) and centre-cropped;
cropped images are "simply resized" to size x size, as the paper says.

Small grey images (animals, fashion-mnist) stay uint8 Tensors (1, H, W) in memory; their
transforms take such a tensor and return a normalised float Tensor (1, S, S).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BILINEAR = T.InterpolationMode.BILINEAR


def _natural_augmentations():
    """The photometric and geometric jitter shared by full and cropped training."""
    return [
        T.RandomPerspective(distortion_scale=0.2, p=0.5),
        T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.02),
        T.RandomHorizontalFlip(),
        T.RandomAffine(degrees=10, translate=(0.05, 0.05), shear=(-2, 2), interpolation=_BILINEAR),
    ]


def _resize_side(size: int) -> int:
    """256 for 224: the margin kept before (centre or random) cropping."""
    return int(round(size * 256 / 224))


def natural_train_transform(size: int = 224, cropped: bool = False,
                            mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """PIL image -> augmented Tensor (C, size, size)."""
    if cropped:
        # The object already fills the image: keep all of it, jitter, then a small random crop.
        head = [T.Resize((_resize_side(size), _resize_side(size)), interpolation=_BILINEAR)]
        tail = [T.RandomCrop(size)]
    else:
        head = [T.RandomResizedCrop(size, scale=(0.6, 1.0), interpolation=_BILINEAR)]
        tail = []
    return T.Compose(head + _natural_augmentations() + tail + [T.ToTensor(), T.Normalize(mean, std)])


def natural_test_transform(size: int = 224, cropped: bool = False,
                           mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """PIL image -> Tensor (C, size, size) without randomness."""
    if cropped:
        head = [T.Resize((size, size), interpolation=_BILINEAR)]
    else:
        head = [T.Resize(_resize_side(size), interpolation=_BILINEAR), T.CenterCrop(size)]
    return T.Compose(head + [T.ToTensor(), T.Normalize(mean, std)])


def natural_test_points(points: torch.Tensor, original_size, size: int = 224, cropped: bool = False,
                        box=None) -> torch.Tensor:
    """Where pixels of an original image land after ``natural_test_transform``.

    points (K, 2) as x, y in the original image's pixels; original_size (width, height);
    ``box`` (left, upper, right, lower) when ``cropped`` (the box crop happens first).
    Returns (K, 3): x, y in the (size, size) tensor and 1.0 where the point is inside it,
    else 0.0. Follows torchvision: Resize(int) gives the long side int(s * long / short),
    CenterCrop offsets round((resized - size) / 2).
    """
    xy = points.to(torch.float64).reshape(-1, 2).clone()
    width, height = float(original_size[0]), float(original_size[1])
    if cropped:
        left, upper, right, lower = (int(round(v)) for v in box)
        left, upper = max(left, 0), max(upper, 0)
        right, lower = min(right, int(width)), min(lower, int(height))
        xy -= torch.tensor([left, upper], dtype=torch.float64)
        inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < right - left) & (xy[:, 1] < lower - upper)
        xy *= torch.tensor([size / (right - left), size / (lower - upper)], dtype=torch.float64)
    else:
        side = _resize_side(size)
        short, long = min(width, height), max(width, height)
        new_short, new_long = side, int(side * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        xy *= torch.tensor([new_w / width, new_h / height], dtype=torch.float64)
        xy -= torch.tensor([int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))], dtype=torch.float64)
        inside = torch.ones(len(xy), dtype=torch.bool)
    inside &= (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < size) & (xy[:, 1] < size)
    return torch.cat([xy, inside.to(torch.float64)[:, None]], dim=1)


class _ToFloat:
    """uint8 Tensor -> float Tensor in [0, 1]."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0)

    def __repr__(self) -> str:
        return "ToFloat()"


def grey_train_transform(native_size: int, size: int, mean: Sequence[float], std: Sequence[float],
                         flip: bool = True):
    """uint8 Tensor (1, H, W) -> augmented, normalised Tensor (1, size, size).

    A small affine jitter (rotation 10 deg, shift 10 %, scale 0.9-1.1) that keeps a small
    silhouette recognisable, plus an optional horizontal flip.
    """
    steps = [T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), interpolation=_BILINEAR)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    if size != native_size:
        steps.append(T.Resize((size, size), interpolation=_BILINEAR, antialias=True))
    return T.Compose(steps + [_ToFloat(), T.Normalize(mean, std)])


def grey_test_transform(native_size: int, size: int, mean: Sequence[float], std: Sequence[float]):
    """uint8 Tensor (1, H, W) -> normalised Tensor (1, size, size)."""
    steps = []
    if size != native_size:
        steps.append(T.Resize((size, size), interpolation=_BILINEAR, antialias=True))
    return T.Compose(steps + [_ToFloat(), T.Normalize(mean, std)])


def grey_file_transform(size: int, mean: Sequence[float], std: Sequence[float]):
    """PIL "L" image of any size (a user's file) -> Tensor (1, size, size) like the test images."""
    return T.Compose([T.Resize((size, size), interpolation=_BILINEAR), T.ToTensor(), T.Normalize(mean, std)])


def small_rgb_train_transform(native_size: int, size: int, mean: Sequence[float] = IMAGENET_MEAN,
                              std: Sequence[float] = IMAGENET_STD):
    """PIL RGB image of ``native_size`` px (CIFAR) -> augmented Tensor (3, size, size).

    The usual CIFAR augmentation: a random crop after padding by 1/8 of the side, and a
    horizontal flip, both at the native size; then the upsampling a pretrained backbone needs.
    """
    return T.Compose([T.RandomCrop(native_size, padding=max(1, native_size // 8), padding_mode="reflect"),
                      T.RandomHorizontalFlip(), T.Resize((size, size), interpolation=_BILINEAR),
                      T.ToTensor(), T.Normalize(mean, std)])


def small_rgb_test_transform(size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """PIL RGB image of any size -> Tensor (3, size, size), resized whole (no crop: tiny images
    have no margin to spare)."""
    return T.Compose([T.Resize((size, size), interpolation=_BILINEAR), T.ToTensor(), T.Normalize(mean, std)])
