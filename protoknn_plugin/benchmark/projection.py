"""What projection costs, per run and over seeds: how far the prototypes moved at their push,
where they landed, and the validation accuracy right before and right after it.

A run's record gets the numbers of its last push (the one its finished model carries) as
flat keys, and all pushes under ``pushes``; results.md gets one row per head with the
paired after - before difference over seeds and its 95% interval.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .stats import mean_interval, paired_difference

# Flat run-record key -> key of a push record (train.TrainState.pushes).
PUSH_FIELDS = {"push_cosine_mean": "cosine_mean", "push_cosine_min": "cosine_min",
               "push_distinct_images": "distinct_images", "push_distinct_patches": "distinct_patches",
               "val_before_push": "val_accuracy_before", "val_after_push": "val_accuracy_after"}


def projection_fields(pushes: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """``pushes`` (every push record) and the last push's numbers as flat keys; {} without a push."""
    if not pushes:
        return {}
    last = pushes[-1]
    return {"pushes_measured": [dict(p) for p in pushes],
            **{key: last.get(source) for key, source in PUSH_FIELDS.items()}}


def projection_lines(runs: List[Dict[str, Any]]) -> List[str]:
    """Markdown rows, one per head with a push: mean over seeds of the cosine between prototype and
    patch (mean, min), distinct source images and patches, validation accuracy before and after
    the last push, and the paired after - before difference (points) with its 95% interval."""
    rows: Dict[str, List[Dict[str, Any]]] = {}
    for run in runs:
        if run.get("val_before_push") is not None and run.get("val_after_push") is not None:
            rows.setdefault(run["label"], []).append(run)
    if not rows:
        return []
    lines = ["| head | n | cos mean | cos min | distinct images | distinct patches | val before push % | "
             "val after push % | after − before (points) | 95% interval |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, measured in rows.items():
        cells = []
        for key, scale, digits in (("push_cosine_mean", 1, 3), ("push_cosine_min", 1, 3), ("push_distinct_images", 1, 1),
                                   ("push_distinct_patches", 1, 1), ("val_before_push", 100, 2),
                                   ("val_after_push", 100, 2)):
            values = [r[key] for r in measured if r.get(key) is not None]
            cells.append(f"{scale * mean_interval(values).mean:.{digits}f}" if values else "—")
        diff = paired_difference({r["seed"]: r["val_after_push"] for r in measured},
                                 {r["seed"]: r["val_before_push"] for r in measured})
        interval = "—" if diff.half_width is None else f"[{100 * diff.low:+.2f}, {100 * diff.high:+.2f}]"
        lines.append(f"| {label} | {diff.n} | " + " | ".join(cells) + f" | {100 * diff.mean:+.2f} | {interval} |")
    return lines
