"""Explanation data (no plotting): counterfactuals for kNN heads, "this looks like that" for ProtoPNet.

ProtoKNN (paper sec. 2.4, Fig. 3), with k = 1: the anchor is the query image, the
positive its nearest training sample (the k=1 prediction), the negative the nearest
training sample of another class. The squared distance splits over prototypes,

    d_an^2 - d_ap^2 = sum_i c_i,   c_i = (s_a,i - s_n,i)^2 - (s_a,i - s_p,i)^2,

so the prototypes with the largest c_i are why the anchor is nearer the positive.

ProtoPNet (Chen et al. 2019): the predicted logit is sum_i s_i * w_(c,i); the top
prototypes by that product ("points contributed"), or by similarity alone, are shown
with their source patches.

Boxes follow ProtoPNet's convention: the prototype's similarity map is upsampled to the
image (bicubic) and boxed around the pixels at or above its 95th percentile. Boxes are
``(x0, y0, x1, y1)`` in pixels, end exclusive (``image[y0:y1, x0:x1]`` is inside).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ProtoKNNError, UnknownNameError, check

Box = Tuple[int, int, int, int]
"""(x0, y0, x1, y1) pixels, end exclusive."""

RANKINGS = ("contribution", "similarity")
MAP_BATCH = 32  # images per forward when computing similarity maps


# --------------------------------------------------------------------------- numbers

def contributions(s_anchor: Tensor, s_pos: Tensor, s_neg: Tensor) -> Tensor:
    """Per-prototype share of d_an^2 - d_ap^2: (P,) x 3 -> (P,).

    c_i = (s_a,i - s_n,i)^2 - (s_a,i - s_p,i)^2, so ``c.sum() == d_an^2 - d_ap^2``
    (exact up to floating-point rounding, in the inputs' dtype).
    """
    shapes = {tuple(s_anchor.shape), tuple(s_pos.shape), tuple(s_neg.shape)}
    check(len(shapes) == 1 and s_anchor.dim() == 1,
          f"contributions needs three profiles of the same shape (P,), got {sorted(shapes)}")
    return (s_anchor - s_neg).square() - (s_anchor - s_pos).square()


def activation_box(similarity_map: Tensor, image_size: Tuple[int, int], percentile: float = 95.0) -> Box:
    """Box around where a prototype activates: map (H, W) -> (x0, y0, x1, y1) in an image (h, w).

    The map is upsampled bicubically to the image size and the box encloses every pixel at
    or above the map's ``percentile``-th percentile (ProtoPNet: 95).
    """
    check(similarity_map.dim() == 2, f"activation_box needs one map (H, W), got {tuple(similarity_map.shape)}")
    check(0.0 <= percentile <= 100.0, f"percentile must be within 0..100, got {percentile}")
    h, w = int(image_size[0]), int(image_size[1])
    check(h > 0 and w > 0, f"image_size must be positive (h, w), got {tuple(image_size)}")
    up = F.interpolate(similarity_map.detach().double()[None, None], size=(h, w), mode="bicubic",
                       align_corners=False)[0, 0]
    up = up.nan_to_num(neginf=-1e300, posinf=1e300)
    threshold = torch.quantile(up.flatten(), percentile / 100.0)
    # Equal cells (a flat background) come out of the interpolation differing by rounding
    # noise (~1e-16); far below float32 maps' precision, such values count as ties.
    tolerance = 1e-9 * float(up.abs().max())
    hot = up >= threshold - tolerance
    rows = torch.nonzero(hot.any(dim=1)).flatten()
    cols = torch.nonzero(hot.any(dim=0)).flatten()
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def cell_box(cell: Tuple[int, int], map_size: Tuple[int, int], image_size: Tuple[int, int]) -> Box:
    """The image region under feature-map cell (row, col) of a map (H, W): the cell scaled to the image (h, w)."""
    (row, col), (H, W), (h, w) = cell, map_size, image_size
    return (math.floor(col * w / W), math.floor(row * h / H),
            math.ceil((col + 1) * w / W), math.ceil((row + 1) * h / H))


def part_box(position: Tuple[float, float], map_size: Tuple[int, int], image_size: Tuple[int, int]) -> Box:
    """The image region of a cell-sized square centred at the fractional cell ``position`` (row, col)."""
    (row, col), (H, W), (h, w) = position, map_size, image_size
    return (math.floor(col * w / W), math.floor(row * h / H), math.ceil((col + 1) * w / W),
            math.ceil((row + 1) * h / H))


def deformed_part_boxes(model, image: Tensor, prototypes: Sequence[int]) -> Dict[int, Tuple[Box, ...]]:
    """Per prototype of a deformable layer, its parts' boxes on ``image`` (C, H, W) at the patch
    where it is most similar; {} for a layer without parts."""
    layer = model.prototype_layer
    if not hasattr(layer, "part_positions"):
        return {}
    was = model.training
    model.eval()
    try:
        out = model(image[None].to(model_device(model)))
    finally:
        model.train(was)
    map_size, size = tuple(out.feature_map.shape[2:]), tuple(image.shape[-2:])
    boxes = {}
    for i in prototypes:
        positions = layer.part_positions(out.offsets[0].float(), int(out.locations[0, i])).cpu().tolist()
        boxes[int(i)] = tuple(part_box((r, c), map_size, size) for r, c in positions)
    return boxes


def resolve_class(name: str, classes: Sequence[str]) -> int:
    """Class index of ``name`` (case-insensitive); unknown names raise UnknownNameError."""
    lowered = {str(c).lower(): i for i, c in enumerate(classes)}
    key = str(name).strip().lower()
    if key not in lowered:
        raise UnknownNameError("class", str(name), [str(c) for c in classes])
    return lowered[key]


# --------------------------------------------------------------------------- results

@dataclass
class PrototypeEvidence:
    """One prototype in an explanation.

    index: prototype number i.
    score: what it was ranked by (c_i for counterfactuals, s_i * w_(c,i) or s_i for ProtoPNet).
    similarity: its similarity to each image shown, e.g. {"anchor": s_a,i, "positive": s_p,i, ...}.
    boxes: its activation box on each image shown (same keys as ``similarity``).
    source_index: training image (index into ``train_plain``) it was projected onto.
    source_cell: (row, col) of that patch in the feature map.
    source_box: its activation box on the source image.
    source_cell_box: the image region under ``source_cell`` (the projected patch itself).
    prototype_class: ProtoPNet's class of the prototype; None for ProtoKNN.
    weight: ProtoPNet's last-layer weight to the predicted class; None for ProtoKNN.
    """

    index: int
    score: float
    similarity: Dict[str, float]
    boxes: Dict[str, Box]
    source_index: int
    source_cell: Tuple[int, int]
    source_box: Box
    source_cell_box: Box
    prototype_class: Optional[int] = None
    weight: Optional[float] = None
    shared_by: Tuple[int, ...] = ()  # a pool prototype's classes (ProtoPool); () when it has one class or none
    part_boxes: Tuple[Box, ...] = ()  # deformable prototypes: each part's cell at its deformed position


@dataclass
class Counterfactual:
    """Why the anchor is the positive's class rather than the negative's (k = 1, sec. 2.4).

    Profiles are (P,) float64 from one eval-mode forward of the three images, so the
    numbers and the boxes come from the same pass; ``search_d_ap2``/``search_d_an2`` are
    the kNN memory's float32 distances (equal up to rounding for a full memory).
    ``contributions`` (P,) sum to ``difference`` = d_an^2 - d_ap^2. ``top`` are the
    prototypes with the largest contribution, largest first.
    """

    anchor: Tensor  # (C, H, W) normalised
    positive: Tensor
    negative: Tensor
    anchor_profile: Tensor  # (P,)
    positive_profile: Tensor
    negative_profile: Tensor
    predicted_class: int  # the positive's class (the k=1 prediction)
    negative_class: int
    positive_index: int  # training index (train_plain)
    negative_index: int
    positive_memory: int  # position in the kNN memory
    negative_memory: int
    d_ap2: float
    d_an2: float
    difference: float
    contributions: Tensor  # (P,)
    top: List[PrototypeEvidence]
    search_d_ap2: float = float("nan")
    search_d_an2: float = float("nan")
    anchor_label: Optional[int] = None
    anchor_name: str = "query image"
    head_predictions: Dict[str, int] = field(default_factory=dict)

    @property
    def top_sum(self) -> float:
        return float(sum(p.score for p in self.top))


@dataclass
class LooksLike:
    """ProtoPNet's "this looks like that": the top prototypes for the predicted class.

    logits (C,) = last_layer(profile); logit of the predicted class = sum_i s_i w_(c,i),
    and ``top`` are ranked by ``ranking`` ("contribution": s_i * w_(c,i); "similarity": s_i).
    """

    image: Tensor  # (C, H, W)
    profile: Tensor  # (P,)
    logits: Tensor  # (C,)
    predicted_class: int
    ranking: str
    top: List[PrototypeEvidence]
    anchor_label: Optional[int] = None
    anchor_name: str = "query image"
    # With a shared pool (ProtoPool): the prototypes the predicted class uses; else ().
    class_prototypes: Tuple[int, ...] = ()

    @property
    def predicted_logit(self) -> float:
        return float(self.logits[self.predicted_class])


# --------------------------------------------------------------------------- checks

def check_explainable(model) -> None:
    """Raise a one-line error unless ``model`` has projected prototypes."""
    head = model.head
    if not head.uses_prototypes or model.prototype_layer is None:
        raise ProtoKNNError(
            f"head {head.name!r} has no prototypes, so it cannot be explained; "
            "train a protoknn or protopnet head to get explanations")
    if model.projection is None:
        raise ProtoKNNError(
            "the model's prototypes were never projected onto training patches, so they have no source images; "
            "finish training (`protoknn train ... --resume`) before explaining")


def _knn_of(model):
    knn = getattr(model.head, "knn", None)
    if knn is None:
        raise ProtoKNNError(
            f"head {model.head.name!r} has no kNN memory, so it has no counterfactual explanation; "
            "use a protoknn run, or this_looks_like_that for a protopnet run")
    if len(knn) == 0:
        raise ProtoKNNError(
            "the kNN memory is empty (training did not finish); finish training with `protoknn train ... --resume`")
    return knn


def _check_image(model, image: Tensor) -> Tensor:
    channels = model.config.in_channels
    check(isinstance(image, Tensor) and image.dim() == 3 and image.is_floating_point(),
          f"explain needs one normalised image tensor (C, H, W), got "
          f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
    check(image.shape[0] == channels,
          f"the image has {image.shape[0]} channel(s) but the model takes {channels}; "
          "load it with the run's dataset transform (DatasetSplits.load_image)")
    return image


def check_top(top: int) -> int:
    check(isinstance(top, (int, np.integer)) and not isinstance(top, bool) and top >= 1,
          f"top must be a positive number of prototypes, got {top!r}")
    return int(top)


def _training_image(train_dataset, index: int) -> Tuple[Tensor, int]:
    check(0 <= index < len(train_dataset),
          f"the model refers to training image {index} but the training set has {len(train_dataset)}; "
          "rebuild the dataset with the run's settings (same --data-dir and limit)")
    image, label = train_dataset[index]
    return image, int(label)


# --------------------------------------------------------------------------- maps

def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def forward_maps(model, images: Tensor):
    """Eval-mode forward with similarity maps: images (B, C, H, W) -> (profiles (B, P), maps (B, P, h, w))."""
    was = model.training
    model.eval()
    try:
        out = model(images.to(model_device(model)), maps=True)
    finally:
        model.train(was)
    return out.profile.cpu(), out.similarity_maps.cpu()


def source_boxes(model, train_dataset, prototypes: Sequence[int]) -> Dict[int, Tuple[Box, Tuple[int, int], Box]]:
    """Per prototype index: (activation box on its source image, feature-map cell (row, col), that cell's box)."""
    check_explainable(model)
    record = model.projection
    width = int(record.map_size[1])
    wanted = [int(i) for i in prototypes]
    users: Dict[int, List[int]] = {}  # source image -> the prototypes projected onto it
    for i in wanted:
        users.setdefault(int(record.image_index[i]), []).append(i)
    sources = sorted(users)
    result = {}
    for start in range(0, len(sources), MAP_BATCH):  # a chunk at a time: 512 ImageNet-size images are big
        chunk = sources[start:start + MAP_BATCH]
        images = torch.stack([_training_image(train_dataset, src)[0] for src in chunk])
        _, maps = forward_maps(model, images)
        size = tuple(images.shape[-2:])
        for row, src in enumerate(chunk):
            for i in users[src]:
                cell = divmod(int(record.location[i]), width)
                result[i] = (activation_box(maps[row, i], size), cell, cell_box(cell, tuple(record.map_size), size))
    return result


# --------------------------------------------------------------------------- ProtoKNN

@torch.no_grad()
def counterfactual(model, image: Tensor, train_dataset, negative_class: Optional[int] = None,
                   top: int = 5, label: Optional[int] = None, name: str = "query image",
                   classes: Optional[Sequence[str]] = None) -> Counterfactual:
    """Explain a kNN head's k=1 prediction for ``image`` (C, H, W) against ``negative_class``.

    positive = nearest memory item (the prediction); negative = nearest memory item of
    ``negative_class``, by default of any class other than the predicted one.
    ``train_dataset`` must be the run's ``train_plain`` (indices of the memory refer to it).
    ``label`` (the true class) and ``name`` are only shown; ``classes`` names classes in errors.
    """
    check_explainable(model)
    knn = _knn_of(model)
    image = _check_image(model, image)
    top = check_top(top)
    num_classes = int(model.config.num_classes)

    anchor_profile, _ = forward_maps(model, image[None])
    query = anchor_profile.float()
    dist, idx = knn.search(query, 1)
    positive_memory = int(idx[0, 0])
    predicted = int(knn.memory_labels[positive_memory])

    negative_memory, search_an = _negative_memory(knn, query, predicted, negative_class, num_classes, classes)

    positive_index = int(knn.memory_index[positive_memory])
    negative_index = int(knn.memory_index[negative_memory])
    positive, positive_label = _training_image(train_dataset, positive_index)
    negative, negative_label = _training_image(train_dataset, negative_index)
    negative_class_found = int(knn.memory_labels[negative_memory])
    check(positive_label == predicted and negative_label == negative_class_found,
          "the kNN memory's labels do not match the training images; rebuild the dataset with the run's "
          "settings (same dataset, --data-dir and limit)")

    profiles, maps = forward_maps(model, torch.stack([image, positive, negative]))
    s = profiles.double()
    s_a, s_p, s_n = s[0], s[1], s[2]
    c = contributions(s_a, s_p, s_n)
    d_ap2 = float((s_a - s_p).square().sum())
    d_an2 = float((s_a - s_n).square().sum())

    evidence = _top_evidence(model, train_dataset, c, s, maps, top, tuple(image.shape[-2:]))
    return Counterfactual(
        anchor=image.cpu(), positive=positive.cpu(), negative=negative.cpu(),
        anchor_profile=s_a, positive_profile=s_p, negative_profile=s_n,
        predicted_class=predicted, negative_class=negative_class_found,
        positive_index=positive_index, negative_index=negative_index,
        positive_memory=positive_memory, negative_memory=negative_memory,
        d_ap2=d_ap2, d_an2=d_an2, difference=d_an2 - d_ap2, contributions=c, top=evidence,
        search_d_ap2=float(dist[0, 0]), search_d_an2=search_an,
        anchor_label=label, anchor_name=name, head_predictions=_head_predictions(model, image),
    )


def _negative_memory(knn, query: Tensor, predicted: int, negative_class: Optional[int], num_classes: int,
                     classes: Optional[Sequence[str]]) -> Tuple[int, float]:
    """The counterfactual's negative: (memory position, squared distance) of the nearest memory item of
    ``negative_class``, or of any class but ``predicted`` when it is None; a one-line error for a bad class."""
    if negative_class is None:
        negative_memory, distance = nearest_other_class(knn, query, predicted)
        check(negative_memory is not None,
              "every item in the kNN memory has the predicted class, so there is no other class to explain against")
        return negative_memory, distance
    check(isinstance(negative_class, (int, np.integer)) and not isinstance(negative_class, bool)
          and 0 <= int(negative_class) < num_classes,
          f"negative class {negative_class!r} is not a class index of this model (0..{num_classes - 1})")
    shown = repr(classes[predicted]) if classes is not None and predicted < len(classes) else str(predicted)
    check(int(negative_class) != predicted,
          f"the negative class {shown} is the predicted class; choose another class to explain against")
    distances, positions = knn.nearest_of_class(query, int(negative_class))
    return int(positions[0]), float(distances[0])


def _top_evidence(model, train_dataset, c: Tensor, s: Tensor, maps: Tensor, top: int,
                  size: Tuple[int, int]) -> List[PrototypeEvidence]:
    """The ``top`` prototypes by contribution c (P,), with the similarities s (3, P) and maps (3, P, h, w)
    of anchor, positive and negative, their boxes on images of ``size`` and their source patches."""
    order = torch.argsort(c, descending=True)[:min(top, len(c))].tolist()
    sources = source_boxes(model, train_dataset, order)
    keys = ("anchor", "positive", "negative")
    return [
        PrototypeEvidence(
            index=i, score=float(c[i]),
            similarity={k: float(s[r, i]) for r, k in enumerate(keys)},
            boxes={k: activation_box(maps[r, i], size) for r, k in enumerate(keys)},
            source_index=int(model.projection.image_index[i]), source_cell=sources[i][1], source_box=sources[i][0],
            source_cell_box=sources[i][2],
        )
        for i in order
    ]


def nearest_other_class(knn, query: Tensor, predicted: int) -> Tuple[Optional[int], float]:
    """Nearest memory item whose class is not ``predicted``: (memory position, squared distance)."""
    k = min(len(knn), 32)
    while True:
        dist, idx = knn.search(query, k)
        labels = knn.memory_labels.cpu()[idx[0].cpu()]
        other = torch.nonzero(labels != predicted).flatten()
        if len(other):
            j = int(other[0])
            return int(idx[0, j]), float(dist[0, j])
        if k == len(knn):
            return None, float("nan")
        k = min(len(knn), k * 8)


def _head_predictions(model, image: Tensor) -> Dict[str, int]:
    """The head's own named predictions (k=1, k=3, ... or top1) for the image."""
    was = model.training
    model.eval()
    try:
        preds = model.predict_all(image[None].to(model_device(model)))
    finally:
        model.train(was)
    return {name: int(p[0]) for name, p in preds.items()}


# --------------------------------------------------------------------------- ProtoPNet

@torch.no_grad()
def this_looks_like_that(model, image: Tensor, train_dataset, top: int = 10, ranking: str = "contribution",
                         label: Optional[int] = None, name: str = "query image") -> LooksLike:
    """ProtoPNet's explanation of ``image`` (C, H, W): the top prototypes for the predicted class.

    ranking "contribution" (default) orders by s_i * w_(c,i), the points each prototype adds
    to the predicted class's logit (they sum to the logit); "similarity" orders by s_i alone,
    as ProtoPNet's "most activated prototypes" view.
    """
    check_explainable(model)
    class_weights = model.head.class_weights()
    if class_weights is None:
        raise ProtoKNNError(
            f"head {model.head.name!r} has no linear last layer, so it has no 'this looks like that' explanation; "
            "use counterfactual for a kNN head")
    if ranking not in RANKINGS:
        raise UnknownNameError("ranking", ranking, RANKINGS)
    image = _check_image(model, image)
    top = check_top(top)
    profiles, maps = forward_maps(model, image[None])
    profile = profiles[0]
    weight = class_weights.detach().cpu().to(profile.dtype)  # (C, P)
    logits = weight @ profile
    predicted = int(logits.argmax())
    points = profile * weight[predicted]
    key = points if ranking == "contribution" else profile
    order = torch.argsort(key, descending=True)[:min(top, len(key))].tolist()
    sources = source_boxes(model, train_dataset, order)
    size = tuple(image.shape[-2:])
    proto_class = getattr(model.head, "prototype_class", None)
    users = model.head.classes_using()
    shared = users is not None and any(len(u) != 1 for u in users)
    parts = deformed_part_boxes(model, image, order)
    evidence = [
        PrototypeEvidence(
            index=i, score=float(key[i]), similarity={"anchor": float(profile[i])},
            boxes={"anchor": activation_box(maps[0, i], size)},
            source_index=int(model.projection.image_index[i]), source_cell=sources[i][1], source_box=sources[i][0],
            source_cell_box=sources[i][2],
            prototype_class=int(proto_class[i]) if proto_class is not None else None,
            weight=float(weight[predicted, i]), shared_by=tuple(users[i]) if shared else (),
            part_boxes=parts.get(i, ()),
        )
        for i in order
    ]
    uses = tuple(i for i, u in enumerate(users) if predicted in u) if shared else ()
    return LooksLike(image=image.cpu(), profile=profile, logits=logits, predicted_class=predicted, ranking=ranking,
                     top=evidence, anchor_label=label, anchor_name=name, class_prototypes=uses)


# --------------------------------------------------------------------------- decision trees

@dataclass
class PathStep:
    """One internal node on a tree's decision path.

    node: the node's prototype index. similarity: its routing probability s_n = exp(-d_n).
    present: the path went right (s_n > 0.5, "the prototype is present"). box: where the
    prototype activates on the image; the source fields as in ``PrototypeEvidence``.
    """

    node: int
    similarity: float
    present: bool
    box: Box
    source_index: int
    source_cell: Tuple[int, int]
    source_box: Box
    source_cell_box: Box


@dataclass
class DecisionPath:
    """A tree head's greedy path from the root to a leaf for one image.

    ``leaf_distribution`` (C,) is the leaf's class distribution; ``predicted_class`` its
    argmax (the greedy prediction). ``head_predictions``: every named prediction of the head
    (soft, greedy, sample-max). ``tree``: the head's size numbers (after pruning).
    """

    image: Tensor  # (C, H, W)
    steps: List[PathStep]
    leaf: int
    leaf_distribution: Tensor  # (C,)
    predicted_class: int
    head_predictions: Dict[str, int]
    tree: Dict[str, float]
    anchor_label: Optional[int] = None
    anchor_name: str = "query image"


@torch.no_grad()
def decision_path(model, image: Tensor, train_dataset, label: Optional[int] = None,
                  name: str = "query image") -> DecisionPath:
    """Explain a tree head's prediction for ``image`` (C, H, W): each node on the greedy path with its
    prototype, where it activates on the image, present or absent, down to the leaf."""
    check_explainable(model)
    head = model.head
    if head.explanation != "decision-path":
        raise ProtoKNNError(f"head {head.name!r} is no decision tree, so it has no decision path; "
                            "use a prototree run")
    image = _check_image(model, image)
    profiles, maps = forward_maps(model, image[None])
    nodes, rights, leaf = head.decision_path(profiles[0])
    sources = source_boxes(model, train_dataset, nodes)
    size = tuple(image.shape[-2:])
    steps = [PathStep(node=n, similarity=float(profiles[0, n]), present=right, box=activation_box(maps[0, n], size),
                      source_index=int(model.projection.image_index[n]), source_cell=sources[n][1],
                      source_box=sources[n][0], source_cell_box=sources[n][2])
             for n, right in zip(nodes, rights)]
    distribution = head.leaf_distribution(leaf).cpu()
    return DecisionPath(image=image.cpu(), steps=steps, leaf=leaf, leaf_distribution=distribution,
                        predicted_class=int(distribution.argmax()), head_predictions=_head_predictions(model, image),
                        tree=head.stage_info(lambda: profiles), anchor_label=label, anchor_name=name)
