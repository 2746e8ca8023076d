"""`protoknn ablate` takes the cluster variants beyond the paper by name (real CLI, subprocess)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import TINY, assert_one_line_error, run_cli


def test_ablate_runs_the_differentiable_variants_and_labelled_rows(tmp_path):
    # LABEL=VARIANT puts one variant in the table twice; LABEL.KEY=VALUE reaches only that row.
    result = run_cli("ablate", "--variants", "full-relaxed,full-differentiable:sum,learnable=full",
                     "--head-opt", "learnable.frozen_prototypes=false", *TINY, "--out", tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["full-relaxed", "full-differentiable:sum", "learnable"]
    for r in runs:  # an accuracy is a count of correct test images over the test set
        correct = r["accuracy[k=1]"] * r["test_images"]
        assert correct == pytest.approx(round(correct), abs=1e-6) and 0 <= round(correct) <= r["test_images"]
        # the headline accuracy is the prediction chosen on validation (a k for kNN heads)
        assert r["prediction"].startswith("k=") and r["accuracy"] == r[f"accuracy[{r['prediction']}]"]
    options = {r["label"]: r["head_options"] for r in runs}
    assert options["learnable"] == {"cluster_variant": "full", "cluster_reduction": "mean", "frozen_prototypes": False}
    assert options["full-differentiable:sum"] == {"cluster_variant": "full-differentiable", "cluster_reduction": "sum"}
    for r in runs:  # step ms is the epoch's wall time in the run's metrics.csv over its steps (one epoch here)
        epoch = list(csv.DictReader((Path(r["run_dir"]) / "metrics.csv").open()))[0]
        assert r["step_ms"] == pytest.approx(1000 * float(epoch["epoch_seconds"]) / r["backbone_steps"])
        assert r["step_ms"] * r["backbone_steps"] <= 1000 * r["train_seconds"]
    report = (tmp_path / "results.md").read_text()
    assert "step ms" in report
    for metric in ("acc k=1 %", "spread (eq. 17)", "step ms", "peak MB"):  # compared pair by pair too
        assert f"Paired differences of `{metric}`" in report


def test_ablate_refuses_a_row_named_twice(tmp_path):
    result = run_cli("ablate", "--variants", "full,full:sum,full", *TINY, "--out", tmp_path)
    assert_one_line_error(result, "'full' twice", "learnable=full")


def test_ablate_unknown_variant_lists_the_new_ones(tmp_path):
    result = run_cli("ablate", "--variants", "full-implicitt", *TINY, "--out", tmp_path)
    assert_one_line_error(result, "full-implicit", "full-differentiable")
