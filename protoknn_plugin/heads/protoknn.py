"""The ProtoKNN head (ICLR 2023): kNN over prototype profiles.

Training loss (eq. 13): L = L_task + 0.1 L_clst + 1.0 L_aux, where L_task is a
pytorch-metric-learning loss on the unnormalised profiles (MarginLoss + batch-hard
miner by default), L_clst the Sinkhorn cluster loss, and L_aux a PML loss on
g = Linear(GAP(backbone map)). Prototypes start evenly on the hypersphere and stay
frozen; after training they are projected onto training patches and the kNN memory
is built from the training profiles.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from ..cluster import ProtoKNNClusterLoss
from ..errors import ProtoKNNError
from ..knn import KNNClassifier
from ..losses import MetricLoss, create_metric_loss
from ..prototypes import PrototypeOutputs
from ..values import parse_flag
from . import register_head
from .base import Head, Phase, PrototypeSpec
from .space import FloatRange


def check_push_every(push_every) -> int:
    """``push_every`` as given when it is a whole number >= 0, else a one-line error."""
    if not isinstance(push_every, int) or isinstance(push_every, bool) or push_every < 0:
        raise ProtoKNNError(f"protoknn head option push_every must be a whole number >= 0 (0: project only at the "
                            f"end), got {push_every!r}")
    return push_every


def _option(name: str) -> str:
    """How errors name one of this head's options."""
    return f"protoknn head option {name}"


@register_head("protoknn")
class ProtoKNNHead(Head):
    """ProtoKNN's head, built from its parts (eq. 13): ``task_loss`` on the profiles (P,),
    ``cluster_loss`` on the costs, ``aux_loss`` on g = Linear(GAP(backbone map)) (D,) (a
    ``MetricLoss`` named ``none`` turns it and g off), and ``knn`` that predicts.

    ``from_options`` builds the parts from the flat options users give (``--head-opt``,
    config files); the registry builds every head that way. ``options`` holds those flat options
    (empty when the head was built from parts).
    """

    name = "protoknn"
    description = "ProtoKNN: kNN over prototype profiles; metric loss + Sinkhorn cluster loss + aux loss"
    uses_memory = True
    revision = 2  # 2: cluster_variant linear-assignment with a pretrained backbone (validation study)
    pretrained_defaults = {"cluster_variant": "linear-assignment"}

    def __init__(
        self,
        num_classes: int,
        backbone_channels: int,
        dim: int = 64,
        num_prototypes: int = 100,
        *,
        task_loss: MetricLoss,
        cluster_loss: ProtoKNNClusterLoss,
        knn: KNNClassifier,
        aux_loss: MetricLoss,
        cluster_weight: float = 0.1,
        aux_weight: float = 1.0,
        cost_space: str = "unit",
        lr: float = 1e-3,
        beta_lr: float = 5e-4,
        proxy_lr_scale: float = 100.0,
        frozen_prototypes: bool = True,
        prototype_lr: float = 1e-3,
        push_every: int = 0,
    ):
        super().__init__(num_classes, backbone_channels, dim, num_prototypes)
        self.options: Dict[str, object] = {}
        self.push_every = check_push_every(push_every)
        self.frozen_prototypes = parse_flag(frozen_prototypes, _option("frozen_prototypes"))
        self.prototype_lr = float(prototype_lr)
        self.cluster_weight, self.aux_weight = cluster_weight, aux_weight
        self.cost_space = cost_space
        self.lr, self.beta_lr, self.proxy_lr_scale = lr, beta_lr, proxy_lr_scale
        self.task_loss = task_loss
        self.cluster_loss = cluster_loss
        self.aux_loss = aux_loss
        # The aux embedding g exists only when the aux loss is on (Table 5's `none` row has none).
        self.aux_embedding = nn.Linear(backbone_channels, dim) if self.aux_loss.enabled else None
        self.knn = knn
        self.primary = f"k={knn.k}"

    @classmethod
    def from_options(
        cls, num_classes: int, backbone_channels: int, dim: int = 64, num_prototypes: int = 100,
        task_loss: str = "margin", task_miner: str = "batch-hard", aux_loss: str = "margin",
        cluster_variant: str = "full", cluster_reduction: str = "mean", cluster_weight: float = 0.1,
        aux_weight: float = 1.0, tau: float = 0.05, reg: float = 0.05, margin: float = 0.2, beta: float = 1.2,
        cost_space: str = "unit", ks: Sequence[int] = (1, 3, 5, 10), k: int = 5, memory: str = "full",
        lr: float = 1e-3, beta_lr: float = 5e-4, proxy_lr_scale: float = 100.0, plan_cost: str = "gap",
        tau_soft: float = 0.5, straight_through: bool = False, frozen_prototypes: bool = True,
        prototype_lr: float = 1e-3, push_every: int = 0,
    ) -> "ProtoKNNHead":
        """The head from flat options: the losses by PML name (``margin`` takes ``margin`` and
        ``beta``; ``task_miner`` mines for both), the cluster loss by variant with its settings,
        and the kNN at ``k`` that also reports every k of ``ks``."""
        ks = tuple(ks)
        frozen_prototypes = parse_flag(frozen_prototypes, _option("frozen_prototypes"))
        straight_through = parse_flag(straight_through, _option("straight_through"))
        options = dict(
            task_loss=task_loss, task_miner=task_miner, aux_loss=aux_loss, cluster_variant=cluster_variant,
            cluster_reduction=cluster_reduction, cluster_weight=cluster_weight, aux_weight=aux_weight, tau=tau,
            reg=reg, margin=margin, beta=beta, cost_space=cost_space, ks=ks, k=k, memory=memory,
            plan_cost=plan_cost, tau_soft=tau_soft, straight_through=straight_through,
            frozen_prototypes=frozen_prototypes, prototype_lr=prototype_lr, push_every=push_every,
        )
        check_push_every(push_every)
        task_opts = {"margin": margin, "beta": beta} if task_loss == "margin" else {}
        task = create_metric_loss(task_loss, num_classes=num_classes, embedding_size=num_prototypes,
                                  miner=task_miner, **task_opts)
        cluster = ProtoKNNClusterLoss(variant=cluster_variant, tau=tau, reg=reg, reduction=cluster_reduction,
                                      plan_cost=plan_cost, tau_soft=tau_soft, straight_through=straight_through)
        aux = create_metric_loss(aux_loss, num_classes=num_classes, embedding_size=dim, miner=task_miner,
                                 normalize_embeddings=True)
        knn = KNNClassifier(k=k, ks=tuple(sorted(set(ks) | {k})), memory=memory, num_classes=num_classes)
        head = cls(num_classes, backbone_channels, dim, num_prototypes, task_loss=task, cluster_loss=cluster,
                   knn=knn, aux_loss=aux, cluster_weight=cluster_weight, aux_weight=aux_weight,
                   cost_space=cost_space, lr=lr, beta_lr=beta_lr, proxy_lr_scale=proxy_lr_scale,
                   frozen_prototypes=frozen_prototypes, prototype_lr=prototype_lr, push_every=push_every)
        head.options = options
        return head

    @classmethod
    def defaults(cls) -> Dict[str, object]:
        return {
            "task_loss": "margin (PML MarginLoss, m 0.2, learnable beta 1.2, batch-hard miner, unnormalised L2)",
            "cluster": "full (Sinkhorn on gap cost, reg 0.05, tau 0.05, mean over batch), weight 0.1",
            "aux_loss": "margin on GAP+linear embedding, weight 1.0 (proxy-anchor, none selectable)",
            "predict": "kNN over training profiles, k = 1, 3, 5, 10 in one search (k=5 primary)",
            "plan_cost": "gap: the full variants solve T* on the gap cost C^ (eq. 11, our reading); "
                         "cost: on C (eq. 8), the loss still weights C^",
            "cluster variants beyond the paper": "full-relaxed (Gumbel-softmax sampling, tau_soft 0.5, "
                                                  "straight_through false), full-implicit (T* differentiable), "
                                                  "full-differentiable (both)",
            "frozen_prototypes": "true (the paper); false trains them from the same hyperspherical start "
                                 "at prototype_lr 1e-3 (own optimizer group `prototypes`)",
            "with a pretrained backbone": "cluster_variant linear-assignment (best on validation in the "
                                          "projection study of docs/ablation.md)",
            "push_every": "0: project once, at the end (the paper); N: also project after every N epochs, so "
                          "that the later epochs train against prototypes that are training patches",
        }

    @classmethod
    def search_space(cls, pretrained_backbone: bool = False) -> Dict[str, object]:
        # Around the paper's eq. 13 weights (0.1, 1.0), its Sinkhorn reg and temperature (0.05)
        # and its rate 1e-3; the number of prototypes is a shared protocol setting, not tuned.
        return {
            "lr": FloatRange(1e-4, 1e-2, log=True),
            "cluster_weight": FloatRange(0.01, 1.0, log=True),
            "aux_weight": FloatRange(0.1, 3.0, log=True),
            "tau": FloatRange(0.01, 0.2, log=True),
            "reg": FloatRange(0.02, 0.2, log=True),
            "margin": FloatRange(0.05, 0.5),
        }

    def prototype_spec(self) -> PrototypeSpec:
        return PrototypeSpec(self.requested_prototypes, similarity="cosine", addon="linear",
                             init="hypersphere", frozen_prototypes=self.frozen_prototypes, cost_space=self.cost_space)

    def loss(self, out: PrototypeOutputs, labels: Tensor) -> Dict[str, Tensor]:
        task = self.task_loss(out.profile, labels)
        cluster = self.cluster_loss(out.profile, out.cost, out.gap_cost, labels)
        terms = {"task": task, "cluster": cluster}
        total = task + self.cluster_weight * cluster
        if self.aux_embedding is not None:
            g = self.aux_embedding(out.backbone_features.mean(dim=(2, 3)))
            terms["aux"] = self.aux_loss(g, labels)
            total = total + self.aux_weight * terms["aux"]
        terms["total"] = total
        return terms

    def predict_all(self, out: PrototypeOutputs) -> Dict[str, Tensor]:
        preds = self.knn.predict_many(out.profile.detach().float())
        return {f"k={k}": p for k, p in preds.items()}

    def check_data(self, labels: Tensor) -> None:
        """Fail before training when k cannot work on this training set (labels (N,))."""
        if self.knn.k > len(labels):
            raise ProtoKNNError(f"k={self.knn.k} is larger than the {len(labels)} training profiles in the kNN memory; "
                                "lower --k or use more data")
        largest_k = max(self.knn.ks)
        if largest_k > len(labels):  # a k the evaluation always reports, not one the user set
            raise ProtoKNNError(f"the kNN memory would hold only {len(labels)} training profiles, fewer than k={largest_k}, "
                                f"which evaluation always reports (k = {', '.join(map(str, self.knn.ks))}); "
                                "use more training images (a larger --limit or more data)")
        counts = torch.bincount(labels.cpu(), minlength=self.num_classes)
        smallest = int(counts[counts > 0].min())
        if self.knn.k > smallest:
            raise ProtoKNNError(
                f"k={self.knn.k} is larger than the smallest class in the kNN memory ({smallest} images), so that class "
                "can never win a majority vote; lower --k"
            )

    def fit_memory(self, profiles: Tensor, labels: Tensor) -> None:
        """Store the training profiles (N, P) as the kNN memory; every k must fit the memory."""
        self.check_data(labels)
        self.knn.fit(profiles.float(), labels)

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        groups: Dict[str, List[nn.Parameter]] = {}
        if self.aux_embedding is not None:
            groups["head"] = list(self.aux_embedding.parameters())
        for loss in (self.task_loss, self.aux_loss):
            for name, params in loss.param_groups().items():
                groups.setdefault(name, []).extend(params)
        return groups

    def phases(self, epochs: int, pretrained_backbone: bool, frozen_backbone: bool = False) -> List[Phase]:
        # A pretrained backbone is fine-tuned gently (docs/method.md: 1e-5); one trained
        # from scratch needs the same rate as the rest or it never learns.
        backbone_lr = 1e-5 if pretrained_backbone else self.lr
        lrs = {"backbone": backbone_lr, "addon": self.lr, "head": self.lr, "beta": self.beta_lr,
               "proxies": self.lr * self.proxy_lr_scale}
        if not self.frozen_prototypes:  # else absent from lrs: untrained in every phase (the paper)
            lrs["prototypes"] = self.prototype_lr
        final = ("project", "build_memory")
        if not self.push_every or self.push_every >= epochs:
            return [Phase("train", epochs, lrs, after=final)]
        # Intermediate pushes split the epochs into cycles that share one optimiser (Adam is not
        # restarted by a push); the prototypes stay frozen at the projected patches in between.
        points = list(range(self.push_every, epochs, self.push_every)) + [epochs]
        starts = [0] + points[:-1]
        return [Phase("train", end - start, lrs, after=final if end == epochs else ("project",), optimizer_key="train")
                for start, end in zip(starts, points)]
