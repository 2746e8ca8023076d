"""Commands that explain a trained run: explain and prototypes."""
from __future__ import annotations


import click

from . import cli
from .common import console, model_choice, model_choice_options, run_cli, say_note


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--image", required=True, help="Test-set INDEX or an image PATH.")
@click.option("--negative-class", default=None, help="Class to explain against (default: the runner-up).")
@click.option("--top", type=int, default=5, show_default=True, help="Prototypes to show.")
@click.option("--data-dir", type=click.Path(), default=None)
@click.option("--out", required=True, type=click.Path(), help="Figure path (.png).")
@model_choice_options
@run_cli
def explain(run_dir, image, negative_class, top, data_dir, out, last, unprojected):
    """Explain one prediction. ProtoKNN runs: why this class rather than that (anchor, positive, negative,
    d_ap^2, d_an^2 and per-prototype contributions with their boxes). ProtoPNet runs: "this looks like
    that" (top prototypes, similarity, class weight). Writes the figure OUT and prints the numbers."""
    from ..figures import explain_command

    explain_command(run_dir, image, negative_class, top, data_dir, out, console, model_choice(last, unprojected),
                    say_note)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--data-dir", type=click.Path(), default=None)
@click.option("--out", required=True, type=click.Path(), help="Figure path (.png).")
@run_cli
def prototypes(run_dir, data_dir, out):
    """Draw every projected prototype with its source patch. Writes the grid figure OUT."""
    from ..figures import prototypes_command

    prototypes_command(run_dir, data_dir, out, console)
