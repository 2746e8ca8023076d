"""Commands that list what is available: datasets, backbones, heads."""
from __future__ import annotations


import click
from rich.table import Table

from . import cli
from .common import (console, run_cli)


@cli.command()
@click.option("--data-dir", type=click.Path(), default=None, help="Where to look for datasets read from disk.")
@run_cli
def datasets(data_dir):
    """List the datasets: classes, train/test sizes, image size, and whether they are found. Writes nothing; instant."""
    from ..data import describe_dataset, list_datasets

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
    from ..backbones import describe_backbones

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
    """List the registered heads with their losses, defaults and the ranges `benchmark --tune` searches
    (from scratch; with a pretrained backbone the backbone rate's range may differ). Writes nothing; instant."""
    from ..heads import get_head_class, list_heads

    table = Table(title="heads")
    table.add_column("name", style="bold")
    table.add_column("description")
    table.add_column("defaults")
    table.add_column("--head-opt keys")
    table.add_column("search space (--tune)")
    from ..heads.options import option_keys
    from ..heads.space import describe_space

    for name in list_heads():
        cls = get_head_class(name)
        defaults = "\n".join(f"{k}: {v}" for k, v in cls.defaults().items())
        space = "\n".join(describe_space(cls.search_space())) or "nothing to tune"
        table.add_row(name, getattr(cls, "description", ""), defaults, ", ".join(option_keys(cls)), space)
    console.print(table)
