"""Run backends (protoknn_plugin.run_backends): a row belongs to the backend that claims its
name, and the benchmark trains, budgets and sweeps it only through that backend."""
from __future__ import annotations

import json
import textwrap

import pytest

from protoknn_plugin.benchmark import BenchmarkSettings, RunSpec, run_comparison
from protoknn_plugin.benchmark.comparison import sweep_grid
from protoknn_plugin.run_backends import (RUN_BACKENDS, RunBackend, backend_for, create_backend, list_backends,
                                          register_backend)
from protoknn_plugin.train import TrainConfig

BUDGET = {"feature_steps": 6, "images_seen": 60, "backbone_steps": 6, "pushes": 0, "last_layer_steps": 0}


@pytest.fixture
def third_party():
    """A backend of another toolkit, registered by name: rows ``other:NAME``, no protocol sweeps;
    every run it is asked for is logged in ``calls``."""
    calls = []

    @register_backend("test-other")
    class OtherBackend(RunBackend):
        prefix = "other:"
        lr_scales = schedules = tuning = False
        explainable = reports_budget = False

        def budget(self, spec, settings, splits, pretrained, steps_per_epoch):
            return dict(BUDGET)

        def run(self, spec, seed, lr_scale, schedule, settings, splits, run_dir, progress=False, score=False):
            calls.append((spec.head, seed, lr_scale, schedule, score))
            return {"label": spec.label, "head": spec.head, "seed": seed, "primary": "top1",
                    "run_dir": str(run_dir), "accuracy": 0.5 + seed / 5}

    try:
        yield OtherBackend, calls
    finally:
        RUN_BACKENDS._entries.pop("test-other", None)


def test_a_row_goes_to_the_backend_that_claims_its_name(third_party):
    cls, _ = third_party
    assert {"plugin", "test-other"} <= set(list_backends())
    assert type(backend_for("other:net")) is cls and type(create_backend("test-other")) is cls
    assert create_backend("plugin").owns("other:net")  # the default claims anything ...
    assert type(backend_for("protoknn")).__name__ == "PluginBackend"  # ... that no other backend claims


def test_only_the_choices_a_backend_takes_are_swept(third_party):
    cls, _ = third_party
    settings = BenchmarkSettings(lr_scales=(0.5, 1.0))
    assert sweep_grid(RunSpec("o", "other:net"), settings, ("own", "cosine")) == [(1.0, "own")]
    cls.lr_scales = True
    assert sweep_grid(RunSpec("o", "other:net"), settings, ("own", "cosine")) == [(0.5, "own"), (1.0, "own")]
    assert sweep_grid(RunSpec("c", "cnn"), settings, ("own", "cosine")) == [
        (0.5, "own"), (1.0, "own"), (0.5, "cosine"), (1.0, "cosine")]


def test_a_third_party_backend_trains_its_rows_in_a_comparison(third_party, tmp_path):
    _, calls = third_party
    settings = BenchmarkSettings(limit=200, seeds=(0, 1), lr_scales=(0.5, 1.0), prototypes=20, dim=16,
                                 backbone_options={"width": 8}, train=TrainConfig(epochs=1, steps_per_epoch=3))
    summary = run_comparison([RunSpec("theirs", "other:net")], settings, str(tmp_path))
    # one scored run per seed at the backend's own rates: the lr-scale sweep does not apply to it
    assert calls == [("other:net", 0, 1.0, "own", True), ("other:net", 1, 1.0, "own", True)]
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["accuracy"] for r in runs] == [0.5, 0.7]
    assert all(r["images_seen"] == 60 and r["pushes"] == 0 for r in runs)  # the budget it reported, added
    assert summary[0]["label"] == "theirs" and summary[0]["n"] == 2


def test_a_backend_of_an_installed_package_is_found_through_its_entry_point(tmp_path, monkeypatch):
    (tmp_path / "thirdparty_backend.py").write_text(textwrap.dedent("""
        from protoknn_plugin.run_backends import RunBackend
        class EntryPointBackend(RunBackend):
            prefix = "ep:"
    """))
    dist = tmp_path / "thirdparty_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-backend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[protoknn_plugin.run_backends]\nep-test = thirdparty_backend:EntryPointBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(RUN_BACKENDS, "_entry_points_loaded", False)
    try:
        assert "ep-test" in list_backends()
        assert type(backend_for("ep:net")).__name__ == "EntryPointBackend"
    finally:
        RUN_BACKENDS._entries.pop("ep-test", None)


def test_a_prefixed_row_no_backend_claims_names_the_fix_not_an_unknown_head():
    from protoknn_plugin.errors import ProtoKNNError, UnknownNameError

    backend = backend_for("nobody:net")
    with pytest.raises(ProtoKNNError, match="no run backend claims the row 'nobody:net'.*'nobody:'"):
        backend.check("nobody:net")
    with pytest.raises(UnknownNameError, match="protopnett"):
        backend.check("protopnett")
    backend.check("protopnet")  # a registered head passes
