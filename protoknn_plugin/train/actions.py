"""What a phase does apart from its training epochs: the actions at its end (the push, the kNN
memory, a head's own actions such as pruning) and a last layer trained on cached profiles, each
timed so that a benchmark can report what the push and the last layer cost."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

import torch

from ..errors import ProtoKNNError
from ..heads.base import Phase
from ..model import PrototypeModel
from ..prototypes import projection_summary
from .scoring import RunScoring
from .state import TrainState

# Keys of PhaseActions.seconds besides the head's own action names.
PUSH, MEMORY, CACHED_PHASE = "project", "build_memory", "cached_phase"


class PhaseActions:
    """Runs a phase's actions and records the wall seconds each kind took in this process.

    ``seconds``: ``project`` (the prototype projection itself, not the validations around it),
    ``build_memory`` (the kNN memory of the training profiles), ``cached_phase`` (a phase trained
    on cached profiles, profiles included) and any head action by its name. They are not saved in
    the checkpoint: a resumed run counts only what it ran itself."""

    def __init__(self, model: PrototypeModel, scoring: RunScoring):
        self.model, self.scoring = model, scoring
        self.seconds: Dict[str, float] = {}

    @contextmanager
    def timed(self, action: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[action] = self.seconds.get(action, 0.0) + time.perf_counter() - started

    def after(self, phase: Phase, state: TrainState) -> None:
        """Run ``phase.after`` in order, recording the stages before and after them and, for a
        push, its record in ``state.pushes`` (validation before it, and after every action)."""
        if phase.after:
            self._record_stage(phase, state, "before " + "+".join(phase.after))
        push: Optional[Dict[str, Any]] = None
        for action in phase.after:
            push = self._run(action, phase, state) or push
        self.scoring.forget()
        if push is not None:  # after the push and the rebuilt memory: the projection's own cost
            push["val_accuracy_after"] = self.scoring.current_validation().get("val_accuracy")
            state.pushes.append(push)
        self._record_stage(phase, state, "end")

    def _run(self, action: str, phase: Phase, state: TrainState) -> Optional[Dict[str, Any]]:
        """One action; returns the push record for ``project``."""
        if action == PUSH:
            before = self.scoring.current_validation()
            with self.timed(PUSH):
                record = self.model.project_prototypes(self.scoring.loader(self.scoring.splits.train_plain))
            state.projected = True
            return {"phase": phase.name, "phase_index": state.phase, "global_step": state.global_step,
                    **projection_summary(record), "val_accuracy_before": before.get("val_accuracy")}
        if action == MEMORY:
            with self.timed(MEMORY):
                self.model.head.fit_memory(*self.scoring.training_profiles())
        elif action in self.model.head.actions:
            with self.timed(action):
                self.model.head.run_action(action, self.scoring.training_profiles)
        else:
            raise ProtoKNNError(f"phase {phase.name!r} asks for unknown action {action!r}")
        return None

    def _record_stage(self, phase: Phase, state: TrainState, when: str) -> None:
        stage = self.scoring.stage(phase.name, state.phase, when)
        if stage is not None:
            state.stages.append(stage)

    def cached_phase(self, phase: Phase, optimizer: torch.optim.Optimizer, seed: int, batch_size: int) -> None:
        """``phase.epochs`` epochs of the head's loss on the training profiles, computed once
        (ProtoPNet's last layer: nothing before it trains). ``seed``: the batch order's."""
        with self.timed(CACHED_PHASE):
            profiles, labels = self.scoring.training_profiles()
            generator = torch.Generator().manual_seed(seed)
            for _ in range(phase.epochs):
                order = torch.randperm(len(labels), generator=generator).to(labels.device)
                for start in range(0, len(order), batch_size):
                    idx = order[start:start + batch_size]
                    terms = self.model.head.loss_from_profiles(profiles[idx], labels[idx])
                    optimizer.zero_grad(set_to_none=True)
                    terms["total"].backward()
                    optimizer.step()
