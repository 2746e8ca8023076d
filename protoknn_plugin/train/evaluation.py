"""Scoring a model and rebuilding one from a run directory."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch.utils.data import Dataset

from .. import distributed
from ..checkpoint import load_checkpoint
from ..errors import ProtoKNNError
from ..model import ModelConfig, PrototypeModel
from .loading import plain_loader


def load_model_state(model: PrototypeModel, saved: Dict[str, Any]) -> None:
    """Load weights (including a kNN memory of any size) and the projection record."""
    model.load_state_dict(saved["model"])
    model.load_projection_state(saved.get("projection"))


def model_from_checkpoint(path, best: bool = False) -> Tuple[PrototypeModel, Dict[str, Any]]:
    """Rebuild the model of a run directory (its best.pt when ``best`` and it exists) or of a checkpoint file."""
    saved = load_checkpoint(path, best=best)
    cfg = dict(saved["model_config"])
    cfg["weights"] = "none"  # the trained weights come from the checkpoint, not from the original source
    model = PrototypeModel(ModelConfig(**cfg), for_loading=True)
    load_model_state(model, saved)
    model.config.weights = saved["model_config"].get("weights")
    return model, saved


@torch.no_grad()
def evaluate(model: PrototypeModel, dataset: Dataset, batch_size: int = 256,
             device: Optional[torch.device] = None, workers: int = 0) -> Dict[str, float]:
    """Accuracy of every named prediction (``top1`` or ``k=1``, ``k=3``, ...) and images per second."""
    device = device or next(model.parameters()).device
    model.eval()
    correct: Dict[str, int] = {}
    total, started = 0, time.perf_counter()
    # Under torchrun every rank evaluates its shard; the counts are summed over ranks.
    for images, labels, _ in plain_loader(dataset, batch_size, sharded=True, workers=workers, device=device):
        preds = model.predict_all(images.to(device, non_blocking=True))
        for name, p in preds.items():
            correct[name] = correct.get(name, 0) + int((p.cpu() == labels).sum())
        total += len(labels)
    if distributed.is_active():
        names = sorted(correct)
        counts = distributed.all_reduce_sum(torch.tensor([total] + [correct[n] for n in names], dtype=torch.float64))
        total, correct = int(counts[0]), {n: int(c) for n, c in zip(names, counts[1:])}
    seconds = time.perf_counter() - started
    if total == 0:
        raise ProtoKNNError("the evaluation set is empty; check the dataset path and --limit")
    metrics = {f"accuracy[{name}]": c / total for name, c in correct.items()}
    metrics["images_per_second"] = total / max(seconds, 1e-9)
    metrics["test_images"] = total
    return metrics


def write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
