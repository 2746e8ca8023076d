"""Fuzz `train --config`: config files of valid keys with values of random types.

Every file must end in exit 0 or in exit 2 with one line on stderr, never exit 1 (an
unexpected error) and never a traceback.

What this proves, honestly: all 200 files go through the real click command of `protoknn train`
in this process (click.testing.CliRunner; the same --config reading, option checks, data loading,
model building and pre-training checks as the installed CLI), with training itself replaced
by an exit 0 at the moment it would start. So a file either is refused in one line, or its
settings were accepted by everything that runs before the first step. A few files are then run
through the real CLI in a subprocess and trained to the end (tiny settings), which proves that
accepted settings also train.
"""
import random
import unittest.mock as mock

import pytest
import yaml
from click.testing import CliRunner

from conftest import run_cli

# Tiny settings every fuzzed file starts from; the fuzzed keys then replace some of them.
BASE = {"limit": 60, "epochs": 1, "steps_per_epoch": 1, "backbone_opts": ["width=4"], "prototypes": 6, "dim": 4,
        "batch_classes": 2, "per_class": 2, "threads": 1, "k": 1, "workers": 0, "device": "cpu"}
# Values of every YAML type: numbers near the edges, text of several kinds, lists, mappings, null.
VALUES = [-1, 0, 1, 2, 3, -0.5, 0.0, 0.25, 1.5, float("nan"), True, False, None, "", "abc", "16-mixed", "none",
          "$x^$", "width=2", "protoknn.k=1", [1, 2], ["abc"], {"a": 1}, [], {}]


def train_options():
    from protoknn_plugin.cli import cli
    from protoknn_plugin.cli.common import NOT_IN_CONFIG

    return {p.name: p for p in cli.commands["train"].params if p.name and p.name not in NOT_IN_CONFIG}


def same_type_values(option):
    """Values of the option's own type, so that half the draws get past the type check."""
    import click

    if getattr(option, "multiple", False):
        return [[], ["width=4"], ["abc"]]
    if getattr(option, "is_flag", False):
        return [True, False]
    if isinstance(option.type, click.Choice):
        return list(option.type.choices)
    if isinstance(option.type, click.types.IntParamType):
        return [-1, 0, 1, 2, 3]
    if isinstance(option.type, click.types.FloatParamType):
        return [-0.5, 0.0, 0.25, 1.5]
    return ["abc", "none", "$x^$", str(option.default)]


def fuzz_configs(count, seed=0):
    rng = random.Random(seed)
    options = train_options()
    configs = []
    for _ in range(count):
        config = dict(BASE)
        for key in rng.sample(sorted(options), rng.randint(1, 3)):
            pool = same_type_values(options[key]) if rng.random() < 0.5 else VALUES
            config[key] = rng.choice(pool)
        configs.append(config)
    return configs


def one_line_or_success(exit_code, stderr, output=""):
    assert "Traceback" not in stderr + output, stderr + output
    assert exit_code in (0, 2), (exit_code, stderr, output[-2000:])
    if exit_code == 2:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr


@pytest.fixture
def training_stops_at_start(monkeypatch, tmp_path):
    """Trainer.fit exits 0 at once; caches and relative paths stay inside tmp_path."""
    import torch

    from protoknn_plugin.train.trainer import Trainer

    def reached(self, resume=False):
        raise SystemExit(0)

    monkeypatch.setattr(Trainer, "fit", reached)
    monkeypatch.setenv("PROTOKNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_200_random_config_files_end_in_exit_0_or_one_line_exit_2(tmp_path, training_stops_at_start):
    from protoknn_plugin.cli import cli

    runner = CliRunner()
    outcomes = {0: 0, 2: 0}
    for i, config in enumerate(fuzz_configs(200)):
        path = tmp_path / f"fuzz{i}.yaml"
        path.write_text(yaml.safe_dump(config))
        result = runner.invoke(cli, ["train", "--config", str(path), "--out", str(tmp_path / f"run{i}")])
        try:
            one_line_or_success(result.exit_code, result.stderr, result.stdout)
        except AssertionError:
            raise AssertionError(f"config {config}: exit {result.exit_code}: {result.stderr}") from None
        outcomes[result.exit_code] += 1
    # The mix is part of what the test proves: both outcomes occur many times.
    assert outcomes[0] >= 20 and outcomes[2] >= 20, outcomes


def test_a_few_random_config_files_through_the_real_cli(tmp_path):
    """Seeded picks, half refused and half accepted, trained to the end by the installed CLI."""
    from protoknn_plugin.cli import cli

    runner = CliRunner()
    picked = {0: [], 2: []}
    for config in fuzz_configs(200, seed=1):
        if config.get("frozen_backbone") or config.get("tensorboard"):
            continue  # a cache pass or an optional package: outside a tiny subprocess budget
        path = tmp_path / "probe.yaml"
        path.write_text(yaml.safe_dump(config))
        with mock.patch("protoknn_plugin.train.trainer.Trainer.fit", side_effect=SystemExit(0)):
            code = runner.invoke(cli, ["train", "--config", str(path), "--out", str(tmp_path / "probe")]).exit_code
        if code in picked and len(picked[code]) < 2:
            picked[code].append(config)
        if all(len(v) == 2 for v in picked.values()):
            break
    for i, config in enumerate(picked[0] + picked[2]):
        path = tmp_path / f"real{i}.yaml"
        path.write_text(yaml.safe_dump(config))
        result = run_cli("train", "--config", path, "--out", tmp_path / f"real{i}")
        one_line_or_success(result.returncode, result.stderr, result.stdout)
