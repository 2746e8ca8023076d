"""Hostile inputs against a finished run: every refusal is exit 2 with one line naming the
problem, no traceback, and a run directory whose every file is byte-identical afterwards.

One tiny run is trained per module and copied for each row. Read-only run directories: as
root, chmod does not stop writes, so the folder and its files get the immutable attribute
(``chattr +i``), which stops root too; as another user plain chmod is used.
"""
import contextlib
import hashlib
import os
import shutil
import subprocess

import pytest
import torch
from PIL import Image

from conftest import TINY, assert_one_line_error, run_cli


def tiny(**changes):
    """TINY with some options replaced, e.g. tiny(dim=32)."""
    args = list(TINY)
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag, str(value)]
    return args


def digest(folder):
    """{relative path: sha256} of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def unwritable(folder):
    """``folder`` and its files cannot be changed, also by root, while inside the block."""
    paths = [str(folder), *(str(p) for p in folder.rglob("*"))]
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try:
            yield
        finally:
            os.chmod(folder, 0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", *paths], capture_output=True).returncode:
        pytest.skip("cannot make a folder unwritable for root here (chattr +i unsupported on this file system)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *paths], check=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("base") / "run"
    done = run_cli("train", "--head", "protoknn", *TINY, "--out", run)
    assert done.returncode == 0, done.stderr
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def edit_checkpoint(run, change):
    """Rewrite run/checkpoint.pt after ``change(state)``: plain data only, so it still loads safely."""
    from protoknn_plugin.checkpoint import pack_settings, unpack_settings

    path = run / "checkpoint.pt"
    state = unpack_settings(torch.load(path, weights_only=True))
    change(state)
    torch.save(pack_settings(state) if "model_config" in state else state, path)


def wrong_shape(state):
    name = next(k for k, v in state["model"].items() if isinstance(v, torch.Tensor) and v.dim() >= 2)
    state["model"][name] = torch.zeros(state["model"][name].shape[0] + 1, *state["model"][name].shape[1:])


def config_file(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def an_image(tmp_path):
    path = tmp_path / "query.png"
    Image.new("L", (28, 28), 128).save(path)
    return path


# id -> (prepare(run, tmp_path) -> command arguments, key words of the one stderr line)
REFUSED = {
    "config list for a number": (
        lambda run, tmp: ["train", *TINY, "--config", config_file(tmp, "epochs: [1, 2]\n"), "--out", run, "--resume"],
        ["epochs", "[1, 2]", "whole number"]),
    "config mapping for a number": (
        lambda run, tmp: ["train", *TINY, "--config", config_file(tmp, "epochs: {a: 1}\n"), "--out", run, "--resume"],
        ["epochs", "{'a': 1}", "whole number"]),
    "checkpoint with an unknown model_config key": (
        lambda run, tmp: edit_checkpoint(run, lambda s: s["model_config"].update(colour="red")) or ["evaluate", run],
        ["corrupt or incompatible", "colour"]),
    "checkpoint without train_state": (
        lambda run, tmp: edit_checkpoint(run, lambda s: s.pop("train_state")) or ["evaluate", run],
        ["corrupt or incompatible", "train_state"]),
    "checkpoint with a tensor of the wrong shape": (
        lambda run, tmp: edit_checkpoint(run, wrong_shape) or ["evaluate", run],
        ["corrupt or incompatible", "size mismatch"]),
    "checkpoint with a tensor of the wrong shape, resumed": (
        lambda run, tmp: edit_checkpoint(run, wrong_shape) or ["train", *TINY, "--out", run, "--resume"],
        ["corrupt or incompatible", "size mismatch"]),
    "checkpoint with model_config as a list": (
        lambda run, tmp: edit_checkpoint(run, lambda s: s.update(model_config=[1, 2])) or ["evaluate", run],
        ["corrupt or incompatible", "model_config"]),
    "predict into a folder that does not exist": (
        lambda run, tmp: ["predict", run, an_image(tmp), "--output", tmp / "absent" / "p.csv"],
        ["does not exist", "--output"]),
    "resume with another dim": (
        lambda run, tmp: ["train", *tiny(dim=32), "--out", run, "--resume"], ["dim=16", "dim=32", "--dim"]),
    "overwrite with a batch the data cannot fill": (
        lambda run, tmp: ["train", *tiny(per_class=500), "--out", run, "--overwrite"], ["--per-class 500"]),
    "resume with another limit": (
        lambda run, tmp: ["train", *tiny(limit=100), "--out", run, "--resume"], ["limit=200", "limit=100", "--limit"]),
    "resume with another seed and batch": (
        lambda run, tmp: ["train", *tiny(seed=5, per_class=5), "--out", run, "--resume"], ["seed=0", "seed=5"]),
    "resume with another k": (
        lambda run, tmp: ["train", *tiny(k=3), "--out", run, "--resume"], ["head_options.k", "--k"]),
    "resume with fewer epochs": (
        lambda run, tmp: edit_checkpoint(run, lambda s: s["train_config"].update(epochs=2))
        or ["train", *TINY, "--out", run, "--resume"], ["epochs=2", "epochs=1", "not remove"]),
    "zero epochs": (
        lambda run, tmp: ["train", *tiny(epochs=0), "--out", run, "--overwrite"], ["--epochs", "at least 1"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_command_leaves_the_run_directory_as_it_was(case, run, tmp_path):
    prepare, words = REFUSED[case]
    args = prepare(run, tmp_path)
    before = digest(run)
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, *words)
    assert digest(run) == before


def test_predict_into_a_read_only_run_is_refused_before_predicting(run, tmp_path):
    image = an_image(tmp_path)
    before = digest(run)
    with unwritable(run):
        result = run_cli("predict", run, image)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, "not writable", "--output")
    assert digest(run) == before


# Reading a read-only run succeeds, says in one line what it could not keep, and writes nothing there.
READ_ONLY = {
    "evaluate": (lambda run, tmp: ["evaluate", run], ["metrics.json", "not writable"]),
    "faithfulness": (lambda run, tmp: ["faithfulness", run, "--images", "4"], ["faithfulness.json", "not writable"]),
    "report elsewhere": (lambda run, tmp: ["report", run, "--out", tmp / "site", "--images", "1"],
                         ["faithfulness", "not writable"]),
}


@pytest.mark.parametrize("case", sorted(READ_ONLY))
def test_reading_a_read_only_run_writes_elsewhere_and_says_so(case, run, tmp_path):
    prepare, words = READ_ONLY[case]
    args = prepare(run, tmp_path)
    before = digest(run)
    with unwritable(run):
        result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert_one_line_error_free_warning(result, *words)
    assert digest(run) == before


def assert_one_line_error_free_warning(result, *words):
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_resume_with_more_epochs_trains_on_and_says_so(run):
    result = run_cli("train", *tiny(epochs=2), "--out", run, "--resume")
    assert result.returncode == 0, result.stderr
    assert "training on from epoch 1 to 2" in result.stdout
    rows = (run / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [row.split(",")[1] for row in rows] == ["1", "2"]  # the first epoch kept, one more trained
    assert "epochs: 2" in (run / "config.yaml").read_text()
    from protoknn_plugin.checkpoint import load_checkpoint

    saved = load_checkpoint(run)
    assert saved["train_state"]["complete"] and saved["train_config"]["epochs"] == 2


def test_names_are_text_and_looping_links_are_skipped(tmp_path):
    """A class folder named like mathtext and a self-referencing link inside a class folder."""
    root = tmp_path / "data"
    for c, name in enumerate(("a", "$x^$")):
        (root / name).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (16, 16), (40 * c + 5 * i, 100, 30 * i)).save(root / name / f"{i}.png")
    os.symlink("self.png", root / "a" / "self.png")
    run = tmp_path / "run"
    args = ["--dataset", "imagefolder", "--data-dir", root, "--epochs", "1", "--steps-per-epoch", "1",
            "--backbone-opt", "width=4", "--prototypes", "6", "--dim", "4", "--threads", "1", "--batch-classes", "2",
            "--per-class", "2", "--k", "1"]
    trained = run_cli("train", *args, "--out", run)
    assert trained.returncode == 0, trained.stderr
    assert "skipped 1 unreadable" in trained.stderr and "self.png" in trained.stderr
    explained = run_cli("explain", run, "--image", "0", "--out", tmp_path / "e.png")
    assert explained.returncode == 0, explained.stderr
    drawn = run_cli("prototypes", run, "--out", tmp_path / "p.png")
    assert drawn.returncode == 0, drawn.stderr
    assert (tmp_path / "e.png").stat().st_size > 0 and (tmp_path / "p.png").stat().st_size > 0
