"""A whole comparison: check the protocol, run the sweep of learning-rate scales and schedules
on the validation split, train every row under every seed with its choice, choose each row's
prediction (kNN heads: k) on the validation split, score the test set once per run, and write
the tables and figures."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..checkpoint import ensure_writable_dir
from ..errors import ProtoKNNError
from .protocol import budget, check_same_budget, with_schedule
from .runner import cabrnet_run, score_test, train_run
from .settings import BenchmarkSettings, RunSpec, run_dir_name


def _pretrained(settings: BenchmarkSettings, channels: int) -> bool:
    from ..backbones import create_backbone

    weights = {} if settings.weights is None else {"weights": settings.weights}
    backbone = create_backbone(settings.backbone, in_channels=channels, **weights, **dict(settings.backbone_options))
    return getattr(backbone, "weights", None) not in (None, "none", "None", "random")


def check_protocol(specs: Sequence[RunSpec], settings: BenchmarkSettings, splits) -> Dict[str, Dict[str, int]]:
    """Every plugin row's budget, before anything trains; raises when they differ."""
    from ..heads import create_head

    pretrained = _pretrained(settings, splits.channels)
    steps = settings.train.steps_per_epoch or max(1, len(splits.train_labels) // settings.train.batch_size)
    budgets = {}
    for spec in specs:
        if spec.head.startswith("cabrnet:"):  # its schedule is built by the adapter, under the same rules
            from protoknn_plugin.adapters.cabrnet.baseline import cabrnet_budget

            budgets[spec.label] = cabrnet_budget(spec.head.split(":", 1)[1], settings.train.epochs, steps,
                                                 settings.train.batch_size, spec.head_options, pretrained)
            continue
        head = create_head(spec.head, num_classes=len(splits.classes), backbone_channels=8, dim=settings.dim,
                           num_prototypes=settings.prototypes, **spec.head_options)
        budgets[spec.label] = budget(head.phases(settings.train.epochs, pretrained), steps,
                                     settings.train.batch_size, len(splits.train_labels))
    check_same_budget(budgets, pretrained)
    return budgets


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text)


def choose_prediction(records: Sequence[Dict[str, Any]], primary: str) -> Tuple[str, Dict[str, float]]:
    """The prediction (``top1``, or for kNN heads the k) with the best mean validation accuracy over
    ``records`` -> (its name, {name: mean}). Ties go to the head's primary prediction, then to the
    first in the head's order (the smaller k). Without validation scores: (primary, {})."""
    names = [key[len("val_accuracy["):-1] for key in records[0] if key.startswith("val_accuracy[")] if records else []
    names = [n for n in names if all(r.get(f"val_accuracy[{n}]") is not None for r in records)]
    if not names:
        return primary, {}
    means = {n: sum(r[f"val_accuracy[{n}]"] for r in records) / len(records) for n in names}
    return max(names, key=lambda n: (means[n], n == primary)), means


def swept_schedules(spec: RunSpec, settings: BenchmarkSettings, splits, pretrained: bool) -> List[str]:
    """``settings.schedules`` for this row, less those that give the same phases as an earlier one
    (the plain CNN's own schedule already is warm-up + cosine): they would train the same runs twice."""
    if len(settings.schedules) < 2:
        return list(settings.schedules)
    from ..heads import create_head

    head = create_head(spec.head, num_classes=len(splits.classes), backbone_channels=8, dim=settings.dim,
                       num_prototypes=settings.prototypes, **spec.head_options)
    own = head.phases(settings.train.epochs, pretrained)
    kept, seen = [], []
    for schedule in settings.schedules:
        phases = with_schedule(own, schedule)
        if phases not in seen:
            kept.append(schedule)
            seen.append(phases)
    return kept


def sweep(specs, settings, splits, runs_dir: Path, console=None, progress=False,
          schedules: Optional[Dict[str, List[str]]] = None) -> Dict[str, Dict[str, Any]]:
    """Per row: the (lr scale, schedule) whose best prediction (kNN heads: the best k) has the best
    mean validation accuracy over the sweep seeds. ``schedules``: label -> the schedules to try
    (default ``settings.schedules``). Ties go to the scale nearest 1, then to the head's own schedule.

    Returns label -> ``{"lr_scale", "schedule", "val": [{"lr_scale", "schedule", "prediction",
    "val_accuracy"}, ...]}`` (``val`` is empty for a row with one setting: nothing is swept).
    """
    schedules = schedules or {}
    grids = {s.label: [(float(scale), schedule) for schedule in schedules.get(s.label, settings.schedules)
                       for scale in settings.lr_scales] for s in specs}
    if any(len(grid) > 1 for grid in grids.values()) and getattr(splits, "val", None) is None:
        raise ProtoKNNError("the learning-rate and schedule sweep picks on a validation split; set --val-fraction above 0")
    chosen = {}
    for spec in specs:
        grid = grids[spec.label]
        if len(grid) == 1:
            chosen[spec.label] = {"lr_scale": grid[0][0], "schedule": grid[0][1], "val": []}
            continue
        scores = []
        for scale, schedule in grid:
            records = []
            for seed in settings.sweep_seed_list():
                _say(console, f"[bold]{spec.label}[/] sweep lr x{scale:g} {schedule} schedule, seed {seed}")
                record, _ = train_run(spec, seed, scale, settings, splits,
                                      runs_dir / run_dir_name(spec, settings, scale, seed, schedule), progress, schedule)
                records.append(record)
            prediction, means = choose_prediction(records, records[0]["primary"])
            scores.append({"lr_scale": scale, "schedule": schedule, "prediction": prediction,
                           "val_accuracy": means.get(prediction)})
        best = max(scores, key=lambda c: (c["val_accuracy"] or 0.0, -abs(c["lr_scale"] - 1.0), c["schedule"] == "own"))
        chosen[spec.label] = {"lr_scale": best["lr_scale"], "schedule": best["schedule"], "val": scores}
    return chosen


def choose_predictions(runs: List[Dict[str, Any]], chosen: Dict[str, Dict[str, Any]]) -> None:
    """Every plugin row's prediction chosen on the validation split of its final runs (all seeds);
    its test accuracy becomes the row's ``accuracy``. Adds ``prediction`` and
    ``val_by_prediction`` to ``chosen[label]`` and ``prediction`` to each run."""
    for label, choice in chosen.items():
        records = [r for r in runs if r["label"] == label]
        if not records:
            continue
        prediction, means = choose_prediction(records, records[0]["primary"])
        choice.update(prediction=prediction, val_by_prediction=means)
        for run in records:
            run["prediction"] = prediction
            run["accuracy"] = run.get(f"accuracy[{prediction}]", run["accuracy"])


def final_runs(specs, settings, splits, runs_dir: Path, chosen, budgets, console=None,
               progress=False) -> List[Dict[str, Any]]:
    """Every row under every seed with the rate scale and schedule the sweep chose, each scored on
    the test set once (finished runs are read back)."""
    runs = []
    for seed in settings.seeds:
        for spec in specs:
            if spec.head.startswith("cabrnet:"):
                _say(console, f"[bold]{spec.label}[/] seed {seed}")
                result = cabrnet_run(spec, seed, settings, splits, runs_dir / run_dir_name(spec, settings, 1.0, seed),
                                     progress)
                runs.append({**budgets[spec.label], **result})
                continue
            scale, schedule = chosen[spec.label]["lr_scale"], chosen[spec.label]["schedule"]
            run_dir = runs_dir / run_dir_name(spec, settings, scale, seed, schedule)
            done = (run_dir / "metrics.json").exists()
            _say(console, f"[bold]{spec.label}[/] seed {seed}" + (" (done, read from metrics.json)" if done else ""))
            record, model = train_run(spec, seed, scale, settings, splits, run_dir, progress, schedule)
            runs.append(score_test(record, splits, settings, model))
    return runs


def cached_splits(specs: Sequence[RunSpec], settings: BenchmarkSettings, splits, console=None):
    """Every split's backbone maps, computed once for all rows and seeds (the pretrained backbone's
    weights do not depend on the seed; the cache key checks it) -> splits of cached maps."""
    from ..frozen import prepare_feature_cache
    from ..model import ModelConfig, PrototypeModel
    from ..train import resolve_device

    if not _pretrained(settings, splits.channels):
        raise ProtoKNNError("--frozen-backbone needs pretrained weights (e.g. --backbone efficientnet-lite0 or "
                            "--weights PATH); a frozen random backbone would learn nothing")
    probe = PrototypeModel(ModelConfig.for_data(splits, head="cnn", backbone=settings.backbone,
                                                weights=settings.weights,
                                                backbone_options=dict(settings.backbone_options)))
    log = (lambda line: console.print(line, markup=False, highlight=False)) if console is not None else None
    frozen = prepare_feature_cache(probe, splits, dataset=settings.dataset, data_dir=settings.data_dir,
                                   limit=settings.limit, crop=settings.crop, cache_dir=settings.cache_dir,
                                   device=resolve_device(settings.train.device), log=log)
    return frozen.splits


def explain_runs(runs: List[Dict[str, Any]], splits, out_dir: Path, settings: BenchmarkSettings, console=None,
                 images: int = 200) -> None:
    """``--explanations``: faithfulness metrics as extra columns of every prototype row, and one HTML
    report of the first seed's runs with links between the same test image under each head."""
    from ..faithfulness import faithfulness_for_run
    from ..report import write_comparison_report

    first = {}
    for run in runs:
        if run["head"] == "cnn" or run["head"].startswith("cabrnet:"):
            continue  # no prototypes: nothing to explain
        _say(console, f"[bold]{run['label']}[/] seed {run['seed']}: faithfulness")
        metrics = faithfulness_for_run(run["run_dir"], splits=splits, n=images, seed=0)
        run.update({f"faith_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        first.setdefault(run["label"], run["run_dir"])
    if first:
        _say(console, "writing the HTML report of the first seed's runs")
        write_comparison_report(first, out_dir / "report")


def run_comparison(specs: Sequence[RunSpec], settings: BenchmarkSettings, out: str, title: str = "benchmark",
                   console=None, progress: bool = False, splits=None, explanations: bool = False,
                   explanation_images: int = 200, paired_keys: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """Train every spec under every seed, write results.{json,csv,md} and the figures, return the summary.

    Every pair of rows is compared on ``acc %``; ``paired_keys`` (e.g. ``accuracy[k=1]``,
    ``prototype_spread``) adds a paired table per further metric to results.md.

    Raises ``train.Interrupted`` (checkpoint written) on SIGINT/SIGTERM; rerunning resumes.
    """
    from ..data import create_dataset
    from ..data.base import carve_validation
    from .figures import write_figures
    from .tables import rich_paired, rich_table, summarise, write_results

    if not specs:
        raise ProtoKNNError("nothing to compare: pass at least one head or variant")
    if len({s.label for s in specs}) < len(specs):
        raise ProtoKNNError("two rows have the same label; name them with --heads LABEL=HEAD")
    out_dir = ensure_writable_dir(out)
    runs_dir = out_dir / "runs"
    if splits is None:
        splits = create_dataset(settings.dataset, settings.data_dir, limit=settings.limit, strict=settings.strict,
                                crop=settings.crop, image_size=settings.image_size)
    if settings.train.val_fraction and getattr(splits, "val", None) is None:
        splits = carve_validation(splits, settings.train.val_fraction)
    budgets = check_protocol(specs, settings, splits)
    image_splits = splits
    plugin_specs = [s for s in specs if not s.head.startswith("cabrnet:")]
    pretrained = len(settings.schedules) > 1 and _pretrained(settings, splits.channels)
    schedules = {s.label: swept_schedules(s, settings, splits, pretrained) for s in plugin_specs}
    if settings.frozen_backbone:
        splits = cached_splits(specs, settings, splits, console)
    chosen = sweep(plugin_specs, settings, splits, runs_dir, console, progress, schedules)
    runs = final_runs(specs, settings, splits, runs_dir, chosen, budgets, console, progress)
    choose_predictions(runs, chosen)
    if explanations:
        explain_runs(runs, image_splits, out_dir, settings, console, images=explanation_images)
    summary = summarise(runs)
    meta = {"dataset": settings.dataset, "backbone": settings.backbone, "weights": settings.weights,
            "seeds": list(settings.seeds), "epochs": settings.train.epochs, "prototypes": settings.prototypes,
            "dim": settings.dim, "batch": f"{settings.train.batch_classes} x {settings.train.per_class}",
            "limit": settings.limit, "val_fraction": settings.train.val_fraction,
            "train_images": len(splits.train_labels), "val_images": len(splits.val) if getattr(splits, "val", None) is not None else 0,
            "test_images": len(splits.test), "lr_scales": list(settings.lr_scales),
            "schedules": list(settings.schedules),
            "sweep_seeds": settings.sweep_seed_list(), "chosen": chosen, "budgets": budgets,
            "torch_threads": torch.get_num_threads(), "title": title, "paired_keys": list(paired_keys)}
    write_results(out_dir, runs, summary, meta)
    written = write_figures(out_dir, runs, summary)
    if console is not None:
        console.print(rich_table(summary, title, runs))
        paired = rich_paired(runs)
        if paired is not None:
            console.print(paired)
        console.print(f"wrote {out_dir / 'results.json'}, results.csv, results.md" +
                      "".join(f", {p.name}" for p in written))
    return summary
