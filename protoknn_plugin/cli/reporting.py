"""Commands that measure and publish explanations: faithfulness and report."""
from __future__ import annotations

import click

from . import cli
from .common import console, err_console, model_choice, model_choice_options, run_cli, say_note


def _parse_ms(value: str):
    from .common import split_list

    return tuple(split_list(value, int))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--images", "n", type=int, default=200, show_default=True, help="Test images to measure (seeded sample).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample, random controls and noise.")
@click.option("--sigma", type=float, default=0.2, show_default=True,
              help="Std of the Gaussian noise for stability, in normalised pixel units.")
@click.option("--m", "ms", default="1,3,5", show_default=True, help="Numbers of prototypes to occlude.")
@click.option("--data-dir", type=click.Path(), default=None, help="Override the dataset folder stored in the run.")
@model_choice_options
@run_cli
def faithfulness(run_dir, n, seed, sigma, ms, data_dir, last, unprojected):
    """Measure how faithful a run's explanations are: counterfactual deletion of the top-m prototypes'
    boxes against m random prototypes and random boxes of the same size (drop, flip rate, ratio),
    stability under noise, consistency (datasets with part annotations: cub200) and prototype purity.
    Writes RUN_DIR/faithfulness.json and prints a table. Cost: about 10 forward passes per test image
    plus one pass over the training set; the same command gives the same numbers."""
    from ..checkpoint import is_writable_dir
    from ..faithfulness import measure_run

    writable = is_writable_dir(run_dir)  # reading a run never needs write access
    result = measure_run(run_dir, n=n, seed=seed, sigma=sigma, ms=_parse_ms(ms), data_dir=data_dir,
                         choice=model_choice(last, unprojected), say=say_note, write=writable)
    print_faithfulness(result)
    if writable:
        console.print(f"written to {run_dir}/faithfulness.json", markup=False, highlight=False)
    else:
        err_console.print(f"warning: {run_dir} is not writable, so faithfulness.json was not written; "
                          "the tables above are the result", markup=False, highlight=False)


def print_faithfulness(result) -> None:
    from rich.markup import escape
    from rich.table import Table

    deletion = result["deletion"]
    table = Table(title=escape(f"deletion test: {result['head']} on {result['dataset']}, {result['images']} test "
                               f"images, score = {deletion['score']} (mean {deletion['base_mean']:.4g})"))
    for name in ("m", "drop: explained", "random protos", "random boxes", "ratio vs protos", "ratio vs boxes",
                 "flip: explained", "random protos", "random boxes", "area occluded"):
        table.add_column(name, justify="right")
    for m, row in deletion["by_m"].items():
        drop, flip = row["drop"], row["flip"]
        table.add_row(m, *(f"{drop[c]:.4g}" for c in ("explained", "random_prototypes", "random_boxes")),
                      *(_ratio(row[k]) for k in ("ratio_random_prototypes", "ratio_random_boxes")),
                      *(f"{100 * flip[c]:.1f} %" for c in ("explained", "random_prototypes", "random_boxes")),
                      f"{100 * row['area']['explained']:.1f} %")
    console.print(table)
    other = Table(title="prototype quality")
    other.add_column("metric")
    other.add_column("value", justify="right")
    other.add_column("meaning")
    other.add_row("stability", f"{result['stability']:.3f}",
                  f"most activated cell unchanged under noise sigma {result['sigma']}")
    consistency = result.get("consistency")
    other.add_row("consistency", "n/a" if consistency is None else f"{consistency:.3f}",
                  "no part annotations for this dataset" if consistency is None else
                  f"prototypes covering one part in >= 80% of their class's images "
                  f"({result.get('consistency_prototypes')} measured)")
    other.add_row("purity", f"{result['purity']:.3f}",
                  f"mean share of the majority class among the top-{result['purity_k']} training patches")
    console.print(other)


def _ratio(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.2f}x"


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Folder for the site (created).")
@click.option("--images", type=int, default=24, show_default=True,
              help="Test images given a page (misclassified first); each costs a few figures' worth of time.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the image sample.")
@click.option("--faithfulness/--no-faithfulness", default=True, show_default=True,
              help="Show RUN_DIR/faithfulness.json, computing it when absent.")
@click.option("--data-dir", type=click.Path(), default=None, help="Override the dataset folder stored in the run.")
@model_choice_options
@run_cli
def report(run_dir, out, images, seed, faithfulness, data_dir, last, unprojected):
    """Write a static HTML report of a finished run into OUT: index.html (config, metrics, faithfulness
    table, learning curves), prototypes.html (each prototype's source patch and 10 nearest training
    patches) and one page per sampled test image (ProtoKNN: counterfactuals against up to 3 runner-up
    classes; ProtoPNet: "this looks like that"). Opens from disk, no server or JavaScript. Cost: one
    pass over the training set, plus the faithfulness measurement when RUN_DIR has none."""
    from pathlib import Path

    from ..checkpoint import is_writable_dir
    from ..faithfulness import RESULT_NAME
    from ..report import write_report

    cache = is_writable_dir(run_dir)  # reading a run never needs write access
    path = write_report(run_dir, out, images=images, data_dir=data_dir, seed=seed, faithfulness=faithfulness,
                        choice=model_choice(last, unprojected), say=say_note, cache_faithfulness=cache)
    if faithfulness and not cache and not (Path(run_dir) / RESULT_NAME).exists():
        err_console.print(f"warning: {run_dir} is not writable, so the faithfulness measured for the report was not "
                          f"kept in {RESULT_NAME}", markup=False, highlight=False)
    console.print(f"report written to {path}", markup=False, highlight=False)
