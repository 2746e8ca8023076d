"""Pieces shared by every command: option groups, presets, KEY=VALUE parsing and the
one-line error wrapper (every ProtoKNNError becomes one line on stderr and exit code 2)."""
from __future__ import annotations

import functools
import os
import sys
from typing import List, Optional

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import ProtoKNNError

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
        click.option("--head-opt", "head_opts", multiple=True, metavar="HEAD.KEY=VALUE",
                     help="Head constructor argument, repeatable, e.g. protoknn.reg=0.1 or pk-sum.cluster_reduction=sum; "
                          "HEAD is a row label (that row) or a head name (every row of it); values are read as "
                          "int, float, true/false, none, A,B tuples or text."),
        click.option("--weights", default=None, help="Backbone weights: imagenet (download) or a local state-dict PATH."),
        click.option("--backbone", default="small-cnn", show_default=True, help="Backbone name (see `protoknn backbones`)."),
    ]
    for option in options:
        fn = option(fn)
    return dataset_options(fn)


def _train_config(epochs, batch_classes, per_class, steps_per_epoch, device, seed=0, deterministic=False):
    from ..train import TrainConfig

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
    from ..presets import get_preset

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



def comparison_options(fn):
    """The protocol's validation split and learning-rate sweep, shared by benchmark and ablate."""
    fn = click.option("--sweep-seeds", default=None, help="Seeds of the sweep runs (default: the first of --seeds).")(fn)
    fn = click.option("--lr-scales", default="1", show_default=True,
                      help="Learning-rate sweep: every rate of every head times each scale, e.g. 0.3,1,3; each row "
                           "keeps the scale with the best validation accuracy; 1 = the heads' own rates, no sweep.")(fn)
    fn = click.option("--val-fraction", type=float, default=0.1, show_default=True,
                      help="Share of each training class held out for validation (curves, stages, sweep); 0: none.")(fn)
    return fn


def _comparison_settings(dataset, data_dir, limit, strict, crop, backbone, weights, backbone_opts, epochs, batch_classes, per_class, prototypes,
                         dim, steps_per_epoch, device, seeds, val_fraction=0.0, lr_scales="1", sweep_seeds=None):
    from ..benchmark import BenchmarkSettings

    train = _train_config(epochs, batch_classes, per_class, steps_per_epoch, device)
    train.val_fraction = val_fraction
    scales = _split_list(lr_scales, float)
    if not scales or any(s <= 0 for s in scales):
        raise ProtoKNNError(f"--lr-scales {lr_scales!r} must list positive numbers, e.g. 0.3,1,3")
    return BenchmarkSettings(dataset=dataset, data_dir=data_dir, backbone=backbone, weights=weights,
                             prototypes=prototypes, dim=dim, limit=limit, strict=strict, crop=crop, seeds=_split_list(seeds, int),
                             backbone_options=parse_options(backbone_opts), train=train, lr_scales=tuple(scales),
                             sweep_seeds=_split_list(sweep_seeds, int) if sweep_seeds else None)
