"""ProtoKNN's decision part as a CaBRNet classifier.

CaBRNet splits a model into an extractor (backbone, optional add-on) and a
``CaBRNetClassifier`` that holds the prototypes. This classifier takes the
*backbone* map (B, C, H, W): our ``PrototypeLayer`` owns the 1x1-conv add-on, so the
auxiliary loss (eq. 12) still sees GAP(backbone output). Leave ``add_on`` out of the
extractor in ``model_arch.yml``; ``num_features`` is then the backbone's channel count C.

Everything below the CaBRNet interface is the plugin's own bottom layer, not a copy:
``PrototypeLayer`` (frozen hypersphere prototypes, cosine profile, costs C and C^) and
``ProtoKNNHead`` (margin task loss, Sinkhorn cluster loss, aux loss, ``KNNClassifier``).
The kNN memory bank is a set of buffers of ``head.knn``, so CaBRNet's checkpoints
(``model.state_dict()``) carry it, and ``cabrnet evaluate`` restores it.

Accuracy in ``loss`` stats (CaBRNet averages them per epoch and ``--save-best`` reads
``train_set/accuracy``):

* model in eval mode and a memory built (after the epilogue): kNN accuracy against the
  stored training profiles, at the primary ``k`` (``accuracy``) and at every k of ``ks``
  (``accuracy_k1``, ``accuracy_k3``, ...);
* otherwise (training, or no memory yet): leave-one-out 1-NN inside the batch, i.e. each
  sample is classified by its nearest *other* sample of the batch (squared L2 between
  profiles). It tracks how well the profiles cluster by class without a memory; it is
  not the test accuracy. A one-sample batch counts as wrong.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from cabrnet.archs.generic.decision import CaBRNetClassifier

from protoknn_plugin.errors import ProtoKNNError, check
from protoknn_plugin.heads.options import option_keys
from protoknn_plugin.heads.protoknn import ProtoKNNHead
from protoknn_plugin.prototypes import PrototypeLayer, PrototypeOutputs

# CaBRNet's cosine similarity is ProtoKNN's s (eq. 15); any other layer would disagree
# with the profile that the losses and the kNN use.
SUPPORTED_SIMILARITY = "CosineSimilarity"
SIMILARITY_MODULE = "cabrnet.core.utils.similarities"


@contextmanager
def _single_thread():
    """One intra-op thread inside the block, then the previous count.

    The hypersphere initialisation is 1000 small SGD steps; with several threads on a busy
    machine each step waits on thread hand-offs (docs/history.md has the measurement).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def batch_loo_accuracy(profiles: Tensor, labels: Tensor) -> float:
    """Leave-one-out 1-NN accuracy inside a batch: profiles (B, P), labels (B,) -> fraction correct.

    Each sample takes the label of its nearest other sample (squared L2). B = 1 gives 0.
    """
    n = profiles.shape[0]
    if n < 2:
        return 0.0
    with torch.no_grad():
        x = profiles.detach().float()
        dist = torch.cdist(x, x).square()
        dist.fill_diagonal_(float("inf"))
        nearest = dist.argmin(dim=1)
        return float((labels[nearest] == labels).float().mean())


class ProtoKNNClassifier(CaBRNetClassifier):
    """ProtoKNN classifier for CaBRNet: backbone map (B, C, H, W) -> ``PrototypeOutputs``.

    Args (the ``params`` of ``classifier`` in ``model_arch.yml``):
        similarity_config: CaBRNet's ``similarity`` section; must name ``CosineSimilarity``.
        num_classes: C classes (>= 2).
        num_features: backbone channels (CaBRNet fills it in from the extractor).
        num_prototypes: P (frozen, evenly spread on the unit hypersphere).
        dim: D, the add-on's output channels and the prototypes' length.
        seed: seed of the hypersphere initialisation.
        **head_options: any option of ``ProtoKNNHead`` (task_loss, aux_loss,
            cluster_variant, cluster_weight, aux_weight, tau, reg, margin, beta,
            cost_space, k, ks, memory, ...).
    """

    def __init__(
        self,
        similarity_config: Optional[Dict[str, Any]] = None,
        num_classes: int = 2,
        num_features: int = 0,
        num_prototypes: int = 100,
        dim: int = 64,
        seed: int = 0,
        compatibility_mode: bool = False,
        **head_options: Any,
    ) -> None:
        check(isinstance(num_classes, int) and num_classes >= 2,
              f"ProtoKNNClassifier needs num_classes >= 2, got {num_classes!r}; set it in model_arch.yml")
        check(isinstance(num_features, int) and num_features >= 1,
              f"ProtoKNNClassifier needs num_features >= 1 (the backbone's channels), got {num_features!r}; "
              "leave it out of model_arch.yml so CaBRNet infers it from the extractor")
        check(not compatibility_mode,
              "ProtoKNN has no legacy implementation to be compatible with; remove compatibility_mode "
              "from model_arch.yml")
        super().__init__(num_classes=num_classes, num_features=num_features)
        self.head = _make_head(num_classes, num_features, dim, num_prototypes, head_options)
        spec = self.head.prototype_spec()
        with _single_thread():
            self.prototype_layer = PrototypeLayer(
                num_features, spec.num_prototypes, dim, similarity=spec.similarity, addon=spec.addon,
                cost_space=spec.cost_space, init=spec.init, frozen=spec.frozen_prototypes, seed=seed,
            )
        self.build_similarity(_check_similarity(similarity_config))

    # ------------------------------------------------------------ CaBRNet's view of the prototypes
    @property
    def prototypes(self) -> Tensor:  # type: ignore[override]
        """(P, D, 1, 1) view of the prototype layer's (P, D) prototypes, CaBRNet's layout."""
        return self.prototype_layer.prototypes[:, :, None, None]

    @property
    def prototype_class_mapping(self) -> np.ndarray:
        """(P, C) all ones: ProtoKNN's prototypes belong to no class; any may serve every class."""
        return np.ones((self.num_prototypes, self.num_classes), dtype=np.float32)

    def similarities(self, features: Tensor, **kwargs) -> Tensor:
        """Backbone map (N, C, H, W) -> cosine similarity of every patch to every prototype (N, P, H, W)."""
        return self.similarity_layer.similarities(self.prototype_layer.addon(features), self.prototypes, **kwargs)

    def distances(self, features: Tensor, **kwargs) -> Tensor:
        """Backbone map (N, C, H, W) -> CaBRNet's cosine distance 1 - cos (N, P, H, W).

        The losses use the squared distance on the sphere, 2 - 2 cos (docs/method.md), i.e. twice this.
        """
        return self.similarity_layer.distances(self.prototype_layer.addon(features), self.prototypes, **kwargs)

    # ------------------------------------------------------------ forward, loss, prediction
    def forward(self, features: Tensor, **kwargs) -> PrototypeOutputs:
        """Backbone map (B, C, H, W) -> PrototypeOutputs (profile (B, P), cost, gap_cost, ...)."""
        if not isinstance(features, Tensor) or features.dim() != 4 or features.shape[1] != self.num_features:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ProtoKNNError(
                f"ProtoKNNClassifier expects a backbone map (B, {self.num_features}, H, W), got {shape}; "
                "use a single-layer extractor without add_on in model_arch.yml")
        return self.prototype_layer(features)

    def loss(self, output: PrototypeOutputs, label: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        """Eq. 13 on one batch -> (total loss, stats). Stats: loss, task, cluster, aux, accuracy[, accuracy_kK]."""
        _check_labels(label, self.num_classes)
        terms = self.head.loss(output, label)
        stats = {"loss": float(terms["total"].detach())}
        stats.update({name: float(value.detach()) for name, value in terms.items() if name != "total"})
        if not self.training and self.has_memory:
            predictions = self.head.predict_all(output)
            for name, predicted in predictions.items():
                stats["accuracy_k" + name.split("=")[1]] = float((predicted.to(label.device) == label).float().mean())
            stats["accuracy"] = stats["accuracy_k" + str(self.head.knn.k)]
        else:
            stats["accuracy"] = batch_loo_accuracy(output.profile, label)
        return terms["total"], stats

    @property
    def has_memory(self) -> bool:
        return len(self.head.knn) > 0

    def fit_memory(self, profiles: Tensor, labels: Tensor) -> None:
        """Store the kNN memory from training profiles (N, P) and labels (N,)."""
        self.head.fit_memory(profiles, labels)

    @torch.no_grad()
    def predict(self, output: PrototypeOutputs) -> Dict[str, Tensor]:
        """kNN predictions (B,) for every k of ``ks``: {"k=1": ..., "k=3": ...}."""
        check(self.has_memory, "the kNN memory is empty: run the training epilogue (cabrnet train) or "
                               "ProtoKNNCaBRNet.build_memory(dataloader) before predicting")
        return self.head.predict_all(output)


def _check_labels(label: Tensor, num_classes: int) -> None:
    check(isinstance(label, Tensor) and label.dim() == 1 and not label.is_floating_point(),
          f"ProtoKNNClassifier.loss expects integer labels (B,), got "
          f"{tuple(label.shape) if isinstance(label, Tensor) else type(label).__name__}")
    if label.numel():
        low, high = int(label.min()), int(label.max())
        check(low >= 0 and high < num_classes,
              f"a batch holds class {high if high >= num_classes else low} but the classifier has "
              f"num_classes={num_classes}; set num_classes in model_arch.yml to the dataset's class count")


def _check_similarity(config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if config is None:
        return {"name": SUPPORTED_SIMILARITY}
    if not isinstance(config, dict) or config.get("name") != SUPPORTED_SIMILARITY or \
            config.get("module", SIMILARITY_MODULE) != SIMILARITY_MODULE:
        raise ProtoKNNError(
            f"ProtoKNN measures patches by cosine similarity (eq. 15), but model_arch.yml names the similarity "
            f"{config!r}; set `similarity: {{name: {SUPPORTED_SIMILARITY}}}`")
    return config


def _make_head(num_classes: int, channels: int, dim: int, num_prototypes: int, options: Dict[str, Any]) -> ProtoKNNHead:
    allowed = option_keys(ProtoKNNHead)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ProtoKNNError(
            f"unknown ProtoKNNClassifier option(s) {', '.join(unknown)} in model_arch.yml; "
            f"valid: num_prototypes, dim, seed, {', '.join(allowed)}")
    if "ks" in options and isinstance(options["ks"], list):
        options = {**options, "ks": tuple(options["ks"])}
    return ProtoKNNHead.from_options(num_classes=num_classes, backbone_channels=channels, dim=dim,
                                     num_prototypes=num_prototypes, **options)
