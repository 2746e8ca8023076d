"""Rows of one or more `protoknn ablate` / `benchmark` outputs compared on validation, with the cost
of the push.

For every row: the validation accuracy of its chosen prediction, the validation accuracy right
before and right after the final push with the paired difference over seeds, and the paired
difference to a base row on validation (what a choice may use) and on test (reported, never
used to choose). Rows of different output folders pair by seed, which is sound when they share
the data, the split and the seeds (a second `ablate` with other --prototypes/--dim, say).

    python benchmarks/projection_study.py runs/ablate-a/results.json runs/ablate-b/results.json \
        --base full --out study.json
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from protoknn_plugin.benchmark.stats import Interval, mean_interval, paired_difference


def load_rows(paths: List[str]) -> Dict[str, Dict[int, dict]]:
    """row name -> seed -> run record. A label seen in an earlier file is renamed ``label (folder)``."""
    rows: Dict[str, Dict[int, dict]] = defaultdict(dict)
    for path in paths:
        runs = json.loads(Path(path).read_text())["runs"]
        folder = Path(path).parent.name
        taken = set(rows)
        for run in runs:
            name = run["label"] if run["label"] not in taken else f"{run['label']} ({folder})"
            rows[name][int(run["seed"])] = run
    return dict(rows)


def per_seed(runs: Dict[int, dict], key: str) -> Dict[int, float]:
    return {seed: 100.0 * run[key] for seed, run in runs.items() if run.get(key) is not None}


def show(interval: Interval) -> str:
    if interval.half_width is None:
        return f"{interval.mean:+.2f} (n={interval.n})"
    return f"{interval.mean:+.2f} [{interval.low:+.2f}, {interval.high:+.2f}]"


def summarise(rows: Dict[str, Dict[int, dict]], base: str) -> List[dict]:
    out = []
    for name, runs in rows.items():
        val, test = per_seed(runs, "val_accuracy"), per_seed(runs, "accuracy")
        before, after = per_seed(runs, "val_before_push"), per_seed(runs, "val_after_push")
        entry = {"row": name, "n": len(runs), "val": mean_interval(list(val.values())),
                 "test": mean_interval(list(test.values())),
                 "push": paired_difference(after, before) if before and after else None}
        if name != base:
            entry["val_vs_base"] = paired_difference(val, per_seed(rows[base], "val_accuracy"))
            entry["test_vs_base"] = paired_difference(test, per_seed(rows[base], "accuracy"))
        out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json of ablate or benchmark outputs")
    parser.add_argument("--base", default="full", help="the row the others are compared with")
    parser.add_argument("--out", help="write the summary as JSON here")
    args = parser.parse_args()
    rows = load_rows(args.results)
    if args.base not in rows:
        raise SystemExit(f"error: no row {args.base!r} in {', '.join(rows)}; pass --base with one of them")
    summary = summarise(rows, args.base)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"validation choice against {args.base} (points; [95% interval] over seeds)")
    for column in ("row", "n", "val acc %", "push: after - before (val)", f"val - {args.base}",
                   "test acc %", f"test - {args.base}"):
        table.add_column(column)
    for e in summary:
        table.add_row(e["row"], str(e["n"]), e["val"].format(), show(e["push"]) if e["push"] else "-",
                      show(e["val_vs_base"]) if "val_vs_base" in e else "-", e["test"].format(),
                      show(e["test_vs_base"]) if "test_vs_base" in e else "-")
    Console().print(table)
    if args.out:
        as_json = [{k: (vars(v) if isinstance(v, Interval) else v) for k, v in e.items()} for e in summary]
        Path(args.out).write_text(json.dumps(as_json, indent=2))


if __name__ == "__main__":
    main()
