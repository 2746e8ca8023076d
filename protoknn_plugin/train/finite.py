"""Stopping a run at its first non-finite loss, with the last good checkpoint kept.

Checking a loss on the host waits for the device, so away from the CPU the check is batched:
every step folds its loss's finiteness into a flag on the device, and the flag is read every
``sync_every`` steps."""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from ..errors import ProtoKNNError


class FiniteLossCheck:
    """``note`` every step's loss terms; ``check`` at sync points (and before the update when
    ``sync_every`` is 1, so that the weights stay finite)."""

    def __init__(self, sync_every: int, device: torch.device):
        self.sync_every = sync_every
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def note(self, terms: Dict[str, Tensor], step: int) -> None:
        """A step's terms (``step``: its run step, from 1), before its update."""
        if self.sync_every == 1:
            self.check(terms, step)
        else:  # remember on the device; checked at the next sync point
            self._nonfinite = self._nonfinite | ~torch.isfinite(terms["total"].detach())

    def check(self, terms: Dict[str, Tensor], step: int) -> None:
        """Raise when these terms, or any noted since the run began, were not finite."""
        if bool(torch.isfinite(terms["total"])) and not bool(self._nonfinite):
            return
        bad = next((k for k, v in terms.items() if k != "total" and not bool(torch.isfinite(v).all())), "total")
        raise ProtoKNNError(
            f"non-finite loss {'at' if self.sync_every == 1 else 'by'} step {step} (term {bad!r}); the last good checkpoint is kept; "
            "lower the learning rate or check the data for NaN"
        )
