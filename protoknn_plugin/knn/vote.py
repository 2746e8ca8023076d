"""The vote of ProtoKNN's classifier: majority of the k nearest, ties to the closest class."""
from __future__ import annotations

from typing import Dict, Iterable

import torch


def majority_vote(neighbour_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Majority vote over (Q, k) neighbour labels ordered nearest first -> (Q,) classes.

    Ties go to the tied class whose nearest member ranks first (is closest). Vectorised:
    counts (Q, C) by scatter-add, first-occurrence rank (Q, C) by scatter-amin, and the
    score count * (k + 1) + (k - first_rank) orders classes by count, then by rank.
    """
    num_queries, k = neighbour_labels.shape
    labels = neighbour_labels.long()
    counts = torch.zeros(num_queries, num_classes, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    ranks = torch.arange(k, device=labels.device).expand(num_queries, k)
    first_rank = torch.full((num_queries, num_classes), k, dtype=torch.long, device=labels.device)
    first_rank.scatter_reduce_(1, labels, ranks, reduce="amin")
    score = counts * (k + 1) + (k - first_rank)
    return score.argmax(dim=1)


class MajorityVote:
    """``majority_vote`` over ``num_classes`` classes, for one k or for every k of one neighbour list."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, neighbour_labels: torch.Tensor) -> torch.Tensor:
        """(Q, k) neighbour labels, nearest first -> (Q,) classes."""
        return majority_vote(neighbour_labels, self.num_classes)

    def for_each_k(self, neighbour_labels: torch.Tensor, ks: Iterable[int]) -> Dict[int, torch.Tensor]:
        """(Q, K) neighbour labels, nearest first, K >= max(ks) -> {k: (Q,) classes} from the first k of each row."""
        return {k: self(neighbour_labels[:, :k]) for k in ks}
