"""Commands that train and evaluate one run."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from ..errors import ProtoKNNError
from . import cli
from .common import (_print_metrics, _report_skipped, _setup_threads, _train_config, config_option, console,
                     err_console, frozen_backbone_options, loading_options, model_choice, model_choice_options,
                     parse_options, precision_option, run_cli, say_note, training_options, with_preset, workers_option,
                     write_run_config)


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
    from ..checkpoint import check_run_dir, ensure_writable_dir
    from ..data import create_dataset
    from ..model import ModelConfig, PrototypeModel
    from ..train import Interrupted, Trainer, evaluate, write_json
    from .. import distributed

    params = dict(click.get_current_context().params, **locals())
    check_run_dir(out, resume, overwrite)
    _setup_threads(threads)
    splits = create_dataset(dataset, data_dir, limit=limit, strict=strict, crop=crop, image_size=image_size)
    _report_skipped(splits)
    head_options = {}
    if head == "protoknn":
        head_options = dict(task_loss=task_loss, aux_loss=aux_loss, cluster_variant=cluster_variant,
                            cluster_reduction=cluster_reduction, memory=memory, k=k)
    from ..heads.options import assign_head_options

    head_options.update(assign_head_options([(head, head)], head_opts)[head])  # --head-opt wins
    config = ModelConfig.for_data(splits, head=head, backbone=backbone, num_prototypes=prototypes, dim=dim,
                                  weights=weights, head_options=head_options, seed=seed,
                                  backbone_options=parse_options(backbone_opts))
    model = PrototypeModel(config)
    data_info = {"data_dir": data_dir, "limit": limit, "crop": crop, "image_size": image_size}
    frozen = None
    if frozen_backbone:
        from ..frozen import prepare_feature_cache
        from ..train import resolve_device

        try:
            frozen = prepare_feature_cache(model, splits, dataset=dataset, data_dir=data_dir, limit=limit, crop=crop,
                                           cache_dir=cache_dir, device=resolve_device(device),
                                           log=lambda line: console.print(line, markup=False, highlight=False,
                                                                          soft_wrap=True))
        except KeyboardInterrupt:
            err_console.print("interrupted while building the feature cache: the split in progress was discarded, "
                              "finished splits are kept; run the same command again", markup=False)
            sys.exit(130)
        splits = frozen.splits
        data_info.update(frozen.info)
    train_config = _train_config(epochs, batch_classes, per_class, steps_per_epoch, device, seed, deterministic)
    train_config.val_fraction, train_config.workers = val_fraction, workers
    train_config.precision, train_config.tensorboard = precision, tensorboard
    train_config.__post_init__()  # check the new fields
    trainer = Trainer(model, splits, train_config, out_dir=out, dataset_name=dataset, data_info=data_info)
    if distributed.is_main():
        ensure_writable_dir(out)
        if overwrite:
            # The old run's results go now; its checkpoint.pt stays until the new run's first
            # checkpoint replaces it atomically, so a new run that fails early loses nothing saved.
            for stale in ("best.pt", "metrics.json", "metrics.csv"):
                (Path(out) / stale).unlink(missing_ok=True)
        write_run_config(out, {k: params[k] for k in click.get_current_context().params})
    with frozen.bypassed() if frozen else contextlib.nullcontext():  # maps instead of images, backbone frozen
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
        _print_metrics({k: v for k, v in metrics.items() if k not in ("best", "pushes")}, f"{head} on {dataset}")
        for push in state.pushes:
            console.print(push_line(push), markup=False, highlight=False)
    distributed.teardown()


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
    from ..checkpoint import load_checkpoint
    from ..data.catalog import rebuild_run_data
    from ..train import load_trained_model

    if not load_checkpoint(run_dir)["train_state"].get("complete"):
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
    checkpoint.pt. Writes RUN_DIR/metrics.json (its `checkpoint` names the file scored). Cost: one
    pass over the test set."""
    from ..train import evaluate as evaluate_model, resolve_device, write_json

    model, saved, splits, file = load_finished_run(run_dir, model_choice(last, unprojected), data_dir, image_size)
    dev = resolve_device(device)
    metrics = evaluate_model(model.to(dev), splits.test, device=dev, workers=workers)
    metrics["checkpoint"] = file
    write_json(Path(run_dir) / "metrics.json", metrics)
    _print_metrics(metrics, f"{saved['model_config']['head']} on {saved['dataset']}")
