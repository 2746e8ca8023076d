"""The comparison's two figures (matplotlib, Agg): ``results.png``, test accuracy per row
with its 95% interval, and ``curves.png``, validation accuracy after every feature epoch
(mean over seeds, shaded min..max)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def results_figure(path: Path, summary: List[Dict[str, Any]]) -> None:
    plt = _pyplot()
    rows = [r for r in summary if "accuracy" in r["intervals"]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.6))
    for i, row in enumerate(rows):
        interval = row["intervals"]["accuracy"]
        err = None if interval.half_width is None else 100 * interval.half_width
        ax.bar(i, 100 * interval.mean, color=f"C{i}", yerr=err, capsize=6, alpha=0.85)
        text = f"{100 * interval.mean:.1f}" + ("" if err is None else f" ± {err:.1f}")
        ax.text(i, 100 * interval.mean + (err or 0) + 0.5, text, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{r['label']}\n(n={r['n']})" for r in rows], fontsize=8)
    low = min((100 * (r["intervals"]["accuracy"].low or r["intervals"]["accuracy"].mean) for r in rows), default=0)
    ax.set_ylim(max(0.0, low - 10), 100)
    ax.set_ylabel("test accuracy % (95% t-interval)")
    ax.set_title("accuracy per head", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_figure(path: Path, runs: List[Dict[str, Any]]) -> bool:
    """Returns False (and writes nothing) when no run recorded validation accuracy."""
    curves: Dict[str, Dict[int, List[float]]] = {}
    for run in runs:
        for point in run.get("history") or []:
            if point.get("val_accuracy") is not None:
                curves.setdefault(run["label"], {}).setdefault(point["epoch"], []).append(point["val_accuracy"])
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (label, by_epoch) in enumerate(curves.items()):
        epochs = sorted(by_epoch)
        means = [100 * sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
        n = min(len(by_epoch[e]) for e in epochs)
        ax.plot(epochs, means, marker="o", color=f"C{i}", label=f"{label} (n={n})")
        ax.fill_between(epochs, [100 * min(by_epoch[e]) for e in epochs], [100 * max(by_epoch[e]) for e in epochs],
                        color=f"C{i}", alpha=0.15)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("feature epoch")
    ax.set_ylabel("validation accuracy % (prototype heads: un-projected, memory at epoch end)")
    ax.yaxis.label.set_size(8)
    ax.set_title("validation accuracy per epoch (mean over seeds, band min..max)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_figures(out: Path, runs: List[Dict[str, Any]], summary: List[Dict[str, Any]]) -> List[Path]:
    written = []
    if any("accuracy" in r["intervals"] for r in summary):
        results_figure(out / "results.png", summary)
        written.append(out / "results.png")
    if curves_figure(out / "curves.png", runs):
        written.append(out / "curves.png")
    return written
