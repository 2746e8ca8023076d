"""``protoknn report``: a static HTML site for one run, or for several runs side by side.

Layout of OUT: index.html (config, metrics, faithfulness, learning curves, example list),
prototypes.html (gallery), test-NNNNN.html (one per sampled test image) and img/ (PNG files).
No server, no JavaScript, nothing fetched: it opens from disk.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..checkpoint import ensure_writable_dir
from ..errors import ProtoKNNError
from ..formatting import class_name, format_number
from .examples import choose_examples, page_name, predictions, write_example
from .gallery import PAGE as GALLERY, write_gallery
from .tree import tree_link
from .html import esc, figure, link, table, write_page
from .tiles import TileWriter

DEFAULT_IMAGES = 24
INDEX = "index.html"


def _nav(up: Optional[str] = None):
    items = [(INDEX, "Run overview"), (GALLERY, "Prototypes"), (f"{INDEX}#examples", "Test images")]
    return ([(up, "All runs")] if up else []) + items


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stored_faithfulness(path: Path, checkpoint_file: str) -> Optional[dict]:
    """A faithfulness.json measured on ``checkpoint_file`` (files without the key were measured on
    checkpoint.pt), else None."""
    result = _read_json(path)
    return result if result is not None and result.get("checkpoint", "checkpoint.pt") == checkpoint_file else None


def curve_points(run_dir: Path, saved: dict) -> Dict[str, List[float]]:
    """Per-epoch series {name: values}: RUN_DIR/metrics.csv if present, else the checkpoint's history."""
    rows: List[dict] = []
    path = Path(run_dir) / "metrics.csv"
    if path.is_file():
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = list((saved.get("train_state") or {}).get("history") or [])
    series: Dict[str, List[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key in ("epoch", "phase", "step", "global_step"):
                continue
            try:
                series.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                pass
    return series


def learning_curves(series: Dict[str, List[float]], out: Path) -> Optional[str]:
    """One PNG with a line per series against the epoch count; None when there is nothing to draw."""
    if not series:
        return None
    from ..figures import new_figure, save_figure

    fig, grid = new_figure(6.4, 3.2, 1, 1, "Training curves (per epoch, all phases in order)", title_size=11)
    ax = fig.add_subplot(grid[0, 0])
    for name, values in series.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean over the epoch")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, out / "img" / "curves.png")
    return "img/curves.png"


def faithfulness_table(result: dict) -> str:
    deletion = result["deletion"]
    rows = []
    for m, row in deletion["by_m"].items():
        d, f = row["drop"], row["flip"]
        ratio = [("n/a" if v is None or v != v else f"{v:.2f}×") for v in
                 (row["ratio_random_prototypes"], row["ratio_random_boxes"])]
        rows.append((m, *(format_number(d[c]) for c in ("explained", "random_prototypes", "random_boxes")), *ratio,
                     *(f"{100 * f[c]:.1f} %" for c in ("explained", "random_prototypes", "random_boxes"))))
    head = ("m", "drop: explained", "drop: random prototypes", "drop: random boxes", "ratio vs prototypes",
            "ratio vs boxes", "flips: explained", "flips: random prototypes", "flips: random boxes")
    quality = table(("metric", "value"), [
        ("stability", f"{result['stability']:.3f}"),
        ("consistency", "n/a (no part annotations)" if result.get("consistency") is None
         else f"{result['consistency']:.3f}"),
        (f"purity (top {result.get('purity_k', 10)})", f"{result['purity']:.3f}")], caption="prototype quality")
    return (table(head, rows, caption=f"deletion test on {result['images']} test images; score: {deletion['score']} "
                                      f"(mean {format_number(deletion['base_mean'])})") + quality
            + '<p>See docs/explanations.md in the protoknn repository for what each number measures.</p>')


def projection_table(pushes: List[dict]) -> str:
    """One row per push: where the prototypes landed, how far they moved, validation before and after."""
    def percent(value):
        return "—" if value is None else f"{100 * value:.2f} %"

    rows = []
    for push in pushes:
        before, after = push.get("val_accuracy_before"), push.get("val_accuracy_after")
        change = "—" if before is None or after is None else f"{100 * (after - before):+.2f}"
        rows.append((f"{push['phase']} (step {push['global_step']})", push["prototypes"], push["distinct_images"],
                     push["distinct_patches"],
                     *("—" if push.get(k) is None else format_number(push[k]) for k in ("cosine_mean", "cosine_min")),
                     percent(before), percent(after), change))
    head = ("push", "prototypes", "distinct images", "distinct patches", "cosine mean", "cosine min",
            "val before", "val after", "after − before (points)")
    return table(head, rows, caption="cosine: between each prototype before projection and the patch it moved to")


UNPROJECTED_CURVES = ("The per-epoch validation accuracies are those of the un-projected model (metrics.csv: "
                      "projected False); the accuracy after each push is in the Projection section.")


def projection_section(pushes: List[dict], checkpoint_file: str, choice: str) -> List[str]:
    """The report's "Projection" section: which model file it shows, and every push's measurement."""
    unprojected = (", whose prototypes were never projected onto training patches: its explanations show no "
                   "real training patch." if choice == "unprojected" else ".")
    return ["<h2>Projection</h2>",
            f"<p>This report shows <code>{esc(checkpoint_file)}</code>{unprojected}</p>",
            projection_table(pushes) if pushes else "<p>No push recorded (a run from an older version).</p>"]


def _config_rows(saved: dict) -> List[tuple]:
    rows = [("dataset", saved.get("dataset"))]
    for group in ("model_config", "train_config", "data"):
        for key, value in (saved.get(group) or {}).items():
            rows.append((f"{group}.{key}", json.dumps(value, default=str)))
    return rows


def _example_pages(out, model, splits, tiles, predicted, indices, nav, others) -> List[str]:
    """Write one page per test image in ``indices``; returns their index-page list items."""
    entries = []
    for index in indices:
        links = {label: f"{prefix}/{page_name(index)}" for label, prefix in (others or {}).items()}
        name = write_example(out, model, splits, tiles, int(index), int(predicted[index]), nav, links)
        label, guess = int(splits.test_labels[index]), int(predicted[index])
        verdict = "misclassified" if label != guess else "correct"
        entries.append(f"<li>{link(name, f'test #{index}')}: true {esc(class_name(splits, label))}, predicted "
                       f"{esc(class_name(splits, guess))} ({verdict})</li>")
    return entries


def write_report(run_dir, out, images: int = DEFAULT_IMAGES, data_dir=None, seed: int = 0,
                 faithfulness: bool = True, indices: Optional[Sequence[int]] = None,
                 others: Optional[Dict[str, str]] = None, up: Optional[str] = None, choice: str = "best",
                 say=None, cache_faithfulness: bool = True) -> Path:
    """Write the site of one finished run into ``out``; returns the index page's path.

    ``faithfulness``: use RUN_DIR/faithfulness.json, computing it when absent (about a minute on
    the default runs). ``indices``: test images to give pages (default: ``images`` of them,
    misclassified first). ``others``: {label: folder prefix} of the same pages under other runs.
    ``cache_faithfulness``: keep a faithfulness measured here in RUN_DIR (False for a read-only run).
    ``choice``/``say``: which model to load and where its one-line note goes (``runs.load_model``).
    """
    from ..faithfulness import RESULT_NAME, measure_run, nearest_patches, purity
    from ..runs import load_run

    if not isinstance(images, int) or isinstance(images, bool) or images < 0:
        raise ProtoKNNError(f"--images must be a number >= 0, got {images!r}")
    run_dir, out = Path(run_dir), ensure_writable_dir(out)
    run = load_run(run_dir, data_dir, choice, say)
    model, saved, splits = run.model, run.saved, run.splits
    nearest = nearest_patches(model, splits.train_plain, k=10)
    result = _stored_faithfulness(run_dir / RESULT_NAME, model.checkpoint_file) if faithfulness else None
    if faithfulness and result is None:
        result = measure_run(run_dir, splits=splits, data_dir=data_dir, seed=seed, nearest=nearest, model=model,
                             write=cache_faithfulness)
    tiles = TileWriter(splits, out)
    nav = _nav(up)
    write_gallery(out, model, splits, nearest, tiles, nav, purity(nearest.labels))

    predicted = predictions(model, splits.test)
    if indices is None:
        indices = choose_examples(splits.test_labels, predicted, images, seed)
    entries = _example_pages(out, model, splits, tiles, predicted, indices, nav, others)
    tree = tree_link(out, model, splits, tiles, nav)  # "" unless the head is a decision tree
    head = saved["model_config"]["head"]
    metrics = _read_json(run_dir / "metrics.json") or {}
    body = [f"<p>Run directory: <code>{esc(run_dir)}</code>. Head <strong>{esc(head)}</strong> on "
            f"<strong>{esc(saved['dataset'])}</strong>. " + link(GALLERY, "Browse the prototypes") + f".{tree}</p>",
            "<h2>Metrics</h2>",
            table(("metric", "value"), [(k, f"{100 * v:.2f} %" if k.startswith("accuracy[") else
                                         (format_number(v) if isinstance(v, float) else v))
                                        for k, v in metrics.items()])
            if metrics else "<p>No metrics.json in the run directory (run <code>protoknn evaluate</code>).</p>",
            "<h2>Faithfulness of the explanations</h2>",
            faithfulness_table(result) if result else "<p>Not measured (run <code>protoknn faithfulness</code>).</p>"]
    pushes = (saved.get("train_state") or {}).get("pushes") or []
    body += projection_section(pushes, model.checkpoint_file, choice)
    curves = learning_curves(curve_points(run_dir, saved), out)
    body += ["<h2>Learning curves</h2>",
             figure(curves, "training loss terms per epoch", UNPROJECTED_CURVES if pushes else "") if curves
             else "<p>No training history.</p>"]
    body += [f'<h2 id="examples">Test images ({len(entries)}, misclassified first)</h2>',
             f"<ul>{''.join(entries)}</ul>" if entries else "<p>No test image pages (--images 0).</p>",
             "<h2>Run configuration</h2>", table(("setting", "value"), _config_rows(saved))]
    return write_page(out / INDEX, f"Report: {head} on {saved['dataset']}", "".join(body), nav)


def write_comparison_report(run_dirs: Dict[str, str], out, images: int = DEFAULT_IMAGES, data_dir=None,
                            seed: int = 0, faithfulness: bool = True) -> Path:
    """One site for several runs of the same dataset: OUT/<label>/ per run and OUT/index.html.

    Every run gets pages for the same test images (chosen by the first run, misclassified
    first), and each page links to that image under the other runs.
    """
    from ..runs import load_run

    if not run_dirs:
        raise ProtoKNNError("write_comparison_report needs at least one run directory")
    out = ensure_writable_dir(out)
    labels = list(run_dirs)
    first = labels[0]
    run = load_run(run_dirs[first], data_dir)
    splits = run.splits
    predicted = predictions(run.model, splits.test)
    indices = choose_examples(splits.test_labels, predicted, images, seed)
    rows, per_image = [], []
    for label in labels:
        others = {other: f"../{other}" for other in labels if other != label}
        write_report(run_dirs[label], out / label, data_dir=data_dir, seed=seed, faithfulness=faithfulness,
                     indices=indices, others=others, up=f"../{INDEX}")
        metrics = _read_json(Path(run_dirs[label]) / "metrics.json") or {}
        faith = (_read_json(Path(run_dirs[label]) / "faithfulness.json") or {}).get("metrics", {})
        accuracy = max((v for k, v in metrics.items() if k.startswith("accuracy[")), default=None)
        rows.append((link(f"{label}/{INDEX}", label), "—" if accuracy is None else f"{100 * accuracy:.2f} %",
                     *(("—" if faith.get(k) is None else f"{faith[k]:.3g}") for k in
                       ("del_ratio_box[m=1]", "del_flip[m=1]", "stability", "purity"))))
    for index in indices:
        per_image.append((f"test #{index}", esc(class_name(splits, int(splits.test_labels[index]))),
                          *(link(f"{label}/{page_name(index)}", f"{label}") for label in labels)))
    body = ("<h2>Runs</h2>" + table(("run", "best accuracy", "deletion ratio vs boxes (m=1)", "flips (m=1)",
                                     "stability", "purity"), rows, raw=True)
            + '<h2 id="examples">The same test images under each run</h2>'
            + table(("image", "true class", *labels), per_image, raw=True))
    return write_page(out / INDEX, "Report: runs side by side", body, [(INDEX, "All runs")])
