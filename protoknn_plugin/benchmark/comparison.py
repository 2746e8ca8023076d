"""A whole comparison: check the protocol, run the learning-rate sweep on the validation
split, train every row under every seed with its chosen rate, score the test set once per
run, and write the tables and figures."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

from ..checkpoint import ensure_writable_dir
from ..errors import ProtoKNNError
from .executors import InProcessExecutor, RunJob
from .protocol import budget, check_same_budget, schedule_change
from .settings import BenchmarkSettings, RunSpec, run_dir_name


def _pretrained(settings: BenchmarkSettings, channels: int) -> bool:
    from ..backbones import create_backbone

    weights = {} if settings.weights is None else {"weights": settings.weights}
    backbone = create_backbone(settings.backbone, in_channels=channels, **weights, **dict(settings.backbone_options))
    return getattr(backbone, "weights", None) not in (None, "none", "None", "random")


def check_protocol(specs: Sequence[RunSpec], settings: BenchmarkSettings, splits) -> Dict[str, Dict[str, int]]:
    """Every plugin row's budget, before anything trains; raises when they differ. A row whose
    last-layer epochs or pushes differ from its head's defaults (the paper's values) gets
    ``schedule_change`` (protocol.schedule_change), which the table marks."""
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
        row, paper = (budget(create_head(spec.head, num_classes=len(splits.classes), backbone_channels=8,
                                         dim=settings.dim, num_prototypes=settings.prototypes, **options)
                             .phases(settings.train.epochs, pretrained, frozen_backbone=settings.frozen_backbone),
                             steps, settings.train.batch_size, len(splits.train_labels), settings.frozen_backbone)
                      for options in (spec.head_options, {}))
        budgets[spec.label] = row
        change = schedule_change(row, paper)
        if change:
            row["schedule_change"] = change
    check_same_budget(budgets, pretrained)
    return budgets


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text)


def sweep(specs, settings, splits, runs_dir: Path, console=None, progress=False,
          executor=None) -> Dict[str, Dict[str, Any]]:
    """Per row: the lr scale with the best mean validation accuracy over the sweep seeds; a
    row's sweep runs go to ``executor`` together (in this process when None)."""
    if len(settings.lr_scales) == 1:
        return {s.label: {"lr_scale": float(settings.lr_scales[0]), "val": {}} for s in specs}
    if getattr(splits, "val", None) is None:
        raise ProtoKNNError("the learning-rate sweep picks on a validation split; set --val-fraction above 0")
    executor = executor or InProcessExecutor(lambda text: _say(console, text), progress)
    chosen = {}
    for spec in specs:
        scores = {}
        jobs = [RunJob(spec, seed, scale, runs_dir / run_dir_name(spec, settings, scale, seed),
                       title=f"[bold]{spec.label}[/] sweep lr x{scale:g} seed {seed}")
                for scale in settings.lr_scales for seed in settings.sweep_seed_list()]
        records = executor.map(jobs, settings, splits)
        for scale in settings.lr_scales:
            vals = [r["val_accuracy"] for job, r in zip(jobs, records) if job.lr_scale == scale]
            scores[float(scale)] = sum(vals) / len(vals)
        best = max(scores, key=lambda s: (scores[s], -abs(s - 1.0)))  # ties: the head's own rate
        chosen[spec.label] = {"lr_scale": best, "val": scores}
    return chosen


def seed_jobs(specs, settings: BenchmarkSettings, chosen, runs_dir: Path) -> List[RunJob]:
    """Every row under every seed with its chosen rate, each scored on the test split once."""
    jobs = []
    for seed in settings.seeds:
        for spec in specs:
            scale = 1.0 if spec.head.startswith("cabrnet:") else chosen[spec.label]["lr_scale"]
            jobs.append(RunJob(spec, seed, scale, runs_dir / run_dir_name(spec, settings, scale, seed), score=True,
                               title=f"[bold]{spec.label}[/] seed {seed}"))
    return jobs


def tune_then_fix(specs, plugin_specs, settings, splits, out_dir: Path, runs_dir: Path, executor, trials: int,
                  pretrained: bool, console=None):
    """``--tune``: tune the plugin rows, write the choice to results.md, return the rows with
    their chosen options and the per-row choice (``lr_scale`` 1: tuning replaces the sweep)."""
    from .tuning import tune_rows, tuned_specs, write_tuning_section

    if len(settings.lr_scales) > 1:
        raise ProtoKNNError("--tune and --lr-scales both choose the rates; use one of them")
    tuned = tune_rows(plugin_specs, settings, splits, out_dir, runs_dir, executor, trials,
                      pretrained, say=lambda text: _say(console, text))
    write_tuning_section(out_dir, tuned, trials, settings.sweep_seed_list()[0])
    _say(console, f"chosen settings written to {out_dir / 'results.md'}")
    chosen = {label: {"lr_scale": 1.0, "val": {}, "tuned": c} for label, c in tuned.items()}
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
                   explanation_images: int = 200, paired_keys: Sequence[str] = (), executor=None,
                   tune: int = 0) -> List[Dict[str, Any]]:
    """Train every spec under every seed, write results.{json,csv,md} and the figures, return the summary.

    Every pair of rows is compared on ``acc %``; ``paired_keys`` (e.g. ``accuracy[k=1]``,
    ``prototype_spread``) adds a paired table per further metric to results.md.
    ``executor``: where the runs execute (benchmark.executors; None: in this process).
    ``tune``: trials per row of the equal-budget search (benchmark.tuning) before the seeds run.

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
    if settings.frozen_backbone:
        splits = cached_splits(specs, settings, splits, console)
    plugin_specs = [s for s in specs if not s.head.startswith("cabrnet:")]
    executor = executor or InProcessExecutor(lambda text: _say(console, text), progress)
    if tune:
        specs, chosen = tune_then_fix(specs, plugin_specs, settings, splits, out_dir, runs_dir, executor, tune,
                                      _pretrained(settings, image_splits.channels), console)
    else:
        chosen = sweep(plugin_specs, settings, splits, runs_dir, console, progress, executor)
    jobs = seed_jobs(specs, settings, chosen, runs_dir)
    runs = [{**budgets[job.spec.label], **result} if job.spec.head.startswith("cabrnet:") else result
            for job, result in zip(jobs, executor.map(jobs, settings, splits))]
    if explanations:
        explain_runs(runs, image_splits, out_dir, settings, console, images=explanation_images)
    summary = summarise(runs)
    meta = {"dataset": settings.dataset, "backbone": settings.backbone, "weights": settings.weights,
            "seeds": list(settings.seeds), "epochs": settings.train.epochs, "prototypes": settings.prototypes,
            "dim": settings.dim, "batch": f"{settings.train.batch_classes} x {settings.train.per_class}",
            "limit": settings.limit, "val_fraction": settings.train.val_fraction,
            "train_images": len(splits.train_labels), "val_images": len(splits.val) if getattr(splits, "val", None) is not None else 0,
            "test_images": len(splits.test), "lr_scales": list(settings.lr_scales),
            "sweep_seeds": settings.sweep_seed_list(), "chosen": chosen, "budgets": budgets,
            # Each run records its own thread count and device kind (they are in its run key too).
            "threads": sorted({r["threads"] for r in runs if r.get("threads") is not None}),
            "device_kinds": sorted({r["device_kind"] for r in runs if r.get("device_kind")}),
            "title": title, "paired_keys": list(paired_keys)}
    write_results(out_dir, runs, summary, meta)
    if tune:
        from .tuning import write_tuning_section

        write_tuning_section(out_dir, {k: c["tuned"] for k, c in chosen.items() if "tuned" in c}, tune,
                             settings.sweep_seed_list()[0], append=True)
    written = write_figures(out_dir, runs, summary)
    if console is not None:
        console.print(rich_table(summary, title, runs))
        paired = rich_paired(runs)
        if paired is not None:
            console.print(paired)
        console.print(f"wrote {out_dir / 'results.json'}, results.csv, results.md" +
                      "".join(f", {p.name}" for p in written))
    return summary
