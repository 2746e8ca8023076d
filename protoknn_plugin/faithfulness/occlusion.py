"""Occluding image regions for deletion tests: fill boxes, and random boxes of the same sizes.

Boxes are ``explain.Box`` (x0, y0, x1, y1), pixels, end exclusive.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from ..explain import Box


def mean_fill(channels: int) -> Tensor:
    """The dataset mean in normalised units, (C,): images are normalised by that mean, so it is 0."""
    return torch.zeros(channels)


def occlude(image: Tensor, boxes: Sequence[Box], fill: Tensor) -> Tensor:
    """A copy of ``image`` (C, H, W) with every box set to ``fill`` (C,)."""
    out = image.clone()
    for x0, y0, x1, y1 in boxes:
        out[:, y0:y1, x0:x1] = fill.to(out.dtype)[:, None, None]
    return out


def random_boxes_like(boxes: Sequence[Box], image_size: Tuple[int, int], generator: torch.Generator) -> List[Box]:
    """One box of the same width and height per box in ``boxes``, placed uniformly in an image (h, w)."""
    h, w = image_size
    out = []
    for x0, y0, x1, y1 in boxes:
        bw, bh = x1 - x0, y1 - y0
        left = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
        out.append((left, top, left + bw, top + bh))
    return out


def covered_fraction(boxes: Sequence[Box], image_size: Tuple[int, int]) -> float:
    """Share of the image's pixels inside the union of ``boxes``."""
    h, w = image_size
    mask = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return float(mask.float().mean())
