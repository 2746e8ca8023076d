"""The package's own trainer as the default run backend (``run_backends``): every row that no
other backend claims is a registered head, trained by ``runner``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from ..run_backends import DEFAULT_BACKEND, RunBackend, register_backend
from .protocol import budget, schedule_change
from .runner import score_test, train_run


@register_backend(DEFAULT_BACKEND)
class PluginBackend(RunBackend):
    """Rows named by a registered head; every protocol choice (rates, schedules, tuning) applies."""

    def owns(self, row: str) -> bool:
        return True

    def check(self, row: str) -> None:
        """A registered head; a row ``PREFIX:NAME`` that no installed backend claims names the fix."""
        from ..errors import ProtoKNNError
        from ..heads import HEADS, get_head_class
        from ..run_backends import list_backends

        prefix, colon, _ = row.partition(":")
        if colon and row not in HEADS:
            raise ProtoKNNError(
                f"no run backend claims the row {row!r} (installed: {', '.join(list_backends())}); install the "
                f"toolkit that provides {prefix + ':'!r} rows (CaBRNet's: pip install 'protoknn-plugin[cabrnet]', "
                "then `pip install --no-deps -e .` in a source tree), or name a head")
        get_head_class(row)

    def budget(self, spec, settings, splits, pretrained: bool, steps_per_epoch: int) -> Dict[str, Any]:
        """The row's budget; a row whose last-layer epochs or pushes differ from its head's defaults
        (the paper's values) gets ``schedule_change`` (protocol.schedule_change), which the table marks."""
        from ..heads import create_head

        row, paper = (budget(create_head(spec.head, num_classes=len(splits.classes), backbone_channels=8,
                                         dim=settings.dim, num_prototypes=settings.prototypes, **options)
                             .phases(settings.train.epochs, pretrained, frozen_backbone=settings.frozen_backbone),
                             steps_per_epoch, settings.train.batch_size, len(splits.train_labels),
                             settings.frozen_backbone)
                      for options in (spec.head_options, {}))
        change = schedule_change(row, paper)
        if change:
            row["schedule_change"] = change
        return row

    def run(self, spec, seed: int, lr_scale: float, schedule: str, settings, splits, run_dir: Path,
            progress: bool = False, score: bool = False) -> Dict[str, Any]:
        if score and (run_dir / "metrics.json").exists():
            saved = json.loads((run_dir / "metrics.json").read_text())
            if "accuracy" in saved:
                return saved
        record, model = train_run(spec, seed, lr_scale, settings, splits, run_dir, progress, schedule=schedule)
        return score_test(record, splits, settings, model) if score else record
