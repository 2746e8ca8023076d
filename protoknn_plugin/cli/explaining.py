"""Commands that explain a trained run: explain and prototypes (figures from ``figures``, tables with rich)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Tuple

import click

from ..errors import ProtoKNNError, check
from ..formatting import class_name, format_number
from . import cli
from .common import console, model_choice, model_choice_options, run_cli, say_note

if TYPE_CHECKING:  # torch loads when a command runs, not for --help
    from torch import Tensor

    from ..explain import Counterfactual, DecisionPath, LooksLike


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
    explain_command(run_dir, image, negative_class, top, data_dir, out, console, model_choice(last, unprojected),
                    say_note)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--data-dir", type=click.Path(), default=None)
@click.option("--out", required=True, type=click.Path(), help="Figure path (.png).")
@run_cli
def prototypes(run_dir, data_dir, out):
    """Draw every projected prototype with its source patch. Writes the grid figure OUT."""
    prototypes_command(run_dir, data_dir, out, console)


def _query_image(splits, image: str) -> Tuple[Tensor, Optional[int], str]:
    """A test-set INDEX or an image PATH -> (image (C, H, W), true label or None, display name)."""
    text = str(image).strip()
    if text.lstrip("+-").isdigit():
        index, count = int(text), len(splits.test)
        check(0 <= index < count, f"image index {index} is out of range: the test set has {count} images "
                                  f"(0..{count - 1}); pass an index in range or an image path")
        x, y = splits.test[index]
        return x, int(y), f"test #{index}"
    path = Path(text)
    return splits.load_image(path), None, path.name


def explain_command(run_dir, image, negative_class, top, data_dir, out, console, choice: str = "best",
                    say: Optional[Callable[[str], None]] = None) -> Path:
    """`protoknn explain`: the counterfactual (kNN heads) or "this looks like that" (ProtoPNet) figure + table."""
    from rich.markup import escape

    from ..explain import check_top, counterfactual, decision_path, resolve_class, this_looks_like_that
    from ..figures import check_figure_path, counterfactual_figure, decision_path_figure, looks_like_figure
    from ..heads import get_head_class
    from ..runs import check_run, load_model, run_splits

    top = check_top(top)
    check_figure_path(out)  # fail before the slow part
    saved = check_run(run_dir)
    head_class = get_head_class(saved["model_config"]["head"])
    is_knn = bool(head_class.uses_memory)
    splits = run_splits(saved, data_dir)
    x, label, name = _query_image(splits, image)
    negative = None
    if is_knn and negative_class is not None:
        negative = resolve_class(negative_class, splits.classes)
    model = load_model(run_dir, choice, say)
    if head_class.explanation == "decision-path":
        result = decision_path(model, x, splits.train_plain, label=label, name=name)
        path = decision_path_figure(result, splits, out)
        _print_decision_path(result, splits, console, escape)
        console.print(f"figure written to {path}", markup=False, highlight=False)
        return path
    if not is_knn and model.head.class_weights() is None:
        raise ProtoKNNError(f"head {model.head.name!r} has neither a kNN memory nor a linear last layer; "
                            "explain supports protoknn and protopnet runs")
    if is_knn:
        cf = counterfactual(model, x, splits.train_plain, negative, top=top, label=label, name=name,
                            classes=splits.classes)
        path = counterfactual_figure(cf, splits, out)
        _print_counterfactual(cf, splits, console, escape)
    else:
        if negative_class is not None:
            console.print("note: --negative-class applies to kNN heads only; a ProtoPNet run is explained "
                          "by its top prototypes", markup=False)
        result = this_looks_like_that(model, x, splits.train_plain, top=top, label=label, name=name)
        path = looks_like_figure(result, splits, out)
        _print_looks_like(result, splits, console, escape)
    console.print(f"figure written to {path}", markup=False, highlight=False)
    return path


def _print_counterfactual(cf: Counterfactual, splits, console, escape) -> None:
    from rich.table import Table

    pred, neg = class_name(splits, cf.predicted_class), class_name(splits, cf.negative_class)
    summary = Table(title=escape(f"{cf.anchor_name}: why '{pred}' rather than '{neg}' (k = 1)"))
    summary.add_column("quantity")
    summary.add_column("value", justify="right")
    if cf.anchor_label is not None:
        summary.add_row("true class", escape(class_name(splits, cf.anchor_label)))
    for key, value in cf.head_predictions.items():
        summary.add_row(escape(f"head prediction [{key}]"), escape(class_name(splits, value)))
    summary.add_row("positive (nearest training image)", escape(f"train #{cf.positive_index} ({pred})"))
    summary.add_row("negative (nearest of the other class)", escape(f"train #{cf.negative_index} ({neg})"))
    summary.add_row("d_ap^2", format_number(cf.d_ap2))
    summary.add_row("d_an^2", format_number(cf.d_an2))
    summary.add_row("difference d_an^2 - d_ap^2", format_number(cf.difference, sign=True))
    summary.add_row(f"sum of all {len(cf.contributions)} contributions",
                    format_number(float(cf.contributions.sum()), sign=True))
    summary.add_row(f"sum of the top {len(cf.top)}", format_number(cf.top_sum, sign=True))
    console.print(summary)
    table = Table(title="top prototypes by contribution c_i = (s_a - s_n)^2 - (s_a - s_p)^2")
    for col in ("#", "proto", "c_i", "% diff", "s_a", "s_p", "s_n", "source"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for rank, proto in enumerate(cf.top, start=1):
        share = f"{100 * proto.score / cf.difference:.0f}" if cf.difference else "-"
        source_class = class_name(splits, int(splits.train_labels[proto.source_index]))
        table.add_row(str(rank), str(proto.index), format_number(proto.score, sign=True), share,
                      *(format_number(proto.similarity[k]) for k in ("anchor", "positive", "negative")),
                      escape(f"#{proto.source_index} {source_class}"))
    console.print(table)
    console.print("% diff: c_i as a share of d_an^2 - d_ap^2 (other prototypes can pull the other way); "
                  "source: training image the prototype was projected onto", markup=False, highlight=False)


def _print_decision_path(result: DecisionPath, splits, console, escape) -> None:
    from rich.table import Table

    truth = f", true '{class_name(splits, result.anchor_label)}'" if result.anchor_label is not None else ""
    title = f"{result.anchor_name}: leaf {result.leaf} predicts '{class_name(splits, result.predicted_class)}'{truth}"
    table = Table(title=escape(title))
    for col in ("depth", "node", "s = exp(-d)", "decision", "source"):
        table.add_column(col, justify="left" if col in ("decision", "source") else "right")
    for depth, step in enumerate(result.steps):
        table.add_row(str(depth), str(step.node), format_number(step.similarity),
                      "present -> right" if step.present else "absent -> left", f"train #{step.source_index}")
    console.print(table)
    predictions = ", ".join(f"{k} '{class_name(splits, v)}'" for k, v in result.head_predictions.items())
    size = ", ".join(f"{k.replace('tree_', '').replace('_', ' ')} {int(v)}" for k, v in result.tree.items())
    console.print(escape(f"head predictions: {predictions}; pruned tree: {size}"), highlight=False)


def _print_looks_like(result: LooksLike, splits, console, escape) -> None:
    from rich.table import Table

    pred = class_name(splits, result.predicted_class)
    truth = f", true '{class_name(splits, result.anchor_label)}'" if result.anchor_label is not None else ""
    title = f"{result.anchor_name}: predicted '{pred}' (logit {format_number(result.predicted_logit)}){truth}"
    table = Table(title=escape(f"{title}; ranked by {result.ranking}"))
    for col in ("rank", "prototype", "class", "similarity", "weight", "points s*w", "source"):
        table.add_column(col, justify="left" if col in ("class", "source") else "right")
    for rank, proto in enumerate(result.top, start=1):
        s = proto.similarity["anchor"]
        owners = ", ".join(class_name(splits, c) for c in proto.shared_by) or class_name(splits, proto.prototype_class)
        table.add_row(str(rank), str(proto.index), escape(owners), format_number(s),
                      format_number(proto.weight, sign=True), format_number(s * proto.weight, sign=True),
                      f"train #{proto.source_index}")
    console.print(table)
    if result.class_prototypes:
        console.print(f"'{pred}' uses the pool prototypes {', '.join(map(str, result.class_prototypes))}; "
                      "class: the classes that use each prototype", markup=False, highlight=False)


def prototypes_command(run_dir, data_dir, out, console) -> Path:
    """`protoknn prototypes`: the grid of every projected prototype, and a short summary."""
    import torch
    from rich.table import Table

    from ..figures import check_figure_path, prototype_grid_figure
    from ..runs import load_run

    check_figure_path(out)  # fail before the slow part
    run = load_run(run_dir, data_dir)
    model, saved, splits = run.model, run.saved, run.splits
    path = prototype_grid_figure(model, splits, out)
    sources = model.projection.image_index
    source_classes = splits.train_labels[sources]
    table = Table(title=f"prototypes of {model.head.name} on {saved['dataset']}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("prototypes", str(len(sources)))
    table.add_row("distinct source images", str(len(torch.unique(sources))))
    patches = {(int(image), int(where)) for image, where in zip(sources, model.projection.location)}
    table.add_row("distinct source patches", str(len(patches)))
    table.add_row("classes of the source images", f"{len(torch.unique(source_classes))} of {len(splits.classes)}")
    console.print(table)
    console.print(f"figure written to {path}", markup=False, highlight=False)
    return path
