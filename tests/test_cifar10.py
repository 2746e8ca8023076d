"""The cifar10 dataset on small generated data: both layouts, the restricted unpickler, errors."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, run_cli
from protoknn_plugin.data import cifar10 as cifar_module
from protoknn_plugin.data import create_dataset
from protoknn_plugin.errors import ProtoKNNError

CLASSES = cifar_module.CIFAR10_CLASSES
PER_CLASS = 2  # images per class in every batch file


def fake_image(label: int, serial: int) -> np.ndarray:
    """A flat 32x32 RGB image (H, W, 3): red = label * 20, green = serial, blue = 200, and one
    marker pixel at row 0, column 1 whose red is 255 (checks the plane order and transposition)."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = label * 20, serial, 200
    img[0, 1, 0] = 255
    return img


def write_batches(folder, per_class=PER_CLASS):
    """cifar-10-batches-py as torchvision extracts it: plain dicts of numpy arrays and lists."""
    folder.mkdir(parents=True)
    serial = 0
    for name in (*cifar_module.TRAIN_BATCHES, cifar_module.TEST_BATCH):
        images, labels = [], []
        for label in range(10):
            for _ in range(per_class):
                images.append(fake_image(label, serial))
                labels.append(label)
                serial += 1
        # CIFAR's row layout: the red plane, then green, then blue, each row-major.
        data = np.stack(images).transpose(0, 3, 1, 2).reshape(len(images), -1)
        (folder / name).write_bytes(pickle.dumps({"batch_label": name, "labels": labels, "data": data}, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CLASSES)}))
    return folder


def write_jpegs(root, per_class=3):
    for split in ("train", "test"):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(fake_image(label, i)).save(root / split / name / f"{i:04d}.jpg", quality=95)
    return root


@pytest.fixture
def batches_dir(tmp_path):
    write_batches(tmp_path / "cifar-10-batches-py")
    return tmp_path


def test_batches_give_official_split_labels_and_pixels(batches_dir):
    splits = create_dataset("cifar10", str(batches_dir), augment=False)
    assert splits.classes == list(CLASSES) and splits.channels == 3 and splits.image_size == 32
    assert len(splits.train) == 5 * 10 * PER_CLASS and len(splits.test) == 10 * PER_CLASS
    # Batch order is kept: labels 0,0,1,1,...,9,9 in each of the five training batches.
    assert splits.train_labels.tolist() == [c for _ in range(5) for c in range(10) for _ in range(PER_CLASS)]
    raw = splits.train.raw_image(7)  # label 3, serial 7
    assert raw.getpixel((0, 0)) == (60, 7, 200) and raw.getpixel((1, 0)) == (255, 7, 200)
    x, y = splits.train[7]
    assert y == 3 and x.shape == (3, 32, 32)
    # ImageNet normalisation: blue 200/255 -> (0.784 - 0.406) / 0.225.
    assert x[2, 5, 5].item() == pytest.approx((200 / 255 - 0.406) / 0.225, abs=1e-5)


def test_data_dir_may_be_the_batches_folder_or_the_parent_of_cifar10(tmp_path):
    write_batches(tmp_path / "cifar10" / "cifar-10-batches-py")
    for data_dir in (tmp_path, tmp_path / "cifar10", tmp_path / "cifar10" / "cifar-10-batches-py"):
        assert len(create_dataset("cifar10", str(data_dir)).train) == 100


def test_image_size_upsamples_and_limit_keeps_classes_balanced(batches_dir):
    splits = create_dataset("cifar10", str(batches_dir), image_size=128, limit=50)
    x, _ = splits.train[0]
    assert x.shape == (3, 128, 128)
    assert torch.bincount(splits.train_labels).tolist() == [5] * 10
    augmented, _ = splits.train[0]  # the training transform: crop, flip, then the same upsampling
    assert augmented.shape == (3, 128, 128)


def test_jpeg_tree_gives_the_same_classes_and_labels(tmp_path):
    write_jpegs(tmp_path / "cifar10")
    splits = create_dataset("cifar10", str(tmp_path), augment=False)
    assert splits.classes == list(CLASSES)
    assert splits.train_labels.tolist() == [c for c in range(10) for _ in range(3)]
    x, y = splits.test[4]
    assert y == 1 and x.shape == (3, 32, 32)
    # JPEG keeps the flat blue channel within a few levels.
    assert abs(splits.test.raw_image(4).getpixel((16, 16))[2] - 200) <= 4


def test_jpeg_tree_with_a_missing_class_names_it(tmp_path):
    write_jpegs(tmp_path)
    for f in (tmp_path / "test" / "truck").iterdir():
        f.unlink()
    (tmp_path / "test" / "truck").rmdir()
    with pytest.raises(ProtoKNNError, match="'truck' is missing"):
        create_dataset("cifar10", str(tmp_path))


class _RunsCode:
    """What an attacker pickles: unpickling it would call exec and create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_a_malicious_batch_is_refused_and_runs_nothing(batches_dir, tmp_path):
    marker = tmp_path / "pwned.txt"
    # Sanity: the payload does run under plain pickle (so the refusal below means something).
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.exists()
    marker.unlink()
    evil = {"labels": [0], "data": _RunsCode(marker)}
    (batches_dir / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    cifar_module._read_batches.cache_clear()
    with pytest.raises(ProtoKNNError, match=r"refusing to load (__builtin__|builtins)\.exec"):
        create_dataset("cifar10", str(batches_dir))
    assert not marker.exists()
    result = run_cli("train", "--dataset", "cifar10", "--data-dir", batches_dir, "--out", tmp_path / "run")
    assert_one_line_error(result, "data_batch_3", "refusing", ".exec")
    assert result.returncode == 2 and not marker.exists()


def test_a_missing_batch_is_named(batches_dir):
    (batches_dir / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(ProtoKNNError, match="data_batch_4 not found"):
        create_dataset("cifar10", str(batches_dir))


def test_absent_data_names_both_fixes(tmp_path):
    result = run_cli("train", "--dataset", "cifar10", "--data-dir", tmp_path / "nothing", "--out", tmp_path / "run")
    assert_one_line_error(result, "cifar10 not found", "--download", "train/<class>/*.jpg")
    assert result.returncode == 2


def test_download_is_used_only_when_allowed_and_data_absent(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root, filename, md5):  # stands in for the network
        calls.append((url, filename, md5))
        write_batches(tmp_path / "dl" / "cifar-10-batches-py")

    import torchvision.datasets.utils as tv_utils
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    with pytest.raises(ProtoKNNError, match="--download"):
        create_dataset("cifar10", str(tmp_path / "dl"))
    assert calls == []
    monkeypatch.setattr(cifar_module, "_download_allowed", True)
    splits = create_dataset("cifar10", str(tmp_path / "dl"))
    assert len(splits.train) == 100 and len(calls) == 1 and calls[0][1] == "cifar-10-python.tar.gz"
    create_dataset("cifar10", str(tmp_path / "dl"))  # present now: no second download
    assert len(calls) == 1
