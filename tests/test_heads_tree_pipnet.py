"""ProtoTree and PIP-Net heads: their math on tiny tensors by hand, and the CLI chain for each."""
import csv

import pytest
import torch

from protoknn_plugin.heads import create_head
from protoknn_plugin.heads.prototree import (derivative_free_update, greedy_leaves, leaf_probabilities, path_nodes,
                                              prune_routes, reachable, tree_output, tree_size)
from protoknn_plugin.prototypes import PrototypeLayer, PrototypeOutputs

from conftest import TINY, run_cli


def _outputs(profile):
    return PrototypeOutputs(profile, None, None, None, None, torch.zeros(len(profile), 1, 1, 1))


# --------------------------------------------------------------------------- ProtoTree

def test_depth_two_routing_probabilities_by_hand():
    # root s=0.8, left node s=0.3, right node s=0.6; right = present gets s, left 1 - s
    s = torch.tensor([[0.8, 0.3, 0.6]])
    pi = leaf_probabilities(s, torch.zeros(3, dtype=torch.long))
    expected = [0.2 * 0.7, 0.2 * 0.3, 0.8 * 0.4, 0.8 * 0.6]
    assert pi[0].tolist() == pytest.approx(expected)
    assert greedy_leaves(s, torch.zeros(3, dtype=torch.long)).tolist() == [3]  # right (0.8), right (0.6)
    s2 = torch.tensor([[0.4, 0.7, 0.1]])  # left (0.4 <= 0.5), then right (0.7): leaf 1
    assert greedy_leaves(s2, torch.zeros(3, dtype=torch.long)).tolist() == [1]
    # a forced root (pruned right child) sends everything left whatever s says
    forced = torch.tensor([-1, 0, 0])
    assert leaf_probabilities(s, forced)[0].tolist() == pytest.approx([0.7, 0.3, 0.0, 0.0])


def test_routing_is_exp_of_minus_the_plain_euclidean_distance():
    layer = PrototypeLayer(2, 1, 2, similarity="exp-l2", addon="linear", init="random")
    with torch.no_grad():
        layer.addon.weight.copy_(torch.eye(2)[:, :, None, None])
        layer.addon.bias.zero_()
        layer.prototypes.copy_(torch.tensor([[0.0, 0.0]]))
    # patches (3, 4) and (1, 0): nearest is at distance 1 (not squared), so s = exp(-1)
    feats = torch.tensor([[3.0, 1.0], [4.0, 0.0]]).view(1, 2, 1, 2)
    assert float(layer(feats).profile.detach()[0, 0]) == pytest.approx(torch.exp(torch.tensor(-1.0)).item(), rel=1e-5)


def test_derivative_free_leaf_update_matches_the_per_sample_formula():
    generator = torch.Generator().manual_seed(0)
    leaves, classes, batch, steps = 4, 3, 5, 7
    logits = torch.rand(leaves, classes, generator=generator) * 2
    start = torch.rand(leaves, classes, generator=generator)
    pi = torch.rand(batch, leaves, generator=generator)
    pi = pi / pi.sum(1, keepdim=True)
    labels = torch.tensor([0, 2, 1, 2, 0])
    y_hat = tree_output(pi, logits)
    new = derivative_free_update(logits, start, pi, y_hat, labels, steps)
    dist = logits.softmax(1)
    for leaf in range(leaves):
        for c in range(classes):
            delta = sum(float(pi[b, leaf] * dist[leaf, c] / y_hat[b, c]) for b in range(batch) if labels[b] == c)
            expected = max(float(logits[leaf, c] - start[leaf, c] / steps), 0.0) + delta
            assert float(new[leaf, c]) == pytest.approx(expected, rel=1e-5)


def test_head_updates_its_leaves_after_the_step_and_leaves_get_no_gradient():
    head = create_head("prototree", num_classes=3, backbone_channels=4, dim=4, depth=2)
    head.leaf_logits.copy_(torch.rand(4, 3, generator=torch.Generator().manual_seed(1)))
    head.begin_epoch(None, 0, steps=4, first_step=0)
    profile = torch.tensor([[0.8, 0.3, 0.6], [0.1, 0.9, 0.5]], requires_grad=True)
    labels = torch.tensor([2, 0])
    before = head.leaf_logits.clone()
    terms = head.loss(_outputs(profile), labels)
    terms["total"].backward()
    assert profile.grad is not None and not head.leaf_logits.requires_grad
    head.after_step()
    pi = leaf_probabilities(profile.detach(), head.routes)
    expected = derivative_free_update(before, before, pi, tree_output(pi, before), labels, 4)
    assert torch.allclose(head.leaf_logits, expected)
    # the loss is NLL of the soft tree's distribution
    assert float(terms["nll"]) == pytest.approx(float(-tree_output(pi, before)[[0, 1], [2, 0]].log().mean()), rel=1e-5)


def _peaked(leaves, classes, flat):
    logits = torch.zeros(leaves, classes)
    for leaf in range(leaves):
        if leaf not in flat:
            logits[leaf, leaf % classes] = 5.0  # max softmax ~0.98
    return logits  # flat leaves: uniform, max 1 / classes


def test_pruning_removes_exactly_the_leaves_under_the_threshold():
    # depth 3: internal 0..6, leaves 0..7 below nodes 3 (0, 1), 4 (2, 3), 5 (4, 5), 6 (6, 7)
    none = torch.zeros(7, dtype=torch.long)
    logits = _peaked(8, 4, flat={4, 5, 3})
    routes = prune_routes(logits, none, threshold=0.3)  # uniform leaves have max 0.25 <= 0.3
    # node 5 (both leaves flat) goes: its parent 2 always routes right, to node 6
    # leaf 3 alone goes: its parent 4 always routes left, to leaf 2
    assert routes.tolist() == [0, 0, 1, 0, -1, 0, 0]
    seen = reachable(routes)[7:]
    assert [i for i in range(8) if not seen[i]] == [3, 4, 5]
    assert tree_size(none) == (7, 8) and tree_size(routes) == (4, 5)  # internal 0, 1, 3, 6 still route
    pi = leaf_probabilities(torch.rand(6, 7, generator=torch.Generator().manual_seed(2)), routes)
    assert torch.allclose(pi.sum(1), torch.ones(6)) and float(pi[:, [3, 4, 5]].abs().max()) == 0.0
    # a threshold below every leaf's max prunes nothing
    assert prune_routes(logits, none, threshold=0.2).tolist() == none.tolist()


def test_pruning_keeps_the_roots_children_and_their_subtrees():
    logits = _peaked(8, 4, flat={0, 1, 2, 3})  # every leaf under node 1 is flat
    assert prune_routes(logits, torch.zeros(7, dtype=torch.long), threshold=0.3).tolist() == [0] * 7


def test_path_skips_pruned_nodes_and_projection_classes_follow_the_leaves():
    head = create_head("prototree", num_classes=4, backbone_channels=4, dim=4, depth=3)
    head.leaf_logits.copy_(_peaked(8, 4, flat={4, 5}))
    head.run_action("prune", lambda: None)
    head.prune_threshold = 0.3
    head.run_action("prune", lambda: None)
    assert head.routes.tolist() == [0, 0, 1, 0, 0, 0, 0]
    nodes, rights, leaf = path_nodes(torch.tensor([0.9, 0.5, 0.2, 0.5, 0.5, 0.5, 0.7]), head.routes)
    assert nodes == [0, 6] and rights == [True, True] and leaf == 7  # node 2 is forced, so not shown
    allowed = head.projection_classes()
    # leaf l predicts class l % 4; node 6 holds leaves 6, 7 -> classes 2, 3; node 2 is pruned away: any class
    assert allowed[6].tolist() == [False, False, True, True]
    assert allowed[2].all() and allowed[5].all()
    assert allowed[1].tolist() == [True, True, True, True] and allowed[3].tolist() == [True, True, False, False]


# --------------------------------------------------------------------------- the CLI chain

def _chain(tmp_path, head, *extra):
    run = tmp_path / head
    trained = run_cli("train", "--head", head, *TINY, "--workers", "0", *extra, "--out", run)
    assert trained.returncode == 0, trained.stderr
    evaluated = run_cli("evaluate", run)
    assert evaluated.returncode == 0, evaluated.stderr
    explained = run_cli("explain", run, "--image", "3", "--out", tmp_path / "explain.png")
    assert explained.returncode == 0, explained.stderr
    assert (tmp_path / "explain.png").stat().st_size > 0
    faithful = run_cli("faithfulness", run, "--images", "6")
    assert faithful.returncode == 0, faithful.stderr
    reported = run_cli("report", run, "--out", tmp_path / "site", "--images", "2")
    assert reported.returncode == 0, reported.stderr
    explain_png = tmp_path / "explain.png"
    predicted = run_cli("predict", run, explain_png, "--workers", "0", "--output", tmp_path / "p.csv")
    assert predicted.returncode == 0, predicted.stderr
    (row,) = csv.DictReader((tmp_path / "p.csv").open())
    return evaluated.stdout, explained.stdout, faithful.stdout, (tmp_path / "site"), row


def test_prototree_train_evaluate_explain_faithfulness_report_predict(tmp_path):
    evaluated, explained, faithful, site, row = _chain(tmp_path, "prototree", "--head-opt", "prototree.depth=3")
    for name in ("accuracy[soft]", "accuracy[greedy]", "accuracy[sample-max]"):
        assert name in evaluated
    assert "present -> right" in explained or "absent -> left" in explained
    assert "pruned tree: internal nodes" in explained
    assert "y^ of the predicted class" in faithful
    pages = list(site.glob("test-*.html"))
    assert pages and all("Decision path to leaf" in p.read_text() for p in pages)
    scores = [float(row[f"score_{j}"]) for j in range(1, 4)]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
