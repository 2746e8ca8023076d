"""A whole comparison: check the protocol, run the sweep of learning-rate scales and schedules
on the validation split, train every row under every seed with its choice, choose each row's
prediction (kNN heads: k) on the validation split, score the test set once per run, and write
the tables and figures."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..checkpoint import ensure_writable_dir
from ..errors import ProtoKNNError
from ..run_backends import backend_for
from .executors import InProcessExecutor, RunJob
from .protocol import check_same_budget, with_schedule
from .settings import BenchmarkSettings, RunSpec, run_dir_name


def _pretrained(settings: BenchmarkSettings, channels: int) -> bool:
    from ..backbones import RANDOM_WEIGHTS, create_backbone

    weights = {} if settings.weights is None else {"weights": settings.weights}
    backbone = create_backbone(settings.backbone, in_channels=channels, **weights, **dict(settings.backbone_options))
    return getattr(backbone, "weights", None) not in RANDOM_WEIGHTS


def check_protocol(specs: Sequence[RunSpec], settings: BenchmarkSettings, splits) -> Dict[str, Dict[str, int]]:
    """Every row's budget, computed by its run backend (run_backends) before anything trains;
    raises when they differ."""
    pretrained = _pretrained(settings, splits.channels)
    steps = settings.train.steps_per_epoch or max(1, len(splits.train_labels) // settings.train.batch_size)
    budgets = {spec.label: backend_for(spec.head).budget(spec, settings, splits, pretrained, steps) for spec in specs}
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
    own = head.phases(settings.train.epochs, pretrained, frozen_backbone=settings.frozen_backbone)
    kept, seen = [], []
    for schedule in settings.schedules:
        phases = with_schedule(own, schedule)
        if phases not in seen:
            kept.append(schedule)
            seen.append(phases)
    return kept


def sweep_grid(spec: RunSpec, settings: BenchmarkSettings, schedules: Sequence[str]) -> List[Tuple[float, str]]:
    """The (lr scale, schedule) pairs tried for ``spec``: only those its run backend takes."""
    backend = backend_for(spec.head)
    scales = settings.lr_scales if backend.lr_scales else (1.0,)
    return [(float(scale), schedule) for schedule in (schedules if backend.schedules else ("own",))
            for scale in scales]


def sweep(specs, settings, splits, runs_dir: Path, console=None, progress=False, executor=None,
          schedules: Optional[Dict[str, List[str]]] = None) -> Dict[str, Dict[str, Any]]:
    """Per row: the (lr scale, schedule) whose best prediction (kNN heads: the best k) has the best
    mean validation accuracy over the sweep seeds; a row's sweep runs go to ``executor`` together
    (in this process when None). ``schedules``: label -> the schedules to try (default
    ``settings.schedules``). Ties go to the scale nearest 1, then to the head's own schedule.

    Returns label -> ``{"lr_scale", "schedule", "val": [{"lr_scale", "schedule", "prediction",
    "val_accuracy"}, ...]}`` (``val`` is empty for a row with one setting: nothing is swept).
    """
    schedules = schedules or {}
    grids = {s.label: sweep_grid(s, settings, schedules.get(s.label, settings.schedules)) for s in specs}
    if any(len(grid) > 1 for grid in grids.values()) and getattr(splits, "val", None) is None:
        raise ProtoKNNError("the learning-rate and schedule sweep picks on a validation split; set --val-fraction above 0")
    executor = executor or InProcessExecutor(lambda text: _say(console, text), progress)
    chosen = {}
    for spec in specs:
        grid = grids[spec.label]
        if len(grid) == 1:
            chosen[spec.label] = {"lr_scale": grid[0][0], "schedule": grid[0][1], "val": []}
            continue
        jobs = [RunJob(spec, seed, scale, runs_dir / run_dir_name(spec, settings, scale, seed, schedule),
                       schedule=schedule, title=f"[bold]{spec.label}[/] sweep lr x{scale:g} {schedule} schedule, seed {seed}")
                for scale, schedule in grid for seed in settings.sweep_seed_list()]
        records = executor.map(jobs, settings, splits)
        scores = []
        for scale, schedule in grid:
            mine = [r for job, r in zip(jobs, records) if (job.lr_scale, job.schedule) == (scale, schedule)]
            prediction, means = choose_prediction(mine, mine[0]["primary"])
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


def seed_jobs(specs, settings: BenchmarkSettings, chosen, runs_dir: Path) -> List[RunJob]:
    """Every row under every seed with its chosen rate and schedule, each scored on the test split once."""
    jobs = []
    for seed in settings.seeds:
        for spec in specs:
            choice = chosen.get(spec.label, {})  # none for a row no sweep or tuning applies to
            scale, schedule = choice.get("lr_scale", 1.0), choice.get("schedule", "own")
            jobs.append(RunJob(spec, seed, scale, runs_dir / run_dir_name(spec, settings, scale, seed, schedule),
                               score=True, schedule=schedule, title=f"[bold]{spec.label}[/] seed {seed}"))
    return jobs


def tune_then_fix(specs, tunable, settings, splits, out_dir: Path, runs_dir: Path, executor, trials: int,
                  pretrained: bool, console=None):
    """``--tune``: tune the ``tunable`` rows, write the choice to results.md, return the rows with
    their chosen options and the per-row choice (``lr_scale`` 1: tuning replaces the sweep)."""
    from .tuning import tune_rows, tuned_specs, write_tuning_section

    if len(settings.lr_scales) > 1 or len(settings.schedules) > 1:
        raise ProtoKNNError("--tune and --lr-scales/--schedules both choose the rates; use one of them")
    tuned = tune_rows(tunable, settings, splits, out_dir, runs_dir, executor, trials,
                      pretrained, say=lambda text: _say(console, text))
    write_tuning_section(out_dir, tuned, trials, settings.sweep_seed_list()[0])
    _say(console, f"chosen settings written to {out_dir / 'results.md'}")
    chosen = {label: {"lr_scale": 1.0, "schedule": "own", "val": [], "tuned": c} for label, c in tuned.items()}
    return tuned_specs(specs, tuned), chosen


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
        if run["head"] == "cnn" or not backend_for(run["head"]).explainable:
            continue  # no prototypes, or a run faithfulness cannot read: nothing to explain
        _say(console, f"[bold]{run['label']}[/] seed {run['seed']}: faithfulness")
        metrics = faithfulness_for_run(run["run_dir"], splits=splits, n=images, seed=0)
        run.update({f"faith_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        first.setdefault(run["label"], run["run_dir"])
    if first:
        _say(console, "writing the HTML report of the first seed's runs")
        write_comparison_report(first, out_dir / "report")


def run_comparison(specs: Sequence[RunSpec], settings: BenchmarkSettings, out: str, title: str = "benchmark",
                   console=None, progress: bool = False, splits=None, explanations: bool = False,
                   explanation_images: int = 200, paired_keys: Sequence[str] = (), executor=None,
                   tune: int = 0) -> List[Dict[str, Any]]:
    """Train every spec under every seed, write results.{json,csv,md} and the figures, return the summary.

    Every pair of rows is compared on ``acc %``; ``paired_keys`` (e.g. ``accuracy[k=1]``,
    ``prototype_spread``) adds a paired table per further metric to results.md.
    ``executor``: where the runs execute (benchmark.executors; None: in this process).
    ``tune``: trials per row of the equal-budget search (benchmark.tuning) before the seeds run.

    Raises ``train.Interrupted`` (checkpoint written) on SIGINT/SIGTERM; rerunning resumes.
    """
    from ..train.loading import check_batch_settings
    from .tables import summarise

    if not specs:
        raise ProtoKNNError("nothing to compare: pass at least one head or variant")
    if len({s.label for s in specs}) < len(specs):
        raise ProtoKNNError("two rows have the same label; name them with --heads LABEL=HEAD")
    out_dir = ensure_writable_dir(out)
    runs_dir = out_dir / "runs"
    image_splits = comparison_splits(settings, splits)
    budgets = check_protocol(specs, settings, image_splits)
    check_batch_settings(image_splits.train_labels, settings.train)  # before the feature cache is built
    swept, schedules = swept_rows(specs, settings, image_splits)
    splits = cached_splits(specs, settings, image_splits, console) if settings.frozen_backbone else image_splits
    executor = executor or InProcessExecutor(lambda text: _say(console, text), progress)
    if tune:
        tunable = [s for s in specs if backend_for(s.head).tuning]
        specs, chosen = tune_then_fix(specs, tunable, settings, splits, out_dir, runs_dir, executor, tune,
                                      _pretrained(settings, image_splits.channels), console)
    else:
        chosen = sweep(swept, settings, splits, runs_dir, console, progress, executor, schedules)
    jobs = seed_jobs(specs, settings, chosen, runs_dir)
    runs = [result if backend_for(job.spec.head).reports_budget else {**budgets[job.spec.label], **result}
            for job, result in zip(jobs, executor.map(jobs, settings, splits))]
    choose_predictions(runs, chosen)
    if explanations:
        explain_runs(runs, image_splits, out_dir, settings, console, images=explanation_images)
    summary = summarise(runs)
    meta = comparison_meta(settings, splits, runs, chosen, budgets, title, paired_keys)
    write_outputs(out_dir, runs, summary, meta, chosen, settings, tune, console)
    return summary


def comparison_splits(settings: BenchmarkSettings, splits=None):
    """The comparison's image splits (``settings``' dataset unless given), with the validation share held out."""
    from ..data import create_dataset
    from ..data.base import carve_validation

    if splits is None:
        splits = create_dataset(settings.dataset, settings.data_dir, limit=settings.limit, strict=settings.strict,
                                crop=settings.crop, image_size=settings.image_size)
    if settings.train.val_fraction and getattr(splits, "val", None) is None:
        splits = carve_validation(splits, settings.train.val_fraction)
    return splits


def swept_rows(specs: Sequence[RunSpec], settings: BenchmarkSettings, splits) -> Tuple[List[RunSpec], Dict[str, List[str]]]:
    """The rows whose rate or schedule the sweep chooses, and label -> the schedules each tries."""
    swept = [s for s in specs if backend_for(s.head).lr_scales or backend_for(s.head).schedules]
    pretrained = len(settings.schedules) > 1 and _pretrained(settings, splits.channels)
    schedules = {s.label: swept_schedules(s, settings, splits, pretrained) for s in swept
                 if backend_for(s.head).schedules}
    return swept, schedules


def comparison_meta(settings: BenchmarkSettings, splits, runs: List[Dict[str, Any]], chosen, budgets, title: str,
                    paired_keys: Sequence[str]) -> Dict[str, Any]:
    """The settings, data sizes and choices that results.json records next to the runs."""
    return {"dataset": settings.dataset, "backbone": settings.backbone, "weights": settings.weights,
            "seeds": list(settings.seeds), "epochs": settings.train.epochs, "prototypes": settings.prototypes,
            "dim": settings.dim, "batch": f"{settings.train.batch_classes} x {settings.train.per_class}",
            "limit": settings.limit, "val_fraction": settings.train.val_fraction,
            "train_images": len(splits.train_labels),
            "val_images": len(splits.val) if getattr(splits, "val", None) is not None else 0,
            "test_images": len(splits.test), "lr_scales": list(settings.lr_scales),
            "schedules": list(settings.schedules),
            "sweep_seeds": settings.sweep_seed_list(), "chosen": chosen, "budgets": budgets,
            # Each run records its own thread count and device kind (they are in its run key too).
            "threads": sorted({r["threads"] for r in runs if r.get("threads") is not None}),
            "device_kinds": sorted({r["device_kind"] for r in runs if r.get("device_kind")}),
            "title": title, "paired_keys": list(paired_keys)}


def write_outputs(out_dir: Path, runs, summary, meta: Dict[str, Any], chosen, settings: BenchmarkSettings,
                  tune: int, console=None) -> None:
    """results.{json,csv,md} (with the tuning section under --tune), the figures, and the tables on the console."""
    from .charts import write_figures
    from .tables import rich_paired, rich_table, write_results

    write_results(out_dir, runs, summary, meta)
    if tune:
        from .tuning import write_tuning_section

        write_tuning_section(out_dir, {k: c["tuned"] for k, c in chosen.items() if "tuned" in c}, tune,
                             settings.sweep_seed_list()[0], append=True)
    written = write_figures(out_dir, runs, summary)
    if console is not None:
        console.print(rich_table(summary, meta["title"], runs))
        paired = rich_paired(runs)
        if paired is not None:
            console.print(paired)
        console.print(f"wrote {out_dir / 'results.json'}, results.csv, results.md" +
                      "".join(f", {p.name}" for p in written))
