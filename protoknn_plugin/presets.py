"""The paper's training settings by name (``--preset``).

Each preset fills the options a user did not set on the command line. Learning rates
follow docs/method.md: with pretrained weights the backbone trains at 1e-5 and the rest at
1e-3 (the heads pick these when the backbone is pretrained).
"""
from __future__ import annotations

from typing import Dict

from .errors import UnknownNameError

_PAPER = {"backbone": "resnet50", "weights": "imagenet", "batch_classes": 56, "per_class": 2}

PRESETS: Dict[str, Dict[str, object]] = {
    # CUB-200-2011 full images: 512 prototypes of D 256, 140 epochs.
    "paper-cub-full": {**_PAPER, "dataset": "cub200", "crop": False, "prototypes": 512, "dim": 256, "epochs": 140},
    # Cropped CUB (bounding boxes): 202 prototypes.
    "paper-cub-crop": {**_PAPER, "dataset": "cub200", "crop": True, "prototypes": 202, "dim": 256, "epochs": 140},
    # Cropped Stanford Cars: 195 prototypes of D 128.
    "paper-cars-crop": {**_PAPER, "dataset": "stanford-cars", "crop": True, "prototypes": 195, "dim": 128,
                        "epochs": 140},
    # Stanford Dogs full images: 60 epochs.
    "paper-dogs-full": {**_PAPER, "dataset": "stanford-dogs", "crop": False, "prototypes": 512, "dim": 256,
                        "epochs": 60},
}
# Short names, as the paper's tables call them.
ALIASES = {"cub-full": "paper-cub-full", "cub-crop": "paper-cub-crop", "cars-crop": "paper-cars-crop",
           "dogs-full": "paper-dogs-full"}


def get_preset(name: str) -> Dict[str, object]:
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise UnknownNameError("preset", name, list(PRESETS) + list(ALIASES))
    return dict(PRESETS[key])
