"""One benchmark run: train (or resume, or skip) a (row, learning-rate scale, schedule, seed) in its own
directory, then score it on the validation split, and on the test split once it is chosen.

A run directory holds ``checkpoint.pt`` (the Trainer's, written atomically every epoch),
``run.json`` once training and validation are done, and ``metrics.json`` once the test
set has been scored. Running the same comparison again reads those files instead of
training again, and resumes an interrupted run from its checkpoint bit-for-bit.
"""
from __future__ import annotations

import contextlib
import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..checkpoint import CHECKPOINT_NAME
from ..prototypes import prototype_spread
from ..resources import PeakRAM
from ..runs import build_run
from ..train import TrainConfig, Trainer, evaluate, model_from_checkpoint, write_json
from ..train.actions import CACHED_PHASE, PUSH
from ..train.trainer import head_phases
from .projection import projection_fields
from .protocol import budget, scale_lrs, with_schedule
from .settings import BenchmarkSettings, RunSpec, machine_identity


def frozen_backbone(model, settings: BenchmarkSettings):
    """The mode in which ``model`` reads the comparison's splits: frozen-backbone mode (cached
    backbone maps) under ``settings.frozen_backbone``, else none (images)."""
    return model.frozen_backbone() if settings.frozen_backbone else contextlib.nullcontext()


def build_trainer(spec: RunSpec, seed: int, lr_scale: float, settings: BenchmarkSettings, splits,
                  run_dir: Optional[Path], progress: bool = False, on_epoch=None, schedule: str = "own") -> Trainer:
    """The Trainer of one run, its phases' learning rates scaled by ``lr_scale``, under ``schedule``
    (``protocol.with_schedule``); ``on_epoch``: see Trainer."""
    train_config = TrainConfig(**{**asdict(settings.train), "seed": seed, "workers": settings.workers})
    model_options = dict(head=spec.head, backbone=settings.backbone, num_prototypes=settings.prototypes,
                         dim=settings.dim, weights=settings.weights, backbone_options=dict(settings.backbone_options),
                         head_options=dict(spec.head_options))

    def phases(model):
        own = head_phases(model, train_config.epochs, settings.frozen_backbone)
        return with_schedule(scale_lrs(own, lr_scale), schedule)

    return build_run(splits, train_config, model_options, dataset_name=settings.dataset, out_dir=run_dir,
                     data_info={"data_dir": settings.data_dir, "limit": settings.limit, "crop": settings.crop,
                                "image_size": settings.image_size, "frozen_backbone": settings.frozen_backbone},
                     progress=progress, stage_eval=getattr(splits, "val", None), on_epoch=on_epoch,
                     phases=phases).trainer


def _history(state) -> list:
    """Validation accuracy after every feature epoch: [{"epoch", "phase", "val_accuracy"}]."""
    return [{"epoch": i + 1, "phase": h["phase"], "val_accuracy": h["val_accuracy"]}
            for i, h in enumerate(state.history) if "val_accuracy" in h]


def _step_ms(state, steps_per_epoch: int) -> float | None:
    """Median over feature epochs of wall milliseconds per training step (data loading included;
    validation, projection and the kNN memory excluded), or None before the first epoch."""
    per_step = [1000.0 * h["epoch_seconds"] / steps_per_epoch for h in state.history if "epoch_seconds" in h]
    return statistics.median(per_step) if per_step else None


def train_run(spec: RunSpec, seed: int, lr_scale: float, settings: BenchmarkSettings, splits, run_dir: Path,
              progress: bool = False, on_epoch=None, schedule: str = "own"):
    """Train, resume or skip one run. Returns ``(record, model)``; model is None when skipped.

    Raises ``train.Interrupted`` on SIGINT/SIGTERM, with the checkpoint written. ``on_epoch``
    (e.g. a tuner's pruning check) sees the validation history after every epoch.
    """
    record_path = run_dir / "run.json"
    if record_path.exists():
        return json.loads(record_path.read_text()), None
    trainer = build_trainer(spec, seed, lr_scale, settings, splits, run_dir, progress, on_epoch, schedule)
    model = trainer.model
    resumed = (run_dir / CHECKPOINT_NAME).exists()
    with PeakRAM(trainer.device) as peak, frozen_backbone(model, settings):
        state = trainer.fit(resume=resumed)
        val = getattr(splits, "val", None)
        val_metrics = (evaluate(model, val, trainer.config.eval_batch_size, trainer.device, workers=settings.workers)
                       if val is not None else {})
    primary = model.head.primary
    record: Dict[str, Any] = {
        "label": spec.label, "head": spec.head, "head_options": spec.head_options, "seed": seed,
        "lr_scale": lr_scale, "schedule": schedule, "primary": primary, "run_dir": str(run_dir), "resumed": resumed,
        "val_accuracy": val_metrics.get(f"accuracy[{primary}]"),
        **{"val_" + k: v for k, v in val_metrics.items() if k.startswith("accuracy[")},
        **budget(trainer.phases, trainer.steps_per_epoch, trainer.config.batch_size, len(trainer.splits.train_labels),
                 settings.frozen_backbone),
        **machine_identity(trainer.device), **projection_fields(state.pushes),
        "train_seconds": state.train_seconds, "step_ms": _step_ms(state, trainer.steps_per_epoch),
        # The projections themselves, and the phases on cached profiles (ProtoPNet's last layer).
        "push_seconds": trainer.actions.seconds.get(PUSH, 0.0),
        "last_layer_seconds": trainer.actions.seconds.get(CACHED_PHASE, 0.0), "peak_memory_mb": peak.peak_mb,
        "history": _history(state), "stages": state.stages,
    }
    if model.prototype_layer is not None:
        record["prototype_spread"] = prototype_spread(model.prototype_layer.prototypes)
    beta = getattr(getattr(getattr(model.head, "task_loss", None), "loss", None), "beta", None)
    if isinstance(beta, torch.Tensor):
        record["learned_beta_mean"] = float(beta.detach().mean())
    write_json(record_path, record)
    return record, model


def score_test(record: Dict[str, Any], splits, settings: BenchmarkSettings, model=None) -> Dict[str, Any]:
    """The run's record plus its test metrics (``accuracy`` is the head's primary prediction).

    Reads ``metrics.json`` when the test set was already scored; otherwise scores it once.
    """
    run_dir = Path(record["run_dir"])
    if (run_dir / "metrics.json").exists():
        saved = json.loads((run_dir / "metrics.json").read_text())
        if "accuracy" in saved:
            return saved
    if model is None:
        model, _ = model_from_checkpoint(run_dir)
    device = next(model.parameters()).device
    with frozen_backbone(model, settings):
        metrics = evaluate(model, splits.test, settings.train.eval_batch_size, device, workers=settings.workers)
    result = {**record, **metrics, "accuracy": metrics[f"accuracy[{record['primary']}]"]}
    write_json(run_dir / "metrics.json", result)
    return result

