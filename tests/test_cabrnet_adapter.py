"""The CaBRNet adapter: lazy import without the extra, and ProtoKNN inside CaBRNet with it.

Tests that need CaBRNet skip without it; tests/cabrnet_ci.sh runs this file inside
.venv-cabrnet, where they all run.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import protoknn_plugin.adapters.cabrnet as adapter
from protoknn_plugin.errors import ProtoKNNError, UnknownNameError

CONFIGS = Path(adapter.__file__).parent / "configs"


# ---------------------------------------------------------------- without the extra
@pytest.fixture
def no_cabrnet(monkeypatch):
    """Make `import cabrnet` fail as if the extra were not installed (None in sys.modules)."""
    monkeypatch.setitem(sys.modules, "cabrnet", None)


@pytest.mark.parametrize("name", ["ProtoKNNClassifier", "ProtoKNNCaBRNet"])
def test_lazy_names_without_cabrnet_name_the_extra(no_cabrnet, name):
    with pytest.raises(ProtoKNNError, match=r"protoknn-plugin\[cabrnet\]"):
        getattr(adapter, name)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        adapter.NoSuchThing  # noqa: B018


def test_baseline_without_cabrnet_names_the_extra(no_cabrnet):
    from protoknn_plugin.adapters.cabrnet.baseline import run_cabrnet_head

    with pytest.raises(ProtoKNNError, match=r"protoknn-plugin\[cabrnet\]"):
        run_cabrnet_head("protopnet", settings=None, splits=None, out_dir="unused", seed=0)


def test_cabrnet_rows_belong_to_the_adapter_s_backend_and_name_the_extra_when_it_is_missing(no_cabrnet):
    from protoknn_plugin.benchmark import RunSpec  # noqa: F401  (registers the default backend)
    from protoknn_plugin.run_backends import backend_for

    backend = backend_for("cabrnet:protopnet")
    assert type(backend).__name__ == "CaBRNetBackend" and backend.architecture("cabrnet:protopnet") == "protopnet"
    assert not (backend.lr_scales or backend.schedules or backend.tuning)  # it builds its own schedule
    assert type(backend_for("protopnet")).__name__ == "PluginBackend"
    with pytest.raises(ProtoKNNError, match=r"protoknn-plugin\[cabrnet\]"):
        backend.check("cabrnet:protopnet")  # what `protoknn benchmark` runs on every row before training


def test_unknown_cabrnet_baseline_suggests_the_known_one():
    from protoknn_plugin.adapters.cabrnet.baseline import run_cabrnet_head

    with pytest.raises(UnknownNameError, match="protopnet"):
        run_cabrnet_head("protopnets", settings=None, splits=None, out_dir="unused", seed=0)


@pytest.mark.parametrize("epochs, warm, periods, start", [
    (1, 0, {"joint": [0, 0]}, 0),
    (8, 2, {"warmup": [0, 1], "joint": [2, 7]}, 7),          # pushes after the last epoch only
    (25, 5, {"warmup": [0, 4], "joint": [5, 24]}, 4),        # pushes after epochs 4, 14, 24
])
def test_protopnet_schedule_matches_the_plugin_head(epochs, warm, periods, start):
    from protoknn_plugin.adapters.cabrnet.baseline import DEFAULT_OPTIONS, protopnet_schedule

    schedule = protopnet_schedule(epochs, DEFAULT_OPTIONS, pretrained=True)
    assert schedule["warm_epochs"] == warm
    assert {name: p["epoch_range"] for name, p in schedule["training"]["periods"].items()} == periods
    projection = schedule["projection"]
    assert projection["start_epoch"] == start
    last_push = start + (epochs - 1 - start) // projection["frequency"] * projection["frequency"]
    assert last_push == epochs - 1  # the final epoch is always followed by a push
    # the last layer trains only after pushes, never in the warm or joint periods
    assert all("last_layer" in p["freeze"] for p in schedule["training"]["periods"].values())


def test_protopnet_schedule_from_scratch_follows_the_benchmark_protocol():
    from protoknn_plugin.adapters.cabrnet.baseline import DEFAULT_OPTIONS, protopnet_schedule
    from protoknn_plugin.heads import create_head

    schedule = protopnet_schedule(4, DEFAULT_OPTIONS, pretrained=False)
    assert schedule["warm_epochs"] == 0 and list(schedule["training"]["periods"]) == ["joint"]
    groups = schedule["training"]["optimizers"]["joint_optimizer"]["groups"]
    ours = create_head("protopnet", num_classes=10, backbone_channels=8, dim=8, num_prototypes=100).phases(4, False)[0]
    assert groups["backbone"] == {"lr": ours.lrs["backbone"], "weight_decay": ours.weight_decay["backbone"]}
    assert groups["add_on"] == {"lr": ours.lrs["addon"], "weight_decay": ours.weight_decay["addon"]}
    assert groups["prototypes"] == {"lr": ours.lrs["prototypes"]}


@pytest.mark.parametrize("epochs, pretrained, backbone_steps, pushes", [
    (4, False, 4 * 65, 1),     # from scratch: no warm epochs; one push, after the last epoch
    (8, True, 6 * 65, 1),      # 2 warm epochs inside the budget leave the backbone 6 epochs
    (25, True, 20 * 65, 3),    # pushes after epochs 4, 14 and 24
])
def test_cabrnet_protopnet_budget_by_hand(epochs, pretrained, backbone_steps, pushes):
    from protoknn_plugin.adapters.cabrnet.baseline import cabrnet_budget

    budget = cabrnet_budget("protopnet", epochs, 65, 110, {}, pretrained)
    assert budget == {"feature_steps": epochs * 65, "images_seen": epochs * 65 * 110,
                      "backbone_steps": backbone_steps, "pushes": pushes,
                      "last_layer_steps": pushes * 20 * 65}  # 20 last-layer epochs of images per push


def test_the_protocol_check_gives_the_cabrnet_row_the_plugin_protopnet_budget():
    from types import SimpleNamespace

    from protoknn_plugin.benchmark import BenchmarkSettings, RunSpec
    from protoknn_plugin.benchmark.comparison import check_protocol
    from protoknn_plugin.errors import ProtoKNNError
    from protoknn_plugin.train import TrainConfig

    splits = SimpleNamespace(channels=1, classes=[str(c) for c in range(10)], train_labels=torch.arange(10).repeat(72))
    settings = BenchmarkSettings(train=TrainConfig(epochs=4))
    specs = [RunSpec("protopnet", "protopnet"), RunSpec("theirs", "cabrnet:protopnet")]
    budgets = check_protocol(specs, settings, splits)  # no CaBRNet install needed
    for key in ("feature_steps", "images_seen", "backbone_steps", "pushes"):
        assert budgets["theirs"][key] == budgets["protopnet"][key], key
    assert budgets["theirs"]["backbone_steps"] == 4 * (720 // 110)
    with pytest.raises(ProtoKNNError, match="valid: prototypes_per_class"):
        check_protocol([RunSpec("theirs", "cabrnet:protopnet", {"warm_epoch": 1})], settings, splits)


def test_prototree_milestones_are_the_paper_s_fractions_of_the_budget():
    from protoknn_plugin.adapters.cabrnet.prototree import PROTOTREE_OPTIONS, fitted_milestones, prototree_schedule

    # 100 epochs: the paper's milestones; 4 epochs: 2.4, 2.8, 3.2, 3.6, 4.0 rounded, repeats kept
    assert fitted_milestones(100, PROTOTREE_OPTIONS["milestones"]) == [60, 70, 80, 90, 100]
    assert fitted_milestones(4, PROTOTREE_OPTIONS["milestones"]) == [2, 3, 3, 4, 4]
    assert fitted_milestones(4, None) == [] and fitted_milestones(10, 0.5) == [5]  # --head-opt none / one number
    with pytest.raises(ProtoKNNError, match="milestones are fractions"):
        fitted_milestones(4, ("soon",))
    scratch = prototree_schedule(4, PROTOTREE_OPTIONS, pretrained=False)
    assert scratch["warm_epochs"] == 0 and scratch["training"]["periods"] == {
        "joint": {"epoch_range": [0, 3], "optimizers": "main_optimizer"}}
    groups = scratch["training"]["optimizers"]["main_optimizer"]["groups"]
    assert groups["backbone"] == {"lr": 1e-3}  # the protocol's from-scratch rate
    pretrained = prototree_schedule(10, PROTOTREE_OPTIONS, pretrained=True)
    assert pretrained["warm_epochs"] == 3  # 30% of 10 epochs with the backbone frozen
    assert pretrained["training"]["periods"]["warmup"] == {"epoch_range": [0, 2], "freeze": ["backbone"],
                                                           "optimizers": "main_optimizer"}


@pytest.mark.parametrize("pretrained", [False, True])
def test_cabrnet_prototree_budget_is_the_plugin_prototree_budget(pretrained):
    from protoknn_plugin.adapters.cabrnet.baseline import cabrnet_budget
    from protoknn_plugin.benchmark.protocol import budget
    from protoknn_plugin.heads import create_head

    epochs, steps, batch = 10, 65, 110
    ours = create_head("prototree", num_classes=10, backbone_channels=8, dim=8).phases(epochs, pretrained)
    expected = budget(ours, steps, batch, train_images=steps * batch)
    assert cabrnet_budget("prototree", epochs, steps, batch, {}, pretrained) == expected
    assert expected["backbone_steps"] == (7 if pretrained else 10) * steps and expected["pushes"] == 1


def test_the_protocol_check_refuses_a_cabrnet_prototree_row_with_another_budget(monkeypatch):
    from types import SimpleNamespace

    from protoknn_plugin.adapters.cabrnet import baseline, prototree
    from protoknn_plugin.benchmark import BenchmarkSettings, RunSpec
    from protoknn_plugin.benchmark.comparison import check_protocol
    from protoknn_plugin.train import TrainConfig

    splits = SimpleNamespace(channels=1, classes=[str(c) for c in range(10)], train_labels=torch.arange(10).repeat(72))
    settings = BenchmarkSettings(train=TrainConfig(epochs=4))
    specs = [RunSpec("prototree", "prototree"), RunSpec("theirs", "cabrnet:prototree")]
    budgets = check_protocol(specs, settings, splits)  # no CaBRNet install needed
    assert budgets["theirs"] == {**budgets["prototree"], "last_layer_epochs": 0}
    with pytest.raises(ProtoKNNError, match=r"unknown cabrnet:prototree option\(s\) detph; valid: depth"):
        check_protocol([RunSpec("theirs", "cabrnet:prototree", {"detph": 4})], settings, splits)
    # a row that froze the backbone for its warm epochs (the pretrained schedule) on a backbone
    # trained from scratch takes fewer backbone steps: refused before anything trains
    frozen = lambda epochs, steps, batch, options, pretrained: prototree.prototree_budget(  # noqa: E731
        epochs, steps, batch, options, True)
    monkeypatch.setitem(baseline.CABRNET_BUDGETS, "prototree", frozen)
    with pytest.raises(ProtoKNNError, match=r"backbone_steps: prototree 24, theirs 18"):
        check_protocol(specs, settings, splits)


# ---------------------------------------------------------------- with CaBRNet
@pytest.fixture(scope="module")
def cabrnet():
    return pytest.importorskip("cabrnet")


def small_classifier(**options):
    from protoknn_plugin.adapters.cabrnet.classifier import ProtoKNNClassifier

    kwargs = dict(num_classes=3, num_features=8, num_prototypes=6, dim=4, k=1, ks=(1, 3), seed=0)
    kwargs.update(options)
    return ProtoKNNClassifier({"name": "CosineSimilarity"}, **kwargs)


def batch(seed=0, n=6):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 8, 3, 3, generator=generator)
    labels = torch.arange(n) % 3
    return features, labels


def test_batch_loo_accuracy_hand_cases(cabrnet):
    from protoknn_plugin.adapters.cabrnet.classifier import batch_loo_accuracy

    profiles = torch.tensor([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0], [5.0, 6.0]])
    assert batch_loo_accuracy(profiles, torch.tensor([0, 0, 1, 1])) == 1.0
    assert batch_loo_accuracy(profiles, torch.tensor([0, 1, 0, 1])) == 0.0
    # pairs (0, 1) and (2, 3) are mutual nearest neighbours: samples 0 and 1 are right, 2 and 3 wrong
    assert batch_loo_accuracy(profiles, torch.tensor([0, 0, 1, 0])) == 0.5
    assert batch_loo_accuracy(profiles[:1], torch.tensor([0])) == 0.0


def test_loss_returns_tensor_and_stats(cabrnet):
    from protoknn_plugin.adapters.cabrnet.classifier import batch_loo_accuracy

    clf = small_classifier()
    features, labels = batch()
    out = clf(features)
    loss, stats = clf.loss(out, labels)
    assert loss.dim() == 0 and loss.requires_grad
    assert {"loss", "task", "cluster", "aux", "accuracy"} <= set(stats)
    assert stats["loss"] == pytest.approx(float(loss.detach()))
    assert stats["loss"] == pytest.approx(stats["task"] + 0.1 * stats["cluster"] + 1.0 * stats["aux"], abs=1e-5)
    assert stats["accuracy"] == batch_loo_accuracy(out.profile, labels)  # no memory yet
    loss.backward()
    assert clf.prototype_layer.prototypes.grad is None  # frozen: they move only by projection
    assert clf.prototype_layer.addon.weight.grad is not None


def test_similarities_are_cabrnet_shaped_and_match_the_profile(cabrnet):
    clf = small_classifier()
    features, _ = batch()
    sims = clf.similarities(features)
    assert sims.shape == (6, 6, 3, 3)
    assert clf.prototypes.shape == (6, 4, 1, 1)
    torch.testing.assert_close(sims.flatten(2).max(dim=2).values, clf(features).profile, atol=1e-5, rtol=0)
    torch.testing.assert_close(clf.distances(features), 1 - sims)


def test_memory_bank_survives_a_state_dict_round_trip(cabrnet):
    clf = small_classifier().eval()
    features, labels = batch()
    with torch.no_grad():
        profiles = clf(features).profile
    clf.fit_memory(profiles, labels)
    buffer = io.BytesIO()
    torch.save(clf.state_dict(), buffer)  # what CaBRNet's checkpoints do
    buffer.seek(0)
    restored = small_classifier(seed=1).eval()  # other prototypes, empty memory
    assert not restored.has_memory
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    knn, knn2 = clf.head.knn, restored.head.knn
    torch.testing.assert_close(knn2.memory_profiles, knn.memory_profiles)
    assert torch.equal(knn2.memory_labels, knn.memory_labels)
    with torch.no_grad():
        _, stats = restored.loss(restored(features), labels)
    # each query is a stored profile: its 1-NN is itself, so k=1 is always right
    assert stats["accuracy_k1"] == 1.0
    assert stats["accuracy"] == stats["accuracy_k1"]  # k=1 is the primary k here
    assert "accuracy_k3" in stats


@pytest.mark.parametrize("options, message", [
    ({"similarity_config": {"name": "ProtoPNetSimilarity"}}, "CosineSimilarity"),
    ({"num_classes": 1}, "num_classes >= 2"),
    ({"no_such_option": 3}, "no_such_option"),
    ({"compatibility_mode": True}, "compatibility_mode"),
])
def test_bad_configuration_is_one_clear_error(cabrnet, options, message):
    from protoknn_plugin.adapters.cabrnet.classifier import ProtoKNNClassifier

    kwargs = dict(similarity_config={"name": "CosineSimilarity"}, num_classes=3, num_features=8,
                  num_prototypes=6, dim=4)
    kwargs.update(options)
    with pytest.raises(ProtoKNNError, match=message):
        ProtoKNNClassifier(**kwargs)


def test_labels_beyond_num_classes_are_one_clear_error(cabrnet):
    clf = small_classifier()
    features, _ = batch()
    with pytest.raises(ProtoKNNError, match="num_classes=3"):
        clf.loss(clf(features), torch.tensor([0, 1, 2, 3, 0, 1]))


# ---------------------------------------------------------------- the whole CaBRNet model
@pytest.fixture(scope="module")
def model_config(cabrnet):
    import yaml

    config = yaml.safe_load((CONFIGS / "model_arch.yml").read_text())
    config["extractor"]["backbone"]["layer"] = "layer1"  # 64 channels, cheaper
    config["classifier"]["params"].update(num_prototypes=6, dim=8, k=1, ks=[1, 3])
    return config


def build(config, **kwargs):
    import copy

    from cabrnet.archs.generic.model import CaBRNet

    return CaBRNet.build_from_config(copy.deepcopy(config), **kwargs)


def image_loader(shuffle=False):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 16, 16, generator=generator)
    labels = torch.arange(12) % 10
    return DataLoader(TensorDataset(images, labels), batch_size=5, shuffle=shuffle)


def test_packaged_config_builds_and_epilogue_projects_and_stores_memory(model_config, tmp_path):
    from protoknn_plugin.adapters.cabrnet import ProtoKNNCaBRNet

    model = build(model_config)
    assert isinstance(model, ProtoKNNCaBRNet)
    loader = image_loader()
    with pytest.raises(ProtoKNNError, match="shuffle: False"):
        model.project(image_loader(shuffle=True), device="cpu")
    with pytest.raises(ProtoKNNError, match="no_such_option"):
        model.epilogue({"projection_set": loader}, None, str(tmp_path), device="cpu", no_such_option=1)
    info = model.epilogue({"projection_set": loader}, None, str(tmp_path), device="cpu")
    assert [entry["proto_idx"] for entry in info] == list(range(6))
    images = loader.dataset.tensors[0]
    with torch.no_grad():
        z = model.classifier.prototype_layer.addon(model.extractor(images))
    for entry in info:  # eq. 14: each prototype is now the (unit) patch it names
        patch = torch.nn.functional.normalize(z[entry["img_idx"], :, entry["h"], entry["w"]], dim=0)
        torch.testing.assert_close(model.classifier.prototypes[entry["proto_idx"], :, 0, 0], patch)
        assert entry["score"] <= 1.0 + 1e-6
    assert len(model.classifier.head.knn) == 12

    # a CaBRNet checkpoint round trip keeps the memory: rebuild from config + state file
    state = tmp_path / "model_state.pth"
    torch.save(model.state_dict(), state)
    reloaded = build(model_config, state_dict_path=str(state)).eval()
    torch.testing.assert_close(reloaded.classifier.head.knn.memory_profiles, model.classifier.head.knn.memory_profiles)
    stats = reloaded.evaluate({"test_set": loader}, device="cpu")
    assert stats["test_set/accuracy_k1"] == 1.0  # the test images are the stored ones

    # counterfactual (sec. 2.4): contributions sum to d_an^2 - d_ap^2
    result = reloaded.counterfactual(images[:1])
    knn = reloaded.classifier.head.knn
    with torch.no_grad():
        anchor = reloaded(images[:1]).profile[0]
    d_ap = (anchor - knn.memory_profiles[result["positive"]]).square().sum()
    d_an = (anchor - knn.memory_profiles[result["negative"]]).square().sum()
    assert result["negative_class"] != result["positive_class"]
    assert float(result["contributions"].sum()) == pytest.approx(float(d_an - d_ap), abs=1e-4)
    from PIL import Image

    ranked = reloaded.explain(Image.new("RGB", (16, 16)), lambda _: images[0], None, device="cpu",
                              disable_rendering=True, num_closest=3)
    contributions = result["contributions"]
    assert [i for i, _, _ in ranked] == torch.argsort(contributions, descending=True)[:3].tolist()
    assert all(similar == (c > 0) for _, c, similar in ranked)


def test_make_tiny_dataset_writes_an_image_folder_and_configs(cabrnet, tmp_path):
    import yaml
    from PIL import Image

    from protoknn_plugin.adapters.cabrnet.make_tiny_dataset import main

    assert main([str(tmp_path), "--train", "20", "--val", "10", "--test", "10"]) == 0
    train = tmp_path / "tiny-animals" / "train"
    folders = sorted(p.name for p in train.iterdir())
    assert folders == [f"{i:02d}-{c}" for i, c in enumerate(
        ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"])]
    assert len(list(train.glob("*/*.png"))) == 20
    assert len(list((tmp_path / "tiny-animals" / "test").glob("*/*.png"))) == 10
    val = {p.relative_to(tmp_path / "tiny-animals" / "val") for p in (tmp_path / "tiny-animals" / "val").glob("*/*.png")}
    assert len(val) == 10 and not val & {p.relative_to(train) for p in train.glob("*/*.png")}  # disjoint from train
    assert sorted({p.parent.name for p in val}) == folders  # one per class
    with Image.open(next(train.glob("*/*.png"))) as img:
        assert img.mode == "RGB" and img.size == (28, 28)
    dataset = yaml.safe_load((tmp_path / "configs" / "dataset.yml").read_text())
    for part in dataset.values():
        root = Path(part["params"]["root"])
        assert root.is_absolute() and root.is_dir()
    assert (tmp_path / "configs" / "model_arch.yml").read_text() == (CONFIGS / "model_arch.yml").read_text()


def test_cabrnet_protopnet_baseline_returns_a_benchmark_row(cabrnet, tmp_path):
    from protoknn_plugin.adapters.cabrnet.baseline import run_cabrnet_head
    from protoknn_plugin.benchmark import BenchmarkSettings
    from protoknn_plugin.data import create_dataset
    from protoknn_plugin.train import TrainConfig

    settings = BenchmarkSettings(prototypes=10, dim=8, limit=40,
                                 train=TrainConfig(epochs=1, batch_classes=10, per_class=2, device="cpu"),
                                 backbone_options={"width": 8})
    splits = create_dataset("animals", limit=40)
    with pytest.raises(ProtoKNNError, match="warm_epoch"):
        run_cabrnet_head("protopnet", settings, splits, tmp_path, seed=0, options={"warm_epoch": 1})
    row = run_cabrnet_head("protopnet", settings, splits, tmp_path, seed=0, options={"last_layer_epochs": 1})
    assert row["label"] == row["head"] == "cabrnet:protopnet" and row["seed"] == 0
    assert row["test_images"] == len(splits.test) == 40
    assert row["warm_epochs"] == 0  # the protocol: no warm phase on a backbone trained from scratch
    # The row describes the model it saved: its spread is that of the saved prototypes (eq. 17).
    from protoknn_plugin.prototypes import prototype_spread

    state = torch.load(tmp_path / "model_state.pth", weights_only=True)
    saved = [value for key, value in state.items() if key.endswith("prototypes")]
    assert len(saved) == 1
    assert row["prototype_spread"] == pytest.approx(prototype_spread(saved[0].flatten(1)), abs=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text()) == row  # floats survive JSON exactly
    assert (tmp_path / "projection_info.csv").is_file()


def test_cabrnet_prototree_routes_like_the_plugin_tree(cabrnet):
    """The same similarities and leaf logits give the same soft prediction y^ in both trees
    (CaBRNet numbers its nodes depth-first, the plugin breadth-first; right = "similar")."""
    from cabrnet.archs.prototree.decision import ProtoTreeClassifier

    from protoknn_plugin.heads.prototree import leaf_probabilities, tree_output

    depth = 3
    classifier = ProtoTreeClassifier({"name": "ProtoTreeSimilarity"}, num_classes=4, depth=depth, num_features=2)
    generator = torch.Generator().manual_seed(0)
    similarities = torch.rand(5, 2 ** depth - 1, generator=generator)  # CaBRNet's prototype order
    logits = torch.randn(2 ** depth, 4, generator=generator)           # CaBRNet's leaf order
    with torch.no_grad():
        for leaf, row in zip(classifier.tree.leaves, logits):
            leaf._relative_distribution.copy_(row[None])
    theirs, _ = classifier.tree(similarities=similarities, parent_probs=torch.ones(1),
                                conditional_probs=torch.ones(1), greedy_path=torch.ones(1, dtype=torch.bool))

    def breadth_first(node, level=0, index=0, order=None):  # node -> (its prototype, breadth-first slot)
        order = {} if order is None else order
        if node.proto_idxs is not None:
            order[2 ** level - 1 + index] = node.proto_idxs[0]
            breadth_first(node.get_submodule(f"{node.node_id}_child_nsim"), level + 1, 2 * index, order)
            breadth_first(node.get_submodule(f"{node.node_id}_child_sim"), level + 1, 2 * index + 1, order)
        return order

    order = breadth_first(classifier.tree)
    ours_similarity = similarities[:, [order[n] for n in range(2 ** depth - 1)]]
    routes = torch.zeros(2 ** depth - 1, dtype=torch.long)
    ours = tree_output(leaf_probabilities(ours_similarity, routes), logits)  # leaves: left to right
    assert torch.allclose(theirs, ours, atol=1e-6)


def test_cabrnet_prototree_updates_its_leaves_like_the_plugin_tree(cabrnet):
    """Two batches of CaBRNet's ProtoTree epoch with nothing else learning (rate 0): its leaves
    end where the plugin's derivative-free update takes them from the same forward passes."""
    from cabrnet.archs.prototree.decision import ProtoTreeClassifier
    from cabrnet.archs.prototree.model import ProtoTree

    from protoknn_plugin.heads.prototree import derivative_free_update

    torch.manual_seed(0)
    classifier = ProtoTreeClassifier({"name": "ProtoTreeSimilarity"}, num_classes=3, depth=2, num_features=4)
    model = ProtoTree(extractor=nn.Sequential(nn.Conv2d(2, 4, 1), nn.Sigmoid()), classifier=classifier)
    leaves = list(classifier.tree.leaves)
    with torch.no_grad():
        for leaf in leaves:
            leaf._relative_distribution.copy_(torch.rand(1, 3) * 2)
    xs, ys = torch.rand(8, 2, 3, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loader = DataLoader(TensorDataset(xs, ys), batch_size=4)
    start = torch.cat([leaf._relative_distribution.detach() for leaf in leaves])  # (L, C)

    def set_leaves(logits):
        with torch.no_grad():
            for leaf, row in zip(leaves, logits):
                leaf._relative_distribution.copy_(row[None])

    expected = start.clone()
    with torch.no_grad():
        for batch_x, batch_y in loader:  # the second batch sees the leaves the first one left
            y_hat, info = model(batch_x)
            pi = torch.cat([info[leaf.node_id]["absolute_probability"] for leaf in leaves], dim=1)  # (B, L)
            expected = derivative_free_update(expected, start, pi, y_hat, batch_y, steps_per_epoch=2)
            set_leaves(expected)
    set_leaves(start)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    model._train_epoch({"train_set": loader}, frozen, device="cpu")
    theirs = torch.cat([leaf._relative_distribution.detach() for leaf in leaves])
    assert torch.allclose(theirs, expected, atol=1e-6)
    assert not torch.allclose(theirs, start)  # the leaves did move


def test_cabrnet_prototree_baseline_returns_a_benchmark_row(cabrnet, tmp_path):
    import csv

    from protoknn_plugin.adapters.cabrnet.baseline import run_cabrnet_head
    from protoknn_plugin.adapters.cabrnet.prototree import build_cabrnet_prototree, PROTOTREE_OPTIONS
    from protoknn_plugin.benchmark import BenchmarkSettings
    from protoknn_plugin.data import create_dataset
    from protoknn_plugin.train import TrainConfig

    settings = BenchmarkSettings(dim=8, limit=40,
                                 train=TrainConfig(epochs=1, batch_classes=10, per_class=2, device="cpu"),
                                 backbone_options={"width": 8})
    splits = create_dataset("animals", limit=40)
    with pytest.raises(ProtoKNNError, match="unknown cabrnet:prototree option"):
        run_cabrnet_head("prototree", settings, splits, tmp_path, seed=0, options={"detph": 2})
    row = run_cabrnet_head("prototree", settings, splits, tmp_path, seed=0, options={"depth": 2})
    assert row["label"] == row["head"] == "cabrnet:prototree" and row["seed"] == 0
    assert row["test_images"] == len(splits.test) == 40 and 0.0 <= row["accuracy[top1]"] <= 1.0
    assert row["warm_epochs"] == 0  # the protocol: no frozen epochs on a backbone trained from scratch
    # 10 classes: every leaf's max softmax is >= 0.1 > 0.01, so pruning keeps the whole tree
    assert (row["tree_leaves"], row["tree_prototypes"]) == (4, 3)
    assert json.loads((tmp_path / "metrics.json").read_text()) == row
    # The saved prototypes are projected: each is the add-on feature at the patch recorded for it.
    model = build_cabrnet_prototree(settings, 10, splits.channels, seed=1, options={**PROTOTREE_OPTIONS, "depth": 2})
    model.load_state_dict(torch.load(tmp_path / "model_state.pth", weights_only=True))
    model.eval()
    with open(tmp_path / "projection_info.csv") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 3
    for record in records:
        image, _ = splits.train_plain[int(record["img_idx"])]
        with torch.no_grad():
            feature = model.features(image[None])[0, :, int(record["h"]), int(record["w"])]
        prototype = model.classifier.prototypes[int(record["proto_idx"])].flatten()
        assert torch.allclose(prototype, feature, atol=1e-5)


def test_benchmark_cli_runs_prototree_beside_cabrnet_prototree_under_the_protocol(cabrnet, tmp_path):
    from conftest import TINY, assert_one_line_error, run_cli

    bad = run_cli("benchmark", "--heads", "prototree,cabrnet:prototree", *TINY,
                  "--head-opt", "cabrnet:prototree.detph=3", "--out", tmp_path / "bad")
    assert_one_line_error(bad, "cabrnet:prototree", "detph")
    assert bad.returncode == 2 and not (tmp_path / "bad" / "runs").exists()  # refused before training
    result = run_cli("benchmark", "--heads", "prototree,cabrnet:prototree", *TINY, "--seeds", "0", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    rows = {run["label"]: run for run in runs}
    assert set(rows) == {"prototree", "cabrnet:prototree"}
    for key in ("images_seen", "backbone_steps", "pushes"):  # the budget both rows were checked on
        assert rows["prototree"][key] == rows["cabrnet:prototree"][key], key
    assert rows["cabrnet:prototree"]["backbone_steps"] == 3  # 1 epoch of 3 steps
    assert rows["cabrnet:prototree"]["test_images"] == rows["prototree"]["test_images"]


def test_classifier_opt_sets_model_arch_params(cabrnet, tmp_path):
    import yaml

    from protoknn_plugin.adapters.cabrnet.make_tiny_dataset import main

    assert main([str(tmp_path), "--train", "20", "--val", "10", "--test", "10",
                 "--classifier-opt", "aux_loss=none", "--classifier-opt", "k=3"]) == 0
    params = yaml.safe_load((tmp_path / "configs" / "model_arch.yml").read_text())["classifier"]["params"]
    assert params["aux_loss"] == "none" and params["k"] == 3 and params["task_loss"] == "margin"


# ---------------------------------------------------------------- parameter groups under CaBRNet
TASK_LOSSES = ["margin", "triplet-margin", "proxy-anchor"]
AUX_LOSSES = ["margin", "proxy-anchor", "none"]


def packaged_training_config():
    import yaml

    return yaml.safe_load((CONFIGS / "training.yml").read_text())


def optimiser_groups(model, training_config):
    """{group name: (lr, [parameter names])} of the optimiser CaBRNet builds from training_config."""
    from cabrnet.core.utils.optimizers import OptimizerManager

    model.register_training_params(training_config)  # what `cabrnet train` does first
    manager = OptimizerManager.build_from_config(config=training_config, model=model)
    names = {id(p): n for n, p in model.named_parameters()}
    optimiser = manager.optimizers["main_optimizer"]
    group_names = list(training_config["optimizers"]["main_optimizer"]["groups"])
    return {name: (group["lr"], [names[id(p)] for p in group["params"]])
            for name, group in zip(group_names, optimiser.param_groups)}


@pytest.mark.parametrize("task", TASK_LOSSES)
@pytest.mark.parametrize("aux", AUX_LOSSES)
def test_every_loss_combination_gets_its_optimiser_from_the_shipped_training_yml(model_config, task, aux):
    # CaBRNet 1.2 crashed (NameError) on groups that matched nothing, e.g. aux_loss none
    config = {**model_config, "classifier": {**model_config["classifier"], "params": {
        **model_config["classifier"]["params"], "task_loss": task, "aux_loss": aux}}}
    model = build(config)
    groups = optimiser_groups(model, packaged_training_config())
    placed = [name for _, names in groups.values() for name in names]
    assert len(placed) == len(set(placed))  # no parameter in two groups
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(placed) == trainable  # everything trains, the frozen prototypes do not
    assert "classifier.prototype_layer.prototypes" not in placed
    assert bool(groups["head"][1]) == (aux != "none")
    assert bool(groups["beta"][1]) == ("margin" in (task, aux))
    assert bool(groups["proxies"][1]) == ("proxy-anchor" in (task, aux))
    assert all(name.endswith(".beta") for name in groups["beta"][1])
    assert all(name.endswith(".proxies") for name in groups["proxies"][1])


def test_proxies_train_at_100x_the_base_rate_under_cabrnet(model_config):
    config = {**model_config, "classifier": {**model_config["classifier"], "params": {
        **model_config["classifier"]["params"], "aux_loss": "proxy-anchor"}}}
    model = build(config)
    groups = optimiser_groups(model, packaged_training_config())
    proxies = "classifier.head.aux_loss.loss.proxies"
    proxy_lr = [lr for lr, names in groups.values() if proxies in names]
    base_lr = [lr for lr, names in groups.values() if "classifier.prototype_layer.addon.weight" in names]
    assert proxy_lr == [pytest.approx(100 * base_lr[0])]  # in exactly one group, at 100x the add-on's 1e-3
    assert groups["beta"][0] == pytest.approx(5e-4) and proxies not in groups["beta"][1]
    # the same rates as `protoknn train` gives this head
    phase = model.classifier.head.phases(1, pretrained_backbone=False)[0]
    assert proxy_lr[0] == pytest.approx(phase.lrs["proxies"]) and base_lr[0] == pytest.approx(phase.lrs["addon"])


def test_include_that_matches_nothing_is_one_clear_error_not_cabrnets_name_error(model_config):
    config = {**model_config, "classifier": {**model_config["classifier"], "params": {
        **model_config["classifier"]["params"], "aux_loss": "none"}}}
    model = build(config)
    training = packaged_training_config()
    training["param_groups"]["head"] = "classifier.head.aux_embedding"  # the old shipped pattern
    with pytest.raises(ProtoKNNError, match=r"param_groups\.head includes 'classifier\.head\.aux_embedding'"):
        model.register_training_params(training)


def test_proxies_sharing_the_beta_group_is_one_clear_error(model_config):
    config = {**model_config, "classifier": {**model_config["classifier"], "params": {
        **model_config["classifier"]["params"], "aux_loss": "proxy-anchor"}}}
    model = build(config)
    training = packaged_training_config()
    # the old shipped groups: proxies fell into `beta` at 5e-4
    training["param_groups"] = {"backbone": "extractor.convnet", "addon": "classifier.prototype_layer.addon",
                                "head": "classifier.head.aux_embedding",
                                "beta": ["classifier.head.task_loss", "classifier.head.aux_loss"]}
    with pytest.raises(ProtoKNNError, match=r"param_groups\.beta mixes the proxy-anchor proxies"):
        model.register_training_params(training)


# ---------------------------------------------------------------- class-balanced batches, kNN validation
@pytest.fixture(scope="module")
def tiny(cabrnet, tmp_path_factory):
    from protoknn_plugin.adapters.cabrnet.make_tiny_dataset import write_image_folder

    root = tmp_path_factory.mktemp("tiny")
    write_image_folder(root, train=40, test=10, val=10)
    return root / "tiny-animals"


def to_tensor():
    from torchvision import transforms

    return transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])


def test_class_balanced_loader_draws_per_class_images_of_distinct_classes(tiny):
    from protoknn_plugin.adapters.cabrnet.sampler import ClassBalancedImageFolder, class_balanced_loader

    dataset = ClassBalancedImageFolder(str(tiny / "train"), per_class=2, transform=to_tensor())
    loader = class_balanced_loader(DataLoader(dataset, batch_size=8, shuffle=True))
    epochs = [[labels for _, labels in loader] for _ in range(2)]
    for batches in epochs:
        assert len(batches) == 40 // 8  # one epoch = N // batch_size batches
        for labels in batches:
            counts = torch.bincount(labels, minlength=10)
            assert sorted(counts[counts > 0].tolist()) == [2, 2, 2, 2]  # 4 classes x 2 images
    assert any(not torch.equal(a, b) for a, b in zip(*epochs))  # each epoch draws anew
    with pytest.raises(ProtoKNNError, match="multiple of per_class"):
        class_balanced_loader(DataLoader(dataset, batch_size=7))
    with pytest.raises(ProtoKNNError, match="asks for 12 classes"):
        class_balanced_loader(DataLoader(dataset, batch_size=24))
    with pytest.raises(ProtoKNNError, match="per_class >= 2"):
        ClassBalancedImageFolder(str(tiny / "train"), per_class=1)


def test_train_epoch_uses_class_balanced_batches_and_validates_with_the_knn(model_config, tiny):
    from cabrnet.core.utils.optimizers import OptimizerManager
    from torchvision.datasets import ImageFolder

    from protoknn_plugin.adapters.cabrnet.sampler import ClassBalancedImageFolder

    model = build(model_config)
    optimizer = OptimizerManager.build_from_config(config=packaged_training_config(), model=model)
    train = ClassBalancedImageFolder(str(tiny / "train"), per_class=2, transform=to_tensor())
    seen = []
    model.extractor.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    plain = {"train_set": DataLoader(train, batch_size=10, shuffle=True),
             "projection_set": DataLoader(ImageFolder(str(tiny / "train"), transform=to_tensor()), batch_size=16)}
    model.train_epoch(plain, optimizer, device="cpu")
    assert not model.classifier.has_memory  # no val_set: the memory waits for the epilogue
    assert seen[:4] == [10, 10, 10, 10]
    loaders = {**plain, "val_set": DataLoader(ImageFolder(str(tiny / "val"), transform=to_tensor()), batch_size=16)}
    stats = model.train_epoch(loaders, optimizer, device="cpu")
    assert "train_set/accuracy" in stats
    assert len(model.classifier.head.knn) == 40  # memory = the projection set's profiles
    val = model.evaluate(loaders, "val_set", device="cpu")  # what CaBRNet runs after each epoch
    assert {"val_set/accuracy", "val_set/accuracy_k1", "val_set/accuracy_k3"} <= set(val)
    # kNN accuracy by hand: the val profiles against the stored ones, at the primary k (1 here)
    profiles, labels = model.profiles(loaders["val_set"], device="cpu")
    by_hand = float((model.classifier.head.knn.predict(profiles) == labels).float().mean())
    assert val["val_set/accuracy"] == pytest.approx(by_hand)
