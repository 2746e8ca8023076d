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
from ..values import parse_pairs

# Job logs and CI are not terminals: rich would assume 80 columns and squeeze the results
# tables into unreadable stubs, so give them room (COLUMNS still wins when set).
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
err_console = Console(stderr=True, soft_wrap=True)


def split_list(value: str, cast=str) -> List:
    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise ProtoKNNError(f"cannot read {value!r} as a comma-separated list of {cast.__name__}; e.g. 0,1,2") from None


def _allow_download(ctx, param, value):
    if value:
        from ..data.cifar10 import allow_download

        allow_download(True)
    return value


def dataset_options(fn):
    """--dataset/--data-dir/--limit, shared by every command that reads data."""
    fn = click.option("--download", is_flag=True, expose_value=False, callback=_allow_download,
                      help="cifar10: fetch cifar-10-batches-py (163 MB) into --data-dir when it is absent (needs internet).")(fn)
    fn = click.option("--crop", is_flag=True, help="Crop images to their bounding boxes (cub200, stanford-dogs, stanford-cars).")(fn)
    fn = click.option("--strict", is_flag=True, help="Fail on a corrupt image instead of skipping it (skips are counted).")(fn)
    fn = click.option("--limit", type=int, default=None, help="Keep this many images per split (stratified), for quick runs.")(fn)
    fn = click.option("--data-dir", type=click.Path(), default=None, help="Folder of datasets read from disk.")(fn)
    fn = click.option("--dataset", default="animals", show_default=True, help="Dataset name (see `protoknn datasets`).")(fn)
    return fn


def frozen_backbone_options(fn):
    """--frozen-backbone/--cache-dir/--image-size: train every head on cached backbone maps."""
    fn = click.option("--cache-dir", type=click.Path(), default=None,
                      help="Feature cache folder (default $PROTOKNN_CACHE or ~/.cache/protoknn/features).")(fn)
    fn = click.option("--frozen-backbone", is_flag=True,
                      help="Freeze the backbone and compute its maps once per split into a feature cache (float16 on "
                           "disk, reused while data, image size and weights are unchanged); the add-on, prototypes and "
                           "head then train on the cache. Costs one backbone pass over train and test.")(fn)
    fn = click.option("--image-size", type=int, default=None,
                      help="Resize images to this side (default: the dataset's own; cifar10 at 128 gives "
                           "efficientnet-lite0 a 4x4 map).")(fn)
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


def make_train_config(epochs, batch_classes, per_class, steps_per_epoch, device, seed=0, deterministic=False,
                      **more):
    """A TrainConfig from the shared options; ``more``: its other fields (val_fraction, workers, ...)."""
    from ..train import TrainConfig

    return TrainConfig(epochs=epochs, batch_classes=batch_classes, per_class=per_class,
                       steps_per_epoch=steps_per_epoch, device=device, seed=seed, deterministic=deterministic, **more)


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
    return parse_pairs(pairs)


def setup_threads(threads: Optional[int]) -> None:
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


def report_skipped(splits) -> None:
    skipped = getattr(splits, "skipped", None) or []
    if skipped:
        err_console.print(f"warning: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}; "
                          "pass --strict to stop on them instead", markup=False)


def print_metrics(metrics, title):
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
    fn = click.option("--schedules", default="own", show_default=True,
                      help="Schedule sweep, on the same terms for every row: `own` (the head's: ProtoKNN constant, "
                           "ProtoPNet StepLR, the plain CNN warm-up + cosine) and `cosine` (every phase: linear "
                           "warm-up over half an epoch, then cosine decay to 0), e.g. own,cosine; crossed with "
                           "--lr-scales, each row keeps the pair with the best validation accuracy.")(fn)
    fn = click.option("--lr-scales", default="1", show_default=True,
                      help="Learning-rate sweep: every rate of every head times each scale, e.g. 0.3,1,3; each row "
                           "keeps the scale with the best validation accuracy; 1 = the heads' own rates, no sweep.")(fn)
    fn = click.option("--workers", type=int, default=0, show_default=True,
                      help="DataLoader worker processes per run (0: load in the main process). Results do not depend "
                           "on it; image folders read from disk gain, in-memory data (animals, the feature cache) "
                           "does not.")(fn)
    fn = click.option("--val-fraction", type=float, default=0.1, show_default=True,
                      help="Share of each training class held out for validation (curves, stages, sweep); 0: none.")(fn)
    return fn


def comparison_settings(*, dataset, data_dir, limit, strict, crop, backbone, weights, backbone_opts, epochs,
                         batch_classes, per_class, prototypes, dim, steps_per_epoch, device, seeds, val_fraction=0.0,
                         lr_scales="1", sweep_seeds=None, frozen_backbone=False, cache_dir=None, image_size=None,
                         workers=0, schedules="own"):
    """BenchmarkSettings from the options benchmark and ablate share (by keyword, as click passes them)."""
    from ..benchmark import BenchmarkSettings

    train = make_train_config(epochs, batch_classes, per_class, steps_per_epoch, device)
    train.val_fraction = val_fraction
    scales = split_list(lr_scales, float)
    if not scales or any(s <= 0 for s in scales):
        raise ProtoKNNError(f"--lr-scales {lr_scales!r} must list positive numbers, e.g. 0.3,1,3")
    from ..benchmark.protocol import SWEEP_SCHEDULES

    schedule_list = split_list(schedules)
    unknown = [name for name in schedule_list if name not in SWEEP_SCHEDULES]
    if not schedule_list or unknown or len(set(schedule_list)) < len(schedule_list):
        raise ProtoKNNError(f"--schedules {schedules!r} must list distinct schedules out of "
                            f"{', '.join(SWEEP_SCHEDULES)}, e.g. own,cosine")
    return BenchmarkSettings(dataset=dataset, data_dir=data_dir, backbone=backbone, weights=weights,
                             prototypes=prototypes, dim=dim, limit=limit, strict=strict, crop=crop, seeds=split_list(seeds, int),
                             backbone_options=parse_options(backbone_opts), train=train, lr_scales=tuple(scales),
                             schedules=tuple(schedule_list),
                             sweep_seeds=split_list(sweep_seeds, int) if sweep_seeds else None,
                             frozen_backbone=frozen_backbone, cache_dir=cache_dir, image_size=image_size,
                             workers=workers)


# ---- run configuration files, data loading and precision (train, evaluate, predict, ...) -----------

# Options that say where and how to (re)start a run, not what the run is: left out of config.yaml.
NOT_IN_CONFIG = ("out", "resume", "overwrite", "config", "run_dir", "paths", "output")


def _read_config(ctx: click.Context, param, value):
    """--config FILE: its keys become the command's defaults (click's default_map), so options
    given on the command line win. YAML is read with safe_load: it cannot run code."""
    if value is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(open(value, encoding="utf-8").read())
    except OSError as err:
        _fail(f"cannot read --config {value!r} ({err.strerror or err}); pass an existing YAML file")
    except yaml.YAMLError as err:
        _fail(f"--config {value!r} is not valid YAML ({str(err).splitlines()[0]}); fix the file")
    defaults = config_defaults(ctx.command, ctx.info_name, data, value)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def config_defaults(command: click.Command, command_name: str, data, source: str) -> dict:
    """The option values of a --config file's mapping, each checked against the option's declared
    type (one-line exit 2 naming key, value and type otherwise). Used by --config itself."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        _fail(f"--config {source!r} must hold a mapping of option: value; e.g. epochs: 10")
    params = {p.name: p for p in command.params if p.name}
    defaults = {}
    for key, item in data.items():
        name = str(key).replace("-", "_")
        if name not in params or name in NOT_IN_CONFIG:
            _fail(f"--config {source!r}: {key!r} is not an option of `{command_name}`; remove it "
                  f"(see `protoknn {command_name} --help`)")
        try:
            defaults[name] = config_value(params[name], item)
        except ValueError as err:
            _fail(f"--config {source!r}: {key}: {_shown(item)} is not {err}; fix the value in the file")
    return defaults


def _shown(value) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_NULL = object()  # a YAML null for an option that needs a value: wrong type for every kind


def config_value(param: click.Parameter, value):
    """``value`` of a config file as the option's declared type, or ValueError naming that type.

    Numbers are read as text where the option takes text (YAML reads ``precision: 32`` as a
    number); a bool is never a number; null only where the option's own default is null."""
    if value is None:
        if getattr(param, "multiple", False):
            return []
        if param.default is None:
            return None
        value = _NULL
    if getattr(param, "multiple", False):
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
            raise ValueError("a list of text items, e.g. [width=16]")
        return [str(v) for v in items]
    kind = param.type
    if getattr(param, "is_flag", False) or isinstance(kind, click.types.BoolParamType):
        if not isinstance(value, bool):
            raise ValueError("true or false")
        return value
    if isinstance(kind, click.types.IntParamType):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("a whole number")
        return value
    if isinstance(kind, click.types.FloatParamType):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("a number")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("text")
    if isinstance(kind, click.Choice) and str(value) not in kind.choices:
        raise ValueError(f"one of {', '.join(map(str, kind.choices))}")
    return str(value)


def _fail(message: str):
    err_console.print(f"error: {message}", markup=False, highlight=False)
    sys.exit(2)


def config_option(fn):
    """--config FILE (YAML), on every command that takes settings."""
    return click.option("--config", type=click.Path(dir_okay=False), default=None, is_eager=True,
                        expose_value=False, callback=_read_config,
                        help="YAML file of option: value (e.g. a run's config.yaml); options given on the command line win.")(fn)


def add_config_option(group: click.Group) -> None:
    """Give every command of ``group`` that lacks one a --config option."""
    for command in group.commands.values():
        if not any(param.name == "config" for param in command.params):
            config_option(command)


def write_run_config(out, params: dict) -> None:
    """OUT/config.yaml: every resolved option of this command, readable back with --config."""
    import yaml
    from pathlib import Path

    resolved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items() if k not in NOT_IN_CONFIG}
    path = Path(out) / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(f"# protoknn {click.get_current_context().info_name}: resolved options; "
                   "reuse with --config\n" + yaml.safe_dump(resolved, sort_keys=True))
    tmp.replace(path)


def workers_option(fn):
    from ..train.config import default_workers

    return click.option("--workers", type=int, default=default_workers(), show_default=True,
                        help="DataLoader worker processes (0: load in the main process); results do not depend on it.")(fn)


def loading_options(fn):
    """--workers and --image-size, on every command that reads images (train gets --image-size
    from frozen_backbone_options)."""
    fn = click.option("--image-size", type=int, default=None,
                      help="Resize images to this many pixels (default: the dataset's own, 224 for photographs).")(fn)
    return workers_option(fn)


def precision_option(fn):
    return click.option("--precision", type=click.Choice(["32", "bf16", "16-mixed"]), default="32", show_default=True,
                        help="Mixed precision for the backbone and add-on (losses stay float32); 16-mixed needs a GPU.")(fn)


# Smallest value of each numeric option (None, where allowed, keeps the option's default meaning).
OPTION_MINIMUMS = {"epochs": 1, "batch_classes": 2, "per_class": 1, "prototypes": 1, "dim": 1, "steps_per_epoch": 1,
                   "limit": 1, "threads": 1, "workers": 0, "image_size": 8, "k": 1, "images": 1, "n": 1,
                   "neighbours": 1, "top_classes": 1, "top_prototypes": 0, "batch_size": 1, "top": 1}


def check_option_ranges(params: dict) -> None:
    """One line for the first numeric option below its smallest value or a fraction outside [0, 1)."""
    for name, smallest in OPTION_MINIMUMS.items():
        value = params.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value < smallest:
            raise ProtoKNNError(f"--{name.replace('_', '-')} must be at least {smallest}, got {value}")
    fraction = params.get("val_fraction")
    if isinstance(fraction, float) and not 0.0 <= fraction < 1.0:
        raise ProtoKNNError(f"--val-fraction must be in [0, 1), got {fraction}; e.g. 0.1")


# ---- which model of a run a command loads (evaluate, predict, explain, report, faithfulness) ----------

def model_choice_options(fn):
    """--last / --unprojected: the model a command loads (``train.load_trained_model``)."""
    fn = click.option("--unprojected", is_flag=True,
                      help="Load best-unprojected.pt: the best validation epoch before projection. Its prototypes "
                           "are no training patches, so its explanations are not real; a note says so.")(fn)
    return click.option("--last", is_flag=True,
                        help="Load the last checkpoint.pt (the finished, projected model) even when the run has "
                             "a best.pt.")(fn)


def model_choice(last: bool, unprojected: bool) -> str:
    """The ``load_trained_model`` choice of the two flags."""
    if last and unprojected:
        raise ProtoKNNError("--last and --unprojected name two different models; pass one of them")
    return "last" if last else "unprojected" if unprojected else "best"


def say_note(text: str) -> None:
    """One line on stderr about which model was loaded."""
    err_console.print(f"note: {text}", markup=False, highlight=False)
