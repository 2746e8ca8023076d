"""The linear ProtoPNet head (Chen et al. 2019), the baseline.

Class-specific prototypes, a linear last layer initialised +1 / -0.5, loss
CE + 0.8 cluster - 0.08 separation + 1e-4 L1, and the phases warm, joint, push and
last-layer-only as data the trainer follows.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnknownNameError
from ..prototypes import PrototypeOutputs
from . import register_head
from .base import Head, Phase, PrototypeSpec
from .space import FloatRange


PROTOPNET_SIMILARITIES = ("log", "cosine")


@register_head("protopnet")
class ProtoPNetHead(Head):
    name = "protopnet"
    revision = 3  # 2: prototype_init default uniform -> shifted-normal; 3: no warm phase under a frozen backbone
    description = "ProtoPNet: class-specific prototypes + linear last layer (CE + 0.8 clst - 0.08 sep + 1e-4 L1)"
    project_within_class = True

    def __init__(
        self,
        num_classes: int,
        backbone_channels: int,
        dim: int = 64,
        num_prototypes: int = 0,
        prototypes_per_class: int = 10,
        cluster_weight: float = 0.8,
        separation_weight: float = 0.08,
        l1_weight: float = 1e-4,
        warm_epochs: int = 5,
        push_every: int = 10,
        push_start: int = 10,
        last_layer_epochs: int = 20,
        joint_step: tuple = (5, 0.1),
        warm_lr: float = 3e-3,
        joint_backbone_lr: float = 1e-4,
        scratch_backbone_lr: float = 1e-3,
        last_layer_lr: float = 1e-4,
        weight_decay: float = 1e-3,
        prototype_init: str = "shifted-normal",
        similarity: str = "log",
    ):
        # num_prototypes is ignored unless it is a multiple of the class count: ProtoPNet's
        # prototypes are class-specific, `prototypes_per_class` of each class.
        if num_prototypes and num_prototypes % num_classes == 0:
            prototypes_per_class = num_prototypes // num_classes
        total = prototypes_per_class * num_classes
        super().__init__(num_classes, backbone_channels, dim, total)
        self.cluster_weight, self.separation_weight, self.l1_weight = cluster_weight, separation_weight, l1_weight
        self.warm_epochs, self.push_every, self.push_start = warm_epochs, push_every, push_start
        self.last_layer_epochs, self.joint_step = last_layer_epochs, tuple(joint_step)
        self.warm_lr, self.last_layer_lr = warm_lr, last_layer_lr
        self.joint_backbone_lr, self.scratch_backbone_lr = joint_backbone_lr, scratch_backbone_lr
        self.weight_decay = weight_decay
        # "shifted-normal": N(0.5, 0.1), CaBRNet's, near the Sigmoid add-on's outputs, so the log
        # similarities and the cluster cost have useful gradients from the first step; "uniform":
        # U[0, 1], the reference code's torch.rand, which lies farther from every patch. The
        # stronger baseline is the default (docs/protocol.md, cross-check with CaBRNet's).
        if prototype_init not in ("uniform", "shifted-normal"):
            raise UnknownNameError("ProtoPNet prototype init", prototype_init, ("uniform", "shifted-normal"))
        self.prototype_init = prototype_init
        # "log": the paper's log((d + 1) / (d + 1e-4)) on squared L2; "cosine": cos(z, p) of the best patch,
        # after Moffett et al. (WACV 2026), with the cluster and separation terms on 2 - 2 cos.
        if similarity not in PROTOPNET_SIMILARITIES:
            raise UnknownNameError("protopnet similarity", similarity, PROTOPNET_SIMILARITIES)
        self.similarity = similarity
        self.register_buffer("prototype_class", torch.arange(total) // prototypes_per_class)
        self.last_layer = nn.Linear(total, num_classes, bias=False)
        identity = F.one_hot(self.prototype_class, num_classes).t().float()  # (C, P)
        self.last_layer.weight.data.copy_(1.0 * identity - 0.5 * (1 - identity))

    @classmethod
    def defaults(cls) -> Dict[str, object]:
        return {
            "loss": "cross-entropy + 0.8 cluster - 0.08 separation + 1e-4 L1 (off-class weights)",
            "prototypes": "10 per class, init N(0.5, 0.1) (prototype_init=uniform: the reference code's U[0, 1]), "
                          "log similarity on squared L2, add-on conv-ReLU-conv-Sigmoid",
            "phases": "warm 5 (backbone untrained; pretrained backbones that train only), joint (StepLR 5, 0.1), push every 10 "
                      "from 10 + 20 last-layer epochs",
            "lrs": "warm/joint add-on + prototypes 3e-3, joint backbone 1e-4 (pretrained) or 1e-3 (from scratch), "
                   "last layer 1e-4; weight decay 1e-3 on backbone and add-on",
            "predict": "argmax of the linear last layer",
            "similarity": "log (the paper); cosine: cos(z, p), cluster and separation on 2 - 2 cos (Moffett et al.)",
        }

    @classmethod
    def search_space(cls, pretrained_backbone: bool = False) -> Dict[str, object]:
        # Around the reference code's rates (add-on and prototypes 3e-3, joint backbone 1e-4,
        # last layer 1e-4), weight decay 1e-3 and loss weights 0.8 / 0.08. The epochs of the
        # phases stay fixed (they are the budget), and so does the prototype count, which the
        # protocol shares between rows.
        backbone = ({"joint_backbone_lr": FloatRange(1e-5, 1e-3, log=True)} if pretrained_backbone
                    else {"scratch_backbone_lr": FloatRange(1e-4, 1e-2, log=True)})
        return {
            "warm_lr": FloatRange(3e-4, 3e-2, log=True),
            **backbone,
            "last_layer_lr": FloatRange(1e-5, 1e-3, log=True),
            "weight_decay": FloatRange(1e-5, 1e-2, log=True),
            "cluster_weight": FloatRange(0.2, 1.6),
            "separation_weight": FloatRange(0.02, 0.16),
        }

    def prototype_spec(self) -> PrototypeSpec:
        return PrototypeSpec(self.requested_prototypes, similarity=self.similarity, addon="protopnet",
                             init=self.prototype_init, frozen_prototypes=False)

    def _l1(self) -> Tensor:
        off_class = 1 - F.one_hot(self.prototype_class, self.num_classes).t().float()
        return (self.last_layer.weight * off_class).abs().sum()

    def loss(self, out: PrototypeOutputs, labels: Tensor) -> Dict[str, Tensor]:
        logits = self.last_layer(out.profile)
        own = self.prototype_class[None, :] == labels[:, None]  # (B, P)
        inf = torch.finfo(out.cost.dtype).max
        cluster = out.cost.masked_fill(~own, inf).min(dim=1).values.mean()
        separation = out.cost.masked_fill(own, inf).min(dim=1).values.mean()
        terms = {"ce": F.cross_entropy(logits, labels), "cluster": cluster, "separation": separation, "l1": self._l1()}
        terms["total"] = (terms["ce"] + self.cluster_weight * cluster - self.separation_weight * separation
                          + self.l1_weight * terms["l1"])
        return terms

    def loss_from_profiles(self, profile: Tensor, labels: Tensor) -> Dict[str, Tensor]:
        """Last-layer-only phase: the features are untrained in it, so only CE + L1 on cached profiles (B, P)."""
        ce = F.cross_entropy(self.last_layer(profile), labels)
        l1 = self._l1()
        return {"ce": ce, "l1": l1, "total": ce + self.l1_weight * l1}

    def predict_all(self, out: PrototypeOutputs) -> Dict[str, Tensor]:
        return {"top1": self.last_layer(out.profile).argmax(dim=1)}

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"last_layer": [self.last_layer.weight]}

    def phases(self, epochs: int, pretrained_backbone: bool, frozen_backbone: bool = False) -> List[Phase]:
        """The reference schedule fitted into ``epochs`` feature-training epochs.

        Warm epochs run only with a pretrained backbone that trains (not a frozen one) and are capped at a quarter of the
        budget so that a short budget still has joint training; pushes happen every ``push_every`` epochs from ``push_start``
        and always at the end, each followed by the last-layer-only epochs (on cached
        training profiles, since nothing before the last layer trains then).
        """
        # Warm-up protects a pretrained backbone from the random add-on's first gradients; a
        # backbone trained from scratch, or a frozen one, has nothing to protect, so its epochs go
        # to the joint phase. Warm epochs count inside the budget (capped at a quarter of it).
        protects = pretrained_backbone and not frozen_backbone
        warm = min(self.warm_epochs, max(1, epochs // 4)) if protects and epochs > 1 else 0
        # The reference joint rate 1e-4 is for a pretrained backbone; one trained from scratch
        # has no reference rate and gets the rate every head uses from scratch (1e-3).
        backbone_lr = self.joint_backbone_lr if pretrained_backbone else self.scratch_backbone_lr
        joint_lrs = {"backbone": backbone_lr, "addon": self.warm_lr, "prototypes": self.warm_lr}
        # Reference code: weight decay 1e-3 on the features and the add-on layers, none on the prototypes.
        decay = {"backbone": self.weight_decay, "addon": self.weight_decay}
        push_and_last = Phase("last-layer", self.last_layer_epochs, {"last_layer": self.last_layer_lr}, cached_profiles=True)
        phases: List[Phase] = []
        if warm:
            phases.append(Phase("warm", warm, {"addon": self.warm_lr, "prototypes": self.warm_lr},
                                weight_decay={"addon": self.weight_decay}))
        done = warm
        push_points = [e for e in range(self.push_start, epochs, self.push_every) if e > done] + [epochs]
        for point in push_points:
            if point > done:
                # One Adam and StepLR across joint cycles, as in the reference code (not restarted after a push).
                phases.append(Phase("joint", point - done, joint_lrs, after=("project",), step_lr=self.joint_step,
                                    weight_decay=decay, optimizer_key="joint"))
                done = point
            else:
                phases[-1] = dataclasses.replace(phases[-1], after=("project",))
            phases.append(push_and_last)
        return phases
