"""Explanations: contribution identity, activation boxes, counterfactuals, ProtoPNet's view, figures and CLI."""
import os

import pytest
import torch

from protoknn_plugin.cli.explaining import explain_command
from protoknn_plugin.data import create_dataset
from protoknn_plugin.errors import ProtoKNNError, UnknownNameError
from protoknn_plugin.explain import (activation_box, cell_box, contributions, counterfactual, resolve_class,
                                     this_looks_like_that)
from protoknn_plugin.figures import counterfactual_figure, looks_like_figure, prototype_grid_figure, save_figure
from protoknn_plugin.model import ModelConfig, PrototypeModel
from protoknn_plugin.train import TrainConfig, Trainer

from conftest import assert_one_line_error, run_cli_parallel

torch.set_num_threads(1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- contributions

def test_contributions_hand_computed():
    s_a, s_p, s_n = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 2.0])
    c = contributions(s_a, s_p, s_n)
    # (1-0)^2 - (1-1)^2 = 1;  (0-0)^2 - (0-1)^2 = -1;  (2-2)^2 - (2-0)^2 = -4
    assert c.tolist() == [1.0, -1.0, -4.0]
    d_an2, d_ap2 = 1.0, 5.0
    assert float(c.sum()) == d_an2 - d_ap2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_contributions_sum_to_distance_difference(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        s_a, s_p, s_n = (torch.rand(512, generator=gen, dtype=dtype) for _ in range(3))
        c = contributions(s_a, s_p, s_n)
        assert c.dtype == dtype
        expected = (s_a - s_n).square().sum() - (s_a - s_p).square().sum()
        scale = float((s_a - s_n).square().sum() + (s_a - s_p).square().sum())
        assert abs(float(c.sum() - expected)) <= tol * scale


def test_contributions_reject_mismatched_shapes():
    with pytest.raises(ProtoKNNError, match="same shape"):
        contributions(torch.zeros(3), torch.zeros(4), torch.zeros(3))


# --------------------------------------------------------------------------- boxes

def test_activation_box_single_hot_cell_covers_its_image_region():
    sim = torch.zeros(7, 7)
    sim[2, 5] = 1.0  # cell rows 8..11, cols 20..23 of a 28x28 image
    x0, y0, x1, y1 = activation_box(sim, (28, 28))
    assert x0 <= 21 < 22 < x1 and y0 <= 9 < 10 < y1  # the cell's centre pixels are inside
    assert x0 >= 16 and x1 <= 28 and y0 >= 4 and y1 <= 16  # at most one cell of spill-over
    assert (x1 - x0) * (y1 - y0) <= 100  # the 95th percentile keeps a small region, not the image


def test_activation_box_orders_x_and_y_on_a_wide_image():
    sim = torch.zeros(7, 7)
    sim[1, 6] = 1.0  # image 28 high, 56 wide: cell rows 4..7, cols 48..55
    x0, y0, x1, y1 = activation_box(sim, (28, 56))
    assert 40 <= x0 <= 48 and x1 == 56 and 0 <= y0 <= 4 and 8 <= y1 <= 12


def test_activation_box_of_a_flat_map_is_the_whole_image():
    assert activation_box(torch.full((7, 7), 0.3), (28, 30)) == (0, 0, 30, 28)


def test_activation_box_rejects_a_batch_of_maps():
    with pytest.raises(ProtoKNNError, match=r"\(H, W\)"):
        activation_box(torch.zeros(2, 7, 7), (28, 28))


def test_cell_box_scales_the_feature_cell_to_the_image():
    assert cell_box((2, 5), (7, 7), (28, 28)) == (20, 8, 24, 12)
    assert cell_box((0, 0), (7, 7), (224, 224)) == (0, 0, 32, 32)


def test_resolve_class_is_case_insensitive_and_suggests():
    classes = ["bear", "bird", "cat"]
    assert resolve_class("CAT", classes) == 2
    with pytest.raises(UnknownNameError, match="Did you mean 'cat'"):
        resolve_class("caat", classes)


# --------------------------------------------------------------------------- tiny trained runs

@pytest.fixture(scope="module")
def splits():
    return create_dataset("animals", limit=200, augment=False)


def _train(head, splits, out_dir):
    model = PrototypeModel(ModelConfig(head=head, num_classes=10, in_channels=1, num_prototypes=20, dim=16,
                                       backbone_options={"width": 8}))
    config = TrainConfig(epochs=1, steps_per_epoch=3, threads=1)
    Trainer(model, splits, config, out_dir=str(out_dir), progress=False, dataset_name="animals",
            data_info={"data_dir": None, "limit": 200}).fit()
    return model.eval()


@pytest.fixture(scope="module")
def runs(splits, tmp_path_factory):
    """Tiny finished runs of each head, trained in-process (a few seconds in all)."""
    root = tmp_path_factory.mktemp("runs")
    return {head: (root / head, _train(head, splits, root / head)) for head in ("protoknn", "protopnet", "cnn")}


def _box_inside(box, size):
    x0, y0, x1, y1 = box
    h, w = size
    return 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def _brute_nearest(knn, profile, mask=None):
    d = (knn.memory_profiles - profile.float()[None]).square().sum(1)
    if mask is not None:
        d = d.masked_fill(~mask, float("inf"))
    return float(d.min()), int(d.argmin())


def test_counterfactual_positive_is_nearest_and_contributions_sum(runs, splits):
    model = runs["protoknn"][1]
    knn = model.head.knn
    image, label = splits.test[5]
    cf = counterfactual(model, image, splits.train_plain, top=4, label=label)
    d_ap2, pos = _brute_nearest(knn, cf.anchor_profile)
    assert cf.positive_memory == pos and cf.positive_index == int(knn.memory_index[pos])
    assert cf.predicted_class == int(knn.memory_labels[pos]) == splits.train_plain[cf.positive_index][1]
    assert cf.d_ap2 == pytest.approx(d_ap2, rel=1e-4, abs=1e-6)
    # default negative: the nearest memory item of any other class
    d_an2, neg = _brute_nearest(knn, cf.anchor_profile, knn.memory_labels != cf.predicted_class)
    assert cf.negative_memory == neg and cf.negative_class != cf.predicted_class
    assert cf.d_an2 == pytest.approx(d_an2, rel=1e-4, abs=1e-6)
    assert cf.d_ap2 <= cf.d_an2
    # the identity, on exactly the profiles reported
    assert cf.difference == pytest.approx(cf.d_an2 - cf.d_ap2, abs=1e-12)
    assert float(cf.contributions.sum()) == pytest.approx(cf.difference, abs=1e-9)
    assert torch.allclose(cf.contributions, contributions(cf.anchor_profile, cf.positive_profile,
                                                          cf.negative_profile))
    # top = the largest contributions, largest first
    scores = [p.score for p in cf.top]
    assert len(cf.top) == 4 and scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(float(cf.contributions.max()))
    assert scores[-1] >= float(cf.contributions.topk(4).values[-1]) - 1e-12
    size = tuple(image.shape[-2:])
    for proto in cf.top:
        assert proto.source_index == int(model.projection.image_index[proto.index])
        assert _box_inside(proto.source_box, size) and _box_inside(proto.source_cell_box, size)
        assert all(_box_inside(box, size) for box in proto.boxes.values())
        assert proto.similarity["anchor"] == pytest.approx(float(cf.anchor_profile[proto.index]))


def test_counterfactual_with_a_chosen_negative_class(runs, splits):
    model = runs["protoknn"][1]
    knn = model.head.knn
    image = splits.test[5][0]
    predicted = counterfactual(model, image, splits.train_plain, top=1).predicted_class
    chosen = (predicted + 3) % 10
    cf = counterfactual(model, image, splits.train_plain, negative_class=chosen, top=2)
    assert cf.negative_class == chosen and splits.train_plain[cf.negative_index][1] == chosen
    d_an2, neg = _brute_nearest(knn, cf.anchor_profile, knn.memory_labels == chosen)
    assert cf.negative_memory == neg and cf.d_an2 == pytest.approx(d_an2, rel=1e-4, abs=1e-6)
    assert float(cf.contributions.sum()) == pytest.approx(cf.d_an2 - cf.d_ap2, abs=1e-9)
    with pytest.raises(ProtoKNNError, match="is the predicted class"):
        counterfactual(model, image, splits.train_plain, negative_class=predicted)
    with pytest.raises(ProtoKNNError, match="not a class index"):
        counterfactual(model, image, splits.train_plain, negative_class=10)


def test_counterfactual_refuses_heads_without_memory_or_projection(runs, splits):
    image = splits.test[0][0]
    with pytest.raises(ProtoKNNError, match="no kNN memory"):
        counterfactual(runs["protopnet"][1], image, splits.train_plain)
    with pytest.raises(ProtoKNNError, match="no prototypes"):
        counterfactual(runs["cnn"][1], image, splits.train_plain)
    with pytest.raises(ProtoKNNError, match="channel"):
        counterfactual(runs["protoknn"][1], image.repeat(3, 1, 1), splits.train_plain)
    unprojected = PrototypeModel(ModelConfig(head="protoknn", num_classes=10, in_channels=1, num_prototypes=20,
                                             dim=16, backbone_options={"width": 8}))
    with pytest.raises(ProtoKNNError, match="projected"):
        counterfactual(unprojected, image, splits.train_plain)


def test_this_looks_like_that_ranks_points_that_sum_to_the_logit(runs, splits):
    model = runs["protopnet"][1]
    image = splits.test[7][0]
    result = this_looks_like_that(model, image, splits.train_plain, top=5)
    with torch.no_grad():
        out = model(image[None])
        logits = model.head.last_layer(out.profile)[0]
        expected = int(model.predict_all(image[None])["top1"][0])
    assert result.predicted_class == expected
    assert result.predicted_logit == pytest.approx(float(logits[expected]), rel=1e-5, abs=1e-5)
    weight = model.head.last_layer.weight[expected].detach()
    points = out.profile[0] * weight
    scores = [p.score for p in result.top]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(float(points.max()), rel=1e-5)
    for proto in result.top:
        assert proto.weight == pytest.approx(float(weight[proto.index]))
        assert proto.prototype_class == int(model.head.prototype_class[proto.index])
        assert _box_inside(proto.boxes["anchor"], tuple(image.shape[-2:]))
    by_similarity = this_looks_like_that(model, image, splits.train_plain, top=5, ranking="similarity")
    assert [p.index for p in by_similarity.top] == out.profile[0].topk(5).indices.tolist()
    with pytest.raises(UnknownNameError):
        this_looks_like_that(model, image, splits.train_plain, ranking="size")
    with pytest.raises(ProtoKNNError, match="no linear last layer"):
        this_looks_like_that(runs["protoknn"][1], image, splits.train_plain)


# --------------------------------------------------------------------------- figures (in-process)

def test_figures_write_pngs_and_bad_paths_are_one_line_errors(runs, splits, tmp_path):
    image, label = splits.test[3]
    cf = counterfactual(runs["protoknn"][1], image, splits.train_plain, top=3, label=label)
    path = counterfactual_figure(cf, splits, tmp_path / "deep" / "cf.png")  # parent folder is created
    assert path.read_bytes()[:8] == PNG_MAGIC
    result = this_looks_like_that(runs["protopnet"][1], image, splits.train_plain, top=3, label=label)
    assert looks_like_figure(result, splits, tmp_path / "ppn.png").stat().st_size > 10_000
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ProtoKNNError, match="cannot write figure"):
        counterfactual_figure(cf, splits, blocker / "cf.png")  # parent is a file
    from matplotlib.figure import Figure

    with pytest.raises(ProtoKNNError, match=r"must end in"):
        save_figure(Figure(), tmp_path / "figure.txt")


def test_prototype_grid_refuses_unprojected_models_and_draws_projected_ones(runs, splits, tmp_path):
    from PIL import Image

    path = prototype_grid_figure(runs["protopnet"][1], splits, tmp_path / "grid.png")
    with Image.open(path) as png:
        assert png.width > 500 and png.height > 400
    unprojected = PrototypeModel(ModelConfig(head="protopnet", num_classes=10, in_channels=1, num_prototypes=20,
                                             dim=16, backbone_options={"width": 8}))
    with pytest.raises(ProtoKNNError, match="never projected"):
        prototype_grid_figure(unprojected, splits, tmp_path / "none.png")
    with pytest.raises(ProtoKNNError, match="no prototypes"):
        prototype_grid_figure(runs["cnn"][1], splits, tmp_path / "none.png")


def test_explain_command_accepts_an_image_path(runs, splits, tmp_path):
    from PIL import Image
    from rich.console import Console

    raw = splits.test.raw_image(4)
    raw.save(tmp_path / "query.png")
    console = Console(file=open(os.devnull, "w"))
    query = splits.load_image(tmp_path / "query.png")
    predicted = counterfactual(runs["protoknn"][1], query, splits.train_plain, top=1).predicted_class
    other = splits.classes[(predicted + 1) % 10].upper()  # class names are matched case-insensitively
    out = explain_command(str(runs["protoknn"][0]), str(tmp_path / "query.png"), other, 2, None,
                          tmp_path / "x.png", console)
    assert out.read_bytes()[:8] == PNG_MAGIC
    with Image.open(out) as png:
        assert png.width > 600 and png.height > 600
    with pytest.raises(ProtoKNNError, match="image file not found"):
        explain_command(str(runs["protoknn"][0]), str(tmp_path / "missing.png"), None, 2, None,
                        tmp_path / "y.png", console)
    with pytest.raises(ProtoKNNError, match="out of range"):
        explain_command(str(runs["protoknn"][0]), "-1", None, 2, None, tmp_path / "y.png", console)


# --------------------------------------------------------------------------- the real CLI

@pytest.fixture(scope="module")
def cli(runs, tmp_path_factory):
    """Every CLI case at once, in parallel subprocesses (each pays the import cost)."""
    out = tmp_path_factory.mktemp("figures")
    knn, ppn, cnn = (str(runs[h][0]) for h in ("protoknn", "protopnet", "cnn"))
    cases = {
        "explain-knn": ["explain", knn, "--image", "3", "--top", "3", "--out", out / "knn.png"],
        "explain-ppn": ["explain", ppn, "--image", "3", "--top", "3", "--out", out / "ppn.png"],
        "grid-knn": ["prototypes", knn, "--out", out / "grid-knn.png"],
        "grid-ppn": ["prototypes", ppn, "--out", out / "grid-ppn.png"],
        "bad-index": ["explain", knn, "--image", "100000", "--out", out / "bad.png"],
        "bad-class": ["explain", knn, "--image", "3", "--negative-class", "zebraa", "--out", out / "bad.png"],
        "cnn": ["explain", cnn, "--image", "3", "--out", out / "bad.png"],
    }
    return out, run_cli_parallel(cases, timeout=300)


@pytest.mark.parametrize("case,png", [("explain-knn", "knn.png"), ("explain-ppn", "ppn.png"),
                                      ("grid-knn", "grid-knn.png"), ("grid-ppn", "grid-ppn.png")])
def test_cli_writes_figures(cli, case, png):
    out, results = cli
    result = results[case]
    assert result.returncode == 0, result.stderr
    assert (out / png).read_bytes()[:8] == PNG_MAGIC and (out / png).stat().st_size > 5_000
    assert "figure written to" in result.stdout


def test_cli_explain_prints_the_numbers(cli):
    stdout = cli[1]["explain-knn"].stdout
    for words in ("d_ap^2", "d_an^2", "difference", "sum of all 20 contributions", "c_i"):
        assert words in stdout, stdout
    assert "points s*w" in cli[1]["explain-ppn"].stdout


@pytest.mark.parametrize("case,words", [("bad-index", ("image index 100000", "out of range")),
                                        ("bad-class", ("unknown class", "zebraa", "zebra")),
                                        ("cnn", ("cnn", "no prototypes"))])
def test_cli_bad_inputs_are_one_line_errors(cli, case, words):
    assert_one_line_error(cli[1][case], *words)
