"""Optimisers and learning-rate schedules for a training phase.

A head declares each phase's learning rates, weight decay and schedule as data
(``heads.base.Phase``); this module turns that into a torch optimiser over the
model's named components and a scheduler that the trainer steps.

Schedules:
- ``constant``: the phase's rates throughout.
- ``step``: ``StepLR(step_size, gamma)`` stepped once per epoch (ProtoPNet's joint phase).
- ``cosine``: linear warm-up over ``warmup_epochs`` then cosine decay to zero, stepped
  once per optimiser step, so short budgets still end at a small rate.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from .errors import ProtoKNNError

SCHEDULES = ("constant", "step", "cosine")


class WarmupCosine:
    """LR factor at optimiser step ``t`` (0-based): linear warm-up, then cosine to 0.

    ``factor(t) = (t + 1) / warmup`` for ``t < warmup``, then
    ``0.5 * (1 + cos(pi * (t - warmup) / (total - warmup)))``.
    A callable object (not a lambda) so that LambdaLR can save and restore it.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0):
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, min(int(warmup_steps), self.total_steps - 1))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(phase, components: Dict[str, List[torch.nn.Parameter]]) -> List[dict]:
    """One Adam group per component the phase trains; every other parameter is untrained in this phase.

    Returns groups with ``params``, ``lr``, ``weight_decay`` and ``name``.
    """
    for params in components.values():
        for p in params:
            p.requires_grad_(False)
    groups = []
    for name, lr in phase.lrs.items():
        params = components.get(name, [])
        for p in params:
            p.requires_grad_(True)
        if params:
            groups.append({"params": params, "lr": lr, "name": name,
                           "weight_decay": float(phase.weight_decay.get(name, 0.0))})
    if not groups:
        raise ProtoKNNError(f"phase {phase.name!r} trains nothing: no parameters in {sorted(phase.lrs)}")
    return groups


def build_optimizer(phase, components: Dict[str, List[torch.nn.Parameter]],
                    steps_per_epoch: int) -> Tuple[torch.optim.Optimizer, Optional[object]]:
    """Adam over the phase's components and its scheduler (None for ``constant``).

    Weight decay is Adam's coupled L2 term, as in ProtoPNet's reference code.
    """
    optimizer = torch.optim.Adam(parameter_groups(phase, components))
    schedule = phase.schedule_name
    if schedule == "constant":
        return optimizer, None
    if schedule == "step":
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, *phase.step_lr)
    if schedule == "cosine":
        total = phase.epochs * steps_per_epoch
        warmup = round(phase.warmup_epochs * steps_per_epoch)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, warmup))
    raise ProtoKNNError(f"phase {phase.name!r} asks for unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def steps_per_epoch_schedule(phase) -> bool:
    """Whether the phase's scheduler steps after every optimiser step (else after every epoch)."""
    return phase.schedule_name == "cosine"
