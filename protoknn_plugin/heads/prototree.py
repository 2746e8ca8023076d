"""The ProtoTree head (Nauta et al., CVPR 2021): a soft binary decision tree of prototypes.

Internal node n (numbered breadth-first, children 2n+1 left and 2n+2 right) holds
prototype n. Its routing probability is s_n = exp(-min_patches ||z - p_n||) (plain, not
squared, Euclidean distance): the prototype layer's ``exp-l2`` profile. The right child
("present") gets s_n, the left child 1 - s_n, so leaf l is reached with the product
pi_l(x) of the probabilities on its path. Each leaf holds class logits c_l (no gradient);
the tree predicts y^(x) = sum_l pi_l(x) softmax(c_l) and trains the backbone, add-on and
prototypes with NLL(log y^, y). The leaves are updated derivative-free after every
optimiser step (``derivative_free_update``). After training, leaves whose distributions
are all flat (max <= threshold) are pruned with their subtrees (``prune_routes``) and the
prototypes are projected onto training patches of the classes their leaves predict.

Pruning never changes the tensors' shapes: a pruned node's parent is "forced" towards the
sibling (``routes``: 0 routes softly, +1 always right, -1 always left), which is exactly
the reference code's "the sibling subtree replaces the parent".
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ProtoKNNError
from ..prototypes import PrototypeOutputs
from . import register_head
from .base import Head, Phase, PrototypeSpec
from .space import FloatRange


# --------------------------------------------------------------------------- tree math

def apply_routes(similarity: Tensor, routes: Tensor) -> Tensor:
    """Probability of going right at every internal node: s_n, or 1 / 0 where a pruned node forces a side.
    similarity (B, N), routes (N,) -> (B, N)."""
    forced = routes.to(similarity.device)[None, :].expand_as(similarity)
    return torch.where(forced == 0, similarity, (forced > 0).to(similarity.dtype))


def leaf_probabilities(similarity: Tensor, routes: Tensor) -> Tensor:
    """Path probability pi_l of every leaf: similarity (B, N) of the N = 2^d - 1 internal nodes -> (B, 2^d)."""
    right = apply_routes(similarity, routes)
    depth = (similarity.shape[1] + 1).bit_length() - 1
    reach = right.new_ones(right.shape[0], 1)
    for level in range(depth):
        r = right[:, 2 ** level - 1:2 ** (level + 1) - 1]  # this level's nodes, left to right
        reach = torch.stack([reach * (1 - r), reach * r], dim=2).flatten(1)  # children: left, right
    return reach


def tree_output(pi: Tensor, leaf_logits: Tensor) -> Tensor:
    """y^ = sum_l pi_l softmax(c_l): pi (B, L), leaf_logits (L, C) -> (B, C)."""
    return pi @ leaf_logits.softmax(dim=1)


def derivative_free_update(leaf_logits: Tensor, epoch_start: Tensor, pi: Tensor, y_hat: Tensor, labels: Tensor,
                           steps_per_epoch: int) -> Tensor:
    """The reference code's leaf update after one batch, returning the new c (L, C):

    c_l <- ReLU(c_l - c_l^start / n_batches) + sum_b pi_l(x_b) softmax(c_l)[y_b] e_{y_b} / y^(x_b)[y_b],

    with c^start the logits at the start of the epoch. pi (B, L), y_hat (B, C), labels (B,).
    """
    dist = leaf_logits.softmax(dim=1)  # (L, C)
    target = F.one_hot(labels, leaf_logits.shape[1]).to(pi.dtype)  # (B, C)
    true_prob = y_hat.gather(1, labels[:, None])  # (B, 1): y^ of the true class
    update = dist * ((pi / true_prob).t() @ target)  # (L, C)
    return (leaf_logits - epoch_start / steps_per_epoch).clamp_min(0) + update


def greedy_leaves(similarity: Tensor, routes: Tensor) -> Tensor:
    """The deterministic path: right iff s_n > 0.5 (or where pruning forces). similarity (B, N) -> leaf (B,)."""
    go_right = apply_routes(similarity, routes) > 0.5
    depth = (similarity.shape[1] + 1).bit_length() - 1
    node = torch.zeros(similarity.shape[0], dtype=torch.long, device=similarity.device)
    for _ in range(depth):
        node = 2 * node + 1 + go_right.gather(1, node[:, None])[:, 0].long()
    return node - (2 ** depth - 1)


def path_nodes(similarity: Tensor, routes: Tensor) -> Tuple[List[int], List[bool], int]:
    """The greedy path of one image: (internal nodes that route, whether each went right, leaf).
    similarity (N,). Nodes forced by pruning are left out: they no longer exist in the pruned tree."""
    depth = (similarity.shape[0] + 1).bit_length() - 1
    nodes, rights, node = [], [], 0
    for _ in range(depth):
        forced = int(routes[node])
        right = forced > 0 if forced else bool(similarity[node] > 0.5)
        if not forced:
            nodes.append(node)
            rights.append(right)
        node = 2 * node + 1 + int(right)
    return nodes, rights, node - (2 ** depth - 1)


def _qualifies(leaf_logits: Tensor, threshold: float) -> Tensor:
    """(2N + 1,) per node of the full tree: every leaf below it has max softmax <= threshold."""
    flat = leaf_logits.softmax(dim=1).max(dim=1).values <= threshold  # (L,)
    internal = leaf_logits.shape[0] - 1
    qualifies = torch.cat([torch.zeros(internal, dtype=torch.bool, device=flat.device), flat])
    for node in range(internal - 1, -1, -1):
        qualifies[node] = qualifies[2 * node + 1] & qualifies[2 * node + 2]
    return qualifies


def prune_routes(leaf_logits: Tensor, routes: Tensor, threshold: float) -> Tensor:
    """The reference code's pruning, as forced routes (N,).

    A node is pruned when every leaf below it has max softmax <= ``threshold``; only the
    topmost such node of a subtree counts, and the root and its children are kept. The
    pruned node's parent then always routes to the sibling subtree.
    """
    qualifies = _qualifies(leaf_logits, threshold)
    routes = routes.clone()
    for node in range(3, len(qualifies)):  # nodes at depth >= 2
        parent = (node - 1) // 2
        if qualifies[node] and not qualifies[parent]:
            routes[parent] = -1 if node == 2 * parent + 2 else 1  # pruned right child: always left
    return routes


def reachable(routes: Tensor) -> Tensor:
    """(2N + 1,) bool: nodes of the full tree still reachable once forced routes are followed."""
    internal = len(routes)
    seen = torch.zeros(2 * internal + 1, dtype=torch.bool)
    seen[0] = True
    for node in range(internal):
        if seen[node]:
            forced = int(routes[node])
            seen[2 * node + 1] = forced <= 0
            seen[2 * node + 2] = forced >= 0
    return seen


def tree_size(routes: Tensor) -> Tuple[int, int]:
    """(internal nodes, leaves) of the pruned tree: reachable, and internal nodes that still route."""
    seen = reachable(routes.cpu())
    internal = len(routes)
    routing = seen[:internal] & (routes.cpu() == 0)
    return int(routing.sum()), int(seen[internal:].sum())


# --------------------------------------------------------------------------- the head

@register_head("prototree")
class ProtoTreeHead(Head):
    name = "prototree"
    description = "ProtoTree: soft binary tree of prototypes, exp(-L2) routing, derivative-free leaves, pruning"
    explanation = "decision-path"
    actions = ("prune",)
    primary = "soft"

    def __init__(self, num_classes: int, backbone_channels: int, dim: int = 64, num_prototypes: int = 0,
                 depth: int = 5, prune_threshold: float = 0.01, lr: float = 1e-3, backbone_lr: float = 1e-5,
                 scratch_backbone_lr: float = 1e-3, freeze_fraction: float = 0.3):
        # num_prototypes is ignored: a complete tree of depth d has 2^d - 1 internal nodes.
        if not isinstance(depth, int) or not 1 <= depth <= 12:
            raise ProtoKNNError(f"prototree depth must be a whole number from 1 to 12, got {depth!r}")
        super().__init__(num_classes, backbone_channels, dim, 2 ** depth - 1)
        self.depth, self.prune_threshold = depth, float(prune_threshold)
        self.lr, self.backbone_lr, self.scratch_backbone_lr = lr, backbone_lr, scratch_backbone_lr
        self.freeze_fraction = float(freeze_fraction)
        leaves = 2 ** depth
        self.register_buffer("leaf_logits", torch.zeros(leaves, num_classes))
        self.register_buffer("epoch_start_logits", torch.zeros(leaves, num_classes))
        self.register_buffer("steps_per_epoch", torch.ones((), dtype=torch.long))
        self.register_buffer("routes", torch.zeros(leaves - 1, dtype=torch.long))
        self._pending: Optional[Tuple[Tensor, Tensor, Tensor]] = None

    @classmethod
    def defaults(cls) -> Dict[str, object]:
        return {
            "loss": "NLL of log y^, y^ = sum over leaves of path probability x softmax(leaf logits)",
            "tree": "depth 5 (31 prototypes = internal nodes, 32 leaves); --prototypes is ignored",
            "prototypes": "init N(0.5, 0.1), add-on 1x1 conv (no bias) + Sigmoid, routing exp(-L2 distance)",
            "leaves": "derivative-free update after every step (reference train.py), logits start at 0",
            "pruning": "after training: subtrees whose leaves all have max softmax <= 0.01, then projection "
                       "onto images of the classes of the leaves below each node",
            "phases": "warm 30% (backbone untrained; pretrained backbones only), then joint; Adam lr 1e-3 add-on + "
                      "prototypes, backbone 1e-5 (pretrained) or 1e-3 (from scratch)",
            "predict": "soft (y^, primary), greedy (right iff s > 0.5), sample-max (leaf of largest path probability)",
        }

    def prototype_spec(self) -> PrototypeSpec:
        return PrototypeSpec(self.requested_prototypes, similarity="exp-l2", addon="conv-sigmoid",
                             init="shifted-normal", frozen_prototypes=False)

    # ---- training -------------------------------------------------------------------
    def soft_output(self, out: PrototypeOutputs) -> Tuple[Tensor, Tensor]:
        """(path probabilities pi (B, L), y^ (B, C)) from the routing probabilities ``out.profile`` (B, N)."""
        pi = leaf_probabilities(out.profile, self.routes)
        return pi, tree_output(pi, self.leaf_logits.to(pi.dtype))

    def loss(self, out: PrototypeOutputs, labels: Tensor) -> Dict[str, Tensor]:
        pi, y_hat = self.soft_output(out)
        nll = F.nll_loss(torch.log(y_hat.clamp_min(torch.finfo(y_hat.dtype).tiny)), labels)
        if torch.is_grad_enabled():  # a training step: the leaves follow after the optimiser's step
            self._pending = (pi.detach(), y_hat.detach(), labels.detach())
        return {"nll": nll, "total": nll}

    def begin_epoch(self, phase: Phase, epoch: int, steps: int, first_step: int, run_epoch: int) -> None:
        if first_step == 0:  # a resumed epoch keeps the snapshot saved with it
            self.epoch_start_logits.copy_(self.leaf_logits)
            self.steps_per_epoch.fill_(max(1, steps))

    @torch.no_grad()
    def after_step(self) -> None:
        if self._pending is None:
            return
        pi, y_hat, labels = self._pending
        self._pending = None
        self.leaf_logits.copy_(derivative_free_update(self.leaf_logits, self.epoch_start_logits, pi.float(),
                                                      y_hat.float(), labels, int(self.steps_per_epoch)))

    def run_action(self, action: str, train_profiles: Callable[[], Tuple[Tensor, Tensor]]) -> None:
        if action != "prune":
            raise NotImplementedError(action)
        self.routes.copy_(prune_routes(self.leaf_logits, self.routes, self.prune_threshold))

    def stage_info(self, profiles: Callable[[], Tensor]) -> Dict[str, float]:
        internal, leaves = tree_size(self.routes)
        return {"tree_internal_nodes": internal, "tree_leaves": leaves}

    def projection_classes(self) -> Tensor:
        """(C, N) bool: node n projects onto images of the classes its reachable leaves predict
        (the reference's class-constrained projection); a node pruned away may use any image."""
        seen = reachable(self.routes.cpu())
        internal = len(self.routes)
        leaf_class = self.leaf_logits.argmax(dim=1).cpu()
        allowed = torch.zeros(internal, self.num_classes, dtype=torch.bool)
        for node in range(internal):
            first = last = node
            while first < internal:  # the leaves below a node are a contiguous run of the next levels
                first, last = 2 * first + 1, 2 * last + 2
            below = torch.arange(first, last + 1) - internal
            keep = below[seen[internal + below]]
            allowed[node, leaf_class[keep]] = True
            if not (seen[node] and int(self.routes[node]) == 0) or not allowed[node].any():
                allowed[node] = True
        return allowed.t().contiguous().to(self.leaf_logits.device)  # (C, N), like every head's

    @classmethod
    def search_space(cls, pretrained_backbone: bool = False) -> Dict[str, object]:
        # Around the reference's rates (add-on and prototypes 1e-3, pretrained backbone 1e-5);
        # the depth stays fixed: it sets the prototype count, which the protocol shares.
        backbone = ({"backbone_lr": FloatRange(1e-6, 1e-4, log=True)} if pretrained_backbone
                    else {"scratch_backbone_lr": FloatRange(1e-4, 1e-2, log=True)})
        return {"lr": FloatRange(1e-4, 1e-2, log=True), **backbone}

    def phases(self, epochs: int, pretrained_backbone: bool, frozen_backbone: bool = False) -> List[Phase]:
        lrs = {"addon": self.lr, "prototypes": self.lr}
        backbone_lr = self.backbone_lr if pretrained_backbone else self.scratch_backbone_lr
        # The reference freezes a pretrained backbone for its first 30 of 100 epochs, so the
        # random add-on's first gradients do not wreck it; one trained from scratch, or a frozen
        # (cached) one, has nothing to protect.
        protects = pretrained_backbone and not frozen_backbone
        warm = min(epochs - 1, round(epochs * self.freeze_fraction)) if protects else 0
        phases = [Phase("warm", warm, lrs)] if warm > 0 else []
        phases.append(Phase("joint", epochs - warm, {**lrs, "backbone": backbone_lr}, after=("prune", "project")))
        return phases

    # ---- inference --------------------------------------------------------------------
    def logits(self, out: PrototypeOutputs) -> Tensor:
        """log y^ (B, C): class scores whose softmax is the soft tree's distribution."""
        _, y_hat = self.soft_output(out)
        return torch.log(y_hat.clamp_min(torch.finfo(y_hat.dtype).tiny))

    def leaf_classes(self) -> Tensor:
        return self.leaf_logits.argmax(dim=1)

    def predict_all(self, out: PrototypeOutputs) -> Dict[str, Tensor]:
        pi, y_hat = self.soft_output(out)
        leaf_class = self.leaf_classes()
        return {"soft": y_hat.argmax(dim=1), "greedy": leaf_class[greedy_leaves(out.profile, self.routes)],
                "sample-max": leaf_class[pi.argmax(dim=1)]}

    def decision_path(self, profile: Tensor) -> Tuple[List[int], List[bool], int]:
        """The greedy path of one image's routing probabilities (N,): (nodes, went right, leaf)."""
        return path_nodes(profile, self.routes.cpu())

    def leaf_distribution(self, leaf: int) -> Tensor:
        """softmax(c_leaf): (C,)."""
        return self.leaf_logits[leaf].softmax(dim=0)

    def make_scorer(self, anchors: Tensor) -> "TreeScorer":
        return TreeScorer(self, anchors)


class TreeScorer:
    """Deletion-test scorer: the soft tree's probability of the class predicted before occlusion.

    Evidence ranks the nodes of the greedy decision path by their routing probability s_n
    (those shown present in the explanation first); nodes off the path get -1, below every
    s_n in [0, 1], so deleting the m top patches re-routes along the explained path.
    """

    kind = "tree-probability"
    score_name = "y^ of the predicted class"

    def __init__(self, head: ProtoTreeHead, anchors: Tensor):
        self.head = head
        self.anchors = anchors.double().cpu()
        self.predicted = self._distribution(self.anchors).argmax(1)

    def _distribution(self, profiles: Tensor) -> Tensor:
        routes = self.head.routes.cpu()
        pi = leaf_probabilities(profiles.double().cpu(), routes)
        return tree_output(pi, self.head.leaf_logits.double().cpu())

    def evidence(self) -> Tensor:
        routes = self.head.routes.cpu()
        evidence = torch.full_like(self.anchors, -1.0)
        for row, profile in enumerate(self.anchors):
            nodes, _, _ = path_nodes(profile, routes)
            evidence[row, nodes] = profile[nodes]
        return evidence

    def score(self, profiles: Tensor, rows: Tensor) -> Tensor:
        return self._distribution(profiles).gather(1, self.predicted[rows][:, None])[:, 0]

    def predict(self, profiles: Tensor) -> Tensor:
        return self._distribution(profiles).argmax(1)
