import textwrap

import pytest
import torch

from protoknn_plugin.data import create_dataset
from protoknn_plugin.errors import ProtoKNNError, UnknownNameError
from protoknn_plugin.heads import HEADS, Head, create_head, get_head_class, list_heads, register_head
from protoknn_plugin.heads.protopnet import ProtoPNetHead
from protoknn_plugin.model import ModelConfig, PrototypeModel
from protoknn_plugin.train import TrainConfig, Trainer, epoch_batches


def test_builtin_heads_are_registered():
    assert {"protoknn", "protopnet", "cnn"} <= set(list_heads())


def test_unknown_head_suggests_close_match():
    with pytest.raises(UnknownNameError, match="protoknn"):
        create_head("protokn", num_classes=3, backbone_channels=4, dim=4, num_prototypes=4)


def test_register_head_decorator_and_duplicate_name():
    @register_head("test-dummy")
    class Dummy(Head):
        name = "test-dummy"

    try:
        assert "test-dummy" in list_heads()
        head = create_head("test-dummy", num_classes=2, backbone_channels=3, dim=4, num_prototypes=5)
        assert type(head) is Dummy  # the decorator registers the class and hands it back unchanged
        assert (head.num_classes, head.backbone_channels, head.dim, head.requested_prototypes) == (2, 3, 4, 5)
        with pytest.raises(ValueError, match="already registered"):
            register_head("test-dummy")(type("Other", (Head,), {}))
        assert get_head_class("test-dummy") is Dummy  # the refused registration replaced nothing
    finally:
        HEADS._entries.pop("test-dummy")


def test_third_party_head_found_through_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "thirdparty_head.py"
    pkg.write_text(textwrap.dedent("""
        from protoknn_plugin.heads.plain import PlainCNNHead
        class ThirdPartyHead(PlainCNNHead):
            name = "third-party"
    """))
    dist = tmp_path / "thirdparty_head-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-head\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[protoknn_plugin.heads]\nthird-party = thirdparty_head:ThirdPartyHead\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(HEADS, "_entry_points_loaded", False)
    try:
        assert "third-party" in list_heads()
        head = create_head("third-party", num_classes=2, backbone_channels=3)
        assert type(head).__name__ == "ThirdPartyHead"
    finally:
        HEADS._entries.pop("third-party", None)


def test_protopnet_last_layer_initialisation_and_prototype_classes():
    head = ProtoPNetHead(num_classes=3, backbone_channels=8, dim=4, prototypes_per_class=2)
    assert head.prototype_class.tolist() == [0, 0, 1, 1, 2, 2]
    w = head.last_layer.weight
    assert w.shape == (3, 6)
    assert w[0].tolist() == [1, 1, -0.5, -0.5, -0.5, -0.5]
    assert head._l1().item() == pytest.approx(0.5 * 12)


def test_protopnet_phases_follow_the_reference_schedule():
    head = ProtoPNetHead(num_classes=2, backbone_channels=4, dim=4)
    phases = head.phases(30, pretrained_backbone=True)
    names = [(p.name, p.epochs, p.after) for p in phases]
    assert names[0] == ("warm", 5, ())
    assert "backbone" not in phases[0].lrs and phases[0].lrs["prototypes"] == 3e-3
    # push at epochs 10, 20 and the end (30), each followed by 20 last-layer epochs
    assert [n for n in names if n[0] != "last-layer"] == [("warm", 5, ()), ("joint", 5, ("project",)),
                                                          ("joint", 10, ("project",)), ("joint", 10, ("project",))]
    last = [p for p in phases if p.name == "last-layer"]
    assert len(last) == 3 and all(p.epochs == 20 and p.lrs == {"last_layer": 1e-4} and p.cached_profiles for p in last)
    assert phases[1].lrs["backbone"] == 1e-4 and phases[1].step_lr == (5, 0.1)
    assert sum(p.epochs for p in phases if not p.cached_profiles) == 30


def test_protopnet_loss_terms_hand_computed():
    from protoknn_plugin.prototypes import PrototypeOutputs

    head = ProtoPNetHead(num_classes=2, backbone_channels=4, dim=4, prototypes_per_class=1)
    cost = torch.tensor([[1.0, 4.0], [9.0, 2.0]])
    profile = torch.log((cost + 1) / (cost + 1e-4))
    out = PrototypeOutputs(profile, cost, cost, None, None, torch.zeros(2, 4, 1, 1))
    terms = head.loss(out, torch.tensor([0, 1]))
    assert terms["cluster"].item() == pytest.approx((1.0 + 2.0) / 2)
    assert terms["separation"].item() == pytest.approx((4.0 + 9.0) / 2)
    expected = terms["ce"] + 0.8 * terms["cluster"] - 0.08 * terms["separation"] + 1e-4 * terms["l1"]
    assert terms["total"].item() == pytest.approx(expected.item())


@pytest.fixture(scope="module")
def animals_small():
    return create_dataset("animals", limit=200)


@pytest.mark.parametrize("head", ["protoknn", "protopnet", "cnn"])
def test_one_training_step_on_embedded_data_only_head_changes(head, animals_small):
    """Swapping the head is the only change: same backbone, data, and trainer."""
    config = ModelConfig(head=head, backbone="small-cnn", num_classes=10, in_channels=1, num_prototypes=20, dim=16,
                         backbone_options={"width": 8})
    model = PrototypeModel(config)
    trainer = Trainer(model, animals_small, TrainConfig(epochs=1, batch_classes=5, per_class=2), progress=False)
    trainer.optimizers.build(trainer.phases[0])
    # fit() sets this per phase; ProtoPNet from scratch now starts with its (StepLR) joint phase
    trainer.optimizers.per_step_schedule = False
    batch = epoch_batches(animals_small.train_labels, trainer.config)[0]
    images = torch.stack([animals_small.train[i][0] for i in batch])
    labels = torch.tensor([animals_small.train[i][1] for i in batch])
    before = [p.detach().clone() for p in model.backbone.parameters()]
    terms = trainer._train_step(images, labels)
    assert torch.isfinite(terms["total"])
    after = list(model.backbone.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the backbone must train"
    if head == "protoknn":
        assert {"task", "cluster", "aux", "total"} <= set(terms)
        # the frozen hypersphere prototypes do not move during training
        assert not model.prototype_layer.prototypes.requires_grad


def test_protoknn_beta_and_proxies_get_their_own_groups():
    model = PrototypeModel(ModelConfig(head="protoknn", num_classes=4, in_channels=1, num_prototypes=8, dim=8,
                                       backbone_options={"width": 4}, head_options={"aux_loss": "proxy-anchor"}))
    groups = model.components()
    assert len(groups["beta"]) == 1 and groups["beta"][0].shape == (4,)  # one beta per class
    assert groups["proxies"][0].shape == (4, 8)
    phase = model.head.phases(3, pretrained_backbone=False)[0]
    assert phase.lrs["beta"] == 5e-4 and phase.lrs["proxies"] == pytest.approx(0.1)
    assert "prototypes" not in phase.lrs and phase.after == ("project", "build_memory")


def test_single_class_batch_is_a_clear_error(animals_small, monkeypatch):
    import protoknn_plugin.train.trainer as train_module  # the loop looks epoch_batches up here

    model = PrototypeModel(ModelConfig(head="protoknn", num_classes=10, in_channels=1, num_prototypes=8, dim=8,
                                       backbone_options={"width": 4}))
    trainer = Trainer(model, animals_small, TrainConfig(epochs=1), progress=False)
    first_class = (animals_small.train_labels == 0).nonzero().flatten()[:4].tolist()
    monkeypatch.setattr(train_module, "epoch_batches", lambda labels, config: [first_class])
    with pytest.raises(ProtoKNNError, match="single class"):
        trainer.fit()


def test_protoknn_push_every_splits_training_into_projected_cycles():
    head = create_head("protoknn", num_classes=4, backbone_channels=8, dim=8, num_prototypes=8, push_every=2)
    phases = head.phases(5, pretrained_backbone=True)
    # Pushes after epochs 2, 4 and 5; only the last rebuilds the kNN memory; Adam is not restarted.
    assert [p.epochs for p in phases] == [2, 2, 1]
    assert [p.after for p in phases] == [("project",), ("project",), ("project", "build_memory")]
    assert {p.optimizer_key for p in phases} == {"train"}
    # A cycle at least as long as the budget is the paper's single push at the end.
    for every in (0, 5, 9):
        head = create_head("protoknn", num_classes=4, backbone_channels=8, dim=8, num_prototypes=8, push_every=every)
        assert [(p.epochs, p.after) for p in head.phases(5, pretrained_backbone=True)] == [(5, ("project", "build_memory"))]


@pytest.mark.parametrize("value", [-1, 1.5, "two"])
def test_protoknn_push_every_refuses_what_is_not_a_count(value):
    with pytest.raises(ProtoKNNError, match="push_every must be a whole number"):
        create_head("protoknn", num_classes=4, backbone_channels=8, dim=8, num_prototypes=8, push_every=value)


def test_pretrained_defaults_apply_only_to_a_pretrained_backbone_and_yield_to_the_user():
    from types import SimpleNamespace

    splits = SimpleNamespace(classes=list(range(10)), channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    scratch = ModelConfig.for_data(splits, head="protoknn", backbone="small-cnn")
    assert "cluster_variant" not in scratch.head_options  # the constructor's default (full) stays
    pretrained = ModelConfig.for_data(splits, head="protoknn", backbone="efficientnet-lite0")
    assert pretrained.head_options == {"cluster_variant": "linear-assignment"}
    given = ModelConfig.for_data(splits, head="protoknn", backbone="efficientnet-lite0",
                                 head_options={"cluster_variant": "full", "k": 3})
    assert given.head_options == {"cluster_variant": "full", "k": 3}
    assert ModelConfig.for_data(splits, head="protopnet", backbone="efficientnet-lite0").head_options == {}
