"""The ``protoknn`` command line: one command per user task.

Every ProtoKNNError becomes one line on stderr and exit code 2; no traceback.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import List, Optional

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import ProtoKNNError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def _split_list(value: str, cast=str) -> List:
    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise ProtoKNNError(f"cannot read {value!r} as a comma-separated list of {cast.__name__}; e.g. 0,1,2") from None


def dataset_options(fn):
    """--dataset/--data-dir/--limit, shared by every command that reads data."""
    fn = click.option("--crop", is_flag=True, help="Crop images to their bounding boxes (cub200, stanford-dogs, stanford-cars).")(fn)
    fn = click.option("--strict", is_flag=True, help="Fail on a corrupt image instead of skipping it (skips are counted).")(fn)
    fn = click.option("--limit", type=int, default=None, help="Keep this many images per split (stratified), for quick runs.")(fn)
    fn = click.option("--data-dir", type=click.Path(), default=None, help="Folder of datasets read from disk.")(fn)
    fn = click.option("--dataset", default="animals", show_default=True, help="Dataset name (see `protoknn datasets`).")(fn)
    return fn


def training_options(fn):
    """Budget, model size and device options, shared by train, benchmark and ablate."""
    options = [
        click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)."),
        click.option("--preset", default=None, callback=_apply_preset, expose_value=False, is_eager=False,
                     help="The paper's settings: paper-cub-full, paper-cub-crop, paper-cars-crop, paper-dogs-full; "
                          "options given explicitly win."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--steps-per-epoch", type=int, default=None, help="Batches per epoch (default: training set / batch)."),
        click.option("--dim", type=int, default=64, show_default=True, help="Prototype dimension D (add-on output channels)."),
        click.option("--prototypes", type=int, default=100, show_default=True, help="Number of prototypes P (ProtoPNet: 10 per class)."),
        click.option("--per-class", type=int, default=11, show_default=True, help="Images per class in a batch."),
        click.option("--batch-classes", type=int, default=10, show_default=True, help="Classes per batch (class-balanced)."),
        click.option("--epochs", type=int, default=4, show_default=True, help="Feature-training epochs per run."),
        click.option("--backbone-opt", "backbone_opts", multiple=True, metavar="KEY=VALUE",
                     help="Backbone option, repeatable, e.g. width=16 for small-cnn."),
        click.option("--weights", default=None, help="Backbone weights: imagenet (download) or a local state-dict PATH."),
        click.option("--backbone", default="small-cnn", show_default=True, help="Backbone name (see `protoknn backbones`)."),
    ]
    for option in options:
        fn = option(fn)
    return dataset_options(fn)


def _train_config(epochs, batch_classes, per_class, steps_per_epoch, device, seed=0, deterministic=False):
    from .train import TrainConfig

    return TrainConfig(epochs=epochs, batch_classes=batch_classes, per_class=per_class,
                       steps_per_epoch=steps_per_epoch, device=device, seed=seed, deterministic=deterministic)


def with_preset(fn):
    """Apply --preset to the options the user left at their defaults, then call ``fn``."""

    @functools.wraps(fn)
    def wrapper(**kwargs):
        return fn(**_preset_wins(click.get_current_context(), kwargs))

    return wrapper


def _apply_preset(ctx: click.Context, param, value):
    """Fill every option the user left at its default from the named preset."""
    if value is None:
        return None
    from .presets import get_preset

    try:
        preset = get_preset(value)
    except ProtoKNNError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False)
        sys.exit(err.exit_code)
    ctx.ensure_object(dict)["preset"] = preset
    return value


def _preset_wins(ctx: click.Context, params: dict) -> dict:
    """Options from --preset replace those still at their defaults."""
    preset = (ctx.obj or {}).get("preset") or {}
    from click.core import ParameterSource

    for key, value in preset.items():
        if key in params and ctx.get_parameter_source(key) in (ParameterSource.DEFAULT, None):
            params[key] = value
    return params


def parse_options(pairs) -> dict:
    """('width=16', 'depth=3') -> {'width': 16, 'depth': 3}; values are read as int, float or text."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ProtoKNNError(f"cannot read option {pair!r}; write KEY=VALUE, e.g. width=16")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        options[key.strip()] = value
    return options


def _setup_threads(threads: Optional[int]) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def run_cli(fn):
    """Turn our errors into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ProtoKNNError as err:
            err_console.print(f"error: {err}", markup=False, highlight=False)
            sys.exit(err.exit_code)
        except (KeyboardInterrupt, SystemExit, click.exceptions.Exit, click.ClickException):
            raise
        except Exception as err:  # a bug or an unforeseen failure: still one line, traceback on request
            if os.environ.get("PROTOKNN_DEBUG"):
                raise
            first = (str(err).strip().splitlines() or [""])[0][:300]
            err_console.print(f"error: unexpected {type(err).__name__}: {first} "
                              "(rerun with PROTOKNN_DEBUG=1 for the traceback and report it)", markup=False,
                              highlight=False)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="protoknn-plugin")
def cli():
    """protoknn: ProtoKNN and ProtoPNet heads on one prototype layer.

    Train, evaluate and compare heads side by side, and explain a prediction
    ("this looks like it rather than that").
    """


@cli.command()
@click.option("--data-dir", type=click.Path(), default=None, help="Where to look for datasets read from disk.")
@run_cli
def datasets(data_dir):
    """List the datasets: classes, train/test sizes, image size, and whether they are found. Writes nothing; instant."""
    from .data import describe_dataset, list_datasets

    table = Table(title="datasets")
    for col in ("name", "classes", "train", "test", "image size", "status"):
        table.add_column(col, justify="right" if col in ("classes", "train", "test") else "left")
    for name in list_datasets():
        info = describe_dataset(name, data_dir)
        size = info.get("image_size")
        table.add_row(name, str(info.get("classes", "")), str(info.get("train", "")), str(info.get("test", "")),
                      f"{size}x{size}" if size else "", str(info.get("status", "")))
    console.print(table)


@cli.command()
@run_cli
def backbones():
    """List the backbones: output channels, feature map size and weights. Writes nothing; instant."""
    from .backbones import describe_backbones

    rows = describe_backbones()
    table = Table(title="backbones")
    keys = list(rows[0].keys()) if rows else []
    for key in keys:
        table.add_column(key.replace("_", " "))
    for row in rows:
        table.add_row(*(str(row[k]) for k in keys))
    console.print(table)


@cli.command()
@run_cli
def heads():
    """List the registered heads with their losses and defaults. Writes nothing; instant."""
    from .heads import get_head_class, list_heads

    table = Table(title="heads")
    table.add_column("name", style="bold")
    table.add_column("description")
    table.add_column("defaults")
    for name in list_heads():
        cls = get_head_class(name)
        defaults = "\n".join(f"{k}: {v}" for k, v in cls.defaults().items())
        table.add_row(name, getattr(cls, "description", ""), defaults)
    console.print(table)


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
def train(head, dataset, data_dir, limit, strict, crop, backbone, weights, backbone_opts, epochs, batch_classes, per_class, prototypes, dim,
          steps_per_epoch, device, threads, task_loss, aux_loss, cluster_variant, cluster_reduction, memory, k, seed,
          deterministic, resume, out):
    """Train one head. Writes OUT/checkpoint.pt after every epoch (atomically) and OUT/metrics.json
    with test accuracy at the end. Cost: about epochs x (training set / batch) steps; on this 2-core
    CPU the small CNN on `animals` takes a few seconds per epoch per 1000 images.
    """
    from .data import create_dataset
    from .model import ModelConfig, PrototypeModel
    from .train import Trainer, evaluate, write_json

    _setup_threads(threads)
    splits = create_dataset(dataset, data_dir, limit=limit, strict=strict, crop=crop)
    _report_skipped(splits)
    head_options = {}
    if head == "protoknn":
        head_options = dict(task_loss=task_loss, aux_loss=aux_loss, cluster_variant=cluster_variant,
                            cluster_reduction=cluster_reduction, memory=memory, k=k)
    config = ModelConfig(head=head, backbone=backbone, num_classes=len(splits.classes), in_channels=splits.channels,
                         num_prototypes=prototypes, dim=dim, weights=weights, head_options=head_options, seed=seed,
                         backbone_options=parse_options(backbone_opts))
    model = PrototypeModel(config)
    trainer = Trainer(model, splits, _train_config(epochs, batch_classes, per_class, steps_per_epoch, device, seed,
                                                   deterministic), out_dir=out, dataset_name=dataset,
                      data_info={"data_dir": data_dir, "limit": limit, "crop": crop})
    from .train import Interrupted

    try:
        state = trainer.fit(resume=resume)
    except Interrupted as why:
        err_console.print(f"interrupted by {why}: checkpoint written to {Path(out) / 'checkpoint.pt'}; "
                          f"continue with --resume", markup=False)
        sys.exit(130)
    metrics = evaluate(model, splits.test, device=trainer.device)
    metrics["train_seconds"] = state.train_seconds
    from . import distributed

    if distributed.is_main():  # under torchrun, rank 0 alone writes and reports
        metrics["processes"] = distributed.world_size()
        write_json(Path(out) / "metrics.json", metrics)
        _print_metrics(metrics, f"{head} on {dataset}")
    distributed.teardown()


def _report_skipped(splits) -> None:
    skipped = getattr(splits, "skipped", None) or []
    if skipped:
        err_console.print(f"warning: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}; "
                          "pass --strict to stop on them instead", markup=False)


def _print_metrics(metrics, title):
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        shown = f"{100 * value:.2f} %" if key.startswith("accuracy[") else (f"{value:.1f}" if isinstance(value, float) else str(value))
        table.add_row(escape(key), shown)
    console.print(table)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--data-dir", type=click.Path(), default=None, help="Override the dataset folder stored in the run.")
@click.option("--device", default="auto", show_default=True)
@run_cli
def evaluate(run_dir, data_dir, device):
    """Test accuracy of a trained run: top-1, and for kNN heads k = 1, 3, 5, 10 from one search.
    Writes RUN_DIR/metrics.json. Cost: one pass over the test set."""
    from .data import create_dataset
    from .train import evaluate as evaluate_model, model_from_checkpoint, resolve_device, write_json

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


def _comparison_settings(dataset, data_dir, limit, strict, crop, backbone, weights, backbone_opts, epochs, batch_classes, per_class, prototypes,
                         dim, steps_per_epoch, device, seeds):
    from .benchmark import BenchmarkSettings

    return BenchmarkSettings(dataset=dataset, data_dir=data_dir, backbone=backbone, weights=weights,
                             prototypes=prototypes, dim=dim, limit=limit, strict=strict, crop=crop, seeds=_split_list(seeds, int),
                             backbone_options=parse_options(backbone_opts),
                             train=_train_config(epochs, batch_classes, per_class, steps_per_epoch, device))


@cli.command()
@click.option("--heads", "head_names", default="protoknn,protopnet,cnn", show_default=True,
              help="Comma-separated heads; `cnn` is the plain CNN reference row; cabrnet:protopnet runs "
                   "CaBRNet's own ProtoPNet (extra protoknn-plugin[cabrnet]).")
@training_options
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds, e.g. 0,1,2.")
@click.option("--out", default="runs/benchmark", show_default=True, type=click.Path(), help="Output directory.")
@run_cli
@with_preset
def benchmark(head_names, dataset, data_dir, limit, strict, crop, backbone, weights, backbone_opts, epochs, batch_classes, per_class, prototypes,
              dim, steps_per_epoch, device, threads, seeds, out):
    """Train and evaluate every head on the same data, backbone initialisation and budget, and print one
    table (mean ± std over seeds): accuracy (per k for kNN heads), prototype spread, train seconds, peak
    memory, test images/s. Writes OUT/results.json, results.csv, results.md and OUT/runs/<head>-seed<N>/.
    Cost with no options: 3 heads x 3 seeds x 4 epochs on `animals`, about 8 minutes on a 2-core CPU."""
    from .benchmark import RunSpec, run_comparison

    _setup_threads(threads)
    specs = [RunSpec(name, name) for name in _split_list(head_names)]
    from .heads import get_head_class

    for spec in specs:  # fail fast on an unknown name, before any training
        if spec.head.startswith("cabrnet:"):
            from protoknn_plugin.adapters.cabrnet import require_cabrnet

            require_cabrnet()
        else:
            get_head_class(spec.head)
    settings = _comparison_settings(dataset, data_dir, limit, strict, crop, backbone, weights, backbone_opts, epochs, batch_classes, per_class,
                                    prototypes, dim, steps_per_epoch, device, seeds)
    run_comparison(specs, settings, out, title=f"heads on {dataset} ({backbone}, {epochs} epochs)", console=console)


@cli.command()
@click.option("--variants", default="most-similar,sampling,debias,linear-assignment,full,full:sum", show_default=True,
              help="Cluster-loss variants; VARIANT:sum uses the paper's literal sum instead of the per-sample mean.")
@training_options
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--out", default="runs/ablate", show_default=True, type=click.Path(), help="Output directory.")
@run_cli
@with_preset
def ablate(variants, dataset, data_dir, limit, strict, crop, backbone, weights, backbone_opts, epochs, batch_classes, per_class, prototypes, dim,
           steps_per_epoch, device, threads, seeds, out):
    """The paper's Table 7 on any dataset: ProtoKNN with each cluster-loss variant, accuracy at k = 1, 3, 5
    and prototype spread. Writes OUT/results.json, results.csv, results.md. Cost: one ProtoKNN training
    per variant and seed."""
    from .benchmark import RunSpec, run_comparison
    from .cluster import CLUSTER_VARIANTS
    from .errors import UnknownNameError

    _setup_threads(threads)
    specs = []
    for item in _split_list(variants):
        variant, _, reduction = item.partition(":")
        if variant not in CLUSTER_VARIANTS:
            raise UnknownNameError("cluster variant", variant, CLUSTER_VARIANTS)
        if reduction not in ("", "mean", "sum"):
            raise ProtoKNNError(f"unknown reduction {reduction!r} in {item!r}; use VARIANT, VARIANT:mean or VARIANT:sum")
        specs.append(RunSpec(item, "protoknn", {"cluster_variant": variant, "cluster_reduction": reduction or "mean"}))
    settings = _comparison_settings(dataset, data_dir, limit, strict, crop, backbone, weights, backbone_opts, epochs, batch_classes, per_class,
                                    prototypes, dim, steps_per_epoch, device, seeds)
    run_comparison(specs, settings, out, title=f"cluster-loss ablation on {dataset}", console=console)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--image", required=True, help="Test-set INDEX or an image PATH.")
@click.option("--negative-class", default=None, help="Class to explain against (default: the runner-up).")
@click.option("--top", type=int, default=5, show_default=True, help="Prototypes to show.")
@click.option("--data-dir", type=click.Path(), default=None)
@click.option("--out", required=True, type=click.Path(), help="Figure path (.png).")
@run_cli
def explain(run_dir, image, negative_class, top, data_dir, out):
    """Explain one prediction. ProtoKNN runs: why this class rather than that (anchor, positive, negative,
    d_ap^2, d_an^2 and per-prototype contributions with their boxes). ProtoPNet runs: "this looks like
    that" (top prototypes, similarity, class weight). Writes the figure OUT and prints the numbers."""
    from .figures import explain_command

    explain_command(run_dir, image, negative_class, top, data_dir, out, console)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--data-dir", type=click.Path(), default=None)
@click.option("--out", required=True, type=click.Path(), help="Figure path (.png).")
@run_cli
def prototypes(run_dir, data_dir, out):
    """Draw every projected prototype with its source patch. Writes the grid figure OUT."""
    from .figures import prototypes_command

    prototypes_command(run_dir, data_dir, out, console)


def main(argv: Optional[List[str]] = None) -> None:
    import warnings

    from .data.base import DatasetWarning

    warnings.filterwarnings("ignore", category=DatasetWarning)  # the CLI reports skipped images itself
    # Library warnings as one line each, like our errors.
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    try:
        cli.main(args=argv, prog_name="protoknn", standalone_mode=True)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
