"""Where benchmark runs execute: a run directory's lock lets two benchmark processes share one
--out (each run trained exactly once, by one of them); under a local Ray each run is a task,
with the same per-run accuracies as in-process, and a run whose worker is killed is resumed
by the next worker to the very weights of an uninterrupted run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, assert_one_line_error, run_cli

HERE = Path(__file__).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
TWO_BY_TWO = ["benchmark", "--heads", "protoknn,cnn", *TINY, "--limit", "300", "--seeds", "0,1"]


def _per_run(out):
    runs = json.loads((out / "results.json").read_text())["runs"]
    return {(r["label"], r["seed"]): {k: v for k, v in r.items() if k.startswith(("accuracy", "val_accuracy"))}
            for r in runs}


def test_a_held_run_lock_blocks_others_until_its_process_dies(tmp_path):
    from protoknn_plugin.benchmark.locking import run_lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys; from protoknn_plugin.benchmark.locking import "
                               f"run_lock\nwith run_lock({str(tmp_path)!r}):\n print('held', flush=True)\n "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    with run_lock(tmp_path, wait=False) as held:
        assert not held
    holder.kill()  # SIGKILL: no chance to unlock; the kernel drops the lock with the process
    holder.wait()
    with run_lock(tmp_path, wait=False) as held:
        assert held


def test_two_benchmarks_on_the_same_out_train_each_run_exactly_once(tmp_path):
    out, log = tmp_path / "out", tmp_path / "fits.txt"
    env = dict(ENV, PROTOKNN_FIT_LOG=str(log))
    procs = [subprocess.Popen([sys.executable, str(HERE / "count_fits.py"), *TWO_BY_TWO, "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    fits = log.read_text().splitlines()
    assert "ray imported" not in fits  # the default executor never imports Ray
    assert len(fits) == 4 and len(set(fits)) == 4, fits  # 2 heads x 2 seeds, each trained by one process
    assert sorted(Path(f).name for f in fits) == sorted(p.name for p in (out / "runs").iterdir())


@pytest.mark.parametrize("module, options, extra", [("ray", ["--executor", "ray"], "cluster"),
                                                     ("optuna", ["--tune", "3"], "tune")])
def test_a_missing_extra_is_one_line_naming_it_before_anything_trains(tmp_path, module, options, extra):
    blocker = tmp_path / "blockers" / module
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\", name='{module}')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "blockers"), os.environ.get("PYTHONPATH", "")])}
    result = run_cli(*TWO_BY_TWO, *options, "--out", tmp_path / "out", env=env)
    assert_one_line_error(result, options[0], f"protoknn-plugin[{extra}]")
    assert not (tmp_path / "out" / "runs").exists()


def test_tune_and_an_lr_grid_together_are_one_line(tmp_path):
    result = run_cli(*TWO_BY_TWO, "--tune", "3", "--lr-scales", "0.3,1,3", "--out", tmp_path / "out")
    assert_one_line_error(result, "--tune", "--lr-scales")


def test_address_without_the_ray_executor_is_one_line(tmp_path):
    result = run_cli(*TWO_BY_TWO, "--address", "auto", "--out", tmp_path / "out")
    assert_one_line_error(result, "--address", "--executor ray")


@pytest.mark.slow
def test_local_ray_gives_the_in_process_accuracies_run_by_run(tmp_path):
    pytest.importorskip("ray", reason="--executor ray needs the extra protoknn-plugin[cluster] (ray)")
    reference = run_cli(*TWO_BY_TWO, "--out", tmp_path / "in-process", timeout=900)
    assert reference.returncode == 0, reference.stderr
    on_ray = run_cli(*TWO_BY_TWO, "--executor", "ray", "--ray-cpus", "2", "--cpus-per-run", "1",
                     "--out", tmp_path / "ray", timeout=900)
    assert on_ray.returncode == 0, on_ray.stderr
    assert on_ray.stdout.count("(Ray task)") == 4
    assert _per_run(tmp_path / "ray") == _per_run(tmp_path / "in-process")


@pytest.mark.slow
def test_a_killed_ray_worker_s_run_is_resumed_to_the_uninterrupted_weights(tmp_path):
    pytest.importorskip("ray", reason="--executor ray needs the extra protoknn-plugin[cluster] (ray)")
    args = ["benchmark", "--heads", "cnn", *TINY, "--epochs", "2", "--seeds", "0,1"]
    reference = run_cli(*args, "--out", tmp_path / "in-process", timeout=900)
    assert reference.returncode == 0, reference.stderr
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               PROTOKNN_KILL_RUN="cnn-", PROTOKNN_KILL_STEP="4", PROTOKNN_KILL_MARK=str(tmp_path / "killed"))
    # step 4 lies in the second epoch: the first epoch's checkpoint is on disk when the worker dies
    killed = subprocess.run([sys.executable, str(HERE / "ray_kill_worker.py"), *args, "--executor", "ray",
                             "--out", str(tmp_path / "ray")], capture_output=True, text=True, env=env, timeout=900)
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert (tmp_path / "killed").exists()  # a worker did die mid-run
    runs = json.loads((tmp_path / "ray" / "results.json").read_text())["runs"]
    assert sum(r["resumed"] for r in runs) == 1
    for run_dir in (tmp_path / "ray" / "runs").iterdir():
        ours = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
        theirs = torch.load(tmp_path / "in-process" / "runs" / run_dir.name / "checkpoint.pt", weights_only=True)["model"]
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), run_dir.name
