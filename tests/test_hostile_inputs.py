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
        lambda run, tmp: ["predict", run, an_image(tmp), "--out", tmp / "absent" / "p.csv"],
        ["does not exist", "--out FILE"]),
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


# Rows also run through the installed CLI in a subprocess; the others run the same click command
# in this process (one import of torch for all rows instead of one per row).
THROUGH_SUBPROCESS = {"resume with another dim", "checkpoint with a tensor of the wrong shape, resumed",
                      "config list for a number"}


def invoke(*args):
    """The `protoknn` command in this process: (returncode, stdout, stderr) like run_cli's result."""
    import warnings

    from click.testing import CliRunner

    from protoknn_plugin.cli import cli
    from protoknn_plugin.data.base import DatasetWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DatasetWarning)  # as `protoknn` itself does
        result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_command_leaves_the_run_directory_as_it_was(case, run, tmp_path):
    prepare, words = REFUSED[case]
    args = prepare(run, tmp_path)
    before = digest(run)
    result = run_cli(*args) if case in THROUGH_SUBPROCESS else invoke(*args)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, *words)
    assert digest(run) == before


def test_predict_into_a_read_only_run_is_refused_before_predicting(run, tmp_path):
    image = an_image(tmp_path)
    before = digest(run)
    with unwritable(run):
        result = run_cli("predict", run, image)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, "not writable", "--out FILE")
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


def test_a_failed_first_checkpoint_does_not_promise_a_previous_one(tmp_path, monkeypatch):
    import errno

    from protoknn_plugin.checkpoint import save_atomic
    from protoknn_plugin.errors import ProtoKNNError

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(ProtoKNNError, match="no checkpoint had been saved yet") as first:
        save_atomic({"model_config": {"head": "x"}}, path)
    assert "intact" not in str(first.value) and not path.exists()
    monkeypatch.undo()
    save_atomic({"model_config": {"head": "x"}}, path)
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(ProtoKNNError, match="previous checkpoint is intact"):
        save_atomic({"model_config": {"head": "y"}}, path)


def _plan(*epochs, after=("project",)):
    from protoknn_plugin.heads.base import Phase

    return [Phase(f"p{i}", e, {"head": 1e-3}, after=after if i == len(epochs) - 1 else ()) for i, e in enumerate(epochs)]


def test_more_epochs_continue_a_finished_run_in_its_last_phase():
    from protoknn_plugin.train.resuming import continue_plan
    from protoknn_plugin.train.state import TrainState

    finished = TrainState(phase=1, epoch=0, global_step=30, complete=True)
    state, note = continue_plan(finished, _plan(4), _plan(6), (4, 6))
    # back into phase 0 after its 4th epoch; steps and history are kept, the phase end runs again
    assert (state.phase, state.epoch, state.complete, state.global_step) == (0, 4, False, 30)
    assert "from epoch 4 to 6" in note and "project" in note


def test_more_epochs_on_an_interrupted_run_keep_its_progress():
    from protoknn_plugin.train.resuming import continue_plan
    from protoknn_plugin.train.state import TrainState

    stopped = TrainState(phase=0, epoch=2, step=1)
    state, note = continue_plan(stopped, _plan(4), _plan(6), (4, 6))
    assert state == stopped and "4 -> 6" in note


def test_a_plan_that_changes_in_the_trained_part_is_refused():
    """ProtoPNet-like: pushes move with the epoch count, so the phases already trained differ."""
    from protoknn_plugin.errors import ProtoKNNError
    from protoknn_plugin.train.resuming import check_epochs, continue_plan
    from protoknn_plugin.train.state import TrainState

    finished = TrainState(phase=3, complete=True)
    with pytest.raises(ProtoKNNError, match="phase plan"):
        continue_plan(finished, _plan(2, 2, 1), _plan(3, 3, 1), (4, 6))
    with pytest.raises(ProtoKNNError, match="not remove"):
        check_epochs(4, 3)


def test_config_whose_yaml_would_run_code_is_refused_without_running_it(run, tmp_path):
    marker = tmp_path / "pwned"
    config = config_file(tmp_path, f'epochs: !!python/object/apply:os.system ["touch {marker}"]\n')
    before = digest(run)
    result = invoke("train", *TINY, "--config", config, "--out", run, "--resume")
    assert result.returncode == 2
    assert_one_line_error(result, "not valid YAML")
    assert not marker.exists() and digest(run) == before


def test_benchmark_refuses_a_batch_the_classes_cannot_fill_before_building_the_feature_cache(tmp_path):
    from protoknn_plugin.backbones import create_backbone

    root = tmp_path / "data"
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (16, 16), (40 * c + 5 * i, 100, 30 * i)).save(root / name / f"{i}.png")
    torch.save(create_backbone("small-cnn", in_channels=3, width=4).trunk.state_dict(), tmp_path / "w.pt")
    result = run_cli("benchmark", "--dataset", "imagefolder", "--data-dir", root, "--frozen-backbone",
                     "--weights", tmp_path / "w.pt", "--backbone-opt", "width=4", "--cache-dir", tmp_path / "cache",
                     "--heads", "protoknn", "--seeds", "0", "--epochs", "1", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert_one_line_error(result, "--batch-classes 10", "2 classes")
    assert not (tmp_path / "cache").exists()  # refused before one backbone pass
