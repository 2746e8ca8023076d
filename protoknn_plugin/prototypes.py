"""The prototype layer shared by every head.

A feature map from the backbone (B, C, H, W) goes through a 1x1-conv add-on to
(B, D, H, W); every patch (pixel) z is compared with every prototype p_i (P, D).

Similarity modes:

* ``cosine`` (ProtoKNN, eq. 15): s_{a,i} = max_z cos(z, p_i). The cost C (eq. 8)
  and the gap cost C^ (eq. 11) are squared distances on the unit sphere by default
  (``cost_space="unit"``: ||z - p||^2 = 2 - 2 cos), or on the raw add-on output
  with unit prototypes (``cost_space="raw"``).
* ``log`` (ProtoPNet): squared L2 via ||z||^2 - 2 z.p + ||p||^2 clamped at 0, and
  similarity log((d + 1) / (d + 1e-4)) of the minimum distance.
* ``projection`` (TesNet): s_i = max_z <z, p_i / ||p_i||>, the feature's projection onto
  the unit basis vector (the feature is not normalised); the cost is the unit-sphere
  distance 2 - 2 cos(z, p_i), as in ``cosine``.
* ``focal`` (ProtoPool): the ``log`` distances, and the profile g(min d) - g(mean d) with
  g(d) = log((d + 1) / (d + 1e-4)): the best patch's similarity above the image's average.
* ``exp-l2`` (ProtoTree): the same squared L2, and similarity exp(-sqrt(d + 1e-14)), the
  plain (not squared) Euclidean distance through exp(-x); its maximum over patches is the
  routing probability of a tree node.
* ``channel-softmax`` (PIP-Net): no prototype vectors; the add-on has one channel per
  prototype (D = P) and the similarity of prototype i at a patch is softmax over channels,
  z_i. The distance is 1 - similarity. Prototypes are latent: projection records each
  one's most present training patch without moving anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ProtoKNNError, UnknownNameError

SIMILARITY_MODES = ("cosine", "log", "projection", "focal", "exp-l2", "channel-softmax")
# Modes whose prototypes are not vectors compared with patches: projection moves nothing.
LATENT_MODES = ("channel-softmax",)
PROTOTYPE_INITS = ("hypersphere", "uniform", "shifted-normal", "random")
COST_SPACES = ("unit", "raw")
ADDONS = ("linear", "protopnet", "sigmoid", "conv-sigmoid")


@dataclass
class PrototypeOutputs:
    """What the prototype layer gives every head.

    profile: (B, P) similarity used for classification.
    cost: (B, P) min over patches of the squared distance (eq. 8).
    gap_cost: (B, P) min minus mean over patches of the squared distance (eq. 11).
    locations: (B, P) flat index (h * W + w) of the most similar patch.
    feature_map: (B, D, H, W) add-on output.
    backbone_features: (B, C, H, W) backbone output (the aux loss and plain heads use it).
    similarity_maps: (B, P, H, W) per-patch similarity, only when asked for.
    prototypes: (P, D) the prototype parameter itself, for losses on the prototypes
        alone (TesNet's subspace terms); the same on every rank.
    offsets: (B, K, 2, H, W) learned part offsets of a deformable layer, else None.
    """

    profile: Optional[Tensor]
    cost: Optional[Tensor]
    gap_cost: Optional[Tensor]
    locations: Optional[Tensor]
    feature_map: Optional[Tensor]
    backbone_features: Tensor
    similarity_maps: Optional[Tensor] = None
    prototypes: Optional[Tensor] = None
    offsets: Optional[Tensor] = None


def hypersphere_init(
    num_prototypes: int, dim: int, steps: int = 1000, lr: float = 0.1, momentum: float = 0.9, seed: int = 0
) -> Tensor:
    """Prototypes spread evenly on the unit hypersphere (Mettes et al. 2019). Returns (P, D).

    Minimises each prototype's largest cosine similarity to another with SGD
    (lr 0.1, momentum 0.9) and renormalises rows after every step. The result is
    deterministic in its arguments, so it is computed once per process.
    """
    # Small matrices gain nothing from threads, and on a busy machine each of the many small
    # steps waits on thread hand-offs, so it runs on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _hypersphere_init(num_prototypes, dim, steps, lr, momentum, seed).clone()
    finally:
        torch.set_num_threads(threads)


@lru_cache(maxsize=16)
def _hypersphere_init(num_prototypes: int, dim: int, steps: int, lr: float, momentum: float, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(num_prototypes, dim, generator=generator), dim=1)
    if num_prototypes < 2:
        return protos.float()
    off_diagonal = ~torch.eye(num_prototypes, dtype=torch.bool)
    velocity = torch.zeros_like(protos)
    # Plain SGD with momentum, written out: torch.optim pulls in torch._dynamo (seconds of import).
    for _ in range(steps):
        protos.requires_grad_(True)
        cos = protos @ protos.t()
        loss = cos.masked_select(off_diagonal).view(num_prototypes, -1).max(dim=1).values.mean()
        (grad,) = torch.autograd.grad(loss, protos)
        with torch.no_grad():
            velocity.mul_(momentum).add_(grad)
            protos = F.normalize(protos.detach() - lr * velocity, dim=1)
    return protos.detach()


def log_similarity(distance: Tensor) -> Tensor:
    """ProtoPNet's g(d) = log((d + 1) / (d + 1e-4)), large for a small squared distance d."""
    return torch.log((distance + 1.0) / (distance + 1e-4))


def prototype_spread(prototypes: Tensor) -> float:
    """Eq. 17: 1 - || mean_i p_i / ||p_i|| ||_2 for prototypes (P, D). 1 is evenly spread, 0 collapsed."""
    unit = F.normalize(prototypes.detach().float().reshape(prototypes.shape[0], -1), dim=1)
    return float(1.0 - unit.mean(dim=0).norm())


def initial_prototypes(init: str, num_prototypes: int, dim: int, seed: int) -> Tensor:
    """Starting prototypes (P, D) by the name of their initialisation (PROTOTYPE_INITS)."""
    if init == "hypersphere":
        return hypersphere_init(num_prototypes, dim, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    if init == "uniform":  # ProtoPNet's torch.rand initialisation
        return torch.rand(num_prototypes, dim, generator=generator)
    if init == "shifted-normal":  # N(0.5, 0.1): CaBRNet's ProtoPNet default, near the Sigmoid add-on's outputs
        return 0.5 + 0.1 * torch.randn(num_prototypes, dim, generator=generator)
    if init == "random":
        return F.normalize(torch.randn(num_prototypes, dim, generator=generator), dim=1)
    raise UnknownNameError("prototype init", init, PROTOTYPE_INITS)


def _make_addon(kind: str, in_channels: int, dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Conv2d(in_channels, dim, kernel_size=1)
    if kind == "protopnet":
        # ProtoPNet reference: 1x1 conv, ReLU, 1x1 conv, Sigmoid.
        return nn.Sequential(
            nn.Conv2d(in_channels, dim, 1), nn.ReLU(), nn.Conv2d(dim, dim, 1), nn.Sigmoid()
        )
    if kind == "sigmoid":  # ProtoPool reference: 1x1 conv, Sigmoid
        return nn.Sequential(nn.Conv2d(in_channels, dim, 1), nn.Sigmoid())
    if kind == "conv-sigmoid":
        # ProtoTree reference: 1x1 conv without bias, Sigmoid; Xavier-normal with the sigmoid gain.
        conv = nn.Conv2d(in_channels, dim, 1, bias=False)
        nn.init.xavier_normal_(conv.weight, gain=nn.init.calculate_gain("sigmoid"))
        return nn.Sequential(conv, nn.Sigmoid())
    raise UnknownNameError("add-on", kind, ADDONS)


class PrototypeLayer(nn.Module):
    """Add-on + prototypes (P, D) + similarity, shared by every head."""

    def __init__(
        self,
        in_channels: int,
        num_prototypes: int,
        dim: int,
        similarity: str = "cosine",
        addon: str = "linear",
        cost_space: str = "unit",
        init: str = "hypersphere",
        frozen: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        if similarity not in SIMILARITY_MODES:
            raise UnknownNameError("similarity mode", similarity, SIMILARITY_MODES)
        if cost_space not in COST_SPACES:
            raise UnknownNameError("cost space", cost_space, COST_SPACES)
        if num_prototypes < 1 or dim < 1:
            raise ProtoKNNError(f"need at least one prototype and dim >= 1, got P={num_prototypes}, D={dim}")
        self.similarity, self.cost_space = similarity, cost_space
        self.addon = _make_addon(addon, in_channels, dim)
        if similarity in LATENT_MODES:
            if num_prototypes != dim:
                raise ProtoKNNError(f"similarity {similarity!r} has one add-on channel per prototype, so it needs "
                                    f"P = D, got P={num_prototypes}, D={dim}")
            start, frozen = torch.eye(num_prototypes), True  # prototype i is channel i
        else:
            start = initial_prototypes(init, num_prototypes, dim, seed)
        self.prototypes = nn.Parameter(start, requires_grad=not frozen)
        self.frozen = frozen

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    def freeze(self, frozen: bool = True) -> None:
        self.frozen = frozen
        self.prototypes.requires_grad_(not frozen)

    def component_parameters(self) -> Dict[str, List[nn.Parameter]]:
        """Trainable parts by component name (heads.base.COMPONENTS)."""
        return {"addon": list(self.addon.parameters()), "prototypes": [self.prototypes]}

    def patch_vectors(self, z: Tensor) -> Tensor:
        """(B, D', H*W): what a prototype becomes when pushed onto each patch of z (B, D, H, W)."""
        return z.flatten(2)

    def patch_distances(self, z: Tensor) -> Tuple[Tensor, Tensor]:
        """(similarity, squared distance) per patch, each (B, P, H*W), for add-on output z (B, D, H, W)."""
        flat = z.flatten(2)  # (B, D, HW)
        if self.similarity == "cosine":
            unit_p = F.normalize(self.prototypes, dim=1)
            cos = torch.einsum("bdn,pd->bpn", F.normalize(flat, dim=1), unit_p)
            if self.cost_space == "unit":
                dist = 2.0 - 2.0 * cos
            else:
                dot = torch.einsum("bdn,pd->bpn", flat, unit_p)
                dist = (flat.pow(2).sum(1, keepdim=True) - 2.0 * dot + 1.0).clamp_min(0.0)
            return cos, dist
        if self.similarity == "projection":
            unit_p = F.normalize(self.prototypes, dim=1)
            projection = torch.einsum("bdn,pd->bpn", flat, unit_p)
            cos = projection / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return projection, 2.0 - 2.0 * cos
        if self.similarity == "channel-softmax":
            sim = flat.softmax(dim=1)  # (B, P, HW): P = D
            return sim, 1.0 - sim
        p = self.prototypes
        dot = torch.einsum("bdn,pd->bpn", flat, p)
        dist = (flat.pow(2).sum(1, keepdim=True) - 2.0 * dot + p.pow(2).sum(1)[None, :, None]).clamp_min(0.0)
        if self.similarity == "exp-l2":
            return torch.exp(-torch.sqrt(dist + 1e-14)), dist
        return log_similarity(dist), dist

    def forward(self, backbone_features: Tensor, maps: bool = False) -> PrototypeOutputs:
        """backbone_features (B, C, H, W) -> PrototypeOutputs (profile (B, P), ...)."""
        z = self.addon(backbone_features)
        # Float32 even under autocast: ||z||^2 - 2 z.p + ||p||^2 subtracts near-equal terms,
        # which bf16/fp16 (8/11 mantissa bits) turn into noise (see train/precision.py).
        with torch.autocast(z.device.type, enabled=False):
            sim, dist = self.patch_distances(z.float())
        min_dist, _ = dist.min(dim=2)
        profile, locations = sim.max(dim=2)
        gap_cost = min_dist - dist.mean(dim=2)
        if self.similarity == "focal":
            profile = profile - log_similarity(dist.mean(dim=2))
        sim_maps = sim.view(*sim.shape[:2], *z.shape[2:]) if maps else None
        return PrototypeOutputs(profile, min_dist, gap_cost, locations, z, backbone_features, sim_maps,
                                self.prototypes)


@dataclass
class ProjectionRecord:
    """Where each prototype came from after projection (eq. 14).

    image_index: (P,) index of the source training image.
    location: (P,) flat patch index h * W + w in the feature map.
    similarity: (P,) similarity of the prototype before projection to that patch (the search's
        score: cosine for cosine heads, minus the squared L2 distance for ProtoPNet).
    map_size: (H, W) of the feature map.
    cosine: (P,) cosine between the prototype before projection and that patch, whatever the
        similarity mode (how far projection moved it); None in records made before it was kept.
    """

    image_index: Tensor
    location: Tensor
    similarity: Tensor
    map_size: Tuple[int, int]
    cosine: Optional[Tensor] = None


def projection_summary(record: ProjectionRecord) -> dict:
    """How far a projection moved the prototypes and where they landed.

    ``cosine_mean`` / ``cosine_min``: cosine between each prototype before projection and its
    patch (1: it did not move); ``distinct_images``: source training images; ``distinct_patches``:
    distinct (image, location) pairs (below the prototype count when two share a patch).
    """
    pairs = {(int(i), int(loc)) for i, loc in zip(record.image_index.tolist(), record.location.tolist())}
    summary = {"prototypes": int(record.image_index.numel()),
               "distinct_images": len({i for i, _ in pairs}), "distinct_patches": len(pairs),
               "cosine_mean": None, "cosine_min": None}
    if record.cosine is not None:
        summary["cosine_mean"] = float(record.cosine.float().mean())
        summary["cosine_min"] = float(record.cosine.float().min())
    return summary


def allowed_images(prototype_class: Tensor, labels: Tensor) -> Tensor:
    """(B, P) bool: which prototypes may be projected onto each image of ``labels`` (B,), from
    ``prototype_class``: (P,) one class per prototype, or a boolean (C, P) of allowed classes."""
    if prototype_class.dtype == torch.bool:
        return prototype_class.to(labels.device)[labels]
    return labels[:, None] == prototype_class.to(labels.device)[None, :]


@torch.no_grad()
def project(
    layer: PrototypeLayer,
    batches: Iterable[Tuple[Tensor, Tensor, Tensor]],
    prototype_class: Optional[Tensor] = None,
) -> ProjectionRecord:
    """Move every prototype onto its most similar training patch (eq. 14).

    batches yields (backbone_features (B, C, H, W), labels (B,), dataset indices (B,)).
    With ``prototype_class`` (P,), ProtoPNet's push: prototype i only looks at
    patches of images of class prototype_class[i]. A boolean (C, P) instead says which
    classes' images each prototype may look at (ProtoPool: the classes that use it;
    ProtoTree: the classes of the leaves below a node).
    In a latent mode (``LATENT_MODES``) the prototypes stay; only their sources are recorded.
    """
    P = layer.num_prototypes
    device = layer.prototypes.device
    before = layer.prototypes.detach().clone()
    best = torch.full((P,), -float("inf"), device=device)
    best_patch = layer.prototypes.detach().clone()
    best_image = torch.full((P,), -1, dtype=torch.long, device=device)
    best_loc = torch.zeros(P, dtype=torch.long, device=device)
    map_size = (0, 0)
    for features, labels, indices in batches:
        z = layer.addon(features.to(device))
        map_size = tuple(z.shape[2:])
        sim, dist = layer.patch_distances(z)
        # Cosine mode maximises cosine, projection mode (TesNet) the projection; ProtoPNet's
        # push minimises L2 distance.
        score = -dist if layer.similarity in ("log", "focal") else sim
        if prototype_class is not None:
            score = score.masked_fill(~allowed_images(prototype_class, labels.to(device))[:, :, None], -float("inf"))
        flat = score.permute(1, 0, 2).reshape(P, -1)  # (P, B*HW)
        value, where = flat.max(dim=1)
        improved = value > best
        if improved.any():
            hw = z.shape[2] * z.shape[3]
            img, loc = where // hw, where % hw
            patches = layer.patch_vectors(z)[img, :, loc]  # (P, D)
            best = torch.where(improved, value, best)
            best_patch = torch.where(improved[:, None], patches, best_patch)
            best_image = torch.where(improved, indices.to(device)[img], best_image)
            best_loc = torch.where(improved, loc, best_loc)
    if (best_image < 0).any():
        missing = int((best_image < 0).sum())
        raise ProtoKNNError(
            f"projection found no training patch for {missing} prototype(s); "
            "every prototype class needs at least one training image"
        )
    moved = F.cosine_similarity(before.float(), best_patch.float(), dim=1)
    if layer.similarity in ("cosine", "projection"):
        best_patch = F.normalize(best_patch, dim=1)  # prototypes live on the unit sphere
    if layer.similarity in LATENT_MODES:
        moved = torch.ones_like(moved)  # nothing moves; the record only names the sources
    else:
        layer.prototypes.data.copy_(best_patch)
    return ProjectionRecord(best_image.cpu(), best_loc.cpu(), best.cpu(), map_size, moved.cpu())
