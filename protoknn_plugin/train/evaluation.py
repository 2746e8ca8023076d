"""Scoring a model and rebuilding one from a run directory."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from torch.utils.data import Dataset

from .. import distributed
from ..checkpoint import (BEST_NAME, BEST_UNPROJECTED_NAME, CHECKPOINT_NAME, checkpoint_path, corrupt_checkpoint,
                          load_checkpoint, require_run_parts)
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


# Which model of a run directory a command loads: the default (best.pt when interpretable,
# else checkpoint.pt), the last checkpoint.pt, or best-unprojected.pt asked for by name.
MODEL_CHOICES = ("best", "last", "unprojected")


class TrainedModel(NamedTuple):
    """What ``load_trained_model`` returns: the model, its checkpoint's data, the file it came
    from, and a one-line note for the user (None when the default model was loaded as expected)."""

    model: PrototypeModel
    saved: Dict[str, Any]
    file: str
    note: Optional[str]


def holds_projected_model(saved: Dict[str, Any]) -> bool:
    """Whether a checkpoint's model can explain with training patches: its head never projects,
    or every prototype sits on its recorded source patch."""
    from ..heads import get_head_class

    state = saved.get("train_state") or {}
    if "projected" in state:
        return state["projected"] is not False
    # Written before the flag: every prototype head pushes at its end, so only a finished run's model is projected.
    head = str((saved.get("model_config") or {}).get("head"))
    return not get_head_class(head).uses_prototypes or bool(state.get("complete"))


def load_trained_model(path, choice: str = "best") -> TrainedModel:
    """The model of a finished run that ``evaluate``, ``predict``, ``explain``, ``report`` and
    ``faithfulness`` share. It is never an un-projected model unless ``choice`` is ``unprojected``.

    ``best``: best.pt when the run has one (with projected prototypes), else checkpoint.pt;
    ``last``: checkpoint.pt; ``unprojected``: best-unprojected.pt, the best validation epoch
    before projection. ``path`` may also be a checkpoint file.
    """
    if choice not in MODEL_CHOICES:
        raise ProtoKNNError(f"unknown model choice {choice!r}; use one of {', '.join(MODEL_CHOICES)}")
    folder, note = Path(path), None
    if not folder.is_dir():
        model, saved = model_from_checkpoint(folder)
        return _refuse_unprojected(TrainedModel(model, saved, folder.name, None), choice)
    if choice == "unprojected":
        if not (folder / BEST_UNPROJECTED_NAME).exists():
            raise ProtoKNNError(f"run {str(path)!r} has no {BEST_UNPROJECTED_NAME} (its head does not project, or it "
                                "was trained without --val-fraction or by an older version); drop --unprojected")
        name = BEST_UNPROJECTED_NAME
        note = (f"loaded {name}: its prototypes were never projected onto training patches, so it does not "
                "explain with real training patches")
    elif choice == "best" and (folder / BEST_NAME).exists():
        name = BEST_NAME
        if not holds_projected_model(load_checkpoint(folder / BEST_NAME)):
            name = CHECKPOINT_NAME
            note = (f"{BEST_NAME} of this run holds un-projected prototypes (written by an older version); "
                    f"using {CHECKPOINT_NAME}, the projected final model")
    else:
        name = CHECKPOINT_NAME
    model, saved = model_from_checkpoint(folder / name)
    return _refuse_unprojected(TrainedModel(model, saved, name, note), choice)


def _refuse_unprojected(loaded: TrainedModel, choice: str) -> TrainedModel:
    if choice != "unprojected" and not holds_projected_model(loaded.saved):
        raise ProtoKNNError(f"{loaded.file} holds prototypes that were never projected onto training patches (the "
                            "run has not reached its push); finish the run with --resume, or pass --unprojected to "
                            "load the un-projected model anyway")
    return loaded


@torch.no_grad()
def evaluate(model: PrototypeModel, dataset: Dataset, batch_size: int = 256,
             device: Optional[torch.device] = None, workers: int = 0) -> Dict[str, float]:
    """Accuracy of every named prediction (``top1`` or ``k=1``, ``k=3``, ...), images per second, and the
    head's own numbers on these profiles (``Head.stage_info``: a tree's size, PIP-Net's sparsity; under
    torchrun those of this rank's shard)."""
    device = device or next(model.parameters()).device
    model.eval()
    correct: Dict[str, int] = {}
    total, started = 0, time.perf_counter()
    # Under torchrun every rank evaluates its shard; the counts are summed over ranks.
    profiles = []
    for images, labels, _ in plain_loader(dataset, batch_size, sharded=True, workers=workers, device=device):
        out = model(images.to(device, non_blocking=True))
        preds = model.head.predict_all(out)
        if out.profile is not None:
            profiles.append(out.profile)
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
    metrics.update(model.head.stage_info(lambda: torch.cat(profiles)))
    metrics["test_images"] = total
    return metrics


def write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
