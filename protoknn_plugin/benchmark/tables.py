"""Summaries and tables of a comparison: means with 95% t-intervals over seeds, the number
of seeds on every row, paired differences between rows, and each row's stages."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List

from .projection import projection_lines
from .stats import Interval, mean_interval, paired_table

# Columns in order; accuracy columns are added per k / top1 found in the runs.
COST_KEYS = ("prototype_spread", "backbone_steps", "images_seen", "train_seconds", "step_ms", "push_seconds",
             "last_layer_seconds", "last_layer_steps", "pushes", "peak_memory_mb", "images_per_second")
HEADERS = {"accuracy": "acc %", "prototype_spread": "spread (eq. 17)", "backbone_steps": "backbone steps",
           "images_seen": "images seen", "train_seconds": "train s", "step_ms": "step ms", "push_seconds": "push s",
           "last_layer_seconds": "last-layer s", "last_layer_steps": "last-layer steps",
           "peak_memory_mb": "peak MB", "images_per_second": "test img/s", "val_accuracy": "val acc %",
           "pushes": "pushes"}
# Marks a row whose last-layer epochs or pushes differ from its paper's values (protocol.schedule_change).
SCHEDULE_MARK = "†"


def _accuracy_keys(runs: List[Dict[str, Any]]) -> List[str]:
    keys = {k for r in runs for k in r if k.startswith("accuracy[")}
    return sorted(keys, key=lambda k: (k != "accuracy[top1]", int(k.split("=")[1][:-1]) if "=" in k else 0))


def summarise(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per label (first-seen order): seeds, n, and an Interval for every numeric metric."""
    rows: Dict[str, Dict[str, Any]] = {}
    for run in runs:
        row = rows.setdefault(run["label"], {"label": run["label"], "head": run["head"], "seeds": [],
                                             "lr_scale": run.get("lr_scale", 1.0),
                                             "schedule": run.get("schedule", "own"),
                                             "prediction": run.get("prediction", run.get("primary", "")), "_values": {}})
        row["seeds"].append(run["seed"])
        for key, value in run.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("seed", "lr_scale"):
                row["_values"].setdefault(key, []).append(float(value))
    out = []
    for row in rows.values():
        values = row.pop("_values")
        row["n"] = len(row["seeds"])
        row["intervals"] = {k: mean_interval(v) for k, v in values.items() if len(v) == row["n"]}
        out.append(row)
    return out


def per_seed(runs: List[Dict[str, Any]], key: str = "accuracy") -> Dict[str, Dict[int, float]]:
    table: Dict[str, Dict[int, float]] = {}
    for run in runs:
        if run.get(key) is not None:
            table.setdefault(run["label"], {})[run["seed"]] = float(run[key])
    return table


def _cell(interval: Interval | None, key: str) -> str:
    if interval is None:
        return "—"
    if key.startswith("accuracy") or key == "val_accuracy":
        text = interval.format(scale=100.0)
    elif key == "prototype_spread":
        text = interval.format(digits=4)
    elif key in ("backbone_steps", "images_seen", "last_layer_steps", "pushes"):
        text = interval.format(digits=0)
    else:
        text = interval.format(digits=1)
    return text.rsplit(" (n=", 1)[0]  # the table has its own n column


def _header(key: str) -> str:
    if key.startswith("accuracy["):
        return "acc " + key[len("accuracy["):-1] + " %"
    return HEADERS.get(key, key)


def columns(summary: List[Dict[str, Any]], runs: List[Dict[str, Any]]) -> List[str]:
    present = {k for row in summary for k in row["intervals"]}
    return ["accuracy"] + _accuracy_keys(runs) + [k for k in COST_KEYS if k in present]


def markdown_table(summary, runs, marked=()) -> List[str]:
    """The results table; labels in ``marked`` get SCHEDULE_MARK."""
    keys = columns(summary, runs)
    lines = ["| head | n | " + " | ".join(_header(k) for k in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for row in summary:
        label = row["label"] + (f" {SCHEDULE_MARK}" if row["label"] in marked else "")
        lines.append(f"| {label} | {row['n']} | " + " | ".join(_cell(row["intervals"].get(k), k) for k in keys) + " |")
    return lines


def schedule_changes(meta: Dict[str, Any]) -> Dict[str, str]:
    """{label: what differs from its paper's schedule} of the rows the table marks."""
    return {label: b["schedule_change"] for label, b in (meta.get("budgets") or {}).items() if b.get("schedule_change")}


PAIRED_COLUMNS = ("a − b", "n", "difference", "95% interval", "p", "Holm p", "claimed")
HOLM_NOTE = ("`95% interval` and `p` (paired t-test) are uncorrected; a difference is `claimed` only when "
             "Holm's step-down over every pair of the table rejects 0 at 5% (`Holm p` < 0.05).")


def _p_text(p) -> str:
    return "—" if p is None else ("<0.0001" if p < 1e-4 else f"{p:.4f}")


def paired_cells(pair: Dict[str, Any], scale: float = 100.0, digits: int = 2) -> List[str]:
    """One pair's cells in PAIRED_COLUMNS order: the uncorrected interval and p, Holm's p and the claim."""
    d: Interval = pair["diff"]
    interval = "—" if d.half_width is None else f"[{scale * d.low:+.{digits}f}, {scale * d.high:+.{digits}f}]"
    claimed = "—" if pair["claimed"] is None else ("yes" if pair["claimed"] else "no")
    return [f"{pair['a']} − {pair['b']}", str(d.n), f"{scale * d.mean:+.{digits}f}", interval,
            _p_text(pair["p"]), _p_text(pair["holm_p"]), claimed]


def paired_lines(runs, key: str = "accuracy") -> List[str]:
    """The paired-difference table of ``key``: accuracies in points, other metrics in their own unit;
    Holm's correction runs over the pairs of this table."""
    points = key.startswith("accuracy")
    scale, digits = (100.0, 2) if points else (1.0, 4 if key == "prototype_spread" else 1)
    unit = "difference (points)" if points else "difference"
    header = [unit if name == "difference" else name for name in PAIRED_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for pair in paired_table(per_seed(runs, key)):
        lines.append("| " + " | ".join(paired_cells(pair, scale, digits)) + " |")
    return lines


def _stage_name(stage: Dict[str, Any]) -> str:
    """``joint: before project`` -> ``joint: before push``; ``train: end`` stays."""
    when = stage["when"].replace("project", "push").replace("build_memory", "kNN memory")
    return f"{stage['phase']}: {when}"


def stage_lines(runs) -> List[str]:
    """Validation accuracy of every prediction at each phase boundary, mean over seeds
    (ProtoPNet: before push, after push, after the last layer; ProtoKNN: k = 1, 3, 5, 10),
    then the numbers a head records with its stages (a tree's size, PIP-Net's sparsity)."""
    values: Dict[tuple, Dict[str, List[float]]] = {}
    for run in runs:
        for stage in run.get("stages") or []:
            cells = values.setdefault((run["label"], _stage_name(stage)), {})
            for key, v in stage.items():
                numeric = isinstance(v, (int, float)) and not isinstance(v, bool) and key != "phase_index"
                if key.startswith("accuracy[") or numeric:
                    cells.setdefault(key, []).append(v)
    if not values:
        return []
    keys = _accuracy_keys([{k: 0 for k in cells} for cells in values.values()])
    keys += sorted({k for cells in values.values() for k in cells} - set(keys))
    lines = ["| head | stage | n | " + " | ".join(_header(k) for k in keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for (label, stage), cells in values.items():
        n = max(len(v) for v in cells.values())
        shown = [_cell(mean_interval(cells[k]), k) if k in cells else "—" for k in keys]
        lines.append(f"| {label} | {stage} | {n} | " + " | ".join(shown) + " |")
    return lines


def choice_text(label: str, choice: Dict[str, Any]) -> str:
    """``protoknn x1 own k=3``: what the validation split chose for a row."""
    return " ".join([label, f"x{choice['lr_scale']:g}", choice.get("schedule", "own")]
                    + ([choice["prediction"]] if choice.get("prediction") else []))


def write_results(out: Path, runs: List[Dict[str, Any]], summary: List[Dict[str, Any]], meta: Dict[str, Any]) -> None:
    """results.json (every run, the summary and the paired differences), results.csv and results.md."""
    def plain(row):
        return {**{k: v for k, v in row.items() if k != "intervals"},
                **{k: vars(i) for k, i in row["intervals"].items()}}

    pairs = [{"a": p["a"], "b": p["b"], **vars(p["diff"]), "p": p["p"], "holm_p": p["holm_p"], "claimed": p["claimed"]}
             for p in paired_table(per_seed(runs))]
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": [plain(r) for r in summary],
                                                  "paired": pairs, "runs": runs}, indent=2, default=str))
    keys = columns(summary, runs)
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "head", "n", "seeds", "lr_scale", "schedule", "prediction"]
                        + [c for k in keys for c in (k, k + "_ci95")])
        for row in summary:
            cells = []
            for k in keys:
                i = row["intervals"].get(k)
                cells += ["" if i is None else i.mean, "" if i is None or i.half_width is None else i.half_width]
            writer.writerow([row["label"], row["head"], row["n"], " ".join(map(str, row["seeds"])), row["lr_scale"],
                             row["schedule"], row["prediction"]] + cells)
    seeds = ",".join(str(s) for s in meta.get("seeds", []))
    changes = schedule_changes(meta)
    lines = markdown_table(summary, runs, marked=changes)
    if changes:
        lines += [""] + [f"{SCHEDULE_MARK} {label} changes its paper's schedule: {change}."
                         for label, change in changes.items()]
    lines += ["", f"mean ± half-width of the 95% t-interval over n seeds ({seeds}); `acc %` is each row's "
              "prediction chosen on the validation split (kNN heads: the k with the best mean validation accuracy "
              f"over the seeds); dataset {meta.get('dataset')}, backbone {meta.get('backbone')}, "
              f"{meta.get('epochs')} epochs; choices per row (rate scale, schedule, prediction): "
              + ", ".join(choice_text(label, c) for label, c in (meta.get("chosen") or {}).items()) + ".",
              "", "Paired differences of `acc %` (same seed = same data order and initialisation). " + HOLM_NOTE, ""]
    lines += paired_lines(runs)
    for key in meta.get("paired_keys") or ():  # further metrics compared pair by pair (ablate)
        lines += ["", f"Paired differences of `{_header(key)}`:", ""] + paired_lines(runs, key)
    stages = stage_lines(runs)
    if stages:
        lines += ["", "Validation accuracy at every stage (mean over seeds):", ""] + stages
    projection = projection_lines(runs)
    if projection:
        lines += ["", "Projection at the last push (mean over seeds; cosine between each prototype and its patch "
                  "before projection; accuracies on the validation split, paired over seeds):", ""] + projection
    faithfulness = faithfulness_lines(summary)
    if faithfulness:
        lines += ["", "Faithfulness of the explanations (`--explanations`; mean ± 95% t-interval over seeds; "
                  "ratio = drop when the explained boxes are filled / drop for the control):", ""] + faithfulness
    (out / "results.md").write_text("\n".join(lines) + "\n")


FAITH_KEYS = [(f"faith_del_{kind}[m={m}]", f"{label} m={m}") for m in (1, 3, 5)
              for kind, label in (("ratio_box", "ratio vs random boxes"), ("ratio_proto", "ratio vs random protos"),
                                  ("flip", "flips"))] + [("faith_stability", "stability"), ("faith_purity", "purity")]


def faithfulness_lines(summary: List[Dict[str, Any]]) -> List[str]:
    """One markdown row per prototype head with faithfulness metrics (``faith_*`` keys); [] when none."""
    rows = [r for r in summary if any(k.startswith("faith_") for k in r["intervals"])]
    keys = [(k, h) for k, h in FAITH_KEYS if any(k in r["intervals"] for r in rows)]
    if not rows or not keys:
        return []
    lines = ["| head | n | " + " | ".join(h for _, h in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for key, _ in keys:
            interval = row["intervals"].get(key)
            scale = 100.0 if "flip" in key else 1.0
            cells.append("—" if interval is None else interval.format(scale=scale, digits=2).rsplit(" (n=", 1)[0])
        lines.append(f"| {row['label']} | {row['n']} | " + " | ".join(cells) + " |")
    return lines


def rich_table(summary: List[Dict[str, Any]], title: str, runs: List[Dict[str, Any]] | None = None):
    from rich.markup import escape
    from rich.table import Table

    # The terminal gets accuracy and the budget; results.md has every column.
    keys = [k for k in columns(summary, runs or []) if k.startswith("accuracy") or k in
            ("backbone_steps", "images_seen", "train_seconds", "step_ms", "push_seconds", "last_layer_seconds")]
    table = Table(title=escape(title))
    table.add_column("head", style="bold")
    table.add_column("n", justify="right")
    for key in keys:
        table.add_column(escape(_header(key)), justify="right")
    for row in summary:
        table.add_row(escape(row["label"]), str(row["n"]), *(_cell(row["intervals"].get(k), k) for k in keys))
    return table


def rich_paired(runs: List[Dict[str, Any]]):
    """The paired differences of ``acc %`` as a rich table, or None with a single row."""
    from rich.markup import escape
    from rich.table import Table

    pairs = paired_table(per_seed(runs))
    if not pairs:
        return None
    table = Table(title="paired differences of acc % (same seed, same data); claimed: Holm over all pairs, 5%")
    for name in PAIRED_COLUMNS:
        table.add_column(name, justify="right" if name != "a − b" else "left")
    for pair in pairs:
        table.add_row(*(escape(cell) for cell in paired_cells(pair)))
    return table
