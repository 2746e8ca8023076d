"""The optimiser of the phase being trained: built from the phase's learning rates over the
model's components, continued across phases that share an ``optimizer_key``, with its scheduler,
and the loss forward it steps (wrapped in DistributedDataParallel under torchrun)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from .. import distributed
from ..heads.base import Phase
from ..model import PrototypeModel
from ..schedules import build_optimizer, steps_per_epoch_schedule
from .precision import Precision, outputs_to_float


class LossForward(nn.Module):
    """images, labels -> the head's loss terms on the global batch.

    The forward pass runs under autocast; the losses run in float32 on every rank's
    outputs gathered with gradient-carrying collectives, so DistributedDataParallel's
    gradient average equals the single-process gradient of the global batch.
    """

    def __init__(self, model: PrototypeModel, precision: Precision):
        super().__init__()
        self.model, self.precision = model, precision

    def forward(self, images: Tensor, labels: Tensor) -> Dict[str, Tensor]:
        images, labels = self.model.head.prepare_batch(images, labels)
        with self.precision.autocast():
            out = self.model(images)
        out = distributed.gather_outputs(outputs_to_float(out))
        labels = distributed.gather_labels(labels)
        return self.model.head.loss(out, labels)


class PhaseOptimizers:
    """The current phase's ``optimizer`` and ``scheduler`` (None between phases) and the
    ``forward_loss`` that training steps call.

    ``per_step_schedule``: the scheduler steps after every optimiser step (``step_per_batch``),
    else once per epoch (``step_per_epoch``)."""

    def __init__(self, model: PrototypeModel, precision: Precision, device: torch.device, steps_per_epoch: int):
        self.model, self.precision, self.device = model, precision, device
        self.steps_per_epoch = steps_per_epoch
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None
        self.per_step_schedule = False
        self.forward_loss: nn.Module = LossForward(model, precision)

    def build(self, phase: Phase, kept: Optional[Dict[str, Any]] = None) -> None:
        """The phase's optimiser; a phase sharing an earlier one's optimizer_key continues the state
        kept under that key in ``kept`` (``TrainState.optimizer_states``)."""
        self.optimizer, self.scheduler = build_optimizer(phase, self.model.components(), self.steps_per_epoch)
        self.per_step_schedule = steps_per_epoch_schedule(phase)
        saved = (kept or {}).get(phase.optimizer_key) if phase.optimizer_key else None
        if saved:
            self.load(saved)
        self.forward_loss = self.wrapped_forward()

    def load(self, saved: Dict[str, Any]) -> None:
        """Optimiser and scheduler states as ``state_dicts`` gives them (either may be missing)."""
        if saved.get("optimizer"):
            self.optimizer.load_state_dict(saved["optimizer"])
        if self.scheduler is not None and saved.get("scheduler"):
            self.scheduler.load_state_dict(saved["scheduler"])

    def state_dicts(self) -> Dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler else None}

    def keep(self, phase: Phase, kept: Dict[str, Any]) -> None:
        """Store the finished phase's states under its optimizer_key, for a later phase with the same key."""
        if phase.optimizer_key and self.optimizer is not None:
            kept[phase.optimizer_key] = self.state_dicts()

    def end_phase(self) -> None:
        self.optimizer, self.scheduler = None, None

    def step_per_batch(self) -> None:
        if self.scheduler is not None and self.per_step_schedule:
            self.scheduler.step()

    def step_per_epoch(self) -> None:
        if self.scheduler is not None and not self.per_step_schedule:
            self.scheduler.step()

    def learning_rates(self) -> Dict[str, float]:
        """Parameter group name -> its current learning rate."""
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def wrapped_forward(self) -> nn.Module:
        """DistributedDataParallel over this phase's trainable parameters (rebuilt per phase,
        since phases train different components)."""
        plain = LossForward(self.model, self.precision)
        if not distributed.is_active():
            return plain
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # broadcast_buffers off: the kNN memory is a buffer; BatchNorm statistics are
        # broadcast once per epoch (distributed.broadcast_buffers). find_unused_parameters: a phase may
        # train a component that one loss configuration leaves out of the graph.
        return DistributedDataParallel(plain, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True)
