"""The ProtoPool head (Rymarczyk et al., ECCV 2022): a shared pool of prototypes.

Every class has ``slots`` slots; slot (c, n) picks a pool prototype through the
distribution q[c, :, n] = gumbel_softmax(s * theta[c, :, n], tau 0.5), whose scale s grows
as 1000 sqrt(e / T) over the first T epochs. A slot's focal similarity mixes the pool's
distances first: g(sum_p q d_min(p)) - g(sum_p q d_mean(p)). A linear last layer over the
C * slots slot similarities gives the logits. The loss is
CE + 0.8 cluster - 0.08 separation + orthogonality + 1e-4 L1, as the reference main.py.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ProtoKNNError
from ..prototypes import PrototypeOutputs, log_similarity
from . import register_head
from .base import Head, Phase, PrototypeSpec


def gumbel_scale(epoch: int, horizon: int, final: float = 1000.0) -> float:
    """s(e) = final * sqrt(e / T) for e < T, then final (the code's schedule, T = ``horizon``)."""
    return final * (min(epoch, horizon) / horizon) ** 0.5 if horizon > 0 else final


def slot_distributions(theta: Tensor, scale: float, tau: float = 0.5) -> Tensor:
    """q (C, P, N): a Gumbel-softmax sample over the pool (dim 1) of logits scale * theta (C, P, N).

    Scale 0 is the code's plain softmax(theta) without noise.
    """
    if scale == 0:
        return theta.softmax(dim=1)
    return F.gumbel_softmax(theta * scale, tau=tau, hard=False, dim=1)


def focal_slot_similarity(min_distances: Tensor, mean_distances: Tensor, q: Tensor) -> Tensor:
    """(B, C, N): g(sum_p q d_min) - g(sum_p q d_mean) for distances (B, P) and q (C, P, N)."""
    mixed_min = torch.einsum("bp,cpn->bcn", min_distances, q)
    mixed_mean = torch.einsum("bp,cpn->bcn", mean_distances, q)
    return log_similarity(mixed_min) - log_similarity(mixed_mean)


def slot_orthogonality(theta: Tensor) -> Tensor:
    """(1 / (C N)) sum_c sum_{i != j} cos(theta[c, :, i], theta[c, :, j]) on the raw logits (C, P, N)."""
    unit = F.normalize(theta, dim=1)
    cos = unit.transpose(1, 2) @ unit  # (C, N, N)
    off_diagonal = cos.sum() - cos.diagonal(dim1=1, dim2=2).sum()
    return off_diagonal / (theta.shape[0] * theta.shape[2])


def pool_distance_loss(min_distances: Tensor, usage: Tensor, top: int) -> Tensor:
    """mean_b min over the ``top`` prototypes of largest usage (B, P, detached) of d_min (B, P)."""
    chosen = usage.detach().topk(top, dim=1).indices  # (B, top)
    return min_distances.gather(1, chosen).min(dim=1).values.mean()


@register_head("protopool")
class ProtoPoolHead(Head):
    name = "protopool"
    description = ("ProtoPool: a shared prototype pool, slots chosen by Gumbel-softmax, focal similarity "
                   "(CE + 0.8 clst - 0.08 sep + slot orthogonality + 1e-4 L1)")

    def __init__(
        self,
        num_classes: int,
        backbone_channels: int,
        dim: int = 64,
        num_prototypes: int = 0,
        slots: int = 10,
        gumbel_epochs: int = 30,
        tau: float = 0.5,
        cluster_weight: float = 0.8,
        separation_weight: float = 0.08,
        orthogonality_weight: float = 1.0,
        l1_weight: float = 1e-4,
        warm_epochs: int = 10,
        last_layer_epochs: int = 25,
        lr: float = 1e-3,
        joint_step: tuple = (5, 0.1),
        weight_decay: float = 1e-3,
    ):
        pool = num_prototypes or 2 * num_classes
        if slots < 1 or slots > pool:
            raise ProtoKNNError(f"protopool needs 1 <= slots <= pool size, got slots={slots} for {pool} prototypes; "
                                "lower protopool.slots or raise --prototypes")
        super().__init__(num_classes, backbone_channels, dim, pool)
        self.slots, self.gumbel_epochs, self.tau = slots, gumbel_epochs, tau
        self.cluster_weight, self.separation_weight = cluster_weight, separation_weight
        self.orthogonality_weight, self.l1_weight = orthogonality_weight, l1_weight
        self.warm_epochs, self.last_layer_epochs, self.lr = warm_epochs, last_layer_epochs, lr
        self.joint_step, self.weight_decay = tuple(joint_step), weight_decay
        self.slot_logits = nn.Parameter(nn.init.xavier_normal_(torch.empty(num_classes, pool, slots)))
        self.register_buffer("slot_class", torch.arange(num_classes * slots) // slots)
        self.last_layer = nn.Linear(num_classes * slots, num_classes, bias=False)
        self.last_layer.weight.data.copy_(F.one_hot(self.slot_class, num_classes).t().float())  # 1 own, 0 others
        self.scale = 0.0  # the Gumbel-softmax scale of the current epoch (begin_epoch)

    @classmethod
    def defaults(cls) -> Dict[str, object]:
        return {
            "loss": "cross-entropy + 0.8 cluster - 0.08 separation (top-N / top-(P-N) used prototypes' min distance) "
                    "+ 1.0 slot orthogonality (cosine between a class's slot logits) + 1e-4 L1 (off-class weights)",
            "prototypes": "a pool of --prototypes (0: 2 per class), 10 slots per class, init U[0, 1), "
                          "add-on conv-Sigmoid, squared L2",
            "assignment": "gumbel_softmax(s * theta, tau 0.5) with s = 1000 sqrt(e / 30), then 1000; "
                          "argmax slot at inference",
            "similarity": "focal: g(mixed min distance) - g(mixed mean distance), g(d) = log((d+1)/(d+1e-4))",
            "phases": "warm 10 (backbone untrained; pretrained backbones only), joint (StepLR 5, 0.1), push + "
                      "25 last-layer epochs",
            "lrs": "add-on, prototypes, slot logits 3e-3; backbone 1e-4 (pretrained) or 1e-3 (from scratch); "
                   "last layer 1e-4; weight decay 1e-3 on backbone, add-on and last layer",
            "predict": "argmax of the last layer over the slots' focal similarities",
        }

    def prototype_spec(self) -> PrototypeSpec:
        return PrototypeSpec(self.requested_prototypes, similarity="focal", addon="sigmoid", init="uniform",
                             frozen_prototypes=False)

    # ---- assignment ----------------------------------------------------------------------
    def begin_epoch(self, phase: Phase, epoch: int, steps: int, first_step: int, run_epoch: int) -> None:
        # The code trains from its epoch 1 (epoch 0 only evaluates), so our first epoch is its 1.
        self.scale = gumbel_scale(run_epoch + 1, self.gumbel_epochs)

    def assignment(self) -> Tensor:
        """(C, N): the pool prototype of each slot (the argmax of its logits)."""
        return self.slot_logits.detach().argmax(dim=1)

    def slot_weights(self) -> Tensor:
        """Hard q (C, P, N): one-hot of the assignment, the limit of the Gumbel-softmax as s grows."""
        return F.one_hot(self.assignment(), self.requested_prototypes).transpose(1, 2).float()

    def class_weights(self) -> Tensor:
        """(C, P): the last layer's weights summed over the slots that use each pool prototype."""
        one_hot = F.one_hot(self.assignment().flatten(), self.requested_prototypes).to(self.last_layer.weight)
        return self.last_layer.weight @ one_hot

    def class_prototypes(self) -> Dict[int, List[int]]:
        """Class -> the pool prototypes its slots use (distinct, in slot order)."""
        return {c: list(dict.fromkeys(row)) for c, row in enumerate(self.assignment().tolist())}

    def classes_using(self) -> List[List[int]]:
        users: List[List[int]] = [[] for _ in range(self.requested_prototypes)]
        for c, prototypes in self.class_prototypes().items():
            for p in prototypes:
                users[p].append(c)
        return users

    def projection_classes(self) -> Tensor:
        """(C, P): a prototype is pushed among the images of the classes whose slots use it; one no
        slot uses searches every class (it weighs nothing in any logit)."""
        used = self.slot_weights().amax(dim=2).bool()  # (C, P)
        unused = ~used.any(dim=0)
        return used | unused[None, :]

    # ---- losses and predictions -----------------------------------------------------------
    def _logits_from_slots(self, slot_similarity: Tensor) -> Tensor:
        return self.last_layer(slot_similarity.flatten(1))

    def _l1(self) -> Tensor:
        off_class = 1 - F.one_hot(self.slot_class, self.num_classes).t().float()
        return (self.last_layer.weight * off_class).abs().sum()

    def loss(self, out: PrototypeOutputs, labels: Tensor) -> Dict[str, Tensor]:
        q = slot_distributions(self.slot_logits, self.scale, self.tau)  # (C, P, N)
        mean_distances = out.cost - out.gap_cost
        logits = self._logits_from_slots(focal_slot_similarity(out.cost, mean_distances, q))
        usage = q[labels].sum(dim=2)  # (B, P)
        pool = self.requested_prototypes
        cluster = pool_distance_loss(out.cost, usage, self.slots)
        separation = pool_distance_loss(out.cost, self.slots - usage, pool - self.slots) if pool > self.slots \
            else out.cost.new_zeros(())
        terms = {"ce": F.cross_entropy(logits, labels), "cluster": cluster, "separation": separation,
                 "orthogonality": slot_orthogonality(self.slot_logits), "l1": self._l1()}
        terms["total"] = (terms["ce"] + self.cluster_weight * cluster - self.separation_weight * separation
                          + self.orthogonality_weight * terms["orthogonality"] + self.l1_weight * terms["l1"])
        return terms

    def loss_from_profiles(self, profile: Tensor, labels: Tensor) -> Dict[str, Tensor]:
        """Last-layer phase on cached focal similarities (B, P), slots assigned hard."""
        ce = F.cross_entropy(self.logits_from_profile(profile), labels)
        l1 = self._l1()
        return {"ce": ce, "l1": l1, "total": ce + self.l1_weight * l1}

    def logits_from_profile(self, profile: Tensor) -> Tensor:
        """Logits (B, C) from the pool's focal similarities (B, P) under the hard assignment."""
        return self._logits_from_slots(profile[:, self.assignment()])

    def logits(self, out: PrototypeOutputs) -> Tensor:
        return self.logits_from_profile(out.profile)

    def predict_all(self, out: PrototypeOutputs) -> Dict[str, Tensor]:
        return {"top1": self.logits(out).argmax(dim=1)}

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"head": [self.slot_logits], "last_layer": [self.last_layer.weight]}

    def phases(self, epochs: int, pretrained_backbone: bool, frozen_backbone: bool = False) -> List[Phase]:
        """Warm (backbone untrained; not for a frozen backbone, which needs no protecting), joint, one
        push at the end of the budget, then the last layer."""
        protects = pretrained_backbone and not frozen_backbone
        warm = min(self.warm_epochs, max(1, epochs // 4)) if protects and epochs > 1 else 0
        fast = 3 * self.lr
        backbone_lr = self.lr / 10 if pretrained_backbone else self.lr
        phases: List[Phase] = []
        if warm:
            phases.append(Phase("warm", warm, {"addon": fast, "prototypes": fast, "head": fast},
                                weight_decay={"addon": self.weight_decay}))
        phases.append(Phase("joint", epochs - warm, {"backbone": backbone_lr, "addon": fast, "prototypes": fast,
                                                     "head": fast}, after=("project",), step_lr=self.joint_step,
                            weight_decay={"backbone": self.weight_decay, "addon": self.weight_decay}))
        phases.append(Phase("last-layer", self.last_layer_epochs, {"last_layer": self.lr / 10}, cached_profiles=True,
                            weight_decay={"last_layer": self.weight_decay}))
        return phases
