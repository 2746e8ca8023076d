"""Phase optimisers and schedules, the validation split and stage scores."""
import math

import pytest
import torch

from protoknn_plugin.data import create_dataset
from protoknn_plugin.data.base import carve_validation
from protoknn_plugin.errors import ProtoKNNError
from protoknn_plugin.heads.base import Phase
from protoknn_plugin.model import ModelConfig, PrototypeModel
from protoknn_plugin.schedules import WarmupCosine, build_optimizer
from protoknn_plugin.train import TrainConfig, Trainer


def test_warmup_cosine_factors_by_hand():
    f = WarmupCosine(total_steps=10, warmup_steps=2)
    # warm-up: 1/2, 2/2; then cosine over the remaining 8 steps
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5)  # half-way through the decay
    assert f(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(10) == pytest.approx(0.0, abs=1e-12)


def test_phase_weight_decay_and_cosine_reach_the_optimizer():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    phase = Phase("p", 2, {"addon": 0.1, "head": 0.01}, weight_decay={"addon": 1e-3}, schedule="cosine",
                  warmup_epochs=1)
    opt, sched = build_optimizer(phase, {"addon": [a], "head": [b], "backbone": []}, steps_per_epoch=4)
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"addon": 1e-3, "head": 0.0}
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # 4 warm-up steps rising to the base rate, then decaying towards 0
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lrs[4] == pytest.approx(0.1) and lrs[7] < lrs[5] < lrs[4]


def test_unknown_schedule_is_one_line_error():
    p = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ProtoKNNError, match="unknown schedule 'linear'"):
        build_optimizer(Phase("p", 1, {"head": 0.1}, schedule="linear"), {"head": [p]}, 1)


@pytest.fixture(scope="module")
def animals_small():
    return create_dataset("animals", limit=200)


def test_validation_split_is_stratified_disjoint_and_fixed(animals_small):
    a = carve_validation(animals_small, 0.2)
    b = carve_validation(animals_small, 0.2)
    assert len(a.val) + len(a.train) == len(animals_small.train)
    assert torch.equal(a.val_labels, b.val_labels)
    assert torch.equal(torch.bincount(a.val_labels), torch.full((10,), 4))  # 20 per class -> 4 held out
    # no training image is also a validation image
    train_imgs = {a.train_plain[i][0].numpy().tobytes() for i in range(len(a.train_plain))}
    assert not any(a.val[i][0].numpy().tobytes() in train_imgs for i in range(len(a.val)))
    with pytest.raises(ProtoKNNError, match="val-fraction"):
        carve_validation(animals_small, 1.5)


def _tiny(head):
    return PrototypeModel(ModelConfig(head=head, num_classes=10, in_channels=1, num_prototypes=20, dim=16,
                                      backbone_options={"width": 8}))


@pytest.mark.parametrize("head", ["protoknn", "cnn"])
def test_every_epoch_records_validation_accuracy(head, animals_small):
    trainer = Trainer(_tiny(head), animals_small, TrainConfig(epochs=2, steps_per_epoch=2, val_fraction=0.2),
                      progress=False)
    state = trainer.fit()
    assert len(trainer.splits.train) == 160 and len(trainer.splits.val) == 40
    feature_epochs = [h for h in state.history if "val_accuracy" in h]
    assert len(feature_epochs) == 2
    for h in feature_epochs:
        assert 0.0 <= h["val_accuracy"] <= 1.0
    if head == "protoknn":  # the primary prediction is k=5; the kNN memory holds training images only
        assert feature_epochs[0]["val_accuracy"] == feature_epochs[0]["val_accuracy[k=5]"]
        assert len(trainer.model.head.knn) == 160


def test_protopnet_stages_and_shared_joint_optimizer(animals_small):
    """Joint cycles continue one Adam state; stages score before push, after push, after last layer."""
    model = _tiny("protopnet")
    model.head.push_start, model.head.push_every, model.head.last_layer_epochs = 1, 1, 1
    trainer = Trainer(model, animals_small, TrainConfig(epochs=3, steps_per_epoch=2), progress=False,
                      stage_eval=animals_small.test)
    phases = trainer.phases
    joint = [p for p in phases if p.name == "joint"]
    assert len(joint) >= 2 and len({p.optimizer_key for p in joint}) == 1 and joint[0].optimizer_key
    state = trainer.fit()
    kept = state.optimizer_states[joint[0].optimizer_key]["optimizer"]["state"]
    joint_steps = 2 * sum(p.epochs for p in joint)
    assert all(int(s["step"]) == joint_steps for s in kept.values())
    whens = [(s["phase"], s["when"]) for s in state.stages]
    assert ("joint", "before project") in whens and ("joint", "end") in whens and ("last-layer", "end") in whens
    assert all(0.0 <= s["accuracy[top1]"] <= 1.0 for s in state.stages)
