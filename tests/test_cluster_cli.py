"""`protoknn ablate` takes the cluster variants beyond the paper by name (real CLI, subprocess)."""
from __future__ import annotations

import json

from conftest import TINY, assert_one_line_error, run_cli


def test_ablate_runs_the_differentiable_variants_and_labelled_rows(tmp_path):
    # LABEL=VARIANT puts one variant in the table twice; LABEL.KEY=VALUE reaches only that row.
    result = run_cli("ablate", "--variants", "full-relaxed,full-differentiable:sum,learnable=full",
                     "--head-opt", "learnable.frozen_prototypes=false", *TINY, "--out", tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["full-relaxed", "full-differentiable:sum", "learnable"]
    assert all(0.0 <= r["accuracy[k=1]"] <= 1.0 for r in runs)
    options = {r["label"]: r["head_options"] for r in runs}
    assert options["learnable"] == {"cluster_variant": "full", "cluster_reduction": "mean", "frozen_prototypes": False}
    assert options["full-differentiable:sum"] == {"cluster_variant": "full-differentiable", "cluster_reduction": "sum"}
    assert all(r["step_ms"] > 0 for r in runs)
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
