"""Scoring a model and rebuilding one from a run directory."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch.utils.data import Dataset

from .. import distributed
from ..checkpoint import checkpoint_path, corrupt_checkpoint, load_checkpoint, require_run_parts
from ..errors import ProtoKNNError
from ..model import ModelConfig, PrototypeModel
from .loading import plain_loader


def load_model_state(model: PrototypeModel, saved: Dict[str, Any], where: str = "checkpoint") -> None:
    """Load weights (including a kNN memory of any size) and the projection record; weights that
    do not fit the model (names, shapes) are the one-line corrupt-or-incompatible error."""
    try:
        model.load_state_dict(saved["model"])
        model.load_projection_state(saved.get("projection"))
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise corrupt_checkpoint(where, _first_problem(err)) from None


def _first_problem(err: Exception) -> str:
    """torch lists every mismatch over many lines; the first one names the problem."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "size mismatch" in line or "Missing key" in line or "Unexpected key" in line:
            return line
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def model_config_from(saved: Dict[str, Any], where: str = "checkpoint") -> ModelConfig:
    """The checkpoint's ModelConfig; unknown or ill-typed fields are the corrupt-or-incompatible error."""
    cfg = dict(saved["model_config"])
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(map(str, cfg)) - known)
    if unknown:
        raise corrupt_checkpoint(where, f"unknown model_config key {unknown[0]!r}")
    return ModelConfig(**cfg)


def model_from_checkpoint(path, best: bool = False) -> Tuple[PrototypeModel, Dict[str, Any]]:
    """Rebuild the model of a run directory (its best.pt when ``best`` and it exists) or of a checkpoint file."""
    where = str(checkpoint_path(path, best))
    saved = require_run_parts(load_checkpoint(path, best=best), where)
    config = model_config_from(saved, where)
    config.weights = "none"  # the trained weights come from the checkpoint, not from the original source
    try:
        model = PrototypeModel(config, for_loading=True)
    except ProtoKNNError as err:
        raise corrupt_checkpoint(where, str(err)) from None
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise corrupt_checkpoint(where, f"model_config: {type(err).__name__}: {err}") from None
    load_model_state(model, saved, where)
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
