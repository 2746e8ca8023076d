"""Explanation figures (matplotlib, Agg), drawn by the `protoknn explain` / `protoknn prototypes` commands
(``cli/explaining.py``).

* ``counterfactual_figure``: the paper's Fig. 3 for ProtoKNN runs: anchor, positive and
  negative, d_ap^2, d_an^2 and their difference, then one row per top prototype with its
  source patch, its contribution c_i and the blue box where it activates on each image.
* ``looks_like_figure``: ProtoPNet's "this looks like that" for ProtoPNet runs.
* ``decision_path_figure``: a ProtoTree's path from the root to the leaf that decides.
* ``prototype_grid_figure``: every projected prototype on its source image.

Figures are drawn on a ``matplotlib.figure.Figure`` with an Agg canvas, never through
pyplot, so nothing global changes and no display is needed. Every text is drawn with
``parse_math=False``: class and file names are data, never mathtext (a class named ``$x^$``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from .checkpoint import is_writable_dir
from .errors import ProtoKNNError
from .explain import Box, Counterfactual, DecisionPath, LooksLike, check_explainable, source_boxes
from .formatting import class_name, format_number

BOX_COLOR = "#0050ff"  # the paper's blue boxes
CELL_COLOR = "#ff9900"  # the projected patch cell, dashed
PART_COLOR = "#00a040"  # a deformable prototype's parts, dotted
TITLE_SPACE = 1.0  # inches above the panels for a one-line figure title and the first row's titles
TITLE_LINE = 0.25  # inches per extra title line
FIGURE_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
DPI = 110
CELL = 1.9  # inches per image panel


# --------------------------------------------------------------------------- drawing helpers

def _display(splits, image: Tensor):
    """Normalised (C, H, W) -> (array for imshow, imshow kwargs); grey images use cmap gray."""
    shown = splits.denormalize(image.detach().cpu().float())
    if shown.shape[0] == 1:
        return shown[0].numpy(), {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    return shown.permute(1, 2, 0).numpy(), {}


def _rectangle(ax, box: Box, **style) -> None:
    x0, y0, x1, y1 = box
    # imshow centres pixel j at j, so pixel j spans [j - 0.5, j + 0.5].
    # clip_on=False: a box along the image border stays fully visible over the axes frame.
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, clip_on=False, **style))


def _show(ax, splits, image: Tensor, box: Optional[Box] = None, title: str = "", fontsize: float = 9,
          cell: Optional[Box] = None) -> None:
    """Image with the activation box in blue and, optionally, the projected patch cell dashed."""
    array, kwargs = _display(splits, image)
    small = max(array.shape[:2]) < 96
    ax.imshow(array, interpolation="nearest" if small else "antialiased", **kwargs)
    if box is not None:
        _rectangle(ax, box, edgecolor=BOX_COLOR, linewidth=2.2)
    if cell is not None:
        _rectangle(ax, cell, edgecolor=CELL_COLOR, linewidth=1.8, linestyle=(0, (2, 1.5)))
        x0, y0, x1, y1 = cell
        if max(x1 - x0, y1 - y0) < max(array.shape[:2]) / 12:  # too small to see: mark its centre too
            ax.plot([(x0 + x1 - 1) / 2], [(y0 + y1 - 1) / 2], marker="+", markersize=11, markeredgewidth=2,
                    color=CELL_COLOR)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize, parse_math=False)


def _crop(image: Tensor, box: Box) -> Tensor:
    x0, y0, x1, y1 = box
    return image[..., y0:y1, x0:x1]


def _text_panel(ax, text: str, fontsize: float = 10, **kwargs) -> None:
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=fontsize, transform=ax.transAxes,
            family="monospace", parse_math=False, **kwargs)


def new_figure(width: float, height: float, rows: int, cols: int, title: str, title_size: float = 13, **space):
    """Figure (``height`` inches for the panels, plus room for the title) with an Agg canvas,
    its title, and a (rows, cols) grid right under the title."""
    space_above = TITLE_SPACE + TITLE_LINE * title.count("\n")
    height += space_above
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=title_size, fontweight="bold", y=1 - 0.2 / height, va="top", parse_math=False)
    grid = fig.add_gridspec(rows, cols, top=1 - space_above / height, bottom=0.02, left=0.02, right=0.98, **space)
    return fig, grid


def check_figure_path(out_path) -> Path:
    """A figure path with a known suffix whose folder exists (created) and is writable, or a one-line error."""
    path = Path(out_path)
    if path.suffix.lower() not in FIGURE_FORMATS:
        raise ProtoKNNError(f"cannot write figure {str(path)!r}: the name must end in "
                            f"{', '.join(FIGURE_FORMATS)}; e.g. --out explain.png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ProtoKNNError(f"cannot write figure {str(path)!r}: cannot create its folder ({err.strerror or err}); "
                            "pass --out to a path you can write") from None
    if path.is_dir() or not is_writable_dir(path.parent):
        raise ProtoKNNError(f"cannot write figure {str(path)!r}: "
                            f"{'it is a folder' if path.is_dir() else 'its folder is not writable'}; "
                            "pass --out to a path you can write")
    return path


def save_figure(fig: Figure, out_path, tight: bool = True) -> Path:
    """Write ``fig`` to ``out_path`` (parent folders created); one-line errors for bad paths."""
    path = check_figure_path(out_path)
    try:
        fig.savefig(path, dpi=DPI, bbox_inches="tight" if tight else None, facecolor="white")
    except OSError as err:
        raise ProtoKNNError(f"cannot write figure {str(path)!r} ({err.strerror or err}); "
                            "pass --out to a path you can write") from None
    return path


# --------------------------------------------------------------------------- figures

def counterfactual_figure(cf: Counterfactual, splits, out_path) -> Path:
    """The paper's Fig. 3 for one ``Counterfactual``; returns the written path."""
    rows, cols = 1 + len(cf.top), 6
    pred, neg = class_name(splits, cf.predicted_class), class_name(splits, cf.negative_class)
    fig, grid = new_figure(cols * CELL, rows * CELL * 1.15, rows, cols,
                            f"Why '{pred}' rather than '{neg}'?  (ProtoKNN, k = 1)", hspace=0.45, wspace=0.12)

    num_prototypes = len(cf.contributions)
    summary = "\n".join([
        f"d_ap² (anchor–positive)  = {format_number(cf.d_ap2)}",
        f"d_an² (anchor–negative)  = {format_number(cf.d_an2)}",
        f"Difference d_an² − d_ap² = {format_number(cf.difference, sign=True)}",
        "",
        f"sum of all {num_prototypes} contributions = {format_number(float(cf.contributions.sum()), sign=True)}",
        f"sum of the top {len(cf.top)} shown      = {format_number(cf.top_sum, sign=True)}",
        "",
        "c_i = (s_a,i − s_n,i)² − (s_a,i − s_p,i)²",
        "blue box: where prototype i activates most",
        "orange (dashed box or +): the patch it was projected onto",
    ])
    _text_panel(fig.add_subplot(grid[0, 0:3]), summary, fontsize=9.5)
    truth = f"\ntrue: {class_name(splits, cf.anchor_label)}" if cf.anchor_label is not None else ""
    _show(fig.add_subplot(grid[0, 3]), splits, cf.anchor, title=f"anchor: {cf.anchor_name}{truth}", fontsize=9)
    _show(fig.add_subplot(grid[0, 4]), splits, cf.positive,
          title=f"positive: {pred}\n(train #{cf.positive_index})", fontsize=9)
    _show(fig.add_subplot(grid[0, 5]), splits, cf.negative,
          title=f"negative: {neg}\n(train #{cf.negative_index})", fontsize=9)

    headers = ("prototype patch", "its source image", "contribution", "anchor", "positive", "negative")
    images = {"anchor": cf.anchor, "positive": cf.positive, "negative": cf.negative}
    for row, proto in enumerate(cf.top, start=1):
        source = splits.train_plain[proto.source_index][0]
        source_class = class_name(splits, int(splits.train_labels[proto.source_index]))
        first = row == 1
        _show(fig.add_subplot(grid[row, 0]), splits, _crop(source, proto.source_box),
              title=(headers[0] + "\n" if first else "") + f"prototype {proto.index}")
        _show(fig.add_subplot(grid[row, 1]), splits, source, proto.source_box,
              title=(headers[1] + "\n" if first else "") + f"train #{proto.source_index} ({source_class})",
              cell=proto.source_cell_box)
        _text_panel(fig.add_subplot(grid[row, 2]), f"c_{proto.index} = {format_number(proto.score, sign=True)}",
                    fontsize=10.5, fontweight="bold")
        if first:
            fig.axes[-1].set_title(headers[2], fontsize=9, parse_math=False)
        for col, key in enumerate(("anchor", "positive", "negative"), start=3):
            ax = fig.add_subplot(grid[row, col])
            _show(ax, splits, images[key], proto.boxes[key],
                  title=(headers[col] + "\n" if first else "") + f"s = {format_number(proto.similarity[key])}")
    return save_figure(fig, out_path)


def looks_like_figure(result: LooksLike, splits, out_path) -> Path:
    """ProtoPNet's "this looks like that": per top prototype, its box on the image, its patch and numbers."""
    rows, cols = 1 + len(result.top), 4
    pred = class_name(splits, result.predicted_class)
    fig, grid = new_figure(cols * CELL * 1.15, rows * CELL * 1.15, rows, cols,
                            f"This looks like that: predicted '{pred}'  (ProtoPNet)", hspace=0.45, wspace=0.15)
    truth = f"\ntrue: {class_name(splits, result.anchor_label)}" if result.anchor_label is not None else ""
    _show(fig.add_subplot(grid[0, 0]), splits, result.image, title=f"{result.anchor_name}{truth}")
    ranked = "s_i × w_i (points to the logit)" if result.ranking == "contribution" else "similarity s_i"
    top_points = sum(p.similarity["anchor"] * p.weight for p in result.top)
    summary = "\n".join([
        f"predicted: {pred}   logit = {format_number(result.predicted_logit)}",
        f"top {len(result.top)} prototypes ranked by {ranked}",
        f"points of the top {len(result.top)} = {format_number(top_points, sign=True)}",
        "logit = sum over all prototypes of s_i × w_i",
        "w_i: last-layer weight to the predicted class",
        "blue box: where the prototype activates most",
        "orange (dashed box or +): the patch it was projected onto",
        *(["green dotted boxes: the prototype's parts at their deformed positions"]
          if any(p.part_boxes for p in result.top) else []),
    ])
    _text_panel(fig.add_subplot(grid[0, 1:4]), summary, fontsize=9.5)
    for row, proto in enumerate(result.top, start=1):
        first = row == 1
        source = splits.train_plain[proto.source_index][0]
        this = fig.add_subplot(grid[row, 0])
        _show(this, splits, result.image, proto.boxes["anchor"],
              title=("this (test image)\n" if first else "") + f"prototype {proto.index}")
        for box in proto.part_boxes:  # deformable prototypes: each part where it moved
            _rectangle(this, box, edgecolor=PART_COLOR, linewidth=1.4, linestyle=(0, (1, 1)))
        _show(fig.add_subplot(grid[row, 1]), splits, _crop(source, proto.source_box),
              title=("looks like that\n" if first else "") + f"class {class_name(splits, proto.prototype_class)}")
        _show(fig.add_subplot(grid[row, 2]), splits, source, proto.source_box,
              title=("source image\n" if first else "") + f"train #{proto.source_index}", cell=proto.source_cell_box)
        text = "\n".join([
            f"similarity s = {format_number(proto.similarity['anchor'])}",
            f"weight w     = {format_number(proto.weight, sign=True)}",
            f"points s×w   = {format_number(proto.similarity['anchor'] * proto.weight, sign=True)}",
        ])
        _text_panel(fig.add_subplot(grid[row, 3]), text, fontsize=9.5)
    return save_figure(fig, out_path)


def decision_path_figure(result: DecisionPath, splits, out_path) -> Path:
    """A tree's decision path: per node, where its prototype activates on the image, its source patch,
    s_n and present/absent; the leaf's distribution in the summary."""
    rows, cols = 1 + max(1, len(result.steps)), 4
    pred = class_name(splits, result.predicted_class)
    fig, grid = new_figure(cols * CELL * 1.15, rows * CELL * 1.15, rows, cols,
                            f"Decision path to leaf {result.leaf}: '{pred}'  (ProtoTree)", hspace=0.45, wspace=0.15)
    truth = f"\ntrue: {class_name(splits, result.anchor_label)}" if result.anchor_label is not None else ""
    _show(fig.add_subplot(grid[0, 0]), splits, result.image, title=f"{result.anchor_name}{truth}")
    order = torch.argsort(result.leaf_distribution, descending=True)[:3].tolist()
    summary = "\n".join([
        f"leaf {result.leaf}: " + ", ".join(
            f"{class_name(splits, c)} {format_number(float(result.leaf_distribution[c]))}" for c in order),
        "head: " + ", ".join(f"{k} {class_name(splits, v)}" for k, v in result.head_predictions.items()),
        "tree: " + ", ".join(f"{k.replace('tree_', '')} {int(v)}" for k, v in result.tree.items()),
        "right (present) iff s = exp(-distance) > 0.5",
        "blue box: where the node's prototype activates",
        "orange (dashed box or +): the patch it was projected onto",
    ])
    _text_panel(fig.add_subplot(grid[0, 1:4]), summary, fontsize=9.5)
    for row, step in enumerate(result.steps, start=1):
        first = row == 1
        source = splits.train_plain[step.source_index][0]
        _show(fig.add_subplot(grid[row, 0]), splits, result.image, step.box,
              title=("test image\n" if first else "") + f"node {step.node}")
        _show(fig.add_subplot(grid[row, 1]), splits, _crop(source, step.source_box),
              title=("prototype\n" if first else "") + f"node {step.node}")
        _show(fig.add_subplot(grid[row, 2]), splits, source, step.source_box,
              title=("source image\n" if first else "") + f"train #{step.source_index}", cell=step.source_cell_box)
        verdict = "present -> right" if step.present else "absent -> left"
        _text_panel(fig.add_subplot(grid[row, 3]), f"s = {format_number(step.similarity)}\n{verdict}", fontsize=9.5)
    if not result.steps:
        _text_panel(fig.add_subplot(grid[1, 0:4]), "the pruned tree routes this image without a decision", fontsize=9.5)
    return save_figure(fig, out_path)


def prototype_grid_figure(model, splits, out_path) -> Path:
    """Every projected prototype on its source training image, its box in blue, titled with its index.

    The tiles are pasted into one mosaic drawn on a single axes: hundreds of matplotlib
    axes (P = 512) would take minutes to lay out and draw.
    """
    check_explainable(model)
    num = model.prototype_layer.num_prototypes
    boxes = source_boxes(model, splits.train_plain, range(num))
    proto_class = getattr(model.head, "prototype_class", None)
    sources = [int(model.projection.image_index[i]) for i in range(num)]
    tiles = {src: _rgb(splits, splits.train_plain[src][0]) for src in set(sources)}
    side = max(max(t.shape[:2]) for t in tiles.values())
    cols = min(num, max(5, math.ceil(math.sqrt(num))))
    rows = math.ceil(num / cols)
    gap, band = max(1, round(side * 0.08)), max(4, round(side * 0.42))  # between tiles; label band above
    mosaic = np.ones((rows * (side + band), cols * (side + gap) - gap, 3), dtype=np.float32)
    origins = []
    for i, src in enumerate(sources):
        x, y = (i % cols) * (side + gap), (i // cols) * (side + band) + band
        tile = tiles[src]
        mosaic[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
        origins.append((x, y))

    panel_width = cols * 1.45
    panel_height = panel_width * mosaic.shape[0] / mosaic.shape[1]
    title = (f"{num} projected prototypes ({model.head.name}) on their source training images\n"
             "blue box: where the prototype activates;  orange (dashed box or +): the patch it was projected onto")
    space_above = TITLE_SPACE + TITLE_LINE * title.count("\n") - 0.3
    fig = Figure(figsize=(panel_width, panel_height + space_above), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=10.5, fontweight="bold", y=1 - 0.15 / (panel_height + space_above), va="top",
                 parse_math=False)
    ax = fig.add_axes((0.01, 0.005, 0.98, panel_height / (panel_height + space_above) - 0.005))
    ax.imshow(mosaic, interpolation="nearest" if side < 96 else "antialiased")
    ax.set_xlim(-0.5, mosaic.shape[1] - 0.5)
    ax.set_ylim(mosaic.shape[0] - 0.5, -0.5)
    ax.axis("off")
    small_cells = []
    for i, ((x, y), src) in enumerate(zip(origins, sources)):
        box, _, cell_region = boxes[i]
        _rectangle(ax, _offset(box, x, y), edgecolor=BOX_COLOR, linewidth=1.6)
        _rectangle(ax, _offset(cell_region, x, y), edgecolor=CELL_COLOR, linewidth=1.3, linestyle=(0, (2, 1.5)))
        if max(cell_region[2] - cell_region[0], cell_region[3] - cell_region[1]) < side / 12:
            small_cells.append(((2 * x + cell_region[0] + cell_region[2] - 1) / 2,
                                (2 * y + cell_region[1] + cell_region[3] - 1) / 2))
        owner = class_name(splits, int(proto_class[i])) if proto_class is not None else \
            "from " + class_name(splits, int(splits.train_labels[src]))
        ax.text(x + side / 2, y - band * 0.08, f"p{i} · {owner}\ntrain #{src}", ha="center", va="bottom",
                fontsize=7.5, parse_math=False)
    if small_cells:
        xs, ys = zip(*small_cells)
        ax.plot(xs, ys, linestyle="none", marker="+", markersize=9, markeredgewidth=1.8, color=CELL_COLOR)
    return save_figure(fig, out_path, tight=False)


def _offset(box: Box, x: int, y: int) -> Box:
    """A tile's box in mosaic pixels, the tile's top-left corner being (x, y)."""
    return box[0] + x, box[1] + y, box[2] + x, box[3] + y


def _rgb(splits, image: Tensor) -> np.ndarray:
    """Normalised (C, H, W) -> (H, W, 3) floats in [0, 1] (grey repeated), for the mosaic."""
    shown = splits.denormalize(image.detach().cpu().float())
    return shown.expand(3, *shown.shape[1:]).permute(1, 2, 0).numpy() if shown.shape[0] == 1 \
        else shown.permute(1, 2, 0).numpy()
