import pytest
import torch

from protoknn_plugin.checkpoint import load_checkpoint, save_atomic
from protoknn_plugin.data import create_dataset
from protoknn_plugin.errors import ProtoKNNError
from protoknn_plugin.model import ModelConfig, PrototypeModel
from protoknn_plugin.train import TrainConfig, Trainer, evaluate, model_from_checkpoint

from conftest import TINY, cli_interrupted_at_step, run_cli


@pytest.fixture(scope="module")
def animals_small():
    return create_dataset("animals", limit=200)


def tiny_model(head="protoknn"):
    return PrototypeModel(ModelConfig(head=head, num_classes=10, in_channels=1, num_prototypes=20, dim=16,
                                      backbone_options={"width": 8}))


@pytest.mark.parametrize("head", ["protoknn", "protopnet"])
def test_training_follows_phases_and_writes_complete_checkpoint(head, animals_small, tmp_path):
    model = tiny_model(head)
    trainer = Trainer(model, animals_small, TrainConfig(epochs=2, steps_per_epoch=2), out_dir=str(tmp_path),
                      progress=False)
    state = trainer.fit()
    assert state.complete
    saved = load_checkpoint(tmp_path)
    assert saved["train_state"]["complete"] and saved["model_config"]["head"] == head
    assert model.projection is not None and (model.projection.image_index >= 0).all()
    if head == "protoknn":
        assert len(model.head.knn) == len(animals_small.train_plain)
    # the checkpoint alone rebuilds the same predictions
    rebuilt, _ = model_from_checkpoint(tmp_path)
    a = evaluate(model, animals_small.test)
    b = evaluate(rebuilt, animals_small.test)
    assert {k: v for k, v in a.items() if k.startswith("acc")} == {k: v for k, v in b.items() if k.startswith("acc")}


def test_non_finite_loss_stops_with_step_and_term_and_keeps_last_checkpoint(animals_small, tmp_path, monkeypatch):
    model = tiny_model()
    trainer = Trainer(model, animals_small, TrainConfig(epochs=3, steps_per_epoch=2), out_dir=str(tmp_path),
                      progress=False)
    real_loss = model.head.loss
    calls = {"n": 0}

    def poisoned(out, labels):
        calls["n"] += 1
        terms = real_loss(out, labels)
        if calls["n"] == 3:  # first step of epoch 2
            terms["cluster"] = terms["cluster"] * float("nan")
            terms["total"] = terms["total"] + terms["cluster"]
        return terms

    monkeypatch.setattr(model.head, "loss", poisoned)
    with pytest.raises(ProtoKNNError, match=r"step 3 \(term 'cluster'\)"):
        trainer.fit()
    saved = load_checkpoint(tmp_path)
    assert saved["train_state"]["epoch"] == 1 and not saved["train_state"]["complete"]
    assert all(torch.isfinite(v).all() for v in saved["model"].values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


def test_failed_checkpoint_write_leaves_previous_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"model_config": {"head": "x"}, "value": 1}, path)

    import os

    real_fdopen = os.fdopen

    class FullDisk:
        """A file whose write stores a few bytes and then fails like a full disk."""

        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(bytes(data[:7]))
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(ProtoKNNError, match="disk is full"):
        save_atomic({"model_config": {"head": "x"}, "value": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def _final_state(run_dir):
    return load_checkpoint(run_dir)["model"]


def test_sigterm_mid_run_then_resume_matches_uninterrupted_run(tmp_path):
    args = ["train", "--head", "protoknn", *TINY]
    args[args.index("--epochs") + 1] = "3"
    args[args.index("--steps-per-epoch") + 1] = "8"
    straight = tmp_path / "straight"
    done = run_cli(*args, "--out", straight)
    assert done.returncode == 0, done.stderr

    interrupted = tmp_path / "interrupted"
    stopped = cli_interrupted_at_step([*args, "--out", interrupted], step=12)  # in the second epoch
    err = stopped.stderr
    assert stopped.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    partial = load_checkpoint(interrupted)["train_state"]
    assert not partial["complete"] and partial["global_step"] == 12 and partial["epoch"] == 1

    resumed = run_cli(*args, "--out", interrupted, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _final_state(straight), _final_state(interrupted)
    assert a.keys() == b.keys()
    tensors = [key for key in a if isinstance(a[key], torch.Tensor)]
    assert len(tensors) > 10
    for key in tensors:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    hist_a = load_checkpoint(straight)["train_state"]["history"]
    hist_b = load_checkpoint(interrupted)["train_state"]["history"]
    assert [h["total"] for h in hist_a] == pytest.approx([h["total"] for h in hist_b], rel=1e-5)


def test_resume_with_another_head_names_the_field(tmp_path):
    first = run_cli("train", "--head", "protoknn", *TINY, "--out", tmp_path)
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "checkpoint.pt").read_bytes()
    other = run_cli("train", "--head", "protopnet", *TINY, "--out", tmp_path, "--resume")
    assert other.returncode != 0 and "head='protoknn'" in other.stderr and "Traceback" not in other.stderr
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_same_seed_same_weights_and_metrics_other_seed_differs(animals_small):
    def train(seed):
        model = PrototypeModel(ModelConfig(head="protoknn", num_classes=10, in_channels=1, num_prototypes=20, dim=16,
                                           backbone_options={"width": 8}, seed=seed))
        Trainer(model, animals_small, TrainConfig(epochs=1, steps_per_epoch=3, seed=seed), progress=False).fit()
        return model, evaluate(model, animals_small.test)

    (a, ma), (b, mb), (c, _) = train(0), train(0), train(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    tensors = [k for k in sa if isinstance(sa[k], torch.Tensor) and sa[k].is_floating_point()]
    assert all(torch.equal(sa[k], sb[k]) for k in tensors)
    assert {k: v for k, v in ma.items() if k.startswith("acc")} == {k: v for k, v in mb.items() if k.startswith("acc")}
    assert any(not torch.equal(sa[k], sc[k]) for k in tensors if sa[k].shape == sc[k].shape)


# ---- only a projected model is "best" -----------------------------------------------------------

def source_patch_mismatch(model, train_plain):
    """Largest |prototype - embedding of its recorded source patch| (0: every prototype is its patch)."""
    import torch.nn.functional as F

    layer, record = model.prototype_layer, model.projection
    worst = 0.0
    with torch.no_grad():
        for i, (image, location) in enumerate(zip(record.image_index.tolist(), record.location.tolist())):
            x, _ = train_plain[image]
            patch = layer.addon(model.features(x[None].float()))[0].flatten(1)[:, location]
            if layer.similarity == "cosine":
                patch = F.normalize(patch, dim=0)
            worst = max(worst, float((layer.prototypes[i] - patch).abs().max()))
    return worst


def _train_with_validation(head, animals_small, out, epochs=2):
    trainer = Trainer(tiny_model(head), animals_small, TrainConfig(epochs=epochs, steps_per_epoch=2, val_fraction=0.2),
                      out_dir=str(out), progress=False)
    return trainer, trainer.fit()


@pytest.mark.parametrize("head", ["protoknn", "protopnet"])
def test_best_pt_holds_prototypes_that_are_their_source_patches(head, animals_small, tmp_path):
    from protoknn_plugin.train import load_trained_model

    trainer, state = _train_with_validation(head, animals_small, tmp_path)
    loaded = load_trained_model(tmp_path)
    assert loaded.file == "best.pt" and loaded.note is None
    assert loaded.saved["train_state"]["projected"] is True
    assert source_patch_mismatch(loaded.model.eval(), trainer.splits.train_plain) < 1e-5
    # One record per push, with the validation right before and right after it.
    assert len(state.pushes) == sum("project" in p.after for p in trainer.phases)
    for push in state.pushes:
        assert push["prototypes"] == 20 and 1 <= push["distinct_images"] <= push["distinct_patches"] <= 20
        assert -1.0 <= push["cosine_min"] <= push["cosine_mean"] <= 1.0
        assert 0.0 <= push["val_accuracy_before"] <= 1.0 and 0.0 <= push["val_accuracy_after"] <= 1.0


def test_an_unprojected_epoch_that_validates_better_never_becomes_best_pt(animals_small, tmp_path, monkeypatch):
    """Rig validation so that every un-projected model scores 0.9 and every projected one 0.1."""
    import csv

    from protoknn_plugin.train import load_trained_model

    from protoknn_plugin.train.scoring import RunScoring

    # ProtoKNN projects once, at the end: the model is projected from its push on.
    monkeypatch.setattr(RunScoring, "validation",
                        lambda self: {"val_accuracy": 0.1 if self.model.projection is not None else 0.9})
    trainer, state = _train_with_validation("protoknn", animals_small, tmp_path)
    assert state.best_val_accuracy == 0.1 and state.best_epoch["projected"] is True
    assert state.best_unprojected_val_accuracy == 0.9
    best = load_trained_model(tmp_path)
    assert best.file == "best.pt" and best.saved["train_state"]["best_val_accuracy"] == 0.1
    assert source_patch_mismatch(best.model.eval(), trainer.splits.train_plain) < 1e-5
    # The un-projected winner is kept apart, and loads only by name, with a note.
    unprojected = load_trained_model(tmp_path, "unprojected")
    assert unprojected.file == "best-unprojected.pt" and "never projected" in unprojected.note
    assert unprojected.saved["train_state"]["projected"] is False
    # Every per-epoch row of metrics.csv says its prototypes were not projected.
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == 2 and {r["projected"] for r in rows} == {"False"}


def test_a_best_pt_from_before_the_projected_flag_is_not_loaded_by_default(animals_small, tmp_path):
    """A run of an older version kept an un-projected epoch as best.pt: the default falls back
    to the finished (projected) checkpoint.pt and says so; asking for it as a file is refused."""
    from protoknn_plugin.train import load_trained_model

    _train_with_validation("protoknn", animals_small, tmp_path)
    old = load_checkpoint(tmp_path / "best-unprojected.pt")
    for key in ("projected", "best_unprojected_val_accuracy", "best_unprojected_epoch", "pushes"):
        old["train_state"].pop(key)
    save_atomic(old, tmp_path / "best.pt")
    loaded = load_trained_model(tmp_path)
    assert loaded.file == "checkpoint.pt" and "un-projected" in loaded.note
    with pytest.raises(ProtoKNNError, match="never projected.*--unprojected"):
        load_trained_model(tmp_path / "best.pt")


def test_a_run_on_a_frozen_backbone_has_no_warm_phase(animals_small, monkeypatch):
    # A pretrained backbone gets ProtoPNet's warm phase, unless the run records it frozen (cached).
    monkeypatch.setattr(PrototypeModel, "pretrained_backbone", property(lambda self: True))
    config = TrainConfig(epochs=8, steps_per_epoch=2)
    trains = Trainer(tiny_model("protopnet"), animals_small, config, progress=False)
    frozen = Trainer(tiny_model("protopnet"), animals_small, config, progress=False,
                     data_info={"frozen_backbone": True})
    assert [(p.name, p.epochs) for p in trains.phases][:2] == [("warm", 2), ("joint", 6)]
    assert [(p.name, p.epochs) for p in frozen.phases] == [("joint", 8), ("last-layer", 20)]


def test_the_given_phases_are_trained_and_each_action_is_timed_on_its_own(animals_small, monkeypatch):
    """A clock that moves 1 s per reading and 100 s per validation: every timed action adds exactly
    1 s under its own name, so the validations before and after a push are not push time."""
    import types

    import protoknn_plugin.train.actions as actions
    from protoknn_plugin.heads.base import Phase
    from protoknn_plugin.train.scoring import RunScoring

    clock = {"now": 0.0}

    def perf_counter():
        clock["now"] += 1.0
        return clock["now"]

    def slow_validation(self, validation=RunScoring.validation):
        clock["now"] += 100.0
        return validation(self)

    monkeypatch.setattr(actions, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(RunScoring, "validation", slow_validation)
    joint = {"backbone": 1e-3, "addon": 3e-3, "prototypes": 3e-3}
    phases = [Phase("first", 1, joint, after=("project",)), Phase("last", 2, {"last_layer": 1e-4}, cached_profiles=True),
              Phase("second", 1, joint, after=("project",))]
    trainer = Trainer(tiny_model("protopnet"), animals_small, TrainConfig(epochs=9, steps_per_epoch=1, val_fraction=0.2),
                      progress=False, phases=phases)
    state = trainer.fit()
    assert [h["phase"] for h in state.history] == ["first", "second"]  # a cached phase has no feature epochs
    assert trainer.actions.seconds == {"project": 2.0, "cached_phase": 1.0}
    assert len(state.pushes) == 2 and state.complete


def test_a_non_finite_loss_is_caught_at_once_or_at_the_next_sync_point():
    from protoknn_plugin.train.finite import FiniteLossCheck

    def terms(task):
        return {"task": torch.tensor(task), "total": torch.tensor(task)}

    every_step = FiniteLossCheck(1, torch.device("cpu"))
    every_step.note(terms(1.0), step=1)
    with pytest.raises(ProtoKNNError, match="non-finite loss at step 2 \\(term 'task'\\)"):
        every_step.note(terms(float("nan")), step=2)
    batched = FiniteLossCheck(3, torch.device("cpu"))
    batched.note(terms(float("inf")), step=1)  # remembered, not raised: reading it would wait for the device
    batched.note(terms(1.0), step=2)
    with pytest.raises(ProtoKNNError, match="non-finite loss by step 3 \\(term 'total'\\)"):
        batched.check(terms(1.0), step=3)  # the bad step is past: its term is no longer known
