"""Consistency (Huang et al. 2023): does a prototype cover the same object part across images?

For prototype i and every test image of its class, the annotated parts inside the
prototype's activation box (95th percentile, ``explain.activation_box``) form a binary
vector; averaged over those images it gives, per part, how often the box covers it. The
prototype is consistent when some part is covered in at least ``threshold`` (0.8) of them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import ProtoKNNError
from ..explain import activation_box


def covered_parts(box, parts: Tensor) -> Tensor:
    """Which visible parts (K, 3: x, y, visible) lie inside ``box`` (x0, y0, x1, y1): (K,) bool."""
    x0, y0, x1, y1 = box
    x, y, visible = parts[:, 0], parts[:, 1], parts[:, 2] > 0
    return visible & (x >= x0) & (x < x1) & (y >= y0) & (y < y1)


def part_frequencies(maps: Tensor, parts: Tensor, labels: Tensor, prototype_class: Tensor,
                     image_size) -> Tensor:
    """Per prototype and part, the share of its class's images whose box covers that part: (P, K).

    maps (N, P, h, w), parts (N, K, 3) in image pixels, labels (N,), prototype_class (P,).
    Rows of prototypes without an image of their class are NaN.
    """
    num_prototypes, num_parts = maps.shape[1], parts.shape[1]
    out = torch.full((num_prototypes, num_parts), float("nan"), dtype=torch.float64)
    for i in range(num_prototypes):
        rows = torch.nonzero(labels == prototype_class[i]).flatten().tolist()
        if rows:
            hits = torch.stack([covered_parts(activation_box(maps[n, i], image_size), parts[n]) for n in rows])
            out[i] = hits.double().mean(0)
    return out


def consistency(frequencies: Tensor, threshold: float = 0.8) -> Optional[float]:
    """Share of measured prototypes (rows without NaN) whose best part reaches ``threshold``; None if none."""
    measured = ~torch.isnan(frequencies).any(1)
    if not bool(measured.any()):
        return None
    return float((frequencies[measured].max(1).values >= threshold - 1e-12).double().mean())


def prototype_classes(model, train_labels: Tensor) -> Tensor:
    """Each prototype's class: ProtoPNet's own, else the class of the image it was projected onto. (P,)."""
    own = getattr(model.head, "prototype_class", None)
    if own is not None:
        return own.detach().cpu().long()
    if model.projection is None:
        raise ProtoKNNError("the prototypes were never projected, so they have no class for consistency; "
                            "finish training (`protoknn train ... --resume`)")
    return train_labels[model.projection.image_index.long()].long()
