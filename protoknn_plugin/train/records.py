"""What a run reports: metrics.csv (one row per epoch), optional TensorBoard events, and
progress on the terminal (a rich bar; one plain line per epoch when stdout is not a terminal).
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import ProtoKNNError

METRICS_CSV = "metrics.csv"
_FIRST = ("phase", "epoch", "global_step")
_LAST = ("seconds", "epoch_seconds", "images_per_second")


def flat_row(entry: Dict[str, Any]) -> Dict[str, Any]:
    """A history entry with its learning rates spread into ``lr[group]`` columns."""
    row = {k: v for k, v in entry.items() if k != "lr"}
    for group, lr in (entry.get("lr") or {}).items():
        row[f"lr[{group}]"] = lr
    return row


def write_metrics_csv(path: Path, history: List[Dict[str, Any]]) -> None:
    """Rewrite ``path`` from the whole history (so a resumed run's file stays whole).

    Columns: phase, epoch, global_step, every loss term, lr[group], validation accuracies,
    seconds (since the run began), epoch_seconds, images_per_second. An epoch without a
    column (another phase's loss term) leaves it empty.
    """
    rows = [flat_row(h) for h in history]
    middle = sorted({k for row in rows for k in row} - set(_FIRST) - set(_LAST),
                    key=lambda k: (k.startswith("val_"), k.startswith("lr["), k))
    header = [*_FIRST, *middle, *(k for k in _LAST if any(k in row for row in rows))]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


class TensorBoardWriter:
    """The numbers of metrics.csv as TensorBoard scalars, at the epoch's global step."""

    def __init__(self, log_dir: Path, purge_step: Optional[int] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ProtoKNNError("--tensorboard needs the tensorboard package; "
                                "install it with pip install 'protoknn-plugin[tensorboard]'") from None
        # purge_step: a resumed run drops events written after its checkpoint.
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def add(self, entry: Dict[str, Any]) -> None:
        step = int(entry["global_step"])
        for key, value in flat_row(entry).items():
            if key in _FIRST or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def epoch_line(entry: Dict[str, Any]) -> str:
    """One plain line per epoch for logs: phase, epoch, losses, validation, speed."""
    parts = [f"{entry['phase']} epoch {entry['epoch']}"]
    for key, value in flat_row(entry).items():
        if key in _FIRST or key in ("seconds", "epoch_seconds") or key.startswith("lr[") or key.startswith("val_accuracy["):
            continue
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
    return "  ".join(parts)


class ProgressBar:
    """A rich progress bar: phase, epoch, step, loss terms and images per second."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[terms]}"), TimeElapsedColumn(), transient=False)
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("train", total=1, terms="")
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, phase: str, epoch: int, step: int, steps: int, means: Dict[str, float], rate: float) -> None:
        terms = " ".join(f"{k} {v:.3f}" for k, v in means.items()) + f"  {rate:.0f} img/s"
        self.progress.update(self.task, description=f"{phase} epoch {epoch + 1}", completed=step,
                             total=steps, terms=terms)

    def epoch_done(self, entry: Dict[str, Any]) -> None:
        pass


class PlainLines:
    """No bar: one line per finished epoch on stdout (logs, CI, pipes)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *args, **kwargs) -> None:
        pass

    def epoch_done(self, entry: Dict[str, Any]) -> None:
        print(epoch_line(entry), flush=True)


def make_progress(enabled: bool):
    """A rich bar on a terminal, plain lines otherwise, or None when progress is off."""
    if not enabled:
        return None
    return ProgressBar() if sys.stdout.isatty() else PlainLines()


class EpochLog:
    """Where every finished epoch goes: the run's history, the progress display, metrics.csv and
    (``tensorboard``) TensorBoard events under ``out_dir`` (None: no files, e.g. on other ranks)."""

    def __init__(self, out_dir: Optional[Path], tensorboard: bool = False):
        if tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:  # say so now, not after the first epoch
                raise ProtoKNNError("--tensorboard needs the tensorboard package; "
                                    "install it with pip install 'protoknn-plugin[tensorboard]'")
        self.out_dir, self.tensorboard = out_dir, tensorboard
        self._writer: Optional[TensorBoardWriter] = None

    def epoch(self, history: List[Dict[str, Any]], entry: Dict[str, Any], bar) -> None:
        """Append ``entry`` to ``history`` and report it; metrics.csv is rewritten from the whole history."""
        history.append(entry)
        if bar is not None:
            bar.epoch_done(entry)
        if self.out_dir is None:
            return
        write_metrics_csv(self.out_dir / METRICS_CSV, history)
        if self.tensorboard:
            if self._writer is None:
                self._writer = TensorBoardWriter(self.out_dir / "tensorboard", purge_step=entry["global_step"])
            self._writer.add(entry)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
