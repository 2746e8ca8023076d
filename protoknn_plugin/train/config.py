"""How to train (TrainConfig) and where (resolve_device)."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from ..errors import ProtoKNNError

PRECISIONS = ("32", "bf16", "16-mixed")


def default_workers() -> int:
    """min(8, CPU count): what the CLI uses when --workers is not given."""
    return min(8, os.cpu_count() or 1)


@dataclass
class TrainConfig:
    """How to train. ``steps_per_epoch=None`` means len(train) // batch size."""

    epochs: int = 4
    batch_classes: int = 10
    per_class: int = 11
    steps_per_epoch: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 256
    deterministic: bool = False
    threads: Optional[int] = None
    # Steps between host syncs (loss check, progress bar). None: every step on CPU, where a
    # sync is free, and every 10 on GPU, where it stalls the queue.
    sync_every: Optional[int] = None
    # Share of the training set held out as a validation split (stratified, fixed seed, the
    # same for every run seed so that paired comparisons see the same data). 0: none.
    val_fraction: float = 0.0
    # DataLoader worker processes. Items carry their own augmentation seed, so the weights
    # do not depend on this number. 0: load in the main process.
    workers: int = 0
    # "32", "bf16" (autocast to bfloat16) or "16-mixed" (autocast to float16 + GradScaler).
    precision: str = "32"
    # Files beside checkpoint.pt: metrics.csv always; TensorBoard events when asked.
    tensorboard: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ProtoKNNError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.workers < 0:
            raise ProtoKNNError(f"--workers must be 0 or more, got {self.workers}")

    @property
    def batch_size(self) -> int:
        return self.batch_classes * self.per_class


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ProtoKNNError(f"--device {name} asked for a GPU but torch sees none; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ProtoKNNError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None


def device_kind(device: torch.device) -> str:
    """The kind of chip that computes on ``device``: ``cuda: <GPU name>``, or ``cpu: <CPU model>``
    (from /proc/cpuinfo where there is one). Floating-point kernels differ between kinds, so two
    kinds train the same run to different numbers."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {_cpu_model()}"


@lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
