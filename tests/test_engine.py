"""The training engine through the real CLI: run directories, config files, records,
validation with best.pt, workers, mixed precision and safe checkpoints."""
import csv
import math
import os

import pytest
import torch
import yaml

from protoknn_plugin.checkpoint import load_checkpoint, save_atomic
from protoknn_plugin.errors import ProtoKNNError

from conftest import TINY, assert_one_line_error, run_cli


def _args(**changes):
    args = ["train", "--head", "protoknn", *TINY]
    for option, value in changes.items():
        flag = "--" + option.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag, str(value)]
    return args


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run with a validation split and TensorBoard events, shared by the tests below."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    out = tmp_path_factory.mktemp("run") / "run"
    done = run_cli(*_args(epochs=2, val_fraction=0.2, workers=0), "--tensorboard", "--out", out)
    assert done.returncode == 0, done.stderr
    return out, done


def test_run_dir_holds_checkpoints_config_and_records(run):
    out, done = run
    names = sorted(p.name for p in out.iterdir())
    assert names == ["best-unprojected.pt", "best.pt", "checkpoint.pt", "config.yaml", "metrics.csv", "metrics.json",
                     "tensorboard"]
    # stdout is a pipe here: one plain line per epoch instead of a bar
    lines = [line for line in done.stdout.splitlines() if line.startswith("train epoch ")]
    assert [line.split()[2] for line in lines] == ["1", "2"]
    # and one line for the push: how far the prototypes moved, validation before -> after
    push = [line for line in done.stdout.splitlines() if line.startswith("push after train (step 6): cosine")]
    assert len(push) == 1 and "prototypes, validation" in push[0] and "% -> " in push[0]


def test_metrics_csv_has_one_row_per_epoch_with_every_number(run):
    out, _ = run
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    history = load_checkpoint(out)["train_state"]["history"]
    assert len(rows) == len(history) == 2
    for row, entry in zip(rows, history):
        for term in ("task", "cluster", "aux", "total", "val_accuracy", "seconds", "images_per_second"):
            assert float(row[term]) == pytest.approx(entry[term]), term
        for group, lr in entry["lr"].items():
            assert float(row[f"lr[{group}]"]) == pytest.approx(lr)
        # --limit 200 with --val-fraction 0.2 holds out 40 images: an accuracy counts them, and the
        # head's primary column (k=5) is the one that chooses best.pt
        correct = float(row["val_accuracy"]) * 40
        assert correct == pytest.approx(round(correct), abs=1e-6)
        assert row["val_accuracy"] == row["val_accuracy[k=5]"]
        # images/s is the epoch's images (3 steps of 10 classes x 11 images) over its seconds
        assert float(row["images_per_second"]) * float(row["epoch_seconds"]) == pytest.approx(3 * 10 * 11)


def test_tensorboard_events_hold_the_csv_numbers(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    for key in ("total", "val_accuracy", "images_per_second", "lr[backbone]"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [int(r["global_step"]) for r in rows]
        assert [s.value for s in scalars] == pytest.approx([float(r[key]) for r in rows], rel=1e-5)


def test_best_checkpoint_is_the_best_validation_epoch_and_evaluate_uses_it(run):
    out, _ = run
    last = load_checkpoint(out)
    best = load_checkpoint(out, best=True)
    state = last["train_state"]
    accuracies = [h["val_accuracy"] for h in state["history"]]
    # The epochs are un-projected: they compete only for best-unprojected.pt. ProtoKNN pushes once,
    # at the end, so best.pt is the finished model, scored right after its push.
    assert state["best_unprojected_val_accuracy"] == max(accuracies)
    assert [p["val_accuracy_after"] for p in state["pushes"]] == [state["best_val_accuracy"]]
    assert best["train_state"]["best_val_accuracy"] == state["best_val_accuracy"] and best["train_state"]["projected"]
    done = run_cli("evaluate", out, "--workers", "0")
    assert done.returncode == 0, done.stderr
    import json

    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == "best.pt"
    done = run_cli("evaluate", out, "--last", "--workers", "0")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == "checkpoint.pt"
    done = run_cli("evaluate", out, "--unprojected", "--workers", "0")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().startswith("note: loaded best-unprojected.pt") and len(done.stderr.strip().splitlines()) == 1
    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == "best-unprojected.pt"
    assert_one_line_error(run_cli("evaluate", out, "--last", "--unprojected"), "--last", "--unprojected")


def test_config_yaml_round_trips_and_command_line_wins(run, tmp_path):
    out, _ = run
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["epochs"] == 2 and written["val_fraction"] == 0.2 and written["tensorboard"] is True
    assert "out" not in written and "resume" not in written
    # The written file, passed back, resolves to the same options; an explicit option wins.
    again = run_cli("train", "--config", out / "config.yaml", "--epochs", "1", "--tensorboard", "--out", tmp_path / "b")
    assert again.returncode == 0, again.stderr
    rewritten = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert rewritten == {**written, "epochs": 1}


def test_config_with_unknown_key_is_one_line_error(tmp_path):
    (tmp_path / "run.yaml").write_text("epochs: 1\nlearning_rate: 3\n")
    result = run_cli("train", "--config", tmp_path / "run.yaml", "--out", tmp_path / "x")
    assert_one_line_error(result, "learning_rate", "not an option")


def test_checkpoint_loads_with_weights_only(run):
    out, _ = run
    for name in ("checkpoint.pt", "best.pt"):
        raw = torch.load(out / name, weights_only=True)  # raises on anything but plain data
        assert isinstance(raw["settings_json"], str) and "model_config" not in raw


def test_training_into_an_existing_run_needs_resume_or_overwrite(run, tmp_path):
    out, _ = run
    before = (out / "checkpoint.pt").read_bytes()
    again = run_cli(*_args(), "--out", out)
    assert_one_line_error(again, "already holds a run", "--resume", "--overwrite")
    assert (out / "checkpoint.pt").read_bytes() == before
    empty = run_cli(*_args(), "--out", tmp_path / "empty", "--resume")
    assert_one_line_error(empty, "--resume", "no checkpoint.pt")


def test_overwrite_starts_afresh(tmp_path):
    first = run_cli(*_args(workers=0), "--out", tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_cli(*_args(workers=0, seed=1), "--overwrite", "--out", tmp_path)
    assert second.returncode == 0, second.stderr
    assert load_checkpoint(tmp_path)["model_config"]["seed"] == 1


class _Payload:
    """Pickles as a call to os.system: loading it with a full unpickler runs the command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_whose_pickle_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model_config": {"head": "protoknn"}, "train_state": {"complete": True}, "x": _Payload(marker)},
               tmp_path / "checkpoint.pt")
    result = run_cli("evaluate", tmp_path)
    assert_one_line_error(result, "refusing", "could run code")
    assert not marker.exists()
    with pytest.raises(ProtoKNNError, match="refusing"):
        load_checkpoint(tmp_path)
    assert not marker.exists()
    # the payload is real: a full unpickler would have run it
    torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def test_save_atomic_stores_settings_as_json(tmp_path):
    save_atomic({"model_config": {"head": "x", "dim": 3}, "value": torch.ones(2)}, tmp_path / "c.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert yaml.safe_load(raw["settings_json"])["model_config"] == {"head": "x", "dim": 3}
    assert load_checkpoint(tmp_path / "c.pt")["model_config"] == {"head": "x", "dim": 3}


def test_worker_count_does_not_change_the_weights(tmp_path):
    runs = {}
    for workers in (0, 2):
        done = run_cli(*_args(workers=workers), "--out", tmp_path / str(workers))
        assert done.returncode == 0, done.stderr
        runs[workers] = load_checkpoint(tmp_path / str(workers))["model"]
    tensors = [k for k, v in runs[0].items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert len(tensors) > 10
    for key in tensors:
        assert torch.equal(runs[0][key], runs[2][key]), key


def test_bf16_on_cpu_keeps_the_loss_finite_and_near_float32():
    from protoknn_plugin.data import create_dataset
    from protoknn_plugin.model import ModelConfig, PrototypeModel
    from protoknn_plugin.train.precision import Precision
    from protoknn_plugin.train.trainer import LossForward

    splits = create_dataset("animals", limit=60)
    images = torch.stack([splits.train_plain[i][0] for i in range(40)])
    labels = splits.train_labels[:40]
    model = PrototypeModel(ModelConfig(head="protoknn", num_classes=10, in_channels=1, num_prototypes=20, dim=16,
                                       backbone_options={"width": 8}))
    model.train()
    terms = {}
    for name in ("32", "bf16"):
        torch.manual_seed(5)  # the same Gumbel draws in the cluster loss
        terms[name] = LossForward(model, Precision(name, torch.device("cpu")))(images, labels)
    for key, value in terms["bf16"].items():
        value = value.detach()
        assert value.dtype == torch.float32 and math.isfinite(float(value)), key
        # bf16 keeps 8 mantissa bits (relative step 2^-8); the backbone's rounding moves the
        # loss terms by about that much, not more.
        assert float(value) == pytest.approx(float(terms["32"][key].detach()), rel=0.03, abs=0.03), key
    # and the backbone really runs in bf16 under this precision
    with Precision("bf16", torch.device("cpu")).autocast():
        features = model.backbone(images)
    assert features.dtype == torch.bfloat16


def test_fp16_mixed_on_cpu_is_a_one_line_error(tmp_path):
    result = run_cli(*_args(precision="16-mixed"), "--out", tmp_path)
    assert_one_line_error(result, "16-mixed", "bf16")


def test_tensorboard_without_the_extra_fails_before_training(monkeypatch):
    import importlib.util

    from protoknn_plugin.data import create_dataset
    from protoknn_plugin.model import ModelConfig, PrototypeModel
    from protoknn_plugin.train import TrainConfig, Trainer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    model = PrototypeModel(ModelConfig(head="protoknn", num_classes=10, in_channels=1, num_prototypes=20, dim=16,
                                       backbone_options={"width": 8}))
    with pytest.raises(ProtoKNNError, match=r"protoknn-plugin\[tensorboard\]"):
        Trainer(model, create_dataset("animals", limit=60), TrainConfig(tensorboard=True), progress=False)
