"""The trainer: follows the head's declared phases, checkpoints atomically, resumes exactly.

Every epoch's batch order is drawn up front from pytorch-metric-learning's class-balanced
MPerClassSampler and stored in the checkpoint together with every RNG state, so a run
interrupted mid-epoch (SIGINT/SIGTERM) resumes bit-for-bit on CPU.

Modules: ``config`` (TrainConfig, devices), ``loading`` (batches, seeds, workers),
``precision`` (autocast, GradScaler), ``rng`` (seeds and plain RNG states), ``state``
(TrainState, signals), ``records`` (metrics.csv, TensorBoard, progress), ``evaluation``
(scores, rebuilding a model), ``optimizers`` (each phase's optimiser, scheduler, DDP wrap),
``run_checkpoint`` (checkpoint.pt, best.pt, resuming), ``scoring`` (profiles, validation,
stages), ``actions`` (push, kNN memory, cached phases, timed), ``finite`` (non-finite losses)
and ``trainer`` (the loop over phases, epochs and steps).
"""
from .config import PRECISIONS, TrainConfig, default_workers, device_kind, resolve_device
from .evaluation import (MODEL_CHOICES, TrainedModel, evaluate, holds_projected_model, load_model_state,
                         load_trained_model, model_from_checkpoint, write_json)
from .loading import IndexedDataset, SeededItems, epoch_batches, item_seed, plain_loader
from .rng import rng_state, seed_everything, set_rng_state
from .state import Interrupted, TrainState
from .trainer import Trainer

__all__ = ["PRECISIONS", "TrainConfig", "default_workers", "device_kind", "resolve_device", "evaluate", "load_model_state",
           "MODEL_CHOICES", "TrainedModel", "holds_projected_model", "load_trained_model",
           "model_from_checkpoint", "write_json", "IndexedDataset", "SeededItems", "epoch_batches", "item_seed",
           "plain_loader", "rng_state", "seed_everything", "set_rng_state", "Interrupted", "TrainState", "Trainer"]
