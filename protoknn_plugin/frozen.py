"""Frozen-backbone mode for a whole run: every split's backbone maps cached, the model fed maps.

``prepare_feature_cache(model, splits, ...)`` is what a caller (the ``train`` command, the
benchmark) uses; ``features.FeatureCache`` does the caching, ``PrototypeModel.frozen_backbone()``
feeds the model maps. Every head trains its add-on, prototypes and head on the same cache.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torch.utils.data import Dataset

from .errors import check
from .features import CachedFeatures, FeatureCache, labels_digest, weights_digest


@dataclasses.dataclass
class FrozenBackbone:
    """What ``prepare_feature_cache`` returns: cached splits, and the mode to train them in.

    ``splits``: the original ``DatasetSplits`` with every split replaced by its cached maps
    (same labels, classes and order). ``info``: add it to the run's data info.
    ``frozen_backbone()``: the context in which the model takes maps (``model.frozen_backbone()``).
    """

    model: Any
    splits: Any
    info: Dict[str, Any]
    cache: FeatureCache

    def frozen_backbone(self):
        return self.model.frozen_backbone()

    bypassed = frozen_backbone  # the earlier name, for callers that use it


def _image_splits(splits) -> Dict[str, Dataset]:
    """Every Dataset-valued field of ``splits`` (train, train_plain, test, and a validation split if any)."""
    return {f.name: getattr(splits, f.name) for f in dataclasses.fields(splits)
            if isinstance(getattr(splits, f.name), Dataset)}


def prepare_feature_cache(model, splits, *, dataset: str, data_dir=None, limit=None, crop: bool = False,
                          cache_dir=None, dtype: str = "float16", device=None, progress: bool = True,
                          log: Optional[Callable[[str], None]] = None, channels_last: bool = True) -> FrozenBackbone:
    """Cache the maps of ``model.backbone`` for every split of ``splits``; see ``FrozenBackbone``.

    The training split is cached without augmentation, which makes it the same samples in
    the same order as ``train_plain`` (``DatasetSplits``' contract), so it shares that cache.
    ``dataset``/``data_dir``/``limit``/``crop`` are how the splits were made (part of the key).
    """
    head = model.head
    check(head.supports_frozen_backbone,
          f"head {head.name!r} cannot train with --frozen-backbone: it needs augmentations of the images that a "
          "cache of one backbone map per image cannot give; train it without --frozen-backbone")
    cache = FeatureCache(cache_dir, dtype=dtype, progress=progress, log=log, channels_last=channels_last)
    backbone = model.backbone
    if device is not None:
        backbone.to(device)
    common = {
        "dataset": dataset, "data_dir": str(Path(data_dir).expanduser().resolve()) if data_dir else None,
        "limit": limit, "crop": bool(crop), "image_size": getattr(splits, "image_size", None),
        "mean": list(getattr(splits, "mean", ()) or ()), "std": list(getattr(splits, "std", ()) or ()),
        "backbone": model.config.backbone, "backbone_options": dict(model.config.backbone_options),
        "weights": model.config.weights, "in_channels": model.config.in_channels,
        "weights_digest": weights_digest(backbone),
        # the backbone converts the data's normalisation to its own when these are set
        "input_normalization": [model.config.input_mean, model.config.input_std],
    }
    parts = _image_splits(splits)
    cached: Dict[str, CachedFeatures] = {}
    for name, part in parts.items():
        if name == "train" and "train_plain" in parts:
            continue
        labels = getattr(part, "labels", None)
        identity = {**common, "split": name, "size": len(part),
                    "labels_digest": labels_digest(labels) if labels is not None else None}
        cached[name] = cache.load_or_build(backbone, part, identity, device=device)
    if "train" in parts and "train_plain" in parts:
        cached["train"] = cached["train_plain"]
    for name, part in cached.items():
        expected = getattr(parts[name], "labels", None)
        check(expected is None or torch.equal(part.labels, torch.as_tensor(expected)),
              f"the cached {name} labels differ from the data's; delete {part.folder} and run again")
    info = {"frozen_backbone": True, "feature_cache": str(cache.root), "feature_dtype": dtype}
    return FrozenBackbone(model, dataclasses.replace(splits, **cached), info, cache)
