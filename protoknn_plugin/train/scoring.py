"""Scoring the model as it is during training: profiles of a dataset, accuracy, validation
after every epoch and around every push, and the stage records at phase boundaries."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..model import PrototypeModel
from .config import TrainConfig
from .evaluation import evaluate
from .loading import plain_loader


class RunScoring:
    """Scores of ``model`` on the run's splits; ``stage_eval``: a dataset scored at every phase boundary.

    The validation of the model as it is now is kept until something trains (``forget``), so a
    push reuses the last epoch's scores instead of validating the same model again."""

    def __init__(self, model: PrototypeModel, splits, config: TrainConfig, device: torch.device,
                 stage_eval: Optional[Dataset] = None):
        self.model, self.splits, self.config, self.device = model, splits, config, device
        self.stage_eval = stage_eval
        self._fresh: Optional[Dict[str, float]] = None

    def loader(self, dataset: Dataset):
        """Batches of (image, label, index) of ``dataset`` in order."""
        return plain_loader(dataset, self.config.eval_batch_size, workers=self.config.workers, device=self.device)

    @torch.no_grad()
    def profiles(self, dataset: Dataset) -> Tuple[Tensor, Tensor]:
        """Profiles (N, P) and labels (N,) of a dataset in order, in eval mode."""
        was = self.model.training
        self.model.eval()
        outs, labels = [], []
        # Float32 like ``evaluate``, so the kNN memory and its queries are computed alike.
        for images, y, _ in self.loader(dataset):
            outs.append(self.model(images.to(self.device, non_blocking=True)).profile)
            labels.append(y)
        self.model.train(was)
        return torch.cat(outs), torch.cat(labels).to(self.device)

    def training_profiles(self) -> Tuple[Tensor, Tensor]:
        """Profiles (N, P) and labels (N,) of the un-augmented training split."""
        return self.profiles(self.splits.train_plain)

    @torch.no_grad()
    def score(self, dataset: Dataset) -> Dict[str, float]:
        """Accuracy of every named prediction on ``dataset`` with the model as it is now.

        A kNN head first gets a memory of the current training profiles, so its score is
        meaningful mid-training (the final memory is built the same way after projection).
        """
        if self.model.head.uses_memory:
            self.model.head.fit_memory(*self.training_profiles())
        metrics = evaluate(self.model, dataset, self.config.eval_batch_size, self.device, workers=self.config.workers)
        self.model.train()
        return {k: v for k, v in metrics.items() if k.startswith("accuracy[")}

    def validation(self) -> Dict[str, float]:
        """Validation accuracies as ``val_accuracy[...]`` plus ``val_accuracy`` (the head's primary)."""
        val = getattr(self.splits, "val", None)
        if val is None:
            return {}
        scores = {"val_" + k: v for k, v in self.score(val).items()}
        scores["val_accuracy"] = scores.get(f"val_accuracy[{self.model.head.primary}]", float("nan"))
        return scores

    def validate(self) -> Dict[str, float]:
        """Validate now and keep the scores until something trains."""
        self._fresh = self.validation()
        return self._fresh

    def current_validation(self) -> Dict[str, float]:
        """Validation scores of the model as it is now (those kept when nothing trained since)."""
        return self._fresh if self._fresh is not None else self.validate()

    def forget(self) -> None:
        """The model changed: the kept validation no longer describes it."""
        self._fresh = None

    def stage(self, phase_name: str, phase_index: int, when: str) -> Optional[Dict[str, Any]]:
        """The stage record at a phase boundary (None without ``stage_eval``): the scores on
        ``stage_eval`` and the head's own numbers on its profiles."""
        if self.stage_eval is None:
            return None
        return {"phase": phase_name, "phase_index": phase_index, "when": when, **self.score(self.stage_eval),
                **self.model.head.stage_info(lambda: self.profiles(self.stage_eval)[0])}
