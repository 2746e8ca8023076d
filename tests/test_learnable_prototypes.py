"""ProtoKNN with learnable prototypes (frozen_prototypes=False): same start, own group and rate, they move."""
from __future__ import annotations

import pytest
import torch

from protoknn_plugin.data import create_dataset
from protoknn_plugin.model import ModelConfig, PrototypeModel
from protoknn_plugin.train import TrainConfig, Trainer, epoch_batches


def model_with(**head_options):
    return PrototypeModel(ModelConfig(head="protoknn", backbone="small-cnn", num_classes=10, in_channels=1,
                                      num_prototypes=12, dim=8, backbone_options={"width": 4},
                                      head_options=head_options))


def test_learnable_prototypes_get_their_own_group_and_rate():
    phase = model_with(frozen_prototypes=False, prototype_lr=2e-4).head.phases(2, pretrained_backbone=False)[0]
    assert phase.lrs["prototypes"] == 2e-4
    assert "prototypes" not in model_with().head.phases(2, pretrained_backbone=False)[0].lrs


def test_learnable_prototypes_start_on_the_same_hypersphere_and_move():
    frozen, learnable = model_with(), model_with(frozen_prototypes=False)
    start = learnable.prototype_layer.prototypes.detach().clone()
    assert torch.equal(start, frozen.prototype_layer.prototypes)
    assert torch.allclose(start.norm(dim=1), torch.ones(12), atol=1e-5)  # on the unit sphere
    splits = create_dataset("animals", limit=100)
    for model, moves in ((learnable, True), (frozen, False)):
        trainer = Trainer(model, splits, TrainConfig(epochs=1, batch_classes=5, per_class=2), progress=False)
        trainer.optimizers.build(trainer.phases[0])
        groups = {g["name"]: g for g in trainer.optimizer.param_groups}
        assert ("prototypes" in groups) == moves
        batch = epoch_batches(splits.train_labels, trainer.config)[0]
        images = torch.stack([splits.train[i][0] for i in batch])
        labels = torch.tensor([splits.train[i][1] for i in batch])
        trainer._train_step(images, labels)
        moved = not torch.equal(model.prototype_layer.prototypes.detach(), start)
        assert moved == moves


@pytest.fixture(scope="module")
def batch():
    """One class-balanced batch of 5 classes x 2 images, without augmentation."""
    splits = create_dataset("animals", limit=100)
    indices = epoch_batches(splits.train_labels, TrainConfig(epochs=1, batch_classes=5, per_class=2))[0]
    return splits, torch.stack([splits.train_plain[i][0] for i in indices]), splits.train_labels[indices]


def one_step(variant, batch):
    """Loss terms of one training step from the same weights, batch and random draws, and the
    parameters after it."""
    splits, images, labels = batch
    torch.manual_seed(0)
    model = model_with(cluster_variant=variant)
    trainer = Trainer(model, splits, TrainConfig(epochs=1, batch_classes=5, per_class=2), progress=False)
    trainer.optimizers.build(trainer.phases[0])
    torch.manual_seed(1)
    terms = trainer._train_step(images, labels)
    return terms, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("plain, implicit", [("full", "full-implicit"), ("full-relaxed", "full-differentiable")])
def test_the_implicit_plan_gradient_changes_the_step_but_not_the_loss(batch, plain, implicit):
    # full-implicit is full with dT*/dC, full-differentiable is full-relaxed with it: the same
    # loss value, and a different update once the gradient through T* is added
    (plain_terms, plain_after), (terms, after) = one_step(plain, batch), one_step(implicit, batch)
    assert torch.isfinite(terms["total"])
    for term in ("cluster", "total"):
        assert torch.equal(terms[term], plain_terms[term]), term
    assert len(after) == len(plain_after)
    assert not all(torch.equal(a, b) for a, b in zip(after, plain_after))


def test_the_relaxed_sampler_changes_the_cluster_loss(batch):
    # soft Gumbel-softmax counts in place of the hard draws of the same noise
    (full, _), (relaxed, _) = one_step("full", batch), one_step("full-relaxed", batch)
    assert torch.isfinite(relaxed["cluster"])
    assert not torch.equal(relaxed["cluster"], full["cluster"])
    assert torch.equal(relaxed["task"], full["task"])  # the same weights, batch and miner


def test_yes_no_options_read_command_line_text():
    # KEY=VALUE parsers hand over "false" as text, and bool("false") is True
    assert model_with(frozen_prototypes="false").head.frozen_prototypes is False
    assert model_with(frozen_prototypes="True").head.frozen_prototypes is True
    assert model_with(straight_through="1").head.cluster_loss.straight_through is True
    from protoknn_plugin.errors import ProtoKNNError

    with pytest.raises(ProtoKNNError, match="frozen_prototypes must be true or false"):
        model_with(frozen_prototypes="maybe")


def test_a_prototype_spec_written_with_frozen_means_frozen_prototypes():
    from protoknn_plugin.heads.base import PrototypeSpec

    assert PrototypeSpec(4).frozen_prototypes is True
    assert PrototypeSpec(4, frozen=False).frozen_prototypes is False
    assert PrototypeSpec(4, frozen_prototypes=False).frozen is False
    model = model_with(frozen_prototypes=False)
    assert model.prototype_layer.prototypes.requires_grad and not model.prototype_layer.frozen
