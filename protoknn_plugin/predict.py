"""Predictions for image files with their evidence, one row per image.

kNN heads: the predicted class, the k nearest training images with their squared
distances, and the prototypes that most explain why the query is nearer its nearest
neighbour of the predicted class (p) than the nearest training image of any other class
(n): c_i = (s_q,i - s_n,i)^2 - (s_q,i - s_p,i)^2 (the counterfactual split of
d_qn^2 - d_qp^2 over prototypes).
Linear heads: the predicted class, the top class probabilities, and (ProtoPNet) the
prototypes contributing most points s_i * w_(c,i) to the predicted class's logit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .data.base import IMAGE_SUFFIXES, load_image
from .errors import ProtoKNNError


def collect_images(paths: Sequence[str]) -> List[Path]:
    """Files as given and every image file under given folders (sorted, hidden ones skipped)."""
    found: List[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            found.append(path)
        else:
            raise ProtoKNNError(f"{raw!r} is neither an image file nor a folder; pass existing paths")
    if not found:
        raise ProtoKNNError("no image files found under the given paths; pass image files or folders of them")
    return found


class ImageFiles(Dataset):
    """Items (image (C, S, S), readable) ; an unreadable file gives zeros and readable=False."""

    def __init__(self, paths: Sequence[Path], channels: int, transform, image_size: int):
        self.paths, self.channels, self.transform, self.size = list(paths), channels, transform, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[Tensor, bool]:
        try:
            return load_image(self.paths[i], self.channels, self.transform), True
        except ProtoKNNError:
            return torch.zeros(self.channels, self.size, self.size), False


def training_names(train_plain: Dataset) -> Optional[List[str]]:
    paths = getattr(train_plain, "paths", None)
    return [str(p) for p in paths] if paths is not None else None


class Predictor:
    """Rows of predictions for batches of images (see the module docstring)."""

    def __init__(self, model, classes: Sequence[str], train_names: Optional[List[str]], neighbours: int = 5,
                 top_classes: int = 3, top_prototypes: int = 3):
        self.model, self.classes = model, list(classes)
        self.train_names = train_names
        self.knn = getattr(model.head, "knn", None)
        self.neighbours = neighbours
        self.top_classes = min(top_classes, len(self.classes))
        self.top_prototypes = top_prototypes if model.prototype_layer is not None else 0
        if self.top_prototypes:
            self.top_prototypes = min(top_prototypes, model.prototype_layer.num_prototypes)

    def columns(self) -> List[str]:
        cols = ["path", "predicted_class"]
        if self.knn is not None:
            for i in range(1, self.neighbours + 1):
                cols += [f"neighbour_{i}", f"neighbour_{i}_class", f"distance_{i}"]
        else:
            for i in range(1, self.top_classes + 1):
                cols += [f"class_{i}", f"score_{i}"]
        for i in range(1, self.top_prototypes + 1):
            cols += [f"prototype_{i}", f"prototype_{i}_contribution"]
        return cols

    def _train_name(self, index: int) -> str:
        return self.train_names[index] if self.train_names is not None else f"train[{index}]"

    @torch.no_grad()
    def rows(self, images: Tensor, paths: Sequence[Path]) -> Iterator[Dict[str, object]]:
        out = self.model(images)
        head = self.model.head
        predicted = head.predict(out).cpu()
        rows = [{"path": str(p), "predicted_class": self.classes[int(c)]} for p, c in zip(paths, predicted)]
        if self.knn is not None:
            self._neighbours(rows, out.profile.float())
            contributions = self._knn_contributions(out.profile.float(), predicted)
        else:
            self._class_scores(rows, self._logits(out))
            contributions = self._linear_contributions(out, predicted)
        if contributions is not None and self.top_prototypes:
            values, index = contributions.topk(self.top_prototypes, dim=1)
            for row, v, ix in zip(rows, values.cpu(), index.cpu()):
                for j in range(self.top_prototypes):
                    row[f"prototype_{j + 1}"] = int(ix[j])
                    row[f"prototype_{j + 1}_contribution"] = float(v[j])
        return iter(rows)

    def _neighbours(self, rows, profiles: Tensor) -> None:
        dist, idx = self.knn.search(profiles, self.neighbours)
        original = self.knn.memory_index
        for row, d, ix in zip(rows, dist.cpu(), idx.cpu()):
            for j in range(self.neighbours):
                item = int(ix[j])
                train_index = int(original[item]) if len(original) else item
                row[f"neighbour_{j + 1}"] = self._train_name(train_index)
                row[f"neighbour_{j + 1}_class"] = self.classes[int(self.knn.memory_labels[item])]
                row[f"distance_{j + 1}"] = float(d[j])

    def _knn_contributions(self, profiles: Tensor, predicted: Tensor) -> Optional[Tensor]:
        memory = self.knn.memory_profiles
        if memory.numel() == 0:  # an ivfpq memory keeps only codes
            return None
        memory, labels = memory.to(profiles.device).float(), self.knn.memory_labels.to(profiles.device)
        squared = torch.cdist(profiles, memory).pow(2)  # (B, N)
        same = labels[None, :] == predicted.to(profiles.device)[:, None]
        inf = torch.tensor(float("inf"), device=profiles.device)
        positive = memory[torch.where(same, squared, inf).argmin(dim=1)]
        negative = memory[torch.where(~same, squared, inf).argmin(dim=1)]
        return (profiles - negative).pow(2) - (profiles - positive).pow(2)

    def _logits(self, out) -> Tensor:
        head = self.model.head
        if hasattr(head, "logits"):
            return head.logits(out)
        weights = head.class_weights()
        if weights is not None:
            return out.profile @ weights.t()
        raise ProtoKNNError(f"head {type(head).__name__} gives neither kNN neighbours nor class scores")

    def _class_scores(self, rows, logits: Tensor) -> None:
        values, index = logits.float().softmax(dim=1).topk(self.top_classes, dim=1)
        for row, v, ix in zip(rows, values.cpu(), index.cpu()):
            for j in range(self.top_classes):
                row[f"class_{j + 1}"] = self.classes[int(ix[j])]
                row[f"score_{j + 1}"] = float(v[j])

    def _linear_contributions(self, out, predicted: Tensor) -> Optional[Tensor]:
        class_weights = self.model.head.class_weights()
        if class_weights is None or out.profile is None:
            return None
        weights = class_weights[predicted.to(class_weights.device)]  # (B, P)
        return out.profile.float() * weights.float()


def predict_files(model, splits, paths: Sequence[Path], batch_size: int, device: torch.device, workers: int = 0,
                  on_batch=None, **options) -> Tuple[List[str], List[Dict[str, object]], List[str]]:
    """(columns, rows, unreadable paths) for the image files ``paths``."""
    predictor = Predictor(model, splits.classes, training_names(splits.train_plain), **options)
    files = ImageFiles(paths, splits.channels, splits.image_transform, splits.image_size)
    loader = DataLoader(files, batch_size=batch_size, num_workers=workers, generator=torch.Generator())
    model.eval()
    rows, unreadable, start = [], [], 0
    for images, readable in loader:
        batch_paths = files.paths[start:start + len(images)]
        start += len(images)
        keep = readable.nonzero().flatten()
        unreadable += [str(p) for p, ok in zip(batch_paths, readable) if not ok]
        if len(keep):
            rows += list(predictor.rows(images[keep].to(device), [batch_paths[int(i)] for i in keep]))
        if on_batch is not None:
            on_batch(len(images))
    return predictor.columns(), rows, unreadable
