"""Stability under noise (after Huang et al. 2023): does a prototype's most activated patch stay put?"""
from __future__ import annotations

import torch
from torch import Tensor

from ..explain import model_device


@torch.no_grad()
def _locations(model, images: Tensor, batch: int = 64) -> Tensor:
    """Flat index of the most similar patch per image and prototype: (N, P)."""
    was = model.training
    model.eval()
    try:
        device = model_device(model)
        return torch.cat([model(images[s:s + batch].to(device)).locations.cpu()
                          for s in range(0, len(images), batch)])
    finally:
        model.train(was)


def stability(model, images: Tensor, sigma: float = 0.2, seed: int = 0) -> float:
    """Share of (image, prototype) pairs whose most activated feature-map cell is the same on the
    image (N, C, H, W) and on the image plus Gaussian noise of std ``sigma`` (normalised units).

    The noise is drawn from a generator seeded with ``seed``; sigma 0 gives exactly 1.
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype) * float(sigma)
    clean = _locations(model, images)
    noisy = _locations(model, images + noise)
    return float((clean == noisy).double().mean())
