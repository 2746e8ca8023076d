"""A run's checkpoint files: checkpoint.pt after every epoch and phase, best.pt (the best projected
model, or for a head that never projects the best one) and best-unprojected.pt, and resuming
from checkpoint.pt."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .. import distributed
from ..checkpoint import BEST_NAME, BEST_UNPROJECTED_NAME, CHECKPOINT_NAME, check_compatible, load_checkpoint, save_atomic
from ..errors import ProtoKNNError
from ..heads.base import Phase
from ..model import PrototypeModel
from .config import TrainConfig
from .evaluation import load_model_state
from .optimizers import PhaseOptimizers
from .precision import Precision
from .resuming import resume_progress
from .rng import rng_state, set_rng_state
from .state import TrainState


class RunCheckpoint:
    """Writes and reads the run directory ``out_dir`` (None: nothing is written) of one training.

    ``dataset_name``, ``data_info`` and ``classes`` are kept in every file so that evaluate and
    explain rebuild the same data; ``run_settings`` are the command's resolved options."""

    def __init__(self, out_dir: Optional[Path], model: PrototypeModel, config: TrainConfig, dataset_name: str,
                 data_info: Dict[str, Any], classes: Sequence[str], precision: Precision,
                 optimizers: PhaseOptimizers):
        self.out_dir, self.model, self.config = out_dir, model, config
        self.dataset_name, self.data_info, self.classes = dataset_name, data_info, list(classes)
        self.precision, self.optimizers = precision, optimizers

    @property
    def writes(self) -> bool:
        return self.out_dir is not None and distributed.is_main()  # one set of files per run

    def state(self, progress: TrainState) -> Dict[str, Any]:
        """Plain data only: tensors, numbers, strings, lists and dicts (settings as JSON)."""
        optimizer = self.optimizers.state_dicts()
        return {
            "model_config": self.model.config.to_dict(),
            "train_config": asdict(self.config),
            "dataset": self.dataset_name,
            "data": self.data_info,
            "classes": self.classes,
            "model": self.model.state_dict(),
            "projection": self.model.projection_state(),
            "optimizer": optimizer["optimizer"],
            "scheduler": optimizer["scheduler"],
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None,
            "train_state": asdict(progress),
            "rng": rng_state(),
        }

    def save(self, progress: TrainState) -> None:
        if self.writes:
            save_atomic(self.state(progress), self.out_dir / CHECKPOINT_NAME)

    def keep_best(self, progress: TrainState, scores: Dict[str, float], where: Dict[str, Any]) -> None:
        """Write best.pt when the validation accuracy beats every earlier one (ties: the later,
        more trained model). An un-projected model of a projecting head competes only for
        best-unprojected.pt."""
        acc = scores.get("val_accuracy")
        if acc is None or acc != acc:
            return
        prefix, name = ("best_unprojected", BEST_UNPROJECTED_NAME) if progress.projected is False else ("best", BEST_NAME)
        best = getattr(progress, f"{prefix}_val_accuracy")
        if best is not None and acc < best:
            return
        setattr(progress, f"{prefix}_val_accuracy", float(acc))
        setattr(progress, f"{prefix}_epoch", {**where, "val_accuracy": float(acc), "projected": progress.projected})
        if self.writes:
            save_atomic(self.state(progress), self.out_dir / name)

    def resume(self, phases: List[Phase], projects: bool) -> Optional[TrainState]:
        """The progress of the run directory's checkpoint, with the model, the optimiser of the
        phase in progress, the loss scaler and every RNG restored; None when there is none.
        ``projects``: whether the phases push the prototypes."""
        if self.out_dir is None or not (self.out_dir / CHECKPOINT_NAME).exists():
            return None
        where = str(self.out_dir / CHECKPOINT_NAME)
        saved = load_checkpoint(self.out_dir)
        check_compatible(saved["model_config"], self.model.config.to_dict())
        if saved.get("dataset") and self.dataset_name and saved["dataset"] != self.dataset_name:
            raise ProtoKNNError(
                f"checkpoint was made with dataset={saved['dataset']!r} but this run asks for dataset={self.dataset_name!r}; "
                "use the same settings or a new --out directory"
            )
        load_model_state(self.model, saved, where)
        progress, _ = resume_progress(saved, self.model, self.config, phases, where)
        if projects and progress.projected is None:  # a checkpoint written before the flag
            progress.projected = bool(saved["train_state"].get("complete"))
        if not progress.complete and progress.phase < len(phases):
            self.optimizers.build(phases[progress.phase], progress.optimizer_states)
            self.optimizers.load(saved)
        if self.precision.scaler is not None and saved.get("scaler"):
            self.precision.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        return progress
