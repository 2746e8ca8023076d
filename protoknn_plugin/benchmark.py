"""Side-by-side runs: every head (or cluster-loss variant) on the same data, backbone
initialisation and budget, over several seeds, summarised as mean ± std.

Writes ``results.json`` (every run and the summary), ``results.csv`` and
``results.md``, and keeps each run's directory under ``runs/`` so that
``protoknn explain`` and ``protoknn evaluate`` work on it afterwards.
"""
from __future__ import annotations

import csv
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .checkpoint import ensure_writable_dir
from .errors import ProtoKNNError
from .model import ModelConfig, PrototypeModel
from .prototypes import prototype_spread
from .train import TrainConfig, Trainer, evaluate


@dataclass
class RunSpec:
    """One row of a comparison: a label, a head and that head's options."""

    label: str
    head: str
    head_options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchmarkSettings:
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


class PeakMemory:
    """Peak memory of the block: CUDA peak allocation, or the process's peak RSS on CPU.

    On Linux, writing 5 to /proc/self/clear_refs resets VmHWM, so each run gets its own peak.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = float("nan")

    @staticmethod
    def _vm_hwm_kb() -> Optional[int]:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            kb = self._vm_hwm_kb()
            self.peak_mb = kb / 1024 if kb is not None else float("nan")
        return False


def run_one(spec: RunSpec, seed: int, settings: BenchmarkSettings, splits, out_dir: Path,
            progress: bool = True) -> Dict[str, Any]:
    """Train and evaluate one head with one seed; returns its metrics."""
    config = ModelConfig(
        head=spec.head, backbone=settings.backbone, num_classes=len(splits.classes), in_channels=splits.channels,
        num_prototypes=settings.prototypes, dim=settings.dim, weights=settings.weights,
        backbone_options=dict(settings.backbone_options), head_options=dict(spec.head_options), seed=seed,
    )
    train_config = TrainConfig(**{**asdict(settings.train), "seed": seed})
    model = PrototypeModel(config)
    trainer = Trainer(model, splits, train_config, out_dir=str(out_dir), progress=progress,
                      dataset_name=settings.dataset,
                      data_info={"data_dir": settings.data_dir, "limit": settings.limit, "crop": settings.crop})
    with PeakMemory(trainer.device) as peak:
        started = time.perf_counter()
        trainer.fit()
        train_seconds = time.perf_counter() - started
    metrics = evaluate(model, splits.test, train_config.eval_batch_size, trainer.device)
    result: Dict[str, Any] = {"label": spec.label, "head": spec.head, "seed": seed, **metrics,
                              "train_seconds": train_seconds, "peak_memory_mb": peak.peak_mb}
    if model.prototype_layer is not None:
        result["prototype_spread"] = prototype_spread(model.prototype_layer.prototypes)
    beta = getattr(getattr(getattr(model.head, "task_loss", None), "loss", None), "beta", None)
    if isinstance(beta, torch.Tensor):
        result["learned_beta_mean"] = float(beta.detach().mean())
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def summarise(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and std over seeds for every numeric metric, one row per label (in first-seen order)."""
    rows: Dict[str, Dict[str, Any]] = {}
    for run in runs:
        row = rows.setdefault(run["label"], {"label": run["label"], "head": run["head"], "seeds": [], "_values": {}})
        row["seeds"].append(run["seed"])
        for key, value in run.items():
            if key not in ("label", "head", "seed") and isinstance(value, (int, float)):
                row["_values"].setdefault(key, []).append(float(value))
    out = []
    for row in rows.values():
        values = row.pop("_values")
        for key, vals in values.items():
            row[key] = statistics.fmean(vals)
            row[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def metric_columns(summary: List[Dict[str, Any]]) -> List[str]:
    """Accuracy columns first (top1, then k=1, 3, 5, 10), then the rest in a fixed order."""
    accuracy = sorted({k for row in summary for k in row if k.startswith("accuracy[") and not k.endswith("_std")},
                      key=lambda k: (k != "accuracy[top1]", int(k.split("=")[1][:-1]) if "=" in k else 0))
    rest = [k for k in ("prototype_spread", "train_seconds", "peak_memory_mb", "images_per_second")
            if any(k in row for row in summary)]
    return accuracy + rest


def _fmt(row: Dict[str, Any], key: str) -> str:
    if key not in row:
        return "—"
    mean, std = row[key], row.get(key + "_std", 0.0)
    if key.startswith("accuracy["):
        return f"{100 * mean:.2f} ± {100 * std:.2f}"
    if key == "prototype_spread":
        return f"{mean:.4f} ± {std:.4f}"
    return f"{mean:.1f} ± {std:.1f}"


def _header(key: str) -> str:
    names = {"prototype_spread": "spread (eq. 17)", "train_seconds": "train s", "peak_memory_mb": "peak MB",
             "images_per_second": "test img/s"}
    if key.startswith("accuracy["):
        return "acc " + key[len("accuracy["):-1] + " %"
    return names.get(key, key)


def write_results(out: Path, runs: List[Dict[str, Any]], summary: List[Dict[str, Any]], meta: Dict[str, Any]) -> None:
    columns = metric_columns(summary)
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2, default=str))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "head", "seeds"] + [c for k in columns for c in (k, k + "_std")])
        for row in summary:
            writer.writerow([row["label"], row["head"], " ".join(map(str, row["seeds"]))]
                            + [row.get(c, "") for k in columns for c in (k, k + "_std")])
    lines = ["| head | " + " | ".join(_header(k) for k in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for row in summary:
        lines.append(f"| {row['label']} | " + " | ".join(_fmt(row, k) for k in columns) + " |")
    seeds = ",".join(str(s) for s in meta.get("seeds", []))
    lines.append("")
    lines.append(f"mean ± std over seeds {seeds}; dataset {meta.get('dataset')}, backbone {meta.get('backbone')}, "
                 f"{meta.get('epochs')} epochs.")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def rich_table(summary: List[Dict[str, Any]], title: str):
    from rich.table import Table

    columns = metric_columns(summary)
    from rich.markup import escape

    table = Table(title=escape(title))
    table.add_column("head", style="bold")
    for key in columns:
        table.add_column(escape(_header(key)), justify="right")
    for row in summary:
        table.add_row(escape(row["label"]), *(_fmt(row, k) for k in columns))
    return table


def run_comparison(specs: Sequence[RunSpec], settings: BenchmarkSettings, out: str, title: str = "benchmark",
                   console=None, progress: bool = True, splits=None) -> List[Dict[str, Any]]:
    """Train every spec under every seed, write results.{json,csv,md}, print the table, return the summary."""
    from .data import create_dataset

    if not specs:
        raise ProtoKNNError("nothing to compare: pass at least one head or variant")
    out_dir = ensure_writable_dir(out)
    if splits is None:
        splits = create_dataset(settings.dataset, settings.data_dir, limit=settings.limit, strict=settings.strict,
                                crop=settings.crop)
    runs = []
    for seed in settings.seeds:
        for spec in specs:
            if console is not None:
                console.print(f"[bold]{spec.label}[/] seed {seed}")
            run_dir = out_dir / "runs" / f"{spec.label.replace(':', '-').replace('/', '-')}-seed{seed}"
            if spec.head.startswith("cabrnet:"):
                # CaBRNet's own implementation as a baseline row (extra `protoknn-plugin[cabrnet]`).
                from protoknn_plugin.adapters.cabrnet.baseline import run_cabrnet_head

                runs.append(run_cabrnet_head(spec.head.split(":", 1)[1], settings, splits, run_dir, seed,
                                             label=spec.label, options=spec.head_options, progress=progress))
            else:
                runs.append(run_one(spec, seed, settings, splits, run_dir, progress=progress))
    summary = summarise(runs)
    meta = {"dataset": settings.dataset, "backbone": settings.backbone, "seeds": list(settings.seeds),
            "epochs": settings.train.epochs, "prototypes": settings.prototypes, "dim": settings.dim,
            "batch": f"{settings.train.batch_classes} x {settings.train.per_class}", "limit": settings.limit,
            "torch_threads": torch.get_num_threads(), "title": title}
    write_results(out_dir, runs, summary, meta)
    if console is not None:
        console.print(rich_table(summary, title))
        console.print(f"wrote {out_dir / 'results.json'}, results.csv and results.md")
    return summary
