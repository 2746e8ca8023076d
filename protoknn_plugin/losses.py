"""Metric-learning losses and miners from pytorch-metric-learning, chosen by name.

We never write our own margin or proxy-anchor loss. A name maps to a PML class:
``margin`` -> MarginLoss, ``proxy-anchor`` -> ProxyAnchorLoss, any other kebab-case
name -> the PML class of that name (``triplet-margin`` -> TripletMarginLoss), and
PML class names work as they are. ``none`` turns the loss off.
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Optional

from pytorch_metric_learning import distances, losses, miners
from torch import Tensor, nn

from .errors import ProtoKNNError, UnknownNameError


def _pml_names(module, suffix: str) -> Dict[str, str]:
    """kebab-case name -> PML class name, e.g. 'multi-similarity' -> 'MultiSimilarityLoss'."""
    out = {}
    for cls_name in dir(module):
        if cls_name.endswith(suffix) and cls_name not in ("Base" + suffix, "Generic" + suffix):
            stem = cls_name[: -len(suffix)]
            kebab = "".join("-" + c.lower() if c.isupper() else c for c in stem).lstrip("-")
            out[kebab] = cls_name
    return out


LOSS_NAMES = _pml_names(losses, "Loss")
MINER_NAMES = _pml_names(miners, "Miner")


def list_losses() -> List[str]:
    return ["none"] + sorted(LOSS_NAMES)


def _resolve(name: str, table: Dict[str, str], module, kind: str):
    if name in table:
        return getattr(module, table[name])
    if name in table.values():
        return getattr(module, name)
    raise UnknownNameError(kind, name, ["none", *table])


def _accepts(cls, arg: str) -> bool:
    return arg in inspect.signature(cls.__init__).parameters


class MetricLoss(nn.Module):
    """A PML loss with its optional miner, as one module: ``loss(embeddings (B, E), labels (B,))``.

    ``param_groups()`` names the loss's own parameters: ``beta`` (MarginLoss's learnable
    beta, its own lr) and ``proxies`` (proxy-based losses, 100x lr in the reference code).
    """

    def __init__(self, name: str, loss: Optional[nn.Module], miner: Optional[nn.Module]):
        super().__init__()
        self.name, self.loss, self.miner = name, loss, miner

    @property
    def enabled(self) -> bool:
        return self.loss is not None

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self.loss is None:
            return embeddings.new_zeros(())
        # PML's proxy losses overwrite proxies.data with the embeddings' dtype: keep float32.
        embeddings = embeddings.float()
        tuples = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, tuples)

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        groups: Dict[str, List[nn.Parameter]] = {}
        if self.loss is None:
            return groups
        for pname, param in self.loss.named_parameters():
            groups.setdefault("beta" if "beta" in pname else "proxies", []).append(param)
        return groups


def create_metric_loss(
    name: str,
    *,
    num_classes: int,
    embedding_size: int,
    miner: Optional[str] = "batch-hard",
    normalize_embeddings: bool = False,
    **options,
) -> MetricLoss:
    """Build a PML loss by name.

    ``margin`` defaults follow docs/method.md (eq. 1): MarginLoss(margin=0.2, beta=1.2, learn_beta=True,
    num_classes=C) with a batch-hard miner, both on LpDistance(p=2, power=1,
    normalize_embeddings=...). ``proxy-anchor``: alpha 32, delta 0.1, no miner.
    """
    if name == "none":
        return MetricLoss(name, None, None)
    cls = _resolve(name, LOSS_NAMES, losses, "loss")
    distance = distances.LpDistance(p=2, power=1, normalize_embeddings=normalize_embeddings)
    kwargs = dict(options)
    if cls is losses.MarginLoss:
        kwargs.setdefault("margin", 0.2)
        kwargs.setdefault("beta", 1.2)
        kwargs.setdefault("learn_beta", True)
        if kwargs["learn_beta"]:
            kwargs.setdefault("num_classes", num_classes)
    for arg, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
        if _accepts(cls, arg):
            kwargs.setdefault(arg, value)
    uses_proxies = _accepts(cls, "embedding_size")
    if cls is losses.MarginLoss or cls is losses.TripletMarginLoss or cls is losses.ContrastiveLoss:
        kwargs.setdefault("distance", distance)
    try:
        loss = cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        raise ProtoKNNError(f"cannot build loss {name!r} with options {options}: {err}; check its PML signature") from None
    miner_module = None
    if miner not in (None, "none") and not uses_proxies:
        miner_cls = _resolve(miner, MINER_NAMES, miners, "miner")
        miner_kwargs = {"distance": distance} if _accepts(miner_cls, "distance") or miner_cls is miners.BatchHardMiner else {}
        miner_module = miner_cls(**miner_kwargs)
    return MetricLoss(name, loss, miner_module)


def single_class_guard(labels: Tensor) -> None:
    """Metric losses need positives and negatives: a one-class batch is a sampler bug, say so."""
    if labels.numel() > 0 and bool((labels == labels[0]).all()):
        raise ProtoKNNError(
            "a training batch holds a single class, so the metric-learning loss has no negatives; "
            "use the class-balanced sampler with --batch-classes >= 2"
        )


__all__ = ["MetricLoss", "create_metric_loss", "list_losses", "LOSS_NAMES", "MINER_NAMES", "single_class_guard"]
