"""The TesNet head (Wang et al., ICCV 2021): class subspaces of basis concepts.

Each class owns ``prototypes_per_class`` basis vectors b_j (its subspace on the Grassmann
manifold). A patch z scores s_j = <z, b_j / ||b_j||>, max-pooled over patches, and a
linear last layer (+1 / -0.5) turns the scores into logits. The loss is
CE + 0.8 Clst - 0.08 Sep + 1e-4 L_orth - 1e-7 L_ss + 1e-4 L1, with Clst and Sep on the
cosine of the best patch, L_orth the entrywise L1 norm of B_c B_c^T - I within each
class and L_ss the projection metric between class subspaces (maximised).
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnknownNameError
from ..prototypes import PrototypeOutputs
from . import register_head
from .base import Phase, PrototypeSpec
from .protopnet import ProtoPNetHead

TESNET_SIMILARITIES = ("projection", "cosine")


def class_bases(prototypes: Tensor, num_classes: int) -> Tensor:
    """Unit basis vectors grouped by class: prototypes (C*m, D), class-major -> (C, m, D)."""
    return F.normalize(prototypes, dim=1).reshape(num_classes, -1, prototypes.shape[1])


def orthonormality_loss(bases: Tensor) -> Tensor:
    """L_orth = sum_c sum_kl |(B_c B_c^T - I)_kl| for bases (C, m, D): an entrywise L1 norm."""
    gram = bases @ bases.transpose(1, 2)  # (C, m, m)
    eye = torch.eye(bases.shape[1], dtype=bases.dtype, device=bases.device)
    return (gram - eye).abs().sum()


def subspace_separation_loss(bases: Tensor) -> Tensor:
    """L_ss = (1/sqrt 2) sum_{c<c'} ||B_c^T B_c - B_c'^T B_c'||_F for bases (C, m, D).

    Computed without the (D, D) projection matrices: ||P_c - P_c'||_F^2 =
    ||B_c B_c^T||_F^2 + ||B_c' B_c'^T||_F^2 - 2 ||B_c B_c'^T||_F^2, since
    tr(B_c^T B_c B_c'^T B_c') = ||B_c B_c'^T||_F^2.
    """
    cross = torch.einsum("cmd,knd->ckmn", bases, bases).pow(2).sum(dim=(2, 3))  # (C, C)
    own = cross.diagonal()
    squared = own[:, None] + own[None, :] - 2.0 * cross
    upper = torch.triu_indices(len(own), len(own), offset=1, device=bases.device)
    # clamp: rounding can make a pair's squared distance a hair below 0, and sqrt(0) has no gradient.
    pairs = squared[upper[0], upper[1]].clamp_min(1e-12).sqrt()
    return pairs.sum() / math.sqrt(2.0)


@register_head("tesnet")
class TesNetHead(ProtoPNetHead):
    name = "tesnet"
    revision = 1
    description = ("TesNet: per-class subspaces of basis concepts + linear last layer "
                   "(CE + 0.8 clst - 0.08 sep + 1e-4 orth - 1e-7 subspace sep + 1e-4 L1)")

    def __init__(
        self,
        num_classes: int,
        backbone_channels: int,
        dim: int = 64,
        num_prototypes: int = 0,
        prototypes_per_class: int = 10,
        similarity: str = "projection",
        cluster_weight: float = 0.8,
        separation_weight: float = 0.08,
        orthonormality_weight: float = 1e-4,
        subspace_weight: float = 1e-7,
        l1_weight: float = 1e-4,
        warm_epochs: int = 5,
        last_layer_epochs: int = 20,
        joint_step: tuple = (5, 0.1),
        warm_lr: float = 3e-3,
        joint_backbone_lr: float = 1e-4,
        scratch_backbone_lr: float = 1e-3,
        last_layer_lr: float = 1e-4,
        weight_decay: float = 1e-3,
        prototype_init: str = "uniform",
    ):
        super().__init__(num_classes, backbone_channels, dim, num_prototypes, prototypes_per_class=prototypes_per_class,
                         cluster_weight=cluster_weight, separation_weight=separation_weight, l1_weight=l1_weight,
                         warm_epochs=warm_epochs, last_layer_epochs=last_layer_epochs, joint_step=joint_step,
                         warm_lr=warm_lr, joint_backbone_lr=joint_backbone_lr,
                         scratch_backbone_lr=scratch_backbone_lr, last_layer_lr=last_layer_lr,
                         weight_decay=weight_decay, prototype_init=prototype_init)
        if similarity not in TESNET_SIMILARITIES:
            raise UnknownNameError("tesnet similarity", similarity, TESNET_SIMILARITIES)
        self.similarity = similarity
        self.orthonormality_weight, self.subspace_weight = orthonormality_weight, subspace_weight

    @classmethod
    def defaults(cls) -> Dict[str, object]:
        return {
            "loss": "cross-entropy + 0.8 cluster - 0.08 separation (on the best patch's cosine) "
                    "+ 1e-4 orthonormality (|B_c B_c^T - I|, entrywise L1) - 1e-7 subspace separation "
                    "(projection metric) + 1e-4 L1 (off-class weights)",
            "prototypes": "10 unit basis vectors per class, init U[0, 1) then normalised, add-on conv-ReLU-conv-Sigmoid",
            "similarity": "projection <z, b/||b||> max-pooled (similarity=cosine: cos(z, b))",
            "phases": "warm 5 (backbone untrained; pretrained backbones only), joint (StepLR 5, 0.1), one push at "
                      "the end of the budget + 20 last-layer epochs",
            "lrs": "add-on + prototypes 3e-3, joint backbone 1e-4 (pretrained) or 1e-3 (from scratch), "
                   "last layer 1e-4; weight decay 1e-3 on backbone and add-on",
            "predict": "argmax of the linear last layer",
        }

    def prototype_spec(self) -> PrototypeSpec:
        return PrototypeSpec(self.requested_prototypes, similarity=self.similarity, addon="protopnet",
                             init=self.prototype_init, frozen_prototypes=False)

    def subspace_terms(self, prototypes: Tensor) -> Dict[str, Tensor]:
        """The two Grassmann terms of the basis vectors (P, D)."""
        bases = class_bases(prototypes, self.num_classes)
        return {"orthonormality": orthonormality_loss(bases), "subspace_separation": subspace_separation_loss(bases)}

    def loss(self, out: PrototypeOutputs, labels: Tensor) -> Dict[str, Tensor]:
        logits = self.last_layer(out.profile)
        # Both similarity modes give the unit-sphere cost 2 - 2 cos of the best patch.
        best_cosine = 1.0 - 0.5 * out.cost  # (B, P)
        own = self.prototype_class[None, :] == labels[:, None]  # (B, P)
        cluster = -best_cosine.masked_fill(~own, -2.0).max(dim=1).values.mean()
        separation = -best_cosine.masked_fill(own, -2.0).max(dim=1).values.mean()
        terms = {"ce": F.cross_entropy(logits, labels), "cluster": cluster, "separation": separation,
                 **self.subspace_terms(out.prototypes), "l1": self._l1()}
        terms["total"] = (terms["ce"] + self.cluster_weight * cluster - self.separation_weight * separation
                          + self.orthonormality_weight * terms["orthonormality"]
                          - self.subspace_weight * terms["subspace_separation"] + self.l1_weight * terms["l1"])
        return terms

    def phases(self, epochs: int, pretrained_backbone: bool, frozen_backbone: bool = False) -> List[Phase]:
        """Warm, then joint up to one push at the end of the budget, then the last layer.

        The reference code pushes once (epoch 10), tunes the last layer and reports that
        model; its joint epochs after the push never reach the reported model, so here
        every feature-training epoch comes before the one push. A frozen backbone needs no
        warm-up (nothing to protect), as for ProtoPNet.
        """
        protects = pretrained_backbone and not frozen_backbone
        warm = min(self.warm_epochs, max(1, epochs // 4)) if protects and epochs > 1 else 0
        backbone_lr = self.joint_backbone_lr if pretrained_backbone else self.scratch_backbone_lr
        decay = {"backbone": self.weight_decay, "addon": self.weight_decay}
        phases: List[Phase] = []
        if warm:
            phases.append(Phase("warm", warm, {"addon": self.warm_lr, "prototypes": self.warm_lr},
                                weight_decay={"addon": self.weight_decay}))
        joint_lrs = {"backbone": backbone_lr, "addon": self.warm_lr, "prototypes": self.warm_lr}
        phases.append(Phase("joint", epochs - warm, joint_lrs, after=("project",), step_lr=self.joint_step,
                            weight_decay=decay))
        phases.append(Phase("last-layer", self.last_layer_epochs, {"last_layer": self.last_layer_lr},
                            cached_profiles=True))
        return phases
