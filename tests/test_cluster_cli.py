"""`protoknn ablate` takes the cluster variants beyond the paper by name (real CLI, subprocess)."""
from __future__ import annotations

import json

from conftest import TINY, assert_one_line_error, run_cli


def test_ablate_runs_the_differentiable_variants(tmp_path):
    result = run_cli("ablate", "--variants", "full-relaxed,full-differentiable:sum", *TINY, "--out", tmp_path,
                     timeout=600)
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["full-relaxed", "full-differentiable:sum"]
    assert all(0.0 <= r["accuracy[k=1]"] <= 1.0 for r in runs)


def test_ablate_unknown_variant_lists_the_new_ones(tmp_path):
    result = run_cli("ablate", "--variants", "full-implicitt", *TINY, "--out", tmp_path)
    assert_one_line_error(result, "full-implicit", "full-differentiable")
