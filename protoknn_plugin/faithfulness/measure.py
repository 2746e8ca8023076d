"""All faithfulness metrics of one model on one dataset, as nested results and flat metrics."""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from ..errors import ProtoKNNError, check
from .consistency import consistency, part_frequencies, prototype_classes
from .deletion import CONDITIONS, deletion_test, forward_in_chunks
from .occlusion import mean_fill
from .purity import nearest_patches, purity
from .scorers import create_scorer
from .stability import stability

DEFAULT_IMAGES = 200
DEFAULT_MS = (1, 3, 5)
DEFAULT_SIGMA = 0.2
CONSISTENCY_THRESHOLD = 0.8
CONSISTENCY_PER_CLASS = 30  # CUB has about 29 test images per class: all of them
PURITY_K = 10
SHORT = {"explained": "", "random_prototypes": "_rand_proto", "random_boxes": "_rand_box"}

PartReader = Callable[[Sequence[int]], Tensor]
"""test indices -> parts (N, K, 3): x, y in the test tensors' pixels, visible (0/1)."""


def check_options(n: int, sigma: float, ms: Sequence[int]) -> None:
    """One-line errors for a bad image count, noise level or list of m, before any slow work."""
    check(isinstance(n, int) and not isinstance(n, bool) and n >= 1,
          f"the number of test images must be a positive integer, got {n!r}")
    check(isinstance(sigma, (int, float)) and sigma >= 0 and math.isfinite(sigma),
          f"sigma must be a finite number >= 0, got {sigma!r}")
    check(len(ms) > 0 and all(isinstance(m, int) and m >= 1 for m in ms),
          f"m must be positive numbers of prototypes, e.g. 1,3,5; got {list(ms)!r}")


def sample_indices(count: int, n: int, seed: int) -> Tensor:
    """``n`` of ``count`` indices drawn with a generator seeded by ``seed``, ascending (all if n >= count)."""
    check(isinstance(n, int) and n >= 1, f"the number of test images must be a positive integer, got {n!r}")
    chosen = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.sort(chosen).values


def per_class_indices(labels: Tensor, classes: Tensor, per_class: int, seed: int) -> Tensor:
    """Up to ``per_class`` test indices of each class in ``classes``, seeded, ascending."""
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c in torch.unique(classes).tolist():
        members = torch.nonzero(labels == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.sort(torch.cat(picked)).values if picked else torch.empty(0, dtype=torch.long)


def _stack(dataset, indices: Tensor) -> Tensor:
    return torch.stack([dataset[int(i)][0] for i in indices])


def evaluate_faithfulness(model, splits, n: int = DEFAULT_IMAGES, seed: int = 0, sigma: float = DEFAULT_SIGMA,
                          ms: Sequence[int] = DEFAULT_MS, parts: Optional[PartReader] = None,
                          nearest=None) -> Dict[str, object]:
    """Deletion (explained vs both controls), stability, purity and, with ``parts``, consistency.

    ``splits``: the run's DatasetSplits (``test``, ``train_plain``, ``train_labels``, ``channels``).
    ``nearest``: a ``purity.NearestPatches`` already computed (the report shares it).
    Everything random is seeded with ``seed``; the same call gives the same numbers.
    """
    if not model.head.uses_prototypes or model.prototype_layer is None:
        raise ProtoKNNError(f"head {model.head.name!r} has no prototypes, so its explanations cannot be measured; "
                            "use a protoknn or protopnet run")
    check_options(n, sigma, ms)
    if len(splits.test) == 0:
        raise ProtoKNNError("the test set is empty; check the dataset path and --limit")
    indices = sample_indices(len(splits.test), n, seed)
    images = _stack(splits.test, indices)
    profiles, maps = forward_in_chunks(model, images)
    scorer = create_scorer(model, profiles)
    stats = deletion_test(model, images, scorer, mean_fill(images.shape[1]), ms=ms, seed=seed, maps=maps)
    result: Dict[str, object] = {
        "images": len(indices), "seed": seed, "sigma": sigma, "ms": list(ms),
        "deletion": {
            "score": scorer.score_name, "kind": scorer.kind,
            "base_mean": float(scorer.score(scorer.anchors, torch.arange(len(indices))).mean()),
            "by_m": {str(m): {
                "drop": {c: stats.drop[c][m] for c in CONDITIONS},
                "flip": {c: stats.flip[c][m] for c in CONDITIONS},
                "area": {c: stats.area[c][m] for c in CONDITIONS},
                # None, not NaN, where the control's drop is <= 0: NaN is not valid JSON
                "ratio_random_prototypes": _finite(stats.ratio("random_prototypes", m)),
                "ratio_random_boxes": _finite(stats.ratio("random_boxes", m)),
            } for m in ms},
        },
        "stability": stability(model, images, sigma=sigma, seed=seed),
    }
    nearest = nearest or nearest_patches(model, splits.train_plain, k=PURITY_K)
    per_prototype = purity(nearest.labels)
    result["purity"] = float(per_prototype.mean())
    result["purity_k"] = int(nearest.labels.shape[1])
    result["consistency"] = None
    if parts is not None:
        classes = prototype_classes(model, splits.train_labels)
        chosen = per_class_indices(splits.test_labels, classes, CONSISTENCY_PER_CLASS, seed)
        _, part_maps = forward_in_chunks(model, _stack(splits.test, chosen))
        freq = part_frequencies(part_maps, parts(chosen.tolist()), splits.test_labels[chosen], classes,
                                tuple(images.shape[-2:]))
        result["consistency"] = consistency(freq, CONSISTENCY_THRESHOLD)
        result["consistency_threshold"] = CONSISTENCY_THRESHOLD
        result["consistency_prototypes"] = int((~torch.isnan(freq).any(1)).sum())
    result["metrics"] = flat_metrics(result)
    return result


def flat_metrics(result: Dict[str, object]) -> Dict[str, Optional[float]]:
    """One number per key, for tables and ``benchmark`` columns (None where not measured)."""
    flat: Dict[str, Optional[float]] = {}
    for m, row in result["deletion"]["by_m"].items():
        for condition in CONDITIONS:
            flat[f"del_drop{SHORT[condition]}[m={m}]"] = row["drop"][condition]
            flat[f"del_flip{SHORT[condition]}[m={m}]"] = row["flip"][condition]
        flat[f"del_ratio_proto[m={m}]"] = row["ratio_random_prototypes"]
        flat[f"del_ratio_box[m={m}]"] = row["ratio_random_boxes"]
    for key in ("stability", "consistency", "purity"):
        flat[key] = result.get(key)
    return flat


def _finite(value: float) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None
