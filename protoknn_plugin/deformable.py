"""Deformable prototypes (Donnelly et al., CVPR 2022): prototypes of several parts whose
positions move with offsets predicted from the features.

A prototype has K = parts x parts part vectors (each of the add-on's D channels). At every
patch (h, w), part k looks at (h + a_k + dh_k, w + b_k + dw_k): (a_k, b_k) is a grid of
``dilation`` spacing centred on the patch, (dh_k, dw_k) the offsets a 3x3 conv predicts from
the unit features. The features there are sampled bilinearly (zero outside the map), and the
similarity is the mean over the parts of cos(part, sample). At zero offset with one part it is
the plain layer's cosine similarity.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ProtoKNNError
from .prototypes import PrototypeLayer, PrototypeOutputs, initial_prototypes


def part_grid(parts: int, dilation: int) -> Tensor:
    """(K, 2) resting (row, column) shift of each part from its patch, centred: for 2 x 2 parts
    with dilation 2, (-1, -1), (-1, 1), (1, -1), (1, 1)."""
    steps = torch.arange(parts, dtype=torch.float32) * dilation - dilation * (parts - 1) / 2
    rows, cols = torch.meshgrid(steps, steps, indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1)


def sample_parts(unit: Tensor, shifts: Tensor) -> Tensor:
    """Bilinear samples of unit features (B, D, H, W) at every patch shifted by ``shifts``
    (B, K, 2, H, W) in (row, column) cells. Returns (B, K, D, H, W); outside the map counts as 0.

    A sample keeps the direction of the bilinear mix and the length sqrt(share of its weight
    inside the map), so a whole-cell sample is a unit vector.
    """
    B, D, H, W = unit.shape
    K = shifts.shape[1]
    rows = torch.arange(H, device=unit.device, dtype=unit.dtype)[:, None] + shifts[:, :, 0]  # (B, K, H, W)
    cols = torch.arange(W, device=unit.device, dtype=unit.dtype)[None, :] + shifts[:, :, 1]
    # align_corners=False: cell i spans [-1 + 2i/W, -1 + 2(i+1)/W], its centre (2i + 1)/W - 1.
    grid = torch.stack([(2 * cols + 1) / W - 1, (2 * rows + 1) / H - 1], dim=-1)  # (B, K, H, W, 2)
    grid = grid.reshape(B, K * H, W, 2)
    mixed = F.grid_sample(unit, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(torch.ones_like(unit[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    mixed = F.normalize(mixed, dim=1) * inside.clamp_min(0).sqrt()
    return mixed.reshape(B, D, K, H, W).transpose(1, 2)


class DeformablePrototypeLayer(PrototypeLayer):
    """The shared layer with prototypes (P, K * D) of K parts and a learned offset field."""

    def __init__(self, in_channels: int, num_prototypes: int, dim: int, parts: int = 2, dilation: int = 2,
                 addon: str = "linear", init: str = "uniform", frozen: bool = False, seed: int = 0):
        if parts < 1 or dilation < 1:
            raise ProtoKNNError(f"deformable prototypes need parts >= 1 and dilation >= 1, got {parts} and {dilation}")
        super().__init__(in_channels, num_prototypes, dim, similarity="cosine", addon=addon, init="random",
                         frozen=frozen, seed=seed)
        self.parts, self.dim = parts * parts, dim
        start = initial_prototypes(init, num_prototypes * self.parts, dim, seed)
        self.prototypes = nn.Parameter(start.reshape(num_prototypes, self.parts * dim), requires_grad=not frozen)
        self.register_buffer("grid", part_grid(parts, dilation), persistent=False)
        # Zero at the start (the code's construction): the parts rest on their grid until trained.
        self.offset_predictor = nn.Conv2d(dim, 2 * self.parts, kernel_size=3, padding=1)
        nn.init.zeros_(self.offset_predictor.weight)
        nn.init.zeros_(self.offset_predictor.bias)

    def component_parameters(self) -> Dict[str, List[nn.Parameter]]:
        return {**super().component_parameters(), "offsets": list(self.offset_predictor.parameters())}

    def part_vectors(self) -> Tensor:
        """(P, K, D) unit part vectors."""
        return F.normalize(self.prototypes.reshape(-1, self.parts, self.dim), dim=2)

    def offsets(self, z: Tensor) -> Tensor:
        """(B, K, 2, H, W) learned (row, column) offsets of each part at each patch of z (B, D, H, W)."""
        B, _, H, W = z.shape
        return self.offset_predictor(F.normalize(z, dim=1)).reshape(B, self.parts, 2, H, W)

    def sampled(self, z: Tensor) -> Tuple[Tensor, Tensor]:
        """(samples (B, K, D, H, W), offsets (B, K, 2, H, W)) for add-on output z (B, D, H, W)."""
        offsets = self.offsets(z)
        shifts = self.grid.to(z)[None, :, :, None, None] + offsets
        return sample_parts(F.normalize(z, dim=1), shifts), offsets

    def part_positions(self, offsets: Tensor, location: int) -> Tensor:
        """(K, 2) deformed (row, column) cell positions of the parts at patch ``location`` (flat
        h * W + w), for one image's offsets (K, 2, H, W)."""
        width = offsets.shape[-1]
        row, col = divmod(int(location), width)
        centre = torch.tensor([row, col], dtype=offsets.dtype, device=offsets.device)
        return centre + self.grid.to(offsets) + offsets[:, :, row, col]

    def patch_vectors(self, z: Tensor) -> Tensor:
        samples, _ = self.sampled(z)
        return samples.flatten(1, 2).flatten(2)  # (B, K * D, H * W)

    def patch_distances(self, z: Tensor) -> Tuple[Tensor, Tensor]:
        samples, _ = self.sampled(z)
        cos = torch.einsum("bkdn,pkd->bpn", samples.flatten(3), self.part_vectors()) / self.parts
        return cos, 2.0 - 2.0 * cos

    def forward(self, backbone_features: Tensor, maps: bool = False) -> PrototypeOutputs:
        out = super().forward(backbone_features, maps=maps)
        out.offsets = self.offsets(out.feature_map.float())
        return out
