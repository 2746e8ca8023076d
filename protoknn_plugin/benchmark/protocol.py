"""The comparison protocol as code: the budget of a run, counted from the phases a head
declares, and the checks that every row of a comparison gets the same one.

Budget = images seen by the feature phases and optimiser steps that update the backbone.
Warm epochs (backbone untrained in that phase) count inside it: they see images but do not step the
backbone; a frozen, cached backbone takes no step at all. Phases on cached profiles
(ProtoPNet's last layer) and the pushes are declared with the budget (a row that changes
them from its paper's values is marked in the table) but not equalised across rows: they
are each head's own schedule, and their time is reported as their own cost.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Sequence

from ..errors import ProtoKNNError
from ..heads.base import Phase


def budget(phases: Sequence[Phase], steps_per_epoch: int, batch_size: int, train_images: int,
           frozen_backbone: bool = False) -> Dict[str, int]:
    """``feature_steps``, ``images_seen``, ``backbone_steps`` of the feature phases (none with a
    ``frozen_backbone``), and the head's own schedule: ``last_layer_epochs`` / ``last_layer_steps``
    (cached-profile phases) and ``pushes`` (projections)."""
    feature = [p for p in phases if not p.cached_profiles]
    cached = [p for p in phases if p.cached_profiles]
    feature_steps = sum(p.epochs * steps_per_epoch for p in feature)
    backbone = 0 if frozen_backbone else sum(p.epochs * steps_per_epoch for p in feature if "backbone" in p.lrs)
    return {
        "feature_steps": feature_steps,
        "images_seen": feature_steps * batch_size,
        "backbone_steps": backbone,
        "last_layer_epochs": sum(p.epochs for p in cached),
        "last_layer_steps": sum(p.epochs * math.ceil(train_images / batch_size) for p in cached),
        "pushes": sum("project" in p.after for p in phases),
    }


# The parts of a row's budget that are its head's own schedule, compared with its paper's values.
SCHEDULE_KEYS = {"last_layer_epochs": "last-layer epochs", "pushes": "pushes"}


def schedule_change(row: Dict[str, int], paper: Dict[str, int]) -> str:
    """``"last-layer epochs 5 (paper 20)"`` for every schedule key where a row's budget differs
    from the budget of its head's defaults (the paper's values) under the same epochs; "" when none."""
    return ", ".join(f"{name} {row[key]} (paper {paper[key]})" for key, name in SCHEDULE_KEYS.items()
                     if row.get(key) != paper.get(key))


def scale_lrs(phases: Sequence[Phase], scale: float) -> List[Phase]:
    """Every learning rate of every phase times ``scale`` (the sweep's one knob)."""
    if scale == 1.0:
        return list(phases)
    return [dataclasses.replace(p, lrs={k: v * scale for k, v in p.lrs.items()}) for p in phases]


# The schedules a sweep may offer every row: ``own``, the phases as the head declares them
# (ProtoKNN constant, ProtoPNet StepLR, the plain CNN warm-up + cosine), and ``cosine``.
SWEEP_SCHEDULES = ("own", "cosine")
# Warm-up of the swept ``cosine`` schedule, in epochs: the plain CNN's own.
COSINE_WARMUP_EPOCHS = 0.5


def with_schedule(phases: Sequence[Phase], schedule: str) -> List[Phase]:
    """The phases under a swept schedule (``SWEEP_SCHEDULES``); the rates are left as they are.

    ``cosine``: every feature phase warms up linearly over ``COSINE_WARMUP_EPOCHS`` and then
    decays to 0 by its last step (``schedules.WarmupCosine``). Each gets its own optimiser, so
    joint cycles that shared one (ProtoPNet between pushes) restart the warm-up and the decay
    after each push instead of continuing a decay that already reached 0. Phases on cached
    profiles (ProtoPNet's last layer, a convex fit on fixed profiles) keep their own rate: the
    trainer steps no scheduler there, so a warm-up would hold them at its first, tiny factor.
    """
    if schedule == "own":
        return list(phases)
    if schedule == "cosine":
        return [p if p.cached_profiles else
                dataclasses.replace(p, schedule="cosine", step_lr=None, optimizer_key=None,
                                    warmup_epochs=COSINE_WARMUP_EPOCHS) for p in phases]
    raise ProtoKNNError(f"unknown schedule {schedule!r} to sweep; use one of {', '.join(SWEEP_SCHEDULES)}")


def check_same_budget(budgets: Dict[str, Dict[str, int]], pretrained: bool) -> None:
    """Every row sees the same number of images; from scratch, every row also takes the same
    number of backbone steps (a pretrained backbone may be untrained in warm epochs, which count
    inside the budget)."""
    keys = ["images_seen"] + ([] if pretrained else ["backbone_steps"])
    for key in keys:
        values = {label: b[key] for label, b in budgets.items()}
        if len(set(values.values())) > 1:
            shown = ", ".join(f"{label} {v}" for label, v in values.items())
            raise ProtoKNNError(f"protocol: the rows do not get the same budget ({key}: {shown}); "
                                "give every head the same epochs, or compare them in separate runs")
