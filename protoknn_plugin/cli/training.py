"""Commands that train and evaluate one run."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from ..errors import ProtoKNNError
from . import cli
from .common import (print_metrics, report_skipped, setup_threads, make_train_config, check_option_ranges,
                     config_option, console, err_console, frozen_backbone_options, loading_options, model_choice,
                     model_choice_options, parse_options, precision_option, run_cli, say_note, training_options,
                     with_preset, workers_option, write_run_config)


@cli.command()
@click.option("--head", default="protoknn", show_default=True, help="Head name (see `protoknn heads`).")
@training_options
@workers_option
@precision_option
@frozen_backbone_options
@click.option("--task-loss", default="margin", show_default=True, help="ProtoKNN: PML loss on the profiles.")
@click.option("--aux-loss", default="margin", show_default=True, help="ProtoKNN: PML loss on GAP+linear, or none.")
@click.option("--cluster-variant", default="full", show_default=True,
              help="ProtoKNN cluster loss: most-similar, sampling, debias, linear-assignment, full.")
@click.option("--cluster-reduction", default="mean", show_default=True, help="ProtoKNN: mean (per sample) or sum.")
@click.option("--memory", default="full", show_default=True, help="ProtoKNN kNN memory: full, condensed or ivfpq.")
@click.option("--k", "k", type=int, default=5, show_default=True, help="ProtoKNN: k of the reported prediction (k = 1, 3, 5, 10 are always evaluated).")
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
    from ..checkpoint import check_run_dir, checkpoint_path, load_checkpoint, require_run_parts
    from ..data import create_dataset
    from ..train import Interrupted, Trainer, evaluate, write_json
    from ..train.loading import check_batch_settings
    from .. import distributed

    params = dict(click.get_current_context().params, **locals())
    # Check first, then write: every refusal below leaves the run directory as it was.
    check_option_ranges(params)
    check_run_dir(out, resume, overwrite)
    saved = require_run_parts(load_checkpoint(out), checkpoint_path(out)) if resume else None
    setup_threads(threads)
    splits = create_dataset(dataset, data_dir, limit=limit, strict=strict, crop=crop, image_size=image_size)
    report_skipped(splits)
    model = _new_model(splits, head, head_opts, backbone, backbone_opts, weights, prototypes, dim, seed,
                       dict(task_loss=task_loss, aux_loss=aux_loss, cluster_variant=cluster_variant,
                            cluster_reduction=cluster_reduction, memory=memory, k=k))
    data_info = {"data_dir": data_dir, "limit": limit, "crop": crop, "image_size": image_size}
    train_config = make_train_config(epochs, batch_classes, per_class, steps_per_epoch, device, seed, deterministic)
    train_config.val_fraction, train_config.workers = val_fraction, workers
    train_config.precision, train_config.tensorboard = precision, tensorboard
    train_config.__post_init__()  # check the new fields
    if saved is not None:
        _check_resume(saved, out, model, train_config, dataset, dict(data_info, frozen_backbone=frozen_backbone),
                      splits)
    check_batch_settings(splits.train_labels, train_config)  # before a feature cache is built
    frozen = _feature_cache(model, splits, dataset, data_dir, limit, crop, cache_dir, device) if frozen_backbone else None
    if frozen:
        splits = frozen.splits
        data_info.update(frozen.info)
    trainer = Trainer(model, splits, train_config, out_dir=out, dataset_name=dataset, data_info=data_info)
    check_batch_settings(trainer.splits.train_labels, train_config)  # after the validation hold-out
    note = None
    if saved is not None:
        from ..train.resuming import resume_progress

        note = resume_progress(saved, model, train_config, trainer.phases, str(checkpoint_path(out)))[1]
    if saved is not None and note is None and saved["train_state"].get("complete"):
        note = f"the run already finished its {epochs} epoch(s): evaluating it again; a larger --epochs trains on"
    if distributed.is_main():
        _start_writing(out, overwrite, {k: params[k] for k in click.get_current_context().params}, note)
    with frozen.frozen_backbone() if frozen else contextlib.nullcontext():  # maps instead of images, backbone frozen
        try:
            state = trainer.fit(resume=resume)
        except Interrupted as why:
            err_console.print(f"interrupted by {why}: checkpoint written to {Path(out) / 'checkpoint.pt'}; "
                              f"continue with --resume", markup=False)
            sys.exit(130)
        metrics = evaluate(model, splits.test, device=trainer.device, workers=workers)
    metrics["train_seconds"] = state.train_seconds
    if state.best_epoch:
        metrics["best"] = state.best_epoch
    if state.pushes:
        metrics["pushes"] = state.pushes
    if distributed.is_main():  # under torchrun, rank 0 alone writes and reports
        metrics["processes"] = distributed.world_size()
        write_json(Path(out) / "metrics.json", metrics)
        print_metrics({k: v for k, v in metrics.items() if k not in ("best", "pushes")}, f"{head} on {dataset}")
        for push in state.pushes:
            console.print(push_line(push), markup=False, highlight=False)
    distributed.teardown()


def _new_model(splits, head, head_opts, backbone, backbone_opts, weights, prototypes, dim, seed, protoknn_options):
    """The model to train: ``protoknn_options`` (its own flags) apply to the protoknn head; --head-opt wins."""
    from ..heads.options import assign_head_options
    from ..model import ModelConfig, PrototypeModel

    head_options = dict(protoknn_options) if head == "protoknn" else {}
    head_options.update(assign_head_options([(head, head)], head_opts)[head])
    config = ModelConfig.for_data(splits, head=head, backbone=backbone, num_prototypes=prototypes, dim=dim,
                                  weights=weights, head_options=head_options, seed=seed,
                                  backbone_options=parse_options(backbone_opts))
    return PrototypeModel(config)


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


def _check_resume(saved, out, model, train_config, dataset, data_info, splits) -> None:
    """Refuse to resume with settings that change the results, or a checkpoint that does not fit."""
    from dataclasses import asdict

    from ..checkpoint import CHECKPOINT_NAME
    from ..train import load_model_state
    from ..train.resuming import check_same_run

    check_same_run(saved, model.config.to_dict(), asdict(train_config), dataset, data_info,
                   list(getattr(splits, "classes", [])))
    load_model_state(model, saved, str(Path(out) / CHECKPOINT_NAME))  # the trainer loads it again


def push_line(push) -> str:
    """One line per push: how far the prototypes moved, where they landed, validation before -> after."""
    def percent(value):
        return "n/a" if value is None else f"{100 * value:.2f}%"

    cosine = ("" if push.get("cosine_mean") is None
              else f"cosine to its patch mean {push['cosine_mean']:.3f} (min {push['cosine_min']:.3f}), ")
    return (f"push after {push['phase']} (step {push['global_step']}): {cosine}{push['distinct_images']} images / "
            f"{push['distinct_patches']} patches for {push['prototypes']} prototypes, validation "
            f"{percent(push.get('val_accuracy_before'))} -> {percent(push.get('val_accuracy_after'))}")


def load_finished_run(run_dir, choice, data_dir, image_size):
    """``(model, saved, splits, file)`` of a run that finished training, for evaluate and predict.

    The model is ``train.load_trained_model(run_dir, choice)``'s (best.pt when the run has one,
    never an un-projected model unless ``choice`` is ``unprojected``; its note goes to stderr);
    the data is the run's dataset as it was trained (folder, limit, crop, image size) unless overridden.
    """
    from ..checkpoint import checkpoint_path, load_checkpoint, require_run_parts
    from ..data.catalog import rebuild_run_data
    from ..train import load_trained_model

    if not require_run_parts(load_checkpoint(run_dir), checkpoint_path(run_dir))["train_state"].get("complete"):
        raise ProtoKNNError(f"run {run_dir!r} has not finished training; continue it with `protoknn train ... --resume`")
    loaded = load_trained_model(run_dir, choice)
    if loaded.note:
        say_note(loaded.note)
    saved = loaded.saved
    splits = rebuild_run_data(saved["dataset"], saved.get("data") or {}, data_dir, image_size, augment=True)
    return loaded.model, saved, splits, loaded.file


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
    from ..train import evaluate as evaluate_model, resolve_device, write_json

    model, saved, splits, file = load_finished_run(run_dir, model_choice(last, unprojected), data_dir, image_size)
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
