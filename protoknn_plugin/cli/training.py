"""Commands that train and evaluate one run."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from types import SimpleNamespace

import click

from . import cli
from .common import (print_metrics, report_skipped, setup_threads, make_train_config, check_option_ranges,
                     config_option, console, err_console, frozen_backbone_options, loading_options, model_choice,
                     model_choice_options, parse_options, precision_option, run_cli, say_note, training_options,
                     with_preset, workers_option, write_run_config)


# The ProtoKNN head's own flags of `protoknn train`, in the order its head options are recorded.
PROTOKNN_FLAGS = ("task_loss", "aux_loss", "cluster_variant", "cluster_reduction", "memory", "k")


def protoknn_options(fn):
    """The ProtoKNN head's own options of `protoknn train` (--head-opt protoknn.KEY=VALUE wins over them)."""
    options = [
        click.option("--k", "k", type=int, default=5, show_default=True,
                     help="ProtoKNN: k of the reported prediction (k = 1, 3, 5, 10 are always evaluated)."),
        click.option("--memory", default="full", show_default=True,
                     help="ProtoKNN kNN memory: full, condensed or ivfpq."),
        click.option("--cluster-reduction", default="mean", show_default=True,
                     help="ProtoKNN: mean (per sample) or sum."),
        click.option("--cluster-variant", default="full", show_default=True,
                     help="ProtoKNN cluster loss: most-similar, sampling, debias, linear-assignment, full."),
        click.option("--aux-loss", default="margin", show_default=True,
                     help="ProtoKNN: PML loss on GAP+linear, or none."),
        click.option("--task-loss", default="margin", show_default=True, help="ProtoKNN: PML loss on the profiles."),
    ]
    for option in options:
        fn = option(fn)
    return fn


@cli.command()
@click.option("--head", default="protoknn", show_default=True, help="Head name (see `protoknn heads`).")
@training_options
@workers_option
@precision_option
@frozen_backbone_options
@protoknn_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--deterministic", is_flag=True, help="Use torch's deterministic algorithms (GPU).")
@click.option("--val-fraction", type=float, default=0.0, show_default=True,
              help="Hold out this share of each training class (seeded) as a validation split, scored every "
                   "epoch; OUT/best.pt keeps the best model.")
@click.option("--tensorboard", is_flag=True, help="Also write OUT/tensorboard events (pip install 'protoknn-plugin[tensorboard]').")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
@click.option("--overwrite", is_flag=True, help="Start afresh in an OUT that already holds a run.")
@click.option("--out", required=True, type=click.Path(), help="Run directory.")
@config_option
@run_cli
@with_preset
def train(head, dataset, data_dir, limit, strict, crop, backbone, weights, backbone_opts, head_opts, epochs, batch_classes, per_class, prototypes, dim,
          steps_per_epoch, device, threads, workers, precision, image_size, frozen_backbone, cache_dir, task_loss,
          aux_loss, cluster_variant, cluster_reduction, memory, k, seed, deterministic, val_fraction, tensorboard, resume,
          overwrite, out):
    """Train one head. Writes OUT/checkpoint.pt after every epoch (atomically), OUT/config.yaml
    (every option, reusable with --config), OUT/metrics.csv (one row per epoch: losses, learning
    rates, validation accuracy, seconds, images/s), OUT/best.pt with --val-fraction, and
    OUT/metrics.json with test accuracy at the end. Cost: about epochs x (training set / batch)
    steps; the small CNN on `animals` is the cheapest model, docs/performance.md has measured costs.
    With --frozen-backbone, first one backbone pass over train and test into the feature cache (reused by
    later runs), then epochs read the cache.
    """
    options = SimpleNamespace(**dict(click.get_current_context().params, **locals()))
    from .. import distributed

    run, saved = _build_run(options)
    note = _resume_note(saved, run, out, epochs)
    if distributed.is_main():
        _start_writing(out, overwrite, {k: getattr(options, k) for k in click.get_current_context().params}, note)
    state, metrics = _fit_and_score(run, resume, out, workers)
    if distributed.is_main():  # under torchrun, rank 0 alone writes and reports
        _write_results(metrics, state, out, f"{head} on {dataset}")
    distributed.teardown()


def _build_run(options):
    """The run of the command's ``options`` and the checkpoint it continues (None for a new run).
    Everything is checked before anything is written: every refusal leaves the run directory as it was."""
    from ..data import create_dataset
    from ..runs import build_run, open_run_dir
    from ..train.loading import check_batch_settings

    check_option_ranges(vars(options))
    saved = open_run_dir(options.out, options.resume, options.overwrite)
    setup_threads(options.threads)
    splits = create_dataset(options.dataset, options.data_dir, limit=options.limit, strict=options.strict,
                            crop=options.crop, image_size=options.image_size)
    report_skipped(splits)
    train_config = make_train_config(options.epochs, options.batch_classes, options.per_class,
                                     options.steps_per_epoch, options.device, options.seed, options.deterministic,
                                     val_fraction=options.val_fraction, workers=options.workers,
                                     precision=options.precision, tensorboard=options.tensorboard)
    data_info = {"data_dir": options.data_dir, "limit": options.limit, "crop": options.crop,
                 "image_size": options.image_size}
    run = build_run(splits, train_config, _model_options(options), dataset_name=options.dataset,
                    data_info=data_info, out_dir=options.out,
                    prepare=functools.partial(_before_trainer, options, saved, train_config, data_info))
    check_batch_settings(run.trainer.splits.train_labels, train_config)  # after the validation hold-out
    return run, saved


def _model_options(options):
    """ModelConfig's fields from the options: the ProtoKNN flags apply to the protoknn head; --head-opt wins."""
    from ..heads.options import assign_head_options

    head = options.head
    head_options = {name: getattr(options, name) for name in PROTOKNN_FLAGS} if head == "protoknn" else {}
    head_options.update(assign_head_options([(head, head)], options.head_opts)[head])
    return dict(head=head, backbone=options.backbone, num_prototypes=options.prototypes, dim=options.dim,
                weights=options.weights, head_options=head_options,
                backbone_options=parse_options(options.backbone_opts))


def _before_trainer(options, saved, train_config, data_info, model, splits):
    """The checks that need the model, then --frozen-backbone's feature cache (or None)."""
    from ..runs import check_resume
    from ..train.loading import check_batch_settings

    if saved is not None:
        check_resume(saved, options.out, model, train_config, options.dataset,
                     dict(data_info, frozen_backbone=options.frozen_backbone), splits)
    check_batch_settings(splits.train_labels, train_config)  # before a feature cache is built
    if not options.frozen_backbone:
        return None
    return _feature_cache(model, splits, options.dataset, options.data_dir, options.limit, options.crop,
                          options.cache_dir, options.device)


def _resume_note(saved, run, out, epochs):
    """The line a resumed run prints first: where it continues, or that it had finished; None for a new run."""
    from ..checkpoint import checkpoint_path
    from ..train.resuming import resume_progress

    if saved is None:
        return None
    trainer = run.trainer
    note = resume_progress(saved, run.model, trainer.config, trainer.phases, str(checkpoint_path(out)))[1]
    if note is None and saved["train_state"].get("complete"):
        note = f"the run already finished its {epochs} epoch(s): evaluating it again; a larger --epochs trains on"
    return note


def _fit_and_score(run, resume, out, workers):
    """Train (or continue) the run, then score the test set: (train state, metrics). An interrupt exits with
    130, its checkpoint written."""
    from ..train import Interrupted, evaluate

    with run.frozen_backbone():  # maps instead of images when the backbone is frozen
        try:
            state = run.trainer.fit(resume=resume)
        except Interrupted as why:
            err_console.print(f"interrupted by {why}: checkpoint written to {Path(out) / 'checkpoint.pt'}; "
                              f"continue with --resume", markup=False)
            sys.exit(130)
        metrics = evaluate(run.model, run.splits.test, device=run.trainer.device, workers=workers)
    return state, metrics


def _write_results(metrics, state, out, title) -> None:
    """OUT/metrics.json (test accuracy, training seconds, best epoch, pushes), its table and one line per push."""
    from .. import distributed
    from ..train import write_json

    metrics["train_seconds"] = state.train_seconds
    if state.best_epoch:
        metrics["best"] = state.best_epoch
    if state.pushes:
        metrics["pushes"] = state.pushes
    metrics["processes"] = distributed.world_size()
    write_json(Path(out) / "metrics.json", metrics)
    print_metrics({k: v for k, v in metrics.items() if k not in ("best", "pushes")}, title)
    for push in state.pushes:
        console.print(push_line(push), markup=False, highlight=False)


def _feature_cache(model, splits, dataset, data_dir, limit, crop, cache_dir, device):
    """--frozen-backbone: the splits' backbone maps, computed once into the feature cache."""
    from ..frozen import prepare_feature_cache
    from ..train import resolve_device

    try:
        return prepare_feature_cache(model, splits, dataset=dataset, data_dir=data_dir, limit=limit, crop=crop,
                                     cache_dir=cache_dir, device=resolve_device(device),
                                     log=lambda line: console.print(line, markup=False, highlight=False,
                                                                    soft_wrap=True))
    except KeyboardInterrupt:
        err_console.print("interrupted while building the feature cache: the split in progress was discarded, "
                          "finished splits are kept; run the same command again", markup=False)
        sys.exit(130)


def _start_writing(out, overwrite, options, note) -> None:
    """The first changes to the run directory, made only after every check passed."""
    from ..checkpoint import ensure_writable_dir

    ensure_writable_dir(out)
    if overwrite:
        # The old run's results go now; its checkpoint.pt stays until the new run's first
        # checkpoint replaces it atomically, so a new run that fails early loses nothing saved.
        for stale in ("best.pt", "best-unprojected.pt", "metrics.json", "metrics.csv"):
            (Path(out) / stale).unlink(missing_ok=True)
    write_run_config(out, options)
    if note:
        console.print(note, markup=False, highlight=False)


def push_line(push) -> str:
    """One line per push: how far the prototypes moved, where they landed, validation before -> after."""
    def percent(value):
        return "n/a" if value is None else f"{100 * value:.2f}%"

    cosine = ("" if push.get("cosine_mean") is None
              else f"cosine to its patch mean {push['cosine_mean']:.3f} (min {push['cosine_min']:.3f}), ")
    return (f"push after {push['phase']} (step {push['global_step']}): {cosine}{push['distinct_images']} images / "
            f"{push['distinct_patches']} patches for {push['prototypes']} prototypes, validation "
            f"{percent(push.get('val_accuracy_before'))} -> {percent(push.get('val_accuracy_after'))}")


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--data-dir", type=click.Path(), default=None, help="Override the dataset folder stored in the run.")
@click.option("--device", default="auto", show_default=True)
@model_choice_options
@loading_options
@config_option
@run_cli
def evaluate(run_dir, data_dir, device, last, unprojected, workers, image_size):
    """Test accuracy of a trained run: top-1, and for kNN heads k = 1, 3, 5, 10 from one search.
    Uses RUN_DIR/best.pt (best validation accuracy among projected models) when it exists, else
    checkpoint.pt. Writes RUN_DIR/metrics.json (its `checkpoint` names the file scored) unless RUN_DIR
    is read-only. Cost: one pass over the test set."""
    from ..checkpoint import is_writable_dir
    from ..runs import load_finished_run
    from ..train import evaluate as evaluate_model, resolve_device, write_json

    model, saved, splits, file = load_finished_run(run_dir, model_choice(last, unprojected), data_dir, image_size,
                                                   say_note)
    writable = is_writable_dir(run_dir)  # reading a run never needs write access
    dev = resolve_device(device)
    metrics = evaluate_model(model.to(dev), splits.test, device=dev, workers=workers)
    metrics["checkpoint"] = file
    if writable:
        write_json(Path(run_dir) / "metrics.json", metrics)
    print_metrics(metrics, f"{saved['model_config']['head']} on {saved['dataset']}")
    if not writable:
        err_console.print(f"warning: {run_dir} is not writable, so metrics.json was left as it was; "
                          "the table above is the result", markup=False, highlight=False)
