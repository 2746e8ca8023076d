"""ProtoTree and PIP-Net heads: their math on tiny tensors by hand, and the CLI chain for each."""
import csv
import math

import pytest
import torch

from protoknn_plugin.heads import create_head
from protoknn_plugin.heads.prototree import (derivative_free_update, greedy_leaves, leaf_probabilities, path_nodes,
                                              prune_routes, reachable, tree_output, tree_size)
from protoknn_plugin.heads.pipnet import alignment_loss, class_loss, tanh_loss, two_views
from protoknn_plugin.prototypes import PrototypeLayer, PrototypeOutputs, project

from conftest import TINY, assert_one_line_error, cli_interrupted_at_step, run_cli


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
    head.begin_epoch(None, 0, steps=4, first_step=0, run_epoch=0)
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
    expected_nll = float(-tree_output(pi, before)[[0, 1], [2, 0]].log().mean())
    assert float(terms["nll"].detach()) == pytest.approx(expected_nll, rel=1e-5)


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
    allowed = head.projection_classes().t()  # (C, N) -> per node
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
    predicted = run_cli("predict", run, explain_png, "--workers", "0", "--out", tmp_path / "p.csv")
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
    assert "See the tree" in (site / "index.html").read_text()
    assert (site / "tree.html").read_text().count("<strong>leaf ") == 8  # depth 3, nothing pruned at 0.01
    scores = [float(row[f"score_{j}"]) for j in range(1, 4)]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6


# --------------------------------------------------------------------------- PIP-Net

def test_alignment_loss_by_hand_and_its_stop_gradient():
    # two patches; view 1: (0.8, 0.2), (0.5, 0.5); view 2: (0.6, 0.4), (0.1, 0.9)
    z1 = torch.tensor([[0.8, 0.5], [0.2, 0.5]]).view(1, 2, 1, 2).requires_grad_(True)
    z2 = torch.tensor([[0.6, 0.1], [0.4, 0.9]]).view(1, 2, 1, 2).requires_grad_(True)
    loss = alignment_loss(z1, z2)
    dots = [0.8 * 0.6 + 0.2 * 0.4, 0.5 * 0.1 + 0.5 * 0.9]  # 0.56, 0.50
    assert float(loss.detach()) == pytest.approx(-(math.log(dots[0] + 1e-12) + math.log(dots[1] + 1e-12)) / 2, rel=1e-6)
    loss.backward()
    # each direction differentiates only its own view (the other is detached): d/dz1 = -z2 / (2 * 2 patches * dot)
    expected = torch.tensor([[0.6 / dots[0], 0.1 / dots[1]], [0.4 / dots[0], 0.9 / dots[1]]]) / -4
    assert torch.allclose(z1.grad.view(2, 2), expected, atol=1e-6)


def test_tanh_loss_by_hand():
    p1 = torch.tensor([[0.2, 0.0], [0.3, 0.1]])  # batch sums 0.5, 0.1
    p2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # batch sums 2.0, 0.0
    view1 = (math.log(math.tanh(0.5) + 1e-8) + math.log(math.tanh(0.1) + 1e-8)) / 2
    view2 = (math.log(math.tanh(2.0) + 1e-8) + math.log(0 + 1e-8)) / 2
    assert float(tanh_loss(p1, p2)) == pytest.approx(-(view1 + view2) / 2, rel=1e-6)


def test_class_loss_normalises_scores_with_log1p_of_the_power():
    scores, labels = torch.tensor([[1.0, 2.0], [0.5, 0.0]]), torch.tensor([1, 0])
    inputs = [[math.log(2.0), math.log(5.0)], [math.log(1.25), 0.0]]
    expected = -sum(row[y] - math.log(sum(math.exp(v) for v in row)) for row, y in zip(inputs, [1, 0])) / 2
    assert float(class_loss(scores, labels, 2.0)) == pytest.approx(expected, rel=1e-6)


def test_presence_is_the_max_over_patches_of_a_softmax_over_prototypes_and_projection_moves_nothing():
    layer = PrototypeLayer(3, 3, 3, similarity="channel-softmax", addon="linear")
    with torch.no_grad():
        layer.addon.weight.copy_(torch.eye(3)[:, :, None, None])
        layer.addon.bias.zero_()
    feats = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]).view(1, 3, 1, 2)
    expected = torch.stack([feats[0, :, 0, 0].softmax(0), feats[0, :, 0, 1].softmax(0)]).max(0).values
    assert torch.allclose(layer(feats).profile.detach()[0], expected)
    before = layer.prototypes.detach().clone()
    record = project(layer, [(feats, torch.tensor([0]), torch.tensor([7]))])
    assert torch.equal(layer.prototypes.detach(), before)
    assert record.location.tolist() == [0, 1, 1]  # p2: 1 / (2 + e) at patch 1 > 1 / (2 + e^2) at patch 0


def test_two_views_pair_up_and_differ():
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    head = create_head("pipnet", num_classes=2, backbone_channels=4, dim=4, num_prototypes=4)
    views, labels = head.prepare_batch(images, torch.tensor([0, 1, 1]))
    assert views.shape == (6, 1, 8, 8) and labels.tolist() == [0, 0, 1, 1, 1, 1]
    assert not torch.allclose(views[0], views[1])
    plain = two_views(images, shift=0, brightness=0.0, contrast=0.0)
    assert torch.allclose(plain[0::2], images) and torch.allclose(plain[1::2], images)


def test_class_layer_stays_non_negative_and_becomes_sparse_after_training():
    torch.manual_seed(0)
    head = create_head("pipnet", num_classes=2, backbone_channels=4, dim=6, num_prototypes=6)
    head.stage = "finetune"
    # class 0 shows prototypes 0, 1; class 1 shows 2, 3; prototypes 4, 5 are in every image
    labels = torch.arange(40) % 2
    presence = torch.rand(40, 6) * 0.1
    presence[labels == 0, :2] += 0.8
    presence[labels == 1, 2:4] += 0.8
    presence[:, 4:] += 0.5
    optimizer = torch.optim.Adam(head.param_groups()["last_layer"], lr=0.05)
    for _ in range(150):
        loss = class_loss(head.last_layer(presence), labels, head.multiplier)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        head.after_step()
    raw = head.last_layer.raw_weight.detach()
    assert float(raw.min()) >= 0.0  # non-negative after every step, not only through the relu
    assert float(raw[0, 2:4].max()) == 0.0 and float(raw[1, :2].max()) == 0.0  # the other class's evidence
    assert float(raw[0, :2].min()) > 0 and float(raw[1, 2:4].min()) > 0
    assert (head.scores(presence).argmax(1) == labels).all()
    info = head.stage_info(lambda: presence)
    zeros = float((head.last_layer.weight <= 1e-3).float().mean())
    assert info["sparsity"] == pytest.approx(zeros) and zeros >= 4 / 12


def test_stage_info_and_zero_unused_by_hand():
    head = create_head("pipnet", num_classes=2, backbone_channels=4, dim=3, num_prototypes=3)
    with torch.no_grad():
        head.last_layer.raw_weight.copy_(torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 0.5]]))
    presence = torch.tensor([[0.9, 0.2, 0.05], [0.05, 0.8, 0.05]])
    info = head.stage_info(lambda: presence)
    # presence below 0.1 counts as 0: image 0 -> class 0 (0.9 against 0.4), relevant: prototype 0 only;
    # image 1 -> class 1 (1.6 against 0), relevant: prototype 1 only (prototype 2's 0.05 x 0.5 is dropped)
    assert info["sparsity"] == pytest.approx(2 / 6) and info["prototypes_used"] == 3
    assert info["local_explanation_size"] == pytest.approx(1.0)
    head.run_action("zero-unused", lambda: (presence, torch.tensor([0, 1])))
    assert head.last_layer.raw_weight[:, 2].abs().max() == 0 and head.last_layer.raw_weight[0, 0] == 1.0


def test_pipnet_train_evaluate_explain_faithfulness_report_predict(tmp_path):
    evaluated, explained, faithful, site, row = _chain(tmp_path, "pipnet", "--epochs", "3")
    for name in ("accuracy[top1]", "sparsity", "local_explanation_size"):
        assert name in evaluated
    assert "ranked by contribution" in explained
    assert "logit of the predicted class" in faithful
    assert list(site.glob("test-*.html"))
    assert row["predicted_class"]


def test_pipnet_refuses_a_frozen_backbone_in_one_line(tmp_path):
    result = run_cli("train", "--head", "pipnet", *TINY, "--frozen-backbone", "--out", tmp_path / "run")
    assert_one_line_error(result, "pipnet", "--frozen-backbone", "augmentations")


# --------------------------------------------------------------------------- through the trainer

@pytest.fixture(scope="module")
def animals_small():
    from protoknn_plugin.data import create_dataset

    return create_dataset("animals", limit=200)


def _fit(head, splits, epochs, **head_options):
    from protoknn_plugin.model import ModelConfig, PrototypeModel
    from protoknn_plugin.train import TrainConfig, Trainer

    config = ModelConfig(head=head, backbone="small-cnn", num_classes=10, in_channels=1, num_prototypes=12, dim=8,
                         backbone_options={"width": 4}, head_options=head_options)
    model = PrototypeModel(config)
    trainer = Trainer(model, splits, TrainConfig(epochs=epochs, steps_per_epoch=3, batch_classes=5, per_class=2),
                      progress=False, stage_eval=splits.test)
    return model, trainer.fit()


def test_prototree_stages_report_soft_and_greedy_with_the_tree_before_and_after_pruning(animals_small):
    model, state = _fit("prototree", animals_small, 1, depth=3, prune_threshold=0.5)
    head = model.head
    assert float(head.leaf_logits.abs().sum()) > 0  # the trainer ran the derivative-free update
    before, end = state.stages[-2], state.stages[-1]
    assert before["when"] == "before prune+project" and end["when"] == "end"
    for stage in (before, end):
        assert {"accuracy[soft]", "accuracy[greedy]", "accuracy[sample-max]"} <= set(stage)
    assert (before["tree_internal_nodes"], before["tree_leaves"]) == (7, 8)
    # the pruning the trainer ran is the one of the leaves it trained, and the end stage reports its size
    assert head.routes.tolist() == prune_routes(head.leaf_logits, torch.zeros(7, dtype=torch.long), 0.5).tolist()
    assert (end["tree_internal_nodes"], end["tree_leaves"]) == tree_size(head.routes)
    # every node that still routes was pushed onto an image of a class one of its leaves predicts
    allowed = head.projection_classes().cpu().t()  # (C, N) -> per node
    labels = animals_small.train_labels[model.projection.image_index]
    assert all(bool(allowed[n, labels[n]]) for n in range(7))


def test_pipnet_trains_on_two_views_and_keeps_a_non_negative_class_layer(animals_small, monkeypatch):
    from protoknn_plugin.heads.pipnet import PIPNetHead

    sizes = []
    original = PIPNetHead.loss
    monkeypatch.setattr(PIPNetHead, "loss", lambda self, out, labels: sizes.append(len(labels)) or
                        original(self, out, labels))
    model, state = _fit("pipnet", animals_small, 3)
    assert sizes and all(size == 20 for size in sizes)  # 10 images x 2 views per step
    assert [entry["phase"] for entry in state.history] == ["pretrain", "joint", "joint"]  # from scratch: no finetune
    head = model.head
    assert [p.name for p in head.phases(70, pretrained_backbone=True)] == ["pretrain", "finetune", "joint"]
    assert [p.epochs for p in head.phases(70, pretrained_backbone=True)] == [10, 3, 57]
    assert float(model.head.last_layer.raw_weight.detach().min()) >= 0.0
    assert {"sparsity", "local_explanation_size", "prototypes_used"} <= set(state.stages[-1])


def test_benchmark_stage_table_shows_the_tree_size_before_and_after_pruning():
    from protoknn_plugin.benchmark.tables import stage_lines

    stage = {"phase": "joint", "phase_index": 0, "accuracy[soft]": 0.5, "accuracy[greedy]": 0.4}
    runs = [{"label": "prototree", "stages": [{**stage, "when": "before prune+project", "tree_leaves": 32},
                                              {**stage, "when": "end", "tree_leaves": 21}]},
            {"label": "cnn", "stages": [{"phase": "train", "phase_index": 0, "when": "end", "accuracy[top1]": 0.3}]}]
    lines = stage_lines(runs)
    header = [cell.strip() for cell in lines[0].split("|")]
    assert "tree_leaves" in header and "phase_index" not in header
    column = header.index("tree_leaves")
    rows = {line.split("|")[2].strip(): [cell.strip() for cell in line.split("|")] for line in lines[2:]}
    assert rows["joint: before prune+push"][column] == "32.0" and rows["joint: end"][column] == "21.0"
    assert rows["train: end"][column] == "—"


def test_prototree_trains_on_a_frozen_backbone_cache(tmp_path):
    result = run_cli("train", "--head", "prototree", *TINY, "--head-opt", "prototree.depth=2", "--frozen-backbone",
                     "--cache-dir", tmp_path / "cache", "--workers", "0", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "tree_leaves" in result.stdout and "accuracy[greedy]" in result.stdout


@pytest.mark.parametrize("head", ["prototree", "pipnet"])
def test_interrupted_mid_epoch_then_resumed_matches_the_straight_run(head, tmp_path):
    """The leaves' epoch-start snapshot and PIP-Net's stage survive a resume mid-epoch."""
    from protoknn_plugin.checkpoint import load_checkpoint

    args = ["train", "--head", head, *TINY, "--workers", "0"]
    args[args.index("--epochs") + 1] = "3"
    args[args.index("--steps-per-epoch") + 1] = "4"
    done = run_cli(*args, "--out", tmp_path / "straight")
    assert done.returncode == 0, done.stderr
    stopped = cli_interrupted_at_step([*args, "--out", tmp_path / "stopped"], step=6)  # mid second epoch
    assert stopped.returncode == 130, stopped.stderr
    resumed = run_cli(*args, "--out", tmp_path / "stopped", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (load_checkpoint(tmp_path / name)["model"] for name in ("straight", "stopped"))
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


def test_heads_command_lists_both_with_losses_defaults_and_option_keys():
    result = run_cli("heads")
    assert result.returncode == 0, result.stderr
    flat = " ".join(result.stdout.split())
    for words in (("prototree", "NLL", "depth", "prune_threshold", "greedy"),
                  ("pipnet", "L_align", "L_tanh", "view_shift", "class_lr", "sparse")):
        for word in words:
            assert word in flat, word
