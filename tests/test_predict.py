"""`protoknn predict` through the real CLI, and imagefolder's cheap start-up check."""
import csv

import numpy as np
import pytest
from PIL import Image

from protoknn_plugin.data import base, create_dataset

from conftest import TINY, assert_one_line_error, run_cli


def _train(tmp_path_factory, head):
    out = tmp_path_factory.mktemp(head) / "run"
    done = run_cli("train", "--head", head, *TINY, "--workers", "0", "--out", out)
    assert done.returncode == 0, done.stderr
    return out


def _images(folder, indices):
    """Training images saved losslessly as PNG (their profiles equal the stored ones)."""
    splits = create_dataset("animals", limit=200)
    folder.mkdir()
    for i in indices:
        splits.train_plain.raw_image(i).save(folder / f"train{i}.png")
    return splits


def test_predict_knn_rows_name_the_image_itself_as_nearest_and_skip_unreadable(tmp_path_factory, tmp_path):
    run = _train(tmp_path_factory, "protoknn")
    splits = _images(tmp_path / "imgs", [0, 7, 42])
    (tmp_path / "imgs" / "sub").mkdir()
    (tmp_path / "imgs" / "sub" / "broken.jpg").write_bytes(b"not a jpeg")
    result = run_cli("predict", run, tmp_path / "imgs", "--workers", "0", "--out", tmp_path / "p.csv")
    assert result.returncode == 0, result.stderr
    assert "broken.jpg" in result.stderr and "1 unreadable" in result.stdout
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 3
    for row in rows:
        index = int(row["path"].rsplit("train", 1)[1].split(".")[0])
        # a training image's nearest memory item is itself, at distance 0
        assert row["neighbour_1"] == f"train[{index}]" and float(row["distance_1"]) == pytest.approx(0, abs=1e-6)
        assert row["neighbour_1_class"] == splits.classes[int(splits.train_labels[index])]
        distances = [float(row[f"distance_{j}"]) for j in range(1, 6)]
        assert distances == sorted(distances)
        assert row["predicted_class"] in splits.classes
        contributions = [float(row[f"prototype_{j}_contribution"]) for j in range(1, 4)]
        assert contributions == sorted(contributions, reverse=True)


def test_predict_linear_head_gives_class_probabilities(tmp_path_factory, tmp_path):
    run = _train(tmp_path_factory, "protopnet")
    _images(tmp_path / "imgs", [3])
    # --output, the old name of --out, still names the file
    result = run_cli("predict", run, tmp_path / "imgs" / "train3.png", "--workers", "0", "--output", tmp_path / "p.csv")
    assert result.returncode == 0, result.stderr
    (row,) = csv.DictReader((tmp_path / "p.csv").open())
    scores = [float(row[f"score_{j}"]) for j in range(1, 4)]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    assert row["class_1"] == row["predicted_class"]
    assert "neighbour_1" not in row and row["prototype_1"] != ""


def test_predict_missing_path_is_one_line_error(tmp_path_factory, tmp_path):
    result = run_cli("predict", tmp_path, tmp_path / "nothing.png")
    assert_one_line_error(result)


def test_predict_refuses_out_and_its_old_name_together(tmp_path):
    result = run_cli("predict", tmp_path, tmp_path / "x.png", "--out", tmp_path / "a.csv", "--output", tmp_path / "b.csv")
    assert_one_line_error(result, "--out", "--output", "pass only --out")
    assert "--output" not in run_cli("predict", "--help").stdout  # the old name works but is not advertised


def _jpeg(path, size=64):
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    return path.read_bytes()


def test_quick_check_reads_no_pixels_of_intact_files_and_catches_truncation(tmp_path, monkeypatch):
    data = _jpeg(tmp_path / "ok.jpg")
    (tmp_path / "trailing.jpg").write_bytes(data + b"\0" * 4000)  # intact, with data after the end marker
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 7 // 10])
    Image.new("RGB", (20, 20)).save(tmp_path / "ok.png")
    full = []
    real = base.image_problem
    monkeypatch.setattr(base, "image_problem", lambda p: full.append(p.name) or real(p))
    assert base.quick_image_problem(tmp_path / "ok.jpg") is None
    assert base.quick_image_problem(tmp_path / "ok.png") is None
    assert full == []  # intact JPEG/PNG: magic bytes and end marker, no decode
    assert base.quick_image_problem(tmp_path / "trailing.jpg") is None  # the full check accepts it
    assert "truncated" in base.quick_image_problem(tmp_path / "cut.jpg")
    assert full == ["trailing.jpg", "cut.jpg"]
