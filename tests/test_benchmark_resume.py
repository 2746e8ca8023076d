"""`protoknn benchmark` survives interruption: SIGTERM mid-run ends with one line and exit 130,
the same command again skips finished runs, resumes the interrupted one, and gives the same
results as a run that was never interrupted."""
import json
import os
import subprocess
import sys

from conftest import TINY, cli_interrupted_at_step

ARGS = ["benchmark", "--heads", "protoknn,cnn", *TINY, "--epochs", "2", "--steps-per-epoch", "4", "--seeds", "0,1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")


def _cli(out, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "protoknn_plugin", *ARGS, "--out", str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _finished(out):
    return sorted((out / "runs").glob("*/metrics.json")) if (out / "runs").exists() else []


def _accuracies(out):
    runs = json.loads((out / "results.json").read_text())["runs"]
    keys = [k for r in runs for k in r if k.startswith(("accuracy", "val_accuracy"))]
    return {(r["label"], r["seed"]): {k: r[k] for k in keys if k in r} for r in runs}, runs


def test_sigterm_then_rerun_equals_an_uninterrupted_benchmark(tmp_path):
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    # SIGTERM right after step 6 of the second run: that run is in its second epoch.
    first = cli_interrupted_at_step([*ARGS, "--out", interrupted], trainer_index=2, step=6)
    stderr = first.stderr
    assert first.returncode == 130, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0] and "Traceback" not in stderr, stderr
    done = {p: p.stat().st_mtime_ns for p in _finished(interrupted)}
    assert len(done) == 1 and not (interrupted / "results.json").exists()

    second = _cli(interrupted)
    stdout, stderr = second.communicate(timeout=900)
    assert second.returncode == 0, stderr
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished runs were read, not retrained
    assert stdout.count("(done, read from metrics.json)") == len(done)
    assert len(_finished(interrupted)) == 4

    third = _cli(reference)
    third.communicate(timeout=900)
    assert third.returncode == 0
    resumed, runs = _accuracies(interrupted)
    assert resumed == _accuracies(reference)[0]
    assert any(r["resumed"] for r in runs)  # the interrupted run continued from its checkpoint
