"""Counterfactual deletion: occlude the regions an explanation names and measure the change.

For every anchor and every m: occlude the activation boxes (95th percentile, as in
``explain.activation_box``) of the m prototypes with the largest evidence (c_i for
ProtoKNN, w_(c,i) * s_i for linear heads), fill them with the dataset mean, and score the
occluded image against the same reference (``scorers``). Two controls per m: the boxes of m
prototypes drawn at random, and m random boxes with the sizes of the explained ones. A
faithful explanation drops the score much more than either control.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
from torch import Tensor

from ..explain import forward_maps, activation_box
from .occlusion import covered_fraction, occlude, random_boxes_like

CONDITIONS = ("explained", "random_prototypes", "random_boxes")
CHUNK = 16  # anchors per batch of occluded images (x 3 conditions x len(ms) images)


@dataclass
class DeletionStats:
    """Per condition, per m: mean score drop, share of changed predictions, mean occluded share."""

    drop: Dict[str, Dict[int, float]] = field(default_factory=dict)
    flip: Dict[str, Dict[int, float]] = field(default_factory=dict)
    area: Dict[str, Dict[int, float]] = field(default_factory=dict)

    def ratio(self, control: str, m: int) -> float:
        """Mean drop of the explained boxes over the control's; NaN when the control's is <= 0."""
        base = self.drop[control][m]
        return self.drop["explained"][m] / base if base > 0 else float("nan")


def forward_in_chunks(model, images: Tensor, batch: int = 32):
    """Eval-mode profiles (N, P) and similarity maps (N, P, h, w), ``batch`` images at a time."""
    profiles, maps = [], []
    for start in range(0, len(images), batch):
        p, m = forward_maps(model, images[start:start + batch])
        profiles.append(p)
        maps.append(m)
    return torch.cat(profiles), torch.cat(maps)


def _variants(anchor: Tensor, maps: Tensor, evidence: Tensor, ms: Sequence[int], fill: Tensor,
              generator: torch.Generator):
    """Occluded copies of one anchor: [(condition, m, image, occluded share)]."""
    size = tuple(anchor.shape[-2:])
    num = evidence.shape[0]
    ranked = torch.argsort(evidence, descending=True, stable=True).tolist()
    out = []
    for m in ms:
        count = min(m, num)  # m larger than P occludes every prototype's box
        explained = [activation_box(maps[i], size) for i in ranked[:count]]
        drawn = torch.randperm(num, generator=generator)[:count].tolist()
        chosen = {"explained": explained,
                  "random_prototypes": [activation_box(maps[i], size) for i in drawn],
                  "random_boxes": random_boxes_like(explained, size, generator)}
        for condition in CONDITIONS:
            boxes = chosen[condition]
            out.append((condition, m, occlude(anchor, boxes, fill), covered_fraction(boxes, size)))
    return out


@torch.no_grad()
def deletion_test(model, images: Tensor, scorer, fill: Tensor, ms: Sequence[int] = (1, 3, 5),
                  seed: int = 0, maps: Tensor = None) -> DeletionStats:
    """Deletion statistics for anchors ``images`` (N, C, H, W) whose profiles built ``scorer``.

    ``maps`` (N, P, h, w): the anchors' similarity maps if already computed.
    Seeded: the random prototypes and boxes come from one generator seeded with ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    if maps is None:
        _, maps = forward_in_chunks(model, images)
    evidence = scorer.evidence()
    base = scorer.score(scorer.anchors, torch.arange(len(images)))
    sums: Dict[str, Dict[int, List[float]]] = {k: {} for k in ("drop", "flip", "area")}
    for start in range(0, len(images), CHUNK):
        rows, batch, keys, areas = [], [], [], []
        for n in range(start, min(start + CHUNK, len(images))):
            for condition, m, image, area in _variants(images[n], maps[n], evidence[n], ms, fill, generator):
                rows.append(n)
                batch.append(image)
                keys.append((condition, m))
                areas.append(area)
        rows_t = torch.tensor(rows)
        profiles, _ = forward_in_chunks(model, torch.stack(batch), batch=64)
        drops = base[rows_t] - scorer.score(profiles, rows_t)
        flips = scorer.predict(profiles) != scorer.predicted[rows_t]
        for j, key in enumerate(keys):
            for name, value in (("drop", float(drops[j])), ("flip", float(flips[j])), ("area", areas[j])):
                sums[name].setdefault(key, []).append(value)
    stats = DeletionStats()
    for name in ("drop", "flip", "area"):
        table = getattr(stats, name)
        for (condition, m), values in sums[name].items():
            table.setdefault(condition, {})[m] = sum(values) / len(values)
    return stats
