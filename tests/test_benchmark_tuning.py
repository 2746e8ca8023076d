"""`protoknn benchmark --tune N`: every row gets N trials on the validation split, an interrupted
tuning resumes without training a finished trial again (and chooses what an uninterrupted one
chooses), the test split is read only after the choice is written, and the search spaces
are the heads' own options around their defaults."""
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys

import pytest

from conftest import TINY, cli_interrupted_at_step, run_cli

needs_optuna = pytest.mark.skipif(importlib.util.find_spec("optuna") is None,
                                  reason="--tune needs the extra protoknn-plugin[tune] (optuna)")

ARGS = ["benchmark", "--heads", "protoknn,cnn", *TINY, "--epochs", "2", "--seeds", "0", "--tune", "3"]


def _trials(out):
    """{row label: [(state, value), ...]} of the study database, in trial order."""
    with sqlite3.connect(out / "tuning.db") as db:
        rows = db.execute("SELECT s.study_name, t.state, v.value FROM trials t JOIN studies s USING (study_id) "
                          "LEFT JOIN trial_values v USING (trial_id) ORDER BY t.trial_id").fetchall()
    found = {}
    for study, state, value in rows:
        found.setdefault(study.rsplit("-", 1)[0], []).append((state, value))
    return found


def _finished(trials):
    return [t for t in trials if t[0] in ("COMPLETE", "PRUNED")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "out"
    result = run_cli(*ARGS, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


@needs_optuna
def test_every_row_gets_the_same_number_of_trials_and_the_choice_is_in_results_md(reference):
    trials = _trials(reference)
    assert set(trials) == {"protoknn", "cnn"}
    assert all(len(_finished(t)) == 3 and len(t) == 3 for t in trials.values())
    chosen = json.loads((reference / "results.json").read_text())["meta"]["chosen"]
    md = (reference / "results.md").read_text()
    runs = json.loads((reference / "results.json").read_text())["runs"]
    for label, choice in chosen.items():
        tuned = choice["tuned"]
        assert tuned["trials"] == 3 and set(tuned["params"]) == set(_space(label))
        best = max(v for state, v in trials[label] if state == "COMPLETE")
        assert tuned["val_accuracy"] == best
        run = next(r for r in runs if r["label"] == label)
        assert all(run["head_options"][k] == v for k, v in tuned["params"].items())  # the seeds ran the choice
        assert f"| {label} | 3 |" in md


def _space(label):
    from protoknn_plugin.heads import get_head_class

    return get_head_class(label).search_space(False)


@needs_optuna
def test_sigterm_mid_trial_then_rerun_resumes_it_and_chooses_what_an_uninterrupted_tuning_chose(tmp_path,
                                                                                                 reference):
    out = tmp_path / "out"
    # Trainers are built round by round (protoknn trial 1, cnn trial 1, protoknn trial 2, ...):
    # SIGTERM after the second step of the third one interrupts protoknn's second trial.
    first = cli_interrupted_at_step([*ARGS, "--out", out], trainer_index=3, step=2)
    assert first.returncode == 130, first.stderr
    trials = _trials(out)
    assert [len(_finished(t)) for t in trials.values()] == [1, 1]
    done = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/run.json")}
    assert len(done) == 2

    second = run_cli(*ARGS, "--out", out)
    assert second.returncode == 0, second.stderr
    assert {p: p.stat().st_mtime_ns for p in done} == done  # the finished trials were not trained again
    trials = _trials(out)
    assert all(len(_finished(t)) == 3 for t in trials.values())
    assert [state for state, _ in trials["protoknn"]].count("FAIL") == 1  # the interrupted one, taken up again
    resumed = [json.loads(p.read_text()) for p in (out / "runs").glob("protoknn-*/run.json")]
    assert sum(r["resumed"] for r in resumed) == 1
    assert ({k: _finished(v) for k, v in trials.items()} == {k: _finished(v) for k, v in _trials(reference).items()})
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["chosen"] == json.loads((reference / "results.json").read_text())["meta"]["chosen"]


class SpyDataset:
    """Wraps the test split and notes, at every read, whether results.md already names the choice."""

    def __init__(self, inner, results_md):
        self._inner, self._results_md, self.reads = inner, results_md, []

    def _note(self):
        self.reads.append(self._results_md.exists() and "## Tuning" in self._results_md.read_text())

    def __len__(self):
        return len(self._inner)

    def __getitem__(self, index):
        self._note()
        return self._inner[index]

    def __getattr__(self, name):  # any other way into the data counts as a read too
        self._note()
        return getattr(self._inner, name)


@needs_optuna
def test_the_test_split_is_read_only_after_the_choice_is_written(tmp_path):
    import torch

    from protoknn_plugin.benchmark import BenchmarkSettings, RunSpec, run_comparison
    from protoknn_plugin.data import create_dataset
    from protoknn_plugin.data.base import carve_validation
    from protoknn_plugin.train import TrainConfig

    torch.set_num_threads(1)
    out = tmp_path / "out"
    splits = carve_validation(create_dataset("animals", limit=200), 0.1)
    spy = SpyDataset(splits.test, out / "results.md")
    splits.test = spy
    settings = BenchmarkSettings(limit=200, prototypes=20, dim=16, backbone_options={"width": 8}, seeds=(0,),
                                 train=TrainConfig(epochs=1, steps_per_epoch=3, val_fraction=0.1))
    run_comparison([RunSpec("cnn", "cnn")], settings, str(out), splits=splits, tune=2)
    assert spy.reads and all(spy.reads), spy.reads[:5]


def test_every_search_range_holds_the_heads_default_and_names_an_option():
    from protoknn_plugin.heads import get_head_class, list_heads
    from protoknn_plugin.heads.options import option_defaults, option_keys
    from protoknn_plugin.heads.space import Choice

    for name in list_heads():
        cls = get_head_class(name)
        defaults = option_defaults(cls)
        for pretrained in (False, True):
            for key, rng in cls.search_space(pretrained).items():
                assert key in option_keys(cls), (name, key)
                if isinstance(rng, Choice):
                    assert defaults[key] in rng.choices, (name, key)
                elif key != "weight_decay" or defaults[key] > 0:  # 0 lies below any log range
                    assert rng.low <= defaults[key] <= rng.high, (name, key, rng)


def test_heads_lists_the_search_space():
    result = subprocess.run([sys.executable, "-m", "protoknn_plugin", "heads"], capture_output=True, text=True,
                            env=dict(os.environ, COLUMNS="400"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "search space (--tune)" in result.stdout and "separation_weight: 0.02..0.16" in result.stdout


def _pruning_job(finished):
    from protoknn_plugin.benchmark import RunSpec
    from protoknn_plugin.benchmark.tuning import TrialJob
    from protoknn_plugin.heads.space import FloatRange

    return TrialJob(RunSpec("cnn", "cnn"), 0, "unused", {"lr": 1e-3}, {"lr": FloatRange(1e-4, 1e-2, log=True)},
                    epochs=4, finished=finished)


@needs_optuna
def test_the_median_pruner_stops_a_trial_below_the_median_of_earlier_trials_at_the_same_epoch():
    curves = [[0.5, 0.6, 0.7], [0.4, 0.7, 0.8], [0.3, 0.5, 0.9]]  # epoch 2: median 0.6
    finished = [{"params": {"lr": 1e-3}, "state": "complete", "value": c[-1], "curve": c} for c in curves]
    job = _pruning_job(finished)
    # Optuna's median rule compares the trial's best value so far with that median.
    assert job.should_prune([0.5, 0.55])       # best 0.55, below 0.6 at epoch 2
    assert not job.should_prune([0.1, 0.65])   # best 0.65, above it
    assert not job.should_prune([0.62, 0.2])   # best 0.62 (epoch 1), above it
    assert not job.should_prune([0.0])         # epoch 1 is the pruner's warm-up
    assert not _pruning_job(finished[:2]).should_prune([0.0, 0.0])  # too few finished trials yet


def test_options_fixed_with_head_opt_are_left_out_of_the_search_and_kept_in_the_choice():
    from protoknn_plugin.benchmark import RunSpec
    from protoknn_plugin.benchmark.tuning import row_space, tuned_specs

    fixed = RunSpec("cnn", "cnn", {"lr": 0.01})
    assert set(row_space(fixed, False)) == {"weight_decay", "warmup_epochs"}
    chosen = {"cnn": {"params": {"weight_decay": 1e-4, "warmup_epochs": 0.25}}}
    assert tuned_specs([fixed], chosen)[0].head_options == {"lr": 0.01, "weight_decay": 1e-4, "warmup_epochs": 0.25}
    assert set(row_space(RunSpec("pp", "protopnet"), True)) - set(row_space(RunSpec("pp", "protopnet"), False)) == {
        "joint_backbone_lr"}  # a pretrained backbone's rate is searched only when there is one
