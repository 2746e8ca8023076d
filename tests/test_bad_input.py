"""Bad input at the edges: the real CLI in a subprocess, one line of stderr, no traceback,
and no earlier checkpoint damaged."""
import io

import pytest
import torch
from PIL import Image

from protoknn_plugin.cluster import ProtoKNNClusterLoss, affiliation, sample_counts, transport_plan
from protoknn_plugin.errors import ProtoKNNError
from protoknn_plugin.knn import KNNClassifier

from conftest import TINY, assert_one_line_error, run_cli

IMAGEFOLDER = ["--dataset", "imagefolder", "--epochs", "1", "--steps-per-epoch", "1", "--backbone-opt", "width=4",
               "--prototypes", "6", "--dim", "4", "--threads", "1", "--batch-classes", "2", "--per-class", "2"]


def make_folder(root, per_class=6, classes=("a", "b"), size=16):
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (40 * c + 5 * i, 100, 30 * i)).save(folder / f"{i}.png")
    return root


def imagefolder_args(root, *extra):
    return ["train", "--head", "protoknn", *IMAGEFOLDER, "--data-dir", root, *extra, "--k", "1"]


def test_empty_dataset_directory(tmp_path):
    (tmp_path / "data").mkdir()
    result = run_cli(*imagefolder_args(tmp_path / "data"), "--out", tmp_path / "run")
    assert_one_line_error(result, "empty")


def test_class_folder_without_images(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "c").mkdir()
    result = run_cli(*imagefolder_args(root), "--out", tmp_path / "run")
    assert_one_line_error(result, "data/c", "no images")


def _truncated_png(path):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[:40])


def test_corrupt_image_is_skipped_and_counted_by_default_and_fails_with_strict(tmp_path):
    root = make_folder(tmp_path / "data")
    _truncated_png(root / "a" / "broken.png")
    skipped = run_cli(*imagefolder_args(root), "--out", tmp_path / "run")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 1 unreadable image" in skipped.stderr and "--strict" in skipped.stderr
    strict = run_cli(*imagefolder_args(root, "--strict"), "--out", tmp_path / "run2")
    assert_one_line_error(strict, "broken.png")


def test_grayscale_and_rgba_images_are_converted_to_rgb(tmp_path):
    root = make_folder(tmp_path / "data")
    Image.new("L", (16, 16), 128).save(root / "a" / "grey.png")
    Image.new("RGBA", (16, 16), (1, 2, 3, 100)).save(root / "b" / "alpha.png")
    result = run_cli(*imagefolder_args(root), "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    # what training read: three channels, grey copied to each, transparency composited onto white
    # (alpha 100/255 over 255: 255 - 100/255 * (255 - c) for c = 1, 2, 3, to the nearest integer)
    from protoknn_plugin.data import create_dataset

    splits = create_dataset("imagefolder", str(root), augment=False)
    images = {path.name: (dataset, i) for dataset in (splits.train, splits.test)
              for i, path in enumerate(dataset.paths)}
    expected = {"grey.png": (128, 128, 128), "alpha.png": (155, 156, 156)}
    for name, rgb in expected.items():
        dataset, index = images[name]
        raw = dataset.raw_image(index)
        assert raw.mode == "RGB" and dataset[index][0].shape[0] == 3
        assert [color for _, color in raw.getcolors()] == [rgb], name


def test_k_larger_than_the_smallest_class(tmp_path):
    root = make_folder(tmp_path / "data")
    result = run_cli(*imagefolder_args(root)[:-2], "--k", "7", "--out", tmp_path / "run")
    assert_one_line_error(result, "k=7", "smallest class")


def test_k_larger_than_the_memory(tmp_path):
    root = make_folder(tmp_path / "data", per_class=3)
    result = run_cli(*imagefolder_args(root)[:-2], "--k", "1", "--out", tmp_path / "run")
    # 80/20 split of 3 images per class leaves 2 training images per class: 4 in memory, k=10 is evaluated
    assert_one_line_error(result, "k=10", "training profiles")


def test_checkpoint_from_another_prototype_count_names_the_field(tmp_path):
    first = run_cli("train", "--head", "protoknn", *TINY, "--out", tmp_path)
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "checkpoint.pt").read_bytes()
    args = list(TINY)
    args[args.index("--prototypes") + 1] = "21"
    other = run_cli("train", "--head", "protoknn", *args, "--out", tmp_path, "--resume")
    assert_one_line_error(other, "num_prototypes=20", "num_prototypes=21")
    args = list(TINY)
    args[args.index("--backbone-opt") + 1] = "width=8"
    other = run_cli("train", "--head", "protoknn", *TINY, "--backbone", "resnet18", "--out", tmp_path, "--resume")
    assert_one_line_error(other, "backbone")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


# ---- fuzz: random and degenerate tensors into the cluster loss and the kNN ----------------

def _finite_or_clear(fn):
    try:
        out = fn()
    except ProtoKNNError as err:
        assert "\n" not in str(err)
        return None
    values = out if isinstance(out, (tuple, list)) else (out,)
    for value in values:
        assert torch.isfinite(value.float()).all()
    return out


CASES = {
    "random": lambda g: torch.randn(8, 5, generator=g),
    "all-equal": lambda g: torch.full((8, 5), 0.3),
    "zeros": lambda g: torch.zeros(8, 5),
    "huge": lambda g: torch.randn(8, 5, generator=g) * 1e6,
    "nan": lambda g: torch.randn(8, 5, generator=g).index_put_((torch.tensor([2]), torch.tensor([1])), torch.tensor(float("nan"))),
    "inf": lambda g: torch.randn(8, 5, generator=g).index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", range(3))
def test_fuzz_cluster_loss_and_knn(case, seed):
    g = torch.Generator().manual_seed(seed)
    x = CASES[case](g)
    labels = torch.randint(0, 3, (8,), generator=g)
    for variant in ("most-similar", "sampling", "debias", "linear-assignment", "full"):
        _finite_or_clear(lambda: ProtoKNNClusterLoss(variant=variant)(x, x.abs(), x, labels))
    counts = _finite_or_clear(lambda: sample_counts(x))
    if counts is not None:
        classes, affil = _finite_or_clear(lambda: affiliation(counts, labels))
        _finite_or_clear(lambda: transport_plan(x, labels, classes, affil, reg=0.01))
    knn = KNNClassifier(k=3, ks=(1, 3))
    if _finite_or_clear(lambda: knn.fit(x, labels) and torch.zeros(1)) is not None:
        _finite_or_clear(lambda: knn.predict(x))


def test_zero_feature_maps_give_finite_profiles_and_losses():
    from protoknn_plugin.prototypes import PrototypeLayer

    layer = PrototypeLayer(4, 6, 3)
    out = layer(torch.zeros(4, 4, 3, 3))
    for value in (out.profile, out.cost, out.gap_cost):
        assert torch.isfinite(value).all()
    loss = ProtoKNNClusterLoss()(out.profile, out.cost, out.gap_cost, torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(loss)


def test_disk_filling_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    """The real CLI with a file-size limit (RLIMIT_FSIZE) just above the existing checkpoint:
    the next, larger checkpoint write fails like a full disk would, mid-write."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    done = run_cli("train", "--head", "protoknn", *TINY, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    before = (tmp_path / "checkpoint.pt").read_bytes()
    limit = len(before) + 512  # the epoch checkpoint of a new run also holds the optimiser state

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "-m", "protoknn_plugin", "train", "--head", "protoknn", *TINY,
                             "--out", str(tmp_path), "--overwrite",
                             # workers pass batches through /dev/shm files, which the size limit would hit too
                             "--workers", "0"], capture_output=True, text=True, timeout=300,
                            preexec_fn=limited, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert_one_line_error(result, "could not write checkpoint", "previous checkpoint is intact")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    # no temp file left (the new run wrote its config.yaml and first metrics.csv row before the failed write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.csv"]


def test_non_finite_loss_stops_with_step_and_term_and_keeps_the_checkpoint(tmp_path):
    """A weights file with NaN in it makes the very first loss non-finite."""
    from protoknn_plugin.backbones import create_backbone

    run = tmp_path / "run"
    done = run_cli("train", "--head", "protoknn", *TINY, "--out", run)
    assert done.returncode == 0, done.stderr
    before = (run / "checkpoint.pt").read_bytes()
    net = create_backbone("small-cnn", in_channels=1, width=8)
    state = net.trunk.state_dict()  # a weights file holds the trunk, as torchvision's do
    first = next(k for k in state if k.endswith("conv.weight"))
    state[first] = torch.full_like(state[first], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    result = run_cli("train", "--head", "protoknn", *TINY, "--weights", tmp_path / "nan.pt", "--out", run, "--overwrite")
    assert_one_line_error(result, "at step 1", "non-finite", "cluster loss", "last good checkpoint")
    assert (run / "checkpoint.pt").read_bytes() == before
