"""The Deformable ProtoPNet head (Donnelly et al., CVPR 2022).

Prototypes of 2 x 2 parts on the deformable layer (``protoknn_plugin.deformable``): a part
moves with offsets predicted from the features, and the similarity is the mean cosine of the
parts. The last layer (+1 / -0.5) stays frozen, as in the reference code. The loss is
CE on logits with a subtractive angular margin on wrong-class prototypes
- 0.8 cluster + 0.08 separation (on the margin similarities) + 0.1 part orthogonality
(+ offset L2, weight 0 like the code's, whose term has no gradient).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..prototypes import PrototypeOutputs
from . import register_head
from .base import Phase, PrototypeSpec
from .protopnet import ProtoPNetHead


def angular_margin(similarity: Tensor, margin: float) -> Tensor:
    """cos(max(arccos s - m, 0)) of cosine similarities s: the similarity the margin inflates."""
    angle = torch.arccos(similarity.clamp(-1 + 1e-6, 1 - 1e-6))
    return torch.cos((angle - margin).clamp_min(0.0))


def part_orthogonality(parts: Tensor) -> Tensor:
    """||stack_j (A_j A_j^T - I)||_F for unit part vectors A_j (P, K, D): parts of one prototype
    pushed apart, every prototype in one Frobenius norm."""
    gram = parts @ parts.transpose(1, 2)  # (P, K, K)
    eye = torch.eye(parts.shape[1], dtype=parts.dtype, device=parts.device)
    return (gram - eye).pow(2).sum().clamp_min(1e-12).sqrt()


@register_head("deformable-protopnet")
class DeformableProtoPNetHead(ProtoPNetHead):
    name = "deformable-protopnet"
    revision = 1
    description = ("Deformable ProtoPNet: prototypes of 2x2 parts with learned offsets, mean part cosine, frozen "
                   "last layer (CE with angular margin - 0.8 clst + 0.08 sep + 0.1 part orthogonality)")

    def __init__(
        self,
        num_classes: int,
        backbone_channels: int,
        dim: int = 64,
        num_prototypes: int = 0,
        prototypes_per_class: int = 6,
        parts: int = 2,
        dilation: int = 2,
        margin: float = 0.1,
        cluster_weight: float = 0.8,
        separation_weight: float = 0.08,
        orthogonality_weight: float = 0.1,
        offset_weight: float = 0.0,
        warm_epochs: int = 5,
        pre_offset_epochs: int = 5,
        joint_step: tuple = (5, 0.2),
        warm_lr: float = 3e-3,
        joint_backbone_lr: float = 1e-4,
        scratch_backbone_lr: float = 1e-3,
        offset_lr: float = 1e-4,
        weight_decay: float = 1e-3,
        prototype_init: str = "uniform",
    ):
        super().__init__(num_classes, backbone_channels, dim, num_prototypes, prototypes_per_class=prototypes_per_class,
                         cluster_weight=cluster_weight, separation_weight=separation_weight, l1_weight=0.0,
                         warm_epochs=warm_epochs, joint_step=joint_step, warm_lr=warm_lr,
                         joint_backbone_lr=joint_backbone_lr, scratch_backbone_lr=scratch_backbone_lr,
                         weight_decay=weight_decay, prototype_init=prototype_init, similarity="cosine")
        self.parts, self.dilation, self.margin = parts, dilation, margin
        self.orthogonality_weight, self.offset_weight = orthogonality_weight, offset_weight
        self.pre_offset_epochs, self.offset_lr = pre_offset_epochs, offset_lr
        self.last_layer.weight.requires_grad_(False)  # frozen for the whole run, as in the code

    @classmethod
    def defaults(cls) -> Dict[str, object]:
        return {
            "loss": "cross-entropy on logits with a subtractive angular margin 0.1 on wrong-class prototypes "
                    "- 0.8 cluster + 0.08 separation (best own / other-class margin similarity) "
                    "+ 0.1 part orthogonality (||A A^T - I||_F) + offset L2 (weight 0, as the code's no-grad term)",
            "prototypes": "6 per class, 2x2 parts of --dim channels on a dilation-2 grid, init U[0, 1); "
                          "offsets from a zero-initialised 3x3 conv on the unit features",
            "similarity": "mean over parts of cos(part, bilinear sample at the deformed position)",
            "phases": "warm 5 (prototypes + add-on) and 5 without offsets (pretrained backbones only), joint with "
                      "offsets (StepLR 5, 0.2), push at the end; last layer frozen (+1 / -0.5)",
            "lrs": "add-on + prototypes 3e-3, backbone 1e-4 (pretrained) or 1e-3 (from scratch), offsets 1e-4; "
                   "weight decay 1e-3 on backbone and add-on",
            "predict": "argmax of the last layer on the plain similarities (no margin)",
        }

    def prototype_spec(self) -> PrototypeSpec:
        return PrototypeSpec(self.requested_prototypes, similarity="cosine", addon="linear", init=self.prototype_init,
                             frozen_prototypes=False, parts=self.parts, dilation=self.dilation)

    def loss(self, out: PrototypeOutputs, labels: Tensor) -> Dict[str, Tensor]:
        own = self.prototype_class[None, :] == labels[:, None]  # (B, P)
        inflated = torch.where(own, out.profile, angular_margin(out.profile, self.margin))
        logits = self.last_layer(inflated)
        cluster = inflated.masked_fill(~own, -2.0).max(dim=1).values.mean()
        separation = inflated.masked_fill(own, -2.0).max(dim=1).values.mean()
        parts = F.normalize(out.prototypes.reshape(len(out.prototypes), self.parts * self.parts, -1), dim=2)
        offsets = out.offsets.pow(2).mean() if out.offsets is not None else out.profile.new_zeros(())
        terms = {"ce": F.cross_entropy(logits, labels), "cluster": cluster, "separation": separation,
                 "orthogonality": part_orthogonality(parts), "offset": offsets}
        terms["total"] = (terms["ce"] - self.cluster_weight * cluster + self.separation_weight * separation
                          + self.orthogonality_weight * terms["orthogonality"] + self.offset_weight * offsets)
        return terms

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {}

    @classmethod
    def search_space(cls, pretrained_backbone: bool = False) -> Dict[str, object]:
        # ProtoPNet's ranges without the last layer's rate: this head's last layer never trains.
        space = dict(super().search_space(pretrained_backbone))
        space.pop("last_layer_lr", None)
        return space

    def phases(self, epochs: int, pretrained_backbone: bool, frozen_backbone: bool = False) -> List[Phase]:
        """Warm, warm without offsets, then joint with offsets up to one push at the end. The
        warm phases protect a pretrained backbone that trains; a frozen one needs neither."""
        quarter = max(1, epochs // 4)
        protects = pretrained_backbone and not frozen_backbone and epochs > 2
        warm = min(self.warm_epochs, quarter) if protects else 0
        still = min(self.pre_offset_epochs, quarter) if protects else 0
        backbone_lr = self.joint_backbone_lr if pretrained_backbone else self.scratch_backbone_lr
        decay = {"backbone": self.weight_decay, "addon": self.weight_decay}
        features = {"addon": self.warm_lr, "prototypes": self.warm_lr}
        phases: List[Phase] = []
        if warm:
            phases.append(Phase("warm", warm, features, weight_decay={"addon": self.weight_decay}))
        if still:
            phases.append(Phase("warm-offsets-fixed", still, {"backbone": backbone_lr, **features},
                                weight_decay=decay))
        phases.append(Phase("joint", epochs - warm - still, {"backbone": backbone_lr, **features,
                                                              "offsets": self.offset_lr},
                            after=("project",), step_lr=self.joint_step, weight_decay=decay))
        return phases
