"""``protoknn predict``: class, neighbours or scores, and prototypes for image files."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import click

from . import cli
from .common import (config_option, err_console, loading_options, model_choice, model_choice_options, run_cli,
                     say_note)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="CSV file to write (default: RUN_DIR/predictions.csv).")
@click.option("--output", type=click.Path(dir_okay=False), default=None, hidden=True,
              help="The old name of --out, still read so that existing scripts keep working.")
@click.option("--neighbours", type=int, default=5, show_default=True, help="kNN heads: nearest training images per row.")
@click.option("--top-classes", type=int, default=3, show_default=True, help="Linear heads: class scores per row.")
@click.option("--top-prototypes", type=int, default=3, show_default=True, help="Prototypes per row, largest contribution first.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--data-dir", type=click.Path(), default=None, help="Override the dataset folder stored in the run.")
@click.option("--device", default="auto", show_default=True)
@model_choice_options
@loading_options
@config_option
@run_cli
def predict(run_dir, paths, out, output, neighbours, top_classes, top_prototypes, batch_size, data_dir, device, last,
            unprojected, workers, image_size):
    """Predict the class of image files (PATHS: files or folders, searched recursively).
    Writes one CSV row per image: path, predicted class, the k nearest training images with
    squared distances (kNN heads) or the top class probabilities (linear heads), and the top
    contributing prototypes. Unreadable files are listed on stderr and skipped. Uses best.pt
    (projected) when the run has one. Cost: one forward pass per image plus one kNN search per batch."""
    from ..errors import ProtoKNNError
    from ..predict import collect_images, predict_files
    from ..runs import load_finished_run
    from ..train import resolve_device

    if batch_size < 1 or neighbours < 1 or top_classes < 1 or top_prototypes < 0:
        raise ProtoKNNError("--batch-size, --neighbours and --top-classes must be at least 1, --top-prototypes at least 0")
    if out is not None and output is not None:
        raise ProtoKNNError("--out and --output are one option (--output is its old name); pass only --out")
    out = out if out is not None else output
    model, _, splits, _ = load_finished_run(run_dir, model_choice(last, unprojected), data_dir, image_size,
                                         say_note)
    target = check_output_file(Path(out) if out else Path(run_dir) / "predictions.csv", out is None)
    files = collect_images(paths)
    dev = resolve_device(device)
    model.to(dev)
    from rich.progress import Progress

    with Progress(disable=not sys.stdout.isatty(), transient=True) as progress:
        task = progress.add_task("predicting", total=len(files))
        columns, rows, unreadable = predict_files(
            model, splits, files, batch_size, dev, workers=workers, neighbours=neighbours, top_classes=top_classes,
            top_prototypes=top_prototypes, on_batch=lambda n: progress.advance(task, n))
    tmp = target.with_name(f".{target.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(target)
    for path in unreadable:
        err_console.print(f"warning: unreadable image skipped: {path}", markup=False, highlight=False)
    print(f"{len(rows)} prediction(s) written to {target}" + (f"; {len(unreadable)} unreadable file(s) skipped"
                                                              if unreadable else ""))


def check_output_file(target: Path, in_run_dir: bool) -> Path:
    """The CSV path, checked before any prediction is computed: its folder exists and is writable."""
    from ..checkpoint import is_writable_dir
    from ..errors import ProtoKNNError

    fix = "pass --out FILE in a folder you can write"
    if target.is_dir():
        raise ProtoKNNError(f"--out {str(target)!r} is a folder; {fix}, e.g. --out predictions.csv")
    if not target.parent.is_dir():
        raise ProtoKNNError(f"cannot write {str(target)!r}: the folder {str(target.parent)!r} does not exist; "
                            f"create it or {fix}")
    if not is_writable_dir(target.parent):
        where = "the run directory" if in_run_dir else "the folder"
        raise ProtoKNNError(f"cannot write {str(target)!r}: {where} {str(target.parent)!r} is not writable; {fix}")
    return target
