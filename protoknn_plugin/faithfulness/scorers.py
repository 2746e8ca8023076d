"""What a deletion test measures for each kind of head.

A scorer is built from the anchors' profiles (N, P) once, then scores occluded versions
of those anchors against the same reference:

* ``KNNMarginScorer`` (ProtoKNN): the margin d_an^2 - d_ap^2 against the anchor's own
  nearest positive and nearest negative (fixed before occlusion); evidence c_i
  (``explain.contributions``); prediction = the k = 1 class of a memory search.
* ``LinearLogitScorer`` (ProtoPNet and other linear heads): the logit of the class
  predicted before occlusion; evidence w_(c,i) * s_i; prediction = argmax of the logits.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ProtoKNNError
from ..explain import nearest_other_class, contributions


class KNNMarginScorer:
    """Margin d_an^2 - d_ap^2 of each anchor against its fixed positive and negative."""

    kind = "knn-margin"
    score_name = "d_an^2 - d_ap^2"

    def __init__(self, knn, anchors: Tensor):
        """anchors: profiles (N, P) of the unoccluded images."""
        self.knn = knn
        queries = anchors.float()
        _, idx = knn.search(queries, 1)
        positive = idx[:, 0].cpu()
        negative = []
        for row in range(len(queries)):
            item, _ = nearest_other_class(knn, queries[row:row + 1], int(knn.memory_labels[positive[row]]))
            if item is None:
                raise ProtoKNNError("every item in the kNN memory has one class, so there is no negative to "
                                    "measure a margin against; train on at least two classes")
            negative.append(item)
        self.predicted = knn.memory_labels.cpu()[positive]
        self.positive = knn.profiles_of(positive).double()
        self.negative = knn.profiles_of(torch.tensor(negative)).double()
        self.anchors = anchors.double().cpu()

    def evidence(self) -> Tensor:
        """(N, P): c_i of each anchor; the rows sum to the margins."""
        return torch.stack([contributions(a, p, n) for a, p, n in zip(self.anchors, self.positive, self.negative)])

    def score(self, profiles: Tensor, rows: Tensor) -> Tensor:
        """Margins (B,) of profiles (B, P) that stand for anchors ``rows`` (B,)."""
        s = profiles.double().cpu()
        return (s - self.negative[rows]).square().sum(1) - (s - self.positive[rows]).square().sum(1)

    def predict(self, profiles: Tensor) -> Tensor:
        _, idx = self.knn.search(profiles.float(), 1)
        return self.knn.memory_labels.cpu()[idx[:, 0].cpu()]


class LinearLogitScorer:
    """Logit of the class each anchor was predicted before occlusion."""

    kind = "linear-logit"
    score_name = "logit of the predicted class"

    def __init__(self, weight: Tensor, anchors: Tensor):
        """weight: the last layer (C, P); anchors: profiles (N, P)."""
        self.weight = weight.detach().double().cpu()
        self.anchors = anchors.double().cpu()
        self.predicted = (self.anchors @ self.weight.t()).argmax(1)

    def evidence(self) -> Tensor:
        """(N, P): points w_(c,i) * s_i to the predicted logit; the rows sum to that logit."""
        return self.anchors * self.weight[self.predicted]

    def score(self, profiles: Tensor, rows: Tensor) -> Tensor:
        logits = profiles.double().cpu() @ self.weight.t()
        return logits.gather(1, self.predicted[rows][:, None])[:, 0]

    def predict(self, profiles: Tensor) -> Tensor:
        return (profiles.double().cpu() @ self.weight.t()).argmax(1)


def create_scorer(model, anchors: Tensor):
    """The scorer for ``model``'s head: its own (``Head.make_scorer``), else the kNN margin when it has
    a kNN memory, else the linear last layer."""
    own = model.head.make_scorer(anchors)
    if own is not None:
        return own
    knn = getattr(model.head, "knn", None)
    if knn is not None:
        if len(knn) == 0:
            raise ProtoKNNError("the kNN memory is empty (training did not finish); finish training with "
                                "`protoknn train ... --resume`")
        return KNNMarginScorer(knn, anchors)
    class_weights = model.head.class_weights()
    if class_weights is None:
        raise ProtoKNNError(f"head {model.head.name!r} has neither a kNN memory nor a linear last layer over "
                            "prototypes, so there is no deletion test for it; use a protoknn or protopnet run")
    return LinearLogitScorer(class_weights, anchors)
