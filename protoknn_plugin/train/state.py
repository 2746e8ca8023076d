"""What a run has done so far (TrainState, saved in every checkpoint) and how it stops
(SIGINT/SIGTERM become a flag checked between steps)."""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class TrainState:
    phase: int = 0
    epoch: int = 0  # epoch within the phase
    step: int = 0  # step within the epoch
    global_step: int = 0
    batches: Optional[List[List[int]]] = None  # the current epoch's batch order
    epoch_sums: Dict[str, float] = field(default_factory=dict)  # loss sums so far in this epoch (for logging)
    history: List[Dict[str, Any]] = field(default_factory=list)
    # Accuracy at phase boundaries (e.g. ProtoPNet before push, after push, after last layer).
    stages: List[Dict[str, Any]] = field(default_factory=list)
    # Optimiser and scheduler states kept across phases that share an optimizer_key.
    optimizer_states: Dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    train_seconds: float = 0.0
    # Best validation accuracy so far (best.pt holds that model); None: no validation split.
    # For a head that projects, only projected models compete for best.pt.
    best_val_accuracy: Optional[float] = None
    best_epoch: Optional[Dict[str, Any]] = None
    # None: the head never projects its prototypes. False: the prototypes are not (or no longer)
    # training patches. True: every prototype equals the embedding of its recorded source patch.
    projected: Optional[bool] = None
    # A projecting head's best un-projected model (best-unprojected.pt), loaded only when asked for.
    best_unprojected_val_accuracy: Optional[float] = None
    best_unprojected_epoch: Optional[Dict[str, Any]] = None
    # One record per push: how far the prototypes moved, where they landed, validation before/after.
    pushes: List[Dict[str, Any]] = field(default_factory=list)


class Interrupted(Exception):
    """Raised after the step in flight when SIGINT/SIGTERM arrived; the checkpoint is written."""


class SignalGuard:
    """Turns SIGINT/SIGTERM into a flag checked between steps."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old: Dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def raise_if_received(self) -> None:
        if self.received is not None:
            raise Interrupted(signal.Signals(self.received).name)
