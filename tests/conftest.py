"""Shared test setup: one torch thread (tests share 2 cores with subprocesses), tiny runs."""
import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)

# A tiny model and budget: the whole CLI path in a few seconds.
TINY = ["--limit", "200", "--epochs", "1", "--steps-per-epoch", "3", "--backbone-opt", "width=8",
        "--prototypes", "20", "--dim", "16", "--threads", "1"]


def run_cli(*args, timeout=300, env=None):
    """Run the real CLI in a subprocess; returns CompletedProcess with text output."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200", **(env or {}))
    return subprocess.run([sys.executable, "-m", "protoknn_plugin", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def run_cli_parallel(cases, timeout=900):
    """Run CLI cases {name: args} at once, in subprocesses (each pays the import cost once);
    returns {name: CompletedProcess}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    procs = {name: subprocess.Popen([sys.executable, "-m", "protoknn_plugin", *map(str, args)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, args in cases.items()}
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=timeout)  # before reading returncode, which it sets
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return results


def assert_one_line_error(result, *words):
    """Non-zero exit, no traceback, one line of stderr containing every key word."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


@pytest.fixture(scope="session")
def tiny_args():
    return list(TINY)


def _run_rank(rank, worker, world, init_file, args):
    """One spawned rank: join the group, run ``worker(rank, world, *args)``, then leave through
    the product's teardown (a barrier before the group is destroyed)."""
    import torch.distributed as dist

    from protoknn_plugin import distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    worker(rank, world, *args)
    distributed.teardown()


def spawn_ranks(worker, world, tmp_path, *args):
    """Run ``worker(rank, world, *args)`` in ``world`` processes under one gloo group.

    Every test that spawns ranks goes through here, so no rank destroys its group while a peer
    is still using it (gloo aborts the process when that happens)."""
    import torch.multiprocessing as mp

    init_file = tmp_path / "dist-init-store"
    mp.spawn(_run_rank, args=(worker, world, str(init_file), args), nprocs=world, join=True)


def cli_interrupted_at_step(args, trainer_index=1, step=1, timeout=600):
    """Run the CLI with SIGTERM sent right after ``step`` of the ``trainer_index``-th run it
    trains (tests/sigterm_at_step.py): the same interruption on every machine, at any speed."""
    script = os.path.join(os.path.dirname(__file__), "sigterm_at_step.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    return subprocess.run([sys.executable, script, str(trainer_index), str(step), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
