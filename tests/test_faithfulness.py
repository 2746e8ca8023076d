"""Faithfulness metrics on hand-built models whose answers are known, and on tiny real runs via the CLI.

The hand-built models are real ``PrototypeModel``s (real prototype layer, heads, kNN memory)
whose backbone and add-on are replaced by fixed pooling, so every feature-map cell holds the
mean colour of a 4 x 4 pixel block and each prototype is one colour: the similarity maps, the
boxes and the decisions can be worked out by hand.
"""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from protoknn_plugin.data import create_dataset
from protoknn_plugin.data.cub import parts_in_test_images
from protoknn_plugin.data.transforms import natural_test_points
from protoknn_plugin.errors import ProtoKNNError
from protoknn_plugin.faithfulness import (consistency, covered_parts, create_scorer, deletion_test,
                                          evaluate_faithfulness, forward_in_chunks, mean_fill, nearest_patches,
                                          occlude, purity, random_boxes_like, stability)
from protoknn_plugin.model import ModelConfig, PrototypeModel

from conftest import TINY, assert_one_line_error, run_cli_parallel

torch.set_num_threads(1)
CELL = 4  # pixels per feature-map cell in the hand-built models


class Pool(nn.Module):
    """Fixed backbone: each cell is the mean of a CELL x CELL block (of ``shift(x)``), channels kept."""

    def __init__(self, mean=None, std=None):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        if self.mean is not None:  # back to colours in [0, 1], so black is the zero vector
            x = F.relu(x * self.std[:, None, None] + self.mean[:, None, None])
        return F.avg_pool2d(x, CELL)


def hand_built(head, prototypes, channels, weight=None, pool=None):
    """A PrototypeModel of ``head`` whose features are pooled pixels and whose prototypes are ``prototypes`` (P, D)."""
    model = PrototypeModel(ModelConfig(head=head, num_classes=2, in_channels=channels,
                                       num_prototypes=len(prototypes), dim=channels,
                                       backbone_options={"width": 8}))
    model.backbone = pool or Pool()
    model.prototype_layer.addon = nn.Identity()
    model.prototype_layer.prototypes.data.copy_(torch.as_tensor(prototypes, dtype=torch.float32))
    if weight is not None:
        model.head.last_layer.weight.data.copy_(torch.as_tensor(weight, dtype=torch.float32))
    return model.eval()


# --------------------------------------------------------------------------- blob data for deletion

BLOB, MARKER = 0, 6  # channel 0: the class-1 blob; 1..5: distractors in every image; 6: a marker


def blob_image(generator, blob: bool, marker: bool = False):
    """(7, 32, 32): one 4x4 square per present channel, each in its own cell of the 8x8 grid, with an
    empty cell between any two squares (a box around one never reaches another) and none on the border
    (in a corner, fewer than 5% of the pixels stand above the flat background, so the 95th-percentile
    box would be the whole image)."""
    image = torch.zeros(7, 32, 32)
    cells = [(2 * (c // 3) + 1) * 8 + 2 * (c % 3) + 1 for c in torch.randperm(9, generator=generator)[:7].tolist()]
    present = [c for c in range(7) if (c != BLOB or blob) and (c != MARKER or marker)]
    for channel, cell in zip(present, cells):
        row, col = divmod(cell, 8)
        image[channel, row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = 1.0
    return image


class Items(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, torch.as_tensor(labels)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


class Splits:
    """The parts of DatasetSplits that faithfulness reads."""

    def __init__(self, train, test):
        self.train_plain, self.test = train, test
        self.train_labels, self.test_labels = train.labels, test.labels
        self.channels = 7


@pytest.fixture(scope="module")
def blob_splits():
    """Train: 20 per class, the marker on 7 class-0 and 3 class-1 images. Test: 12 class-1 images."""
    generator = torch.Generator().manual_seed(0)
    images, labels = [], []
    for label in (0, 1):
        for k in range(20):
            marker = k < (7 if label == 0 else 3)
            images.append(blob_image(generator, blob=label == 1, marker=marker))
            labels.append(label)
    test = [blob_image(generator, blob=True) for _ in range(12)]
    return Splits(Items(images, labels), Items(test, [1] * 12))


def knn_model(splits):
    """ProtoKNN: prototype i is colour e_i (cosine), so the profile says which squares are present."""
    model = hand_built("protoknn", torch.eye(7), 7)
    profiles, _ = forward_in_chunks(model, torch.stack(splits.train_plain.images))
    model.head.fit_memory(profiles, splits.train_labels)
    return model


def linear_model():
    """ProtoPNet (log similarity): class 1's logit is the blob prototype's similarity alone, class 0's half of
    distractor 1's; so an image is class 1 exactly when it holds the blob."""
    prototypes = torch.eye(7)[[1, 2, 3, MARKER, BLOB, 4, 5, 5]]  # class 0: p0..p3, class 1: p4..p7
    weight = torch.zeros(2, 8)
    weight[0, 0], weight[1, 4] = 0.5, 1.0
    return hand_built("protopnet", prototypes, 7, weight=weight)


LOG_PEAK, LOG_BACKGROUND = math.log(1 / 1e-4), math.log(2 / 1.0001)  # log((d+1)/(d+1e-4)) at d = 0 and d = 1


@pytest.mark.parametrize("kind", ["knn", "linear"])
def test_deletion_finds_the_one_region_the_decision_depends_on(blob_splits, kind):
    model = knn_model(blob_splits) if kind == "knn" else linear_model()
    images = torch.stack(blob_splits.test.images)
    profiles, maps = forward_in_chunks(model, images)
    scorer = create_scorer(model, profiles)
    assert scorer.predicted.tolist() == [1] * len(images)
    evidence = scorer.evidence()
    blob_prototype = BLOB if kind == "knn" else 4
    assert (evidence.argmax(1) == blob_prototype).all()  # the explanation names the blob
    stats = deletion_test(model, images, scorer, mean_fill(7), ms=(1, 3), seed=0, maps=maps)
    # Hand-computed: kNN margin d_an^2 - d_ap^2 goes from +1 to -1 (drop 2); the class-1 logit
    # falls from log(1e4) to log(2/1.0001) once the blob's cell is black.
    expected = 2.0 if kind == "knn" else LOG_PEAK - LOG_BACKGROUND
    assert stats.drop["explained"][1] == pytest.approx(expected, rel=1e-4)
    assert stats.flip["explained"][1] == 1.0
    for control in ("random_prototypes", "random_boxes"):
        assert stats.drop[control][1] < expected / 2
        assert stats.ratio(control, 1) > 2 or math.isnan(stats.ratio(control, 1))
        assert stats.flip[control][1] < 0.5
    assert stats.drop["explained"][3] == pytest.approx(expected, rel=1e-4)  # the distractors do not matter


def test_deletion_controls_occlude_as_much_as_the_explanation(blob_splits):
    model = knn_model(blob_splits)
    images = torch.stack(blob_splits.test.images)
    scorer = create_scorer(model, forward_in_chunks(model, images)[0])
    stats = deletion_test(model, images, scorer, mean_fill(7), ms=(1,), seed=3)
    # random boxes copy the explained boxes' sizes; overlap at the border can only shrink them
    assert stats.area["random_boxes"][1] <= stats.area["explained"][1] + 1e-12
    assert stats.area["random_boxes"][1] > 0.5 * stats.area["explained"][1]


def test_occlusion_helpers():
    image = torch.ones(2, 6, 8)
    out = occlude(image, [(1, 2, 3, 5)], torch.tensor([0.0, -1.0]))
    assert out[0, 2:5, 1:3].eq(0).all() and out[1, 2:5, 1:3].eq(-1).all()
    assert out.sum() == image.sum() - 6 - 12 and image.eq(1).all()  # the input is left as it was
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        (x0, y0, x1, y1), = random_boxes_like([(0, 0, 3, 5)], (6, 8), generator)
        assert (x1 - x0, y1 - y0) == (3, 5) and 0 <= x0 and x1 <= 8 and 0 <= y0 and y1 <= 6


def test_purity_of_hand_built_prototypes(blob_splits):
    model = knn_model(blob_splits)
    nearest = nearest_patches(model, blob_splits.train_plain, k=10, batch=7)  # batches split the top-k search
    per_prototype = purity(nearest.labels)
    assert nearest.labels[BLOB].tolist() == [1] * 10 and per_prototype[BLOB] == 1.0  # only class 1 has the blob
    # the marker is on 7 class-0 and 3 class-1 training images, and only those have s = 1
    assert sorted(nearest.labels[MARKER].tolist()) == [0] * 7 + [1] * 3
    assert per_prototype[MARKER] == pytest.approx(0.7)
    assert nearest.similarity[MARKER].min() == pytest.approx(1.0)
    assert purity(torch.tensor([[0, 0, 1], [2, 2, 2]])).tolist() == pytest.approx([2 / 3, 1.0])


def test_stability_is_one_without_noise_and_falls_with_much_noise(blob_splits):
    model = linear_model()
    images = torch.stack(blob_splits.test.images)
    assert stability(model, images, sigma=0.0) == 1.0
    # 7 of the 8 prototypes have one clear peak (their square) and stay put; the marker is on no
    # test image, so its map is flat and the noise alone picks its maximum
    assert 7 / 8 <= stability(model, images, sigma=0.05, seed=1) < 1.0
    assert stability(model, images, sigma=5.0, seed=1) < 0.5


def test_evaluate_faithfulness_is_seeded(blob_splits):
    model = linear_model()
    first = evaluate_faithfulness(model, blob_splits, n=8, seed=4)
    again = evaluate_faithfulness(model, blob_splits, n=8, seed=4)
    assert first["metrics"] == again["metrics"] and first["images"] == 8
    assert first["consistency"] is None  # no part annotations here
    other = evaluate_faithfulness(model, blob_splits, n=8, seed=5)
    assert other["metrics"] != first["metrics"]
    with pytest.raises(ProtoKNNError, match="sigma"):
        evaluate_faithfulness(model, blob_splits, n=8, sigma=-1.0)


# --------------------------------------------------------------------------- a generated CUB tree with parts

PARTS = ["beak", "tail", "wing"]
SPOTS = {"beak": (6, 6), "tail": (25, 6), "wing": (15, 25)}  # part centres in the 32 x 32 test tensor
SIZES = [(80, 64), (64, 80), (72, 72), (96, 64), (70, 90)]  # original (width, height): resize + crop differ


def _tensor_to_original(point, size, image_size=32):
    """Invert natural_test_points for a full image (resize short side to 37, centre crop 32)."""
    width, height = size
    side = round(image_size * 256 / 224)
    short, long = min(width, height), max(width, height)
    new_w, new_h = (side, int(side * long / short)) if width <= height else (int(side * long / short), side)
    left, top = int(round((new_w - image_size) / 2.0)), int(round((new_h - image_size) / 2.0))
    return (point[0] + left) * width / new_w, (point[1] + top) * height / new_h, width / new_w


def make_cub_with_parts(parent, green_at):
    """Two classes; each test image has red at the beak and green at ``green_at[class][k]``.

    Returns the CUB root's parent. Parts are annotated at the centres of the drawn squares.
    """
    root = parent / "CUB_200_2011"
    (root / "parts").mkdir(parents=True)
    images, labels, split, locs = [], [], [], []
    image_id = 0
    for label, spots in enumerate(green_at):
        for k, green in enumerate(["tail", "tail"] + list(spots)):  # 2 train images, then the test images
            image_id += 1
            size = SIZES[image_id % len(SIZES)]
            picture = Image.new("RGB", size, (0, 0, 0))
            draw = ImageDraw.Draw(picture)
            for part in PARTS:
                x, y, scale = _tensor_to_original(SPOTS[part], size)
                locs.append(f"{image_id} {PARTS.index(part) + 1} {x:.1f} {y:.1f} 1")
                colour = (255, 0, 0) if part == "beak" else (0, 255, 0) if part == green else None
                if colour:
                    half = 2.5 * scale  # a 5 x 5 square in the test tensor
                    draw.rectangle((x - half, y - half, x + half, y + half), fill=colour)
            rel = f"{label + 1:03d}.Bird_{label}/img_{image_id}.png"
            (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            picture.save(root / "images" / rel)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {label + 1}")
            split.append(f"{image_id} {int(k < 2)}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("parts/part_locs.txt", locs),
                        ("parts/parts.txt", [f"{i} {p}" for i, p in enumerate(PARTS, 1)]),
                        ("classes.txt", ["1 001.Bird_0", "2 002.Bird_1"])):
        (root / name).write_text("\n".join(lines) + "\n")
    return parent


def test_part_locations_follow_the_test_transform(tmp_path):
    make_cub_with_parts(tmp_path, [["tail"], ["wing"]])
    splits = create_dataset("cub200", str(tmp_path), image_size=32)
    names, parts = parts_in_test_images(str(tmp_path), splits.test, range(len(splits.test)), 32)
    assert names == PARTS and parts.shape == (2, 3, 3)
    for row in parts:
        for k, part in enumerate(PARTS):
            # part_locs.txt keeps one decimal of original pixels
            assert row[k, 0] == pytest.approx(SPOTS[part][0], abs=0.05)
            assert row[k, 1] == pytest.approx(SPOTS[part][1], abs=0.05)
            assert row[k, 2] == 1.0
    # the drawn squares are where the parts say: red at the beak in the test tensor
    image = splits.denormalize(splits.test[0][0])
    x, y = SPOTS["beak"]
    assert image[0, y, x] > 0.9 and image[1, y, x] < 0.1
    # points cut off by the centre crop are not visible
    # (80, 64) -> resized (46, 37) -> crop offsets (7, 2)
    moved = natural_test_points(torch.tensor([[1.0, 1.0], [40.0, 32.0]]), (80, 64), 32)
    assert moved[:, 2].tolist() == [0.0, 1.0] and moved[1, :2].tolist() == pytest.approx([16.0, 16.5])
    with_box = natural_test_points(torch.tensor([[15.0, 25.0], [5.0, 5.0]]), (80, 64), 32, cropped=True,
                                   box=(10, 20, 30, 40))
    assert with_box[0].tolist() == pytest.approx([8.0, 8.0, 1.0]) and with_box[1, 2] == 0.0


def test_consistency_on_placed_parts(tmp_path):
    # class 0: green at the tail in 2 of 5 test images, at the wing in 3: neither reaches 80%;
    # class 1: green at the tail in 4 of 5 (80%): consistent. Red is always at the beak.
    make_cub_with_parts(tmp_path, [["tail", "tail", "wing", "wing", "wing"],
                                   ["tail", "tail", "tail", "tail", "wing"]])
    splits = create_dataset("cub200", str(tmp_path), image_size=32)
    red, green = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    pool = Pool(torch.tensor(splits.mean), torch.tensor(splits.std))
    model = hand_built("protopnet", [red, green, red, green], 3, pool=pool)  # p0, p1: class 0; p2, p3: class 1
    reader = lambda idx: parts_in_test_images(str(tmp_path), splits.test, idx, 32)[1]  # noqa: E731
    result = evaluate_faithfulness(model, splits, n=10, parts=reader)
    assert result["consistency"] == pytest.approx(0.75) and result["consistency_prototypes"] == 4
    # the part vectors behind it, by hand: boxes hold the part centre they should and no other
    from protoknn_plugin.faithfulness import part_frequencies

    _, maps = forward_in_chunks(model, torch.stack([splits.test[i][0] for i in range(10)]))
    freq = part_frequencies(maps, reader(list(range(10))), splits.test_labels, torch.tensor([0, 0, 1, 1]), (32, 32))
    expected = torch.tensor([[1, 0, 0], [0, 0.4, 0.6], [1, 0, 0], [0, 0.8, 0.2]], dtype=torch.float64)
    assert torch.allclose(freq, expected)
    assert consistency(freq, 0.8) == 0.75 and consistency(freq, 0.5) == 1.0
    assert consistency(torch.full((2, 3), float("nan"))) is None


def test_covered_parts_needs_visible_parts_inside_the_box():
    parts = torch.tensor([[5.0, 5.0, 1.0], [5.0, 5.0, 0.0], [12.0, 5.0, 1.0]])
    assert covered_parts((0, 0, 10, 10), parts).tolist() == [True, False, False]


# --------------------------------------------------------------------------- the real CLI on tiny runs



@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Tiny runs of three heads, then every faithfulness case; protoknn twice into two copies of its run."""
    root = tmp_path_factory.mktemp("faith")
    heads = ("protoknn", "protopnet", "cnn")
    trained = run_cli_parallel({head: ["train", "--head", head, *TINY, "--out", root / head] for head in heads})
    for head in heads:
        assert trained[head].returncode == 0, trained[head].stderr
    shutil.copytree(root / "protoknn", root / "protoknn-again")
    cases = {
        "first": ["faithfulness", root / "protoknn", "--images", "40", "--sigma", "0"],
        "again": ["faithfulness", root / "protoknn-again", "--images", "40", "--sigma", "0"],
        "linear": ["faithfulness", root / "protopnet", "--images", "20", "--m", "1,2"],
        "cnn": ["faithfulness", root / "cnn"],
        "zero": ["faithfulness", root / "protoknn", "--images", "0"],
        "sigma": ["faithfulness", root / "protoknn", "--sigma", "-1"],
        "missing": ["faithfulness", root / "nope"],
    }
    return root, run_cli_parallel(cases)


def test_cli_faithfulness_writes_json_and_repeats_exactly(cli):
    root, results = cli
    first = results["first"]
    assert first.returncode == 0, first.stderr
    for words in ("deletion test", "ratio vs protos", "stability", "purity", "faithfulness.json"):
        assert words in first.stdout, first.stdout
    saved = json.loads((root / "protoknn" / "faithfulness.json").read_text())
    assert saved["images"] == 40 and saved["head"] == "protoknn" and saved["stability"] == 1.0  # sigma 0
    assert saved["deletion"]["score"] == "d_an^2 - d_ap^2" and set(saved["deletion"]["by_m"]) == {"1", "3", "5"}
    assert results["again"].returncode == 0, results["again"].stderr
    again = json.loads((root / "protoknn-again" / "faithfulness.json").read_text())
    assert {k: v for k, v in again.items() if k != "run"} == {k: v for k, v in saved.items() if k != "run"}


def test_cli_faithfulness_linear_head_and_bad_inputs(cli):
    root, results = cli
    assert results["linear"].returncode == 0, results["linear"].stderr
    text = (root / "protopnet" / "faithfulness.json").read_text()
    saved = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in faithfulness.json: not valid JSON"))
    assert saved["deletion"]["score"] == "logit of the predicted class" and set(saved["deletion"]["by_m"]) == {"1", "2"}
    assert 0.0 < saved["purity"] <= 1.0
    assert_one_line_error(results["cnn"], "no prototypes")
    assert_one_line_error(results["zero"], "positive")
    assert_one_line_error(results["sigma"], "sigma")
    assert_one_line_error(results["missing"], "no checkpoint")
