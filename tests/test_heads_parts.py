"""A head built from objects: ProtoKNNHead takes its losses and kNN as parts, from_options builds them."""
from __future__ import annotations

import pytest
import torch

from protoknn_plugin.cluster import ProtoKNNClusterLoss, create_cluster_plan
from protoknn_plugin.errors import ProtoKNNError
from protoknn_plugin.heads import create_head, get_head_class
from protoknn_plugin.heads.options import option_defaults, option_keys
from protoknn_plugin.heads.protoknn import ProtoKNNHead
from protoknn_plugin.knn import KNNClassifier
from protoknn_plugin.losses import create_metric_loss
from protoknn_plugin.prototypes import PrototypeOutputs


def test_a_head_built_from_parts_uses_them_and_weights_its_terms_as_eq_13():
    head = ProtoKNNHead(4, 8, dim=8, num_prototypes=6,
                        task_loss=create_metric_loss("margin", num_classes=4, embedding_size=6),
                        cluster_loss=ProtoKNNClusterLoss(create_cluster_plan("most-similar"), reduction="sum"),
                        knn=KNNClassifier(k=1, ks=(1,)),
                        aux_loss=create_metric_loss("none", num_classes=4, embedding_size=8),
                        cluster_weight=0.5)
    assert head.aux_embedding is None and head.primary == "k=1" and head.options == {}
    # most-similar with a sum: the smallest cost of each sample, 1 + 2 = 3
    cost = torch.tensor([[1.0, 5.0, 4.0, 9.0, 9.0, 9.0], [3.0, 2.0, 8.0, 9.0, 9.0, 9.0]])
    out = PrototypeOutputs(profile=-cost, cost=cost, gap_cost=None, locations=None, feature_map=None,
                           backbone_features=torch.zeros(2, 8, 1, 1))
    terms = head.loss(out, torch.tensor([0, 1]))
    assert set(terms) == {"task", "cluster", "total"} and float(terms["cluster"]) == 3.0
    assert torch.equal(terms["total"], terms["task"] + 0.5 * terms["cluster"])


def test_create_head_builds_the_parts_from_the_flat_options():
    head = create_head("protoknn", num_classes=4, backbone_channels=8, dim=8, num_prototypes=6,
                       cluster_variant="debias", reg=0.2, k=3, ks=(1, 7), aux_loss="none", straight_through="no")
    assert (head.cluster_loss.variant, head.cluster_loss.reg, head.cluster_loss.straight_through) == ("debias", 0.2, False)
    assert head.knn.k == 3 and head.knn.ks == (1, 3, 7)  # the primary k is always reported
    assert head.aux_embedding is None and head.options["ks"] == (1, 7)
    with pytest.raises(ProtoKNNError, match="straight_through must be true or false, got 'maybe'"):
        create_head("protoknn", num_classes=4, backbone_channels=8, straight_through="maybe")


def test_option_keys_come_from_from_options_for_a_head_of_parts_and_from_init_otherwise():
    keys = option_keys(ProtoKNNHead)
    assert {"task_loss", "cluster_variant", "reg", "k", "push_every"} <= set(keys)
    assert "knn" not in keys and "cluster_loss" not in keys  # parts are not text options
    assert option_defaults(ProtoKNNHead)["cluster_variant"] == "full"
    cnn = get_head_class("cnn")
    assert "lr" in option_keys(cnn) and option_defaults(cnn)["num_prototypes"] == 0
