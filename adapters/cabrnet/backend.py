"""CaBRNet's own architectures as benchmark rows: the run backend ``cabrnet``, whose rows are
named ``cabrnet:ARCH`` (``cabrnet:protopnet``, ``cabrnet:prototree``).

Registered through the entry-point group ``protoknn_plugin.run_backends`` (pyproject.toml), so
the benchmark finds it without naming it, and on import of this package. CaBRNet itself is
imported only when a row runs; checking a row without the extra gives a one-line error that
names the extra.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from protoknn_plugin.run_backends import RunBackend, register_backend

from .extra import require_cabrnet


@register_backend("cabrnet")
class CaBRNetBackend(RunBackend):
    """CaBRNet builds its own schedule under the benchmark's rules (``baseline.protopnet_schedule``,
    ``prototree.prototree_schedule``),
    so no learning-rate scale, schedule or tuning applies; its checkpoints are CaBRNet's, which
    ``protoknn faithfulness`` does not read."""

    prefix = "cabrnet:"
    lr_scales = schedules = tuning = False
    explainable = False
    reports_budget = False

    def architecture(self, row: str) -> str:
        """``cabrnet:prototree`` -> ``prototree``."""
        return row[len(self.prefix):]

    def check(self, row: str) -> None:
        require_cabrnet()

    def budget(self, spec, settings, splits, pretrained: bool, steps_per_epoch: int) -> Dict[str, Any]:
        from .baseline import cabrnet_budget

        return cabrnet_budget(self.architecture(spec.head), settings.train.epochs, steps_per_epoch,
                              settings.train.batch_size, spec.head_options, pretrained)

    def run(self, spec, seed: int, lr_scale: float, schedule: str, settings, splits, run_dir: Path,
            progress: bool = False, score: bool = False) -> Dict[str, Any]:
        """Train and score the row once per seed (CaBRNet scores the test split as it finishes);
        a run with ``metrics.json`` is only read."""
        from protoknn_plugin.train import write_json

        from .baseline import run_cabrnet_head

        if (run_dir / "metrics.json").exists():
            return json.loads((run_dir / "metrics.json").read_text())
        result = run_cabrnet_head(self.architecture(spec.head), settings, splits, run_dir, seed, label=spec.label,
                                  options=spec.head_options, progress=progress)
        result.setdefault("accuracy", result.get("accuracy[top1]"))
        result.setdefault("primary", "top1")
        write_json(run_dir / "metrics.json", result)
        return result
