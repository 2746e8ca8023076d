"""Prototype purity: how class-specific are a prototype's nearest training patches?"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..explain import model_device


@dataclass
class NearestPatches:
    """Per prototype, its ``k`` most similar training images (one patch each, the most similar one).

    similarity (P, k), image_index (P, k) into ``train_plain``, location (P, k) flat
    feature-map cell, labels (P, k) classes of those images; best first.
    """

    similarity: Tensor
    image_index: Tensor
    location: Tensor
    labels: Tensor


@torch.no_grad()
def nearest_patches(model, train_dataset, k: int = 10, batch: int = 256) -> NearestPatches:
    """One eval-mode pass over ``train_dataset``, keeping each prototype's top-k images by s_i."""
    was = model.training
    model.eval()
    device = model_device(model)
    best_sim = best_idx = best_loc = None
    labels = []
    try:
        loader = torch.utils.data.DataLoader(train_dataset, batch_size=batch, shuffle=False)
        seen = 0
        for images, y in loader:
            out = model(images.to(device))
            sim, loc = out.profile.t().cpu(), out.locations.t().cpu()  # (P, B)
            idx = torch.arange(seen, seen + len(y)).expand_as(sim)
            seen += len(y)
            labels.append(torch.as_tensor(y))
            if best_sim is not None:
                sim, idx, loc = (torch.cat([a, b], 1) for a, b in ((best_sim, sim), (best_idx, idx), (best_loc, loc)))
            top = torch.topk(sim, min(k, sim.shape[1]), dim=1).indices
            best_sim, best_idx, best_loc = sim.gather(1, top), idx.gather(1, top), loc.gather(1, top)
    finally:
        model.train(was)
    all_labels = torch.cat(labels)
    return NearestPatches(best_sim, best_idx, best_loc, all_labels[best_idx])


def purity(labels: Tensor) -> Tensor:
    """Per prototype, the share of its nearest patches' labels (P, k) held by the most common class: (P,)."""
    counts = torch.nn.functional.one_hot(labels, int(labels.max()) + 1).sum(1)
    return counts.max(1).values.double() / labels.shape[1]
