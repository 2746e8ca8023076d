"""What a comparison runs: rows (label, head, options) and the settings every row shares."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Sequence

import torch

from ..train import TrainConfig, device_kind, resolve_device


@dataclass
class RunSpec:
    """One row of a comparison: a label, a head and that head's options."""

    label: str
    head: str
    head_options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchmarkSettings:
    """Settings shared by every row: same data, same backbone initialisation, same budget.

    ``lr_scales`` and ``schedules``: the documented sweep. Every row trains once per scale (every
    learning rate of every phase multiplied by it) and schedule (``own``: the head's; ``cosine``:
    warm-up and cosine decay, ``protocol.with_schedule``) on ``sweep_seeds``, picks the pair with
    the best validation accuracy, and only that choice is scored on the test set. ``(1.0,)`` and
    ``("own",)``: the heads' own rates and schedules, no sweep. Extra keys a later mode needs
    (e.g. a frozen backbone with a feature cache) go here and into ``run_key`` through ``asdict``.
    """

    dataset: str = "animals"
    data_dir: Optional[str] = None
    backbone: str = "small-cnn"
    weights: Optional[str] = None
    prototypes: int = 100
    dim: int = 64
    limit: Optional[int] = None
    strict: bool = False
    crop: bool = False
    seeds: Sequence[int] = (0,)
    train: TrainConfig = field(default_factory=TrainConfig)
    backbone_options: Dict[str, Any] = field(default_factory=dict)
    lr_scales: Sequence[float] = (1.0,)
    schedules: Sequence[str] = ("own",)
    sweep_seeds: Optional[Sequence[int]] = None  # None: the first seed
    # Frozen pretrained backbone: its maps are computed once into a feature cache and every row
    # trains its add-on, prototypes and head on them (protoknn_plugin.frozen).
    frozen_backbone: bool = False
    cache_dir: Optional[str] = None
    image_size: Optional[int] = None
    # DataLoader worker processes for every run's training and evaluation. They change the
    # speed, never the result (the batches and their augmentation seeds are drawn up front),
    # so they stay out of the run key, and out of ``train`` whose fields are in it.
    workers: int = 0

    def sweep_seed_list(self) -> list:
        return list(self.sweep_seeds) if self.sweep_seeds else list(self.seeds)[:1]


# Settings that do not change what a run computes, so they do not name its directory.
_NOT_IN_KEY = {"seeds", "lr_scales", "schedules", "sweep_seeds", "strict", "cache_dir", "workers"}
_TRAIN_NOT_IN_KEY = {"seed", "device", "threads", "sync_every", "eval_batch_size"}


def machine_identity(device) -> Dict[str, Any]:
    """``threads`` (torch's CPU threads) and ``device_kind`` (``train.device_kind``) of this process
    on ``device`` (a name like ``auto`` or a torch.device): both change a run's numbers, since
    floating-point kernels and their reduction order differ between thread counts and chips."""
    return {"threads": torch.get_num_threads(), "device_kind": device_kind(resolve_device(str(device)))}


def run_key(spec: RunSpec, settings: BenchmarkSettings, lr_scale: float, schedule: str = "own") -> str:
    """Short hash of everything that decides a run's result except the seed, including the
    thread count and the device kind it computes with (``machine_identity``).

    Part of the run directory's name, so changed options, or another machine's runs in a
    shared output folder, never reuse an old run. The head's own schedule stays out of the
    payload, so keys made before the schedule sweep still hold.
    """
    shared = {k: v for k, v in asdict(settings).items() if k not in _NOT_IN_KEY and k != "train"}
    shared["train"] = {k: v for k, v in asdict(settings.train).items() if k not in _TRAIN_NOT_IN_KEY}
    payload = {"head": spec.head, "options": spec.head_options, "lr_scale": float(lr_scale), **shared,
               "machine": machine_identity(settings.train.device)}
    if schedule != "own":
        payload["schedule"] = schedule
    revision = _head_revision(spec.head)
    if revision != 1:  # absent at 1, so the keys of heads never revised stay what they were
        payload["head_revision"] = revision
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _head_revision(head: str) -> int:
    """The registered head's ``revision`` (1 for another run backend's rows, which name no head,
    and for unknown names, which fail later)."""
    from ..errors import ProtoKNNError
    from ..heads import get_head_class

    try:
        return int(getattr(get_head_class(head), "revision", 1))
    except ProtoKNNError:
        return 1


def run_dir_name(spec: RunSpec, settings: BenchmarkSettings, lr_scale: float, seed: int, schedule: str = "own") -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in spec.label)
    return f"{safe}-{run_key(spec, settings, lr_scale, schedule)}-seed{seed}"
