"""Commands that train and evaluate one run."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import ProtoKNNError
from . import cli
from .common import (_print_metrics, _report_skipped, _setup_threads, _train_config,
                     err_console, parse_options, run_cli, training_options, with_preset)


@cli.command()
@click.option("--head", default="protoknn", show_default=True, help="Head name (see `protoknn heads`).")
@training_options
@click.option("--task-loss", default="margin", show_default=True, help="ProtoKNN: PML loss on the profiles.")
@click.option("--aux-loss", default="margin", show_default=True, help="ProtoKNN: PML loss on GAP+linear, or none.")
@click.option("--cluster-variant", default="full", show_default=True,
              help="ProtoKNN cluster loss: most-similar, sampling, debias, linear-assignment, full.")
@click.option("--cluster-reduction", default="mean", show_default=True, help="ProtoKNN: mean (per sample) or sum.")
@click.option("--memory", default="full", show_default=True, help="ProtoKNN kNN memory: full, condensed or ivfpq.")
@click.option("--k", "k", type=int, default=5, show_default=True, help="ProtoKNN: k of the reported prediction (k = 1, 3, 5, 10 are always evaluated).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--deterministic", is_flag=True, help="Use torch's deterministic algorithms (GPU).")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
@click.option("--out", required=True, type=click.Path(), help="Run directory.")
@run_cli
@with_preset
def train(head, dataset, data_dir, limit, strict, crop, backbone, weights, backbone_opts, head_opts, epochs, batch_classes, per_class, prototypes, dim,
          steps_per_epoch, device, threads, task_loss, aux_loss, cluster_variant, cluster_reduction, memory, k, seed,
          deterministic, resume, out):
    """Train one head. Writes OUT/checkpoint.pt after every epoch (atomically) and OUT/metrics.json
    with test accuracy at the end. Cost: about epochs x (training set / batch) steps; on this 2-core
    CPU the small CNN on `animals` takes a few seconds per epoch per 1000 images.
    """
    from ..data import create_dataset
    from ..model import ModelConfig, PrototypeModel
    from ..train import Trainer, evaluate, write_json

    _setup_threads(threads)
    splits = create_dataset(dataset, data_dir, limit=limit, strict=strict, crop=crop)
    _report_skipped(splits)
    head_options = {}
    if head == "protoknn":
        head_options = dict(task_loss=task_loss, aux_loss=aux_loss, cluster_variant=cluster_variant,
                            cluster_reduction=cluster_reduction, memory=memory, k=k)
    from ..heads.options import assign_head_options

    head_options.update(assign_head_options([(head, head)], head_opts)[head])  # --head-opt wins
    config = ModelConfig(head=head, backbone=backbone, num_classes=len(splits.classes), in_channels=splits.channels,
                         num_prototypes=prototypes, dim=dim, weights=weights, head_options=head_options, seed=seed,
                         backbone_options=parse_options(backbone_opts))
    model = PrototypeModel(config)
    trainer = Trainer(model, splits, _train_config(epochs, batch_classes, per_class, steps_per_epoch, device, seed,
                                                   deterministic), out_dir=out, dataset_name=dataset,
                      data_info={"data_dir": data_dir, "limit": limit, "crop": crop})
    from ..train import Interrupted

    try:
        state = trainer.fit(resume=resume)
    except Interrupted as why:
        err_console.print(f"interrupted by {why}: checkpoint written to {Path(out) / 'checkpoint.pt'}; "
                          f"continue with --resume", markup=False)
        sys.exit(130)
    metrics = evaluate(model, splits.test, device=trainer.device)
    metrics["train_seconds"] = state.train_seconds
    from .. import distributed

    if distributed.is_main():  # under torchrun, rank 0 alone writes and reports
        metrics["processes"] = distributed.world_size()
        write_json(Path(out) / "metrics.json", metrics)
        _print_metrics(metrics, f"{head} on {dataset}")
    distributed.teardown()


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--data-dir", type=click.Path(), default=None, help="Override the dataset folder stored in the run.")
@click.option("--device", default="auto", show_default=True)
@run_cli
def evaluate(run_dir, data_dir, device):
    """Test accuracy of a trained run: top-1, and for kNN heads k = 1, 3, 5, 10 from one search.
    Writes RUN_DIR/metrics.json. Cost: one pass over the test set."""
    from ..data import create_dataset
    from ..train import evaluate as evaluate_model, model_from_checkpoint, resolve_device, write_json

    model, saved = model_from_checkpoint(run_dir)
    if not saved["train_state"].get("complete"):
        raise ProtoKNNError(f"run {run_dir!r} has not finished training; continue it with `protoknn train ... --resume`")
    limit = (saved.get("data") or {}).get("limit")
    splits = create_dataset(saved["dataset"], data_dir or (saved.get("data") or {}).get("data_dir"), limit=limit,
                            crop=bool((saved.get("data") or {}).get("crop")))
    dev = resolve_device(device)
    metrics = evaluate_model(model.to(dev), splits.test, device=dev)
    write_json(Path(run_dir) / "metrics.json", metrics)
    _print_metrics(metrics, f"{saved['model_config']['head']} on {saved['dataset']}")
