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
