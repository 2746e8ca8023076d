"""The real CLI, end to end, in subprocesses: listings, errors, train/evaluate/benchmark/ablate."""
import json
from pathlib import Path

import pytest

from conftest import TINY, assert_one_line_error, run_cli


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("datasets", "backbones", "heads", "train", "evaluate", "benchmark", "ablate", "explain", "prototypes",
                    "faithfulness", "report"):
        assert command in result.stdout


def test_datasets_lists_animals_with_split_sizes():
    result = run_cli("datasets")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "animals" in line)
    assert "10" in line and "8000" in line and "2000" in line and "28x28" in line
    for name in ("fashion-mnist", "imagefolder", "cub200", "stanford-dogs", "stanford-cars"):
        assert name in result.stdout


def test_datasets_reports_not_found_for_absent_paths(tmp_path):
    result = run_cli("datasets", "--data-dir", tmp_path / "nowhere")
    assert result.returncode == 0, result.stderr
    assert "not found at" in result.stdout


def test_backbones_lists_every_backbone():
    result = run_cli("backbones")
    assert result.returncode == 0, result.stderr
    for name in ("resnet18", "resnet34", "resnet50", "resnet152", "vgg16", "vgg19", "densenet121", "densenet161",
                 "efficientnet-lite0", "small-cnn"):
        assert name in result.stdout


def test_heads_lists_both_heads_with_losses():
    result = run_cli("heads")
    assert result.returncode == 0, result.stderr
    assert "protoknn" in result.stdout and "protopnet" in result.stdout
    assert "MarginLoss" in result.stdout and "cluster" in result.stdout


@pytest.mark.parametrize("option,value,words", [
    ("--dataset", "animal", ["unknown dataset", "animals"]),
    ("--backbone", "resnt18", ["unknown backbone", "resnet18"]),
    ("--head", "protokn", ["unknown head", "protoknn"]),
    ("--task-loss", "marginn", ["unknown loss", "margin"]),
])
def test_unknown_names_are_one_line_errors_with_suggestions(option, value, words, tmp_path):
    result = run_cli("train", *TINY, option, value, "--out", tmp_path / "run")
    assert_one_line_error(result, *words)


def test_missing_dataset_path_is_a_one_line_error(tmp_path):
    result = run_cli("train", *TINY, "--dataset", "imagefolder", "--data-dir", tmp_path / "missing", "--out", tmp_path / "r")
    assert_one_line_error(result, "missing")


def test_fashion_mnist_absent_names_the_apt_package(tmp_path):
    result = run_cli("train", *TINY, "--dataset", "fashion-mnist", "--data-dir", tmp_path, "--out", tmp_path / "r")
    assert_one_line_error(result, "dataset-fashion-mnist")


def test_per_class_larger_than_smallest_class(tmp_path):
    result = run_cli("train", *TINY, "--per-class", "500", "--out", tmp_path / "r")
    assert_one_line_error(result, "--per-class", "smallest class")


def test_single_class_batches_are_refused(tmp_path):
    result = run_cli("train", *TINY, "--batch-classes", "1", "--out", tmp_path / "r")
    assert_one_line_error(result, "--batch-classes", "at least 2, got 1")  # before anything is written
    assert not (tmp_path / "r").exists()


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("train", *TINY, "--out", blocker / "run")
    assert_one_line_error(result, "not writable")


@pytest.mark.parametrize("head", ["protoknn", "protopnet", "cnn"])
def test_train_then_evaluate_end_to_end(head, tmp_path):
    run = tmp_path / head
    trained = run_cli("train", "--head", head, *TINY, "--out", run)
    assert trained.returncode == 0, trained.stderr
    assert (run / "checkpoint.pt").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    keys = {"accuracy[k=1]", "accuracy[k=3]", "accuracy[k=5]", "accuracy[k=10]"} if head == "protoknn" else {"accuracy[top1]"}
    assert keys <= set(metrics)
    evaluated = run_cli("evaluate", run)
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads((run / "metrics.json").read_text())
    assert {k: again[k] for k in keys} == {k: metrics[k] for k in keys}


def test_evaluate_missing_run_dir(tmp_path):
    assert_one_line_error(run_cli("evaluate", tmp_path / "nope"), "no checkpoint")


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    assert_one_line_error(run_cli("evaluate", tmp_path), "corrupt")


def test_benchmark_writes_json_csv_md_and_a_row_per_head(tmp_path):
    result = run_cli("benchmark", "--heads", "protoknn,protopnet,cnn", *TINY, "--seeds", "0,1", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    assert [row["label"] for row in data["summary"]] == ["protoknn", "protopnet", "cnn"]
    assert len(data["runs"]) == 6
    knn = data["summary"][0]
    for key in ("accuracy", "accuracy[k=5]", "prototype_spread", "train_seconds", "peak_memory_mb",
                "images_per_second", "backbone_steps", "images_seen"):
        assert knn[key]["n"] == 2 and knn[key]["half_width"] is not None  # mean and 95% interval over 2 seeds
    assert "accuracy[top1]" in data["summary"][1]
    assert [(p["a"], p["b"]) for p in data["paired"]] == [("protoknn", "protopnet"), ("protoknn", "cnn"),
                                                          ("protopnet", "cnn")]
    assert (tmp_path / "results.csv").read_text().count("\n") == 4
    md = (tmp_path / "results.md").read_text()
    assert "| protoknn | 2 |" in md and "±" in md and "protoknn − cnn" in md
    assert "joint: before push" in md and "last-layer: end" in md  # ProtoPNet's stages
    # Every run with a push measures it; each run records its own threads and device kind.
    for run in data["runs"]:
        assert run["threads"] == 1 and run["device_kind"].startswith("cpu: ")
        if run["head"] != "cnn":
            assert run["pushes_measured"] and 0 <= run["val_before_push"] <= 1 and 0 <= run["val_after_push"] <= 1
            assert -1 <= run["push_cosine_min"] <= run["push_cosine_mean"] <= 1
            assert 1 <= run["push_distinct_images"] <= run["push_distinct_patches"] <= 20
    assert data["meta"]["threads"] == [1]
    projection = md.split("Projection at the last push")[1].split("\n\n")[1]
    assert [line.split(" | ")[0] for line in projection.splitlines()[2:]] == ["| protoknn", "| protopnet"]
    assert "acc k=5 %" in result.stdout  # the rich table
    assert (tmp_path / "results.png").stat().st_size > 0 and (tmp_path / "curves.png").stat().st_size > 0


def test_benchmark_with_one_seed_prints_no_plus_minus(tmp_path):
    result = run_cli("benchmark", "--heads", "cnn", *TINY, "--seeds", "0", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "results.md").read_text().split("\n\n")[0]
    assert "| cnn | 1 |" in table and "±" not in table


def test_benchmark_workers_change_neither_the_run_directory_nor_the_result(tmp_path):
    runs = {}
    for workers in ("0", "2"):
        result = run_cli("benchmark", "--heads", "protoknn", *TINY, "--seeds", "0", "--workers", workers,
                         "--out", tmp_path / workers)
        assert result.returncode == 0, result.stderr
        runs[workers] = json.loads((tmp_path / workers / "results.json").read_text())["runs"][0]
    # Same run key, so a rerun with other --workers resumes rather than retrains; same accuracies.
    assert Path(runs["0"]["run_dir"]).name == Path(runs["2"]["run_dir"]).name
    scores = {w: {k: v for k, v in run.items() if k.startswith("accuracy")} for w, run in runs.items()}
    assert len(scores["0"]) >= 4 and scores["0"] == scores["2"]


def test_ablate_runs_each_variant(tmp_path):
    result = run_cli("ablate", "--variants", "most-similar,full,full:sum", *TINY, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    assert [row["label"] for row in data["summary"]] == ["most-similar", "full", "full:sum"]
    assert all("prototype_spread" in row and "accuracy[k=1]" in row for row in data["summary"])


def test_ablate_unknown_variant(tmp_path):
    assert_one_line_error(run_cli("ablate", "--variants", "ful", *TINY, "--out", tmp_path), "unknown cluster variant", "full")


def test_preset_fills_defaults_and_explicit_options_win(tmp_path):
    # the paper's CUB preset points at cub200, which is absent here: the error shows the preset was applied
    result = run_cli("train", "--preset", "paper-cub-full", "--data-dir", tmp_path / "nocub", "--out", tmp_path / "r")
    assert_one_line_error(result, "cub")
    explicit = run_cli("train", "--preset", "paper-cub-full", "--dataset", "animals", *TINY, "--weights", "none",
                       "--backbone", "small-cnn", "--batch-classes", "10", "--per-class", "11",
                       "--out", tmp_path / "r2")
    assert explicit.returncode == 0, explicit.stderr
    from protoknn_plugin.checkpoint import load_checkpoint

    saved = load_checkpoint(tmp_path / "r2")
    assert saved["model_config"]["num_prototypes"] == 20  # --prototypes 20 from TINY wins over the preset's 512
    assert saved["dataset"] == "animals"


def test_unknown_preset(tmp_path):
    assert_one_line_error(run_cli("train", "--preset", "cub-ful", "--out", tmp_path), "unknown preset", "cub-full")


def test_heads_all_names_every_registered_head_and_leaves_out_what_a_cache_cannot_train():
    from protoknn_plugin.heads.options import expand_all
    from protoknn_plugin.heads import get_head_class, list_heads

    rows = expand_all("all", frozen_backbone=False).split(",")
    assert sorted(rows) == sorted(list_heads()) and rows[0] == "protoknn" and rows[-1] == "cnn"
    cannot = {n for n in list_heads() if not get_head_class(n).supports_frozen_backbone}
    assert cannot, "some head (PIP-Net) needs two augmented views, which a feature cache lacks"
    assert set(expand_all("all", frozen_backbone=True).split(",")) == set(list_heads()) - cannot
    # Labelled rows given beside `all` stay, and a head named twice appears once.
    both = expand_all("protopnet-cos=protopnet,all,protoknn", frozen_backbone=False).split(",")
    assert both[0] == "protopnet-cos=protopnet" and both.count("protoknn") == 1
    assert expand_all("protoknn,cnn", frozen_backbone=True) == "protoknn,cnn"
