"""Datasets: animals, fashion-mnist (IDX), imagefolder, the catalog and shared helpers."""
from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from protoknn_plugin.errors import ProtoKNNError, UnknownNameError
from protoknn_plugin.data import (DATASETS, DatasetSplits, DatasetWarning, create_dataset, describe_dataset,
                                  list_datasets, load_image, register_dataset, stratified_pick,
                                  stratified_split)
from protoknn_plugin.data import animals as animals_module
from protoknn_plugin.data.idx import FASHION_MNIST_DIR, read_idx

ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


@pytest.fixture(scope="module")
def animals():
    return create_dataset("animals")


# --------------------------------------------------------------------------- registry / catalog

def test_registry_lists_every_builtin_dataset():
    assert {"animals", "fashion-mnist", "imagefolder", "cub200", "stanford-dogs",
            "stanford-cars"} <= set(list_datasets())
    assert "animals" in DATASETS


def test_unknown_dataset_name_suggests_close_match():
    with pytest.raises(UnknownNameError, match="animals"):
        create_dataset("animal")


def test_registered_dataset_is_created_by_name_with_limit(animals):
    @register_dataset("tiny-test-dataset")
    def tiny(data_dir=None, *, augment=True, image_size=None, strict=False, crop=False):
        return create_dataset("animals", augment=augment)

    try:
        splits = create_dataset("tiny-test-dataset", limit=20)
        assert len(splits.train) == 20 and len(splits.test) == 20
    finally:
        DATASETS._entries.pop("tiny-test-dataset")


def test_describe_absent_path_says_not_found(tmp_path):
    absent = tmp_path / "nowhere"
    for name in ("fashion-mnist", "imagefolder", "cub200", "stanford-dogs", "stanford-cars"):
        info = describe_dataset(name, str(absent))
        assert info["status"] == f"not found at {absent}", (name, info)
        assert set(info) == {"name", "classes", "train", "test", "image_size", "status"}


def test_describe_without_data_dir_gives_one_line_reason():
    info = describe_dataset("cub200")
    assert info["status"] != "ok" and "--data-dir" in info["status"] and "\n" not in info["status"]
    assert info["classes"] == 200  # official count shown even when absent


def test_describe_animals_is_ok():
    assert describe_dataset("animals") == {"name": "animals", "classes": 10, "train": 8000, "test": 2000,
                                           "image_size": 28, "status": "ok"}


def test_limit_must_be_positive():
    for bad in (0, -3, 2.5):
        with pytest.raises(ProtoKNNError, match="limit"):
            create_dataset("animals", limit=bad)


def test_image_size_must_be_positive_int():
    with pytest.raises(ProtoKNNError, match="image_size"):
        create_dataset("animals", image_size=0)


# --------------------------------------------------------------------------- split helpers

def test_stratified_split_hand_case():
    labels = [0] * 10 + [1] * 5 + [2] * 2
    train, test = stratified_split(labels, 0.2, seed=3)
    counts = torch.bincount(torch.tensor(labels)[test], minlength=3).tolist()
    assert counts == [2, 1, 1]  # 20 % of 10 and 5; a class of 2 keeps one test image
    assert sorted(train.tolist() + test.tolist()) == list(range(17))
    assert train.tolist() == sorted(train.tolist())
    again = stratified_split(labels, 0.2, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], test)


def test_stratified_pick_balances_and_respects_short_classes():
    labels = [0] * 10 + [1] * 10 + [2] * 2
    pick = stratified_pick(labels, 6)
    assert torch.bincount(torch.tensor(labels)[pick]).tolist() == [2, 2, 2]
    pick = stratified_pick(labels, 9)  # class 2 runs out: the others take turns, class 0 first
    assert torch.bincount(torch.tensor(labels)[pick]).tolist() == [4, 3, 2]
    pick = stratified_pick(labels, 14)
    assert torch.bincount(torch.tensor(labels)[pick]).tolist() == [6, 6, 2]
    assert len(set(pick.tolist())) == 14
    assert torch.equal(stratified_pick(labels, 100), torch.arange(22))


# --------------------------------------------------------------------------- animals

def test_animals_sizes_classes_and_stratification(animals):
    assert (len(animals.train), len(animals.train_plain), len(animals.test)) == (8000, 8000, 2000)
    assert animals.classes == ANIMALS
    assert (animals.channels, animals.image_size) == (1, 28)
    assert torch.bincount(animals.train_labels).tolist() == [800] * 10
    assert torch.bincount(animals.test_labels).tolist() == [200] * 10
    assert animals.train_labels.dtype == torch.long and animals.train_labels.shape == (8000,)
    assert torch.equal(animals.train_labels, animals.train.labels)
    assert torch.equal(animals.test_labels, animals.test.labels)


def test_animals_split_is_deterministic_and_disjoint():
    first = animals_module.animal_split_indices()
    animals_module.animal_split_indices.cache_clear()
    second = animals_module.animal_split_indices()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    together = torch.cat(second)
    assert len(together) == 10000 and len(torch.unique(together)) == 10000


def test_animals_label_order_matches_the_shapes():
    """Label order anchors measured on the data: zebras keep grey stripes; giraffes are the
    narrowest shapes. A shifted class list would fail here."""
    images, labels = animals_module.load_animal_arrays()
    x = images.float()
    mid_grey = torch.stack([((x[labels == c] > 40) & (x[labels == c] < 215)).float().mean()
                            for c in range(10)])
    width = torch.stack([(x[labels == c] > 127).any(dim=1).float().sum(1).mean() for c in range(10)])
    assert ANIMALS[int(mid_grey.argmax())] == "zebra"
    assert ANIMALS[int(width.argmin())] == "giraffe"


def test_animals_normalisation_constants_match_training_images(animals):
    raw = animals.train_plain.images.float() / 255
    assert raw.mean().item() == pytest.approx(animals.mean[0], abs=1e-3)
    assert raw.std().item() == pytest.approx(animals.std[0], abs=1e-3)


def test_animals_dataloader_batch(animals):
    images, labels = next(iter(DataLoader(animals.train, batch_size=16, shuffle=True)))
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.long and labels.min() >= 0 and labels.max() <= 9


def test_animals_train_plain_is_train_without_augmentation(animals):
    plain, label = animals.train_plain[123]
    assert label == int(animals.train_labels[123])
    expected = (animals.train_plain.images[123].float() / 255 - animals.mean[0]) / animals.std[0]
    assert torch.allclose(plain[0], expected, atol=1e-6)
    assert torch.allclose(animals.denormalize(plain)[0], animals.train_plain.images[123].float() / 255,
                          atol=1e-6)
    torch.manual_seed(0)
    augmented = torch.stack([animals.train[123][0] for _ in range(4)])
    assert not torch.allclose(augmented[0], augmented[1])  # augmentation is random
    unaugmented = create_dataset("animals", augment=False)
    assert torch.equal(unaugmented.train[123][0], plain)


def test_animals_limit_keeps_classes_balanced():
    small = create_dataset("animals", limit=50)
    assert len(small.train) == len(small.train_plain) == len(small.test) == 50
    assert torch.bincount(small.train_labels, minlength=10).tolist() == [5] * 10
    assert torch.bincount(small.test_labels, minlength=10).tolist() == [5] * 10
    assert torch.equal(small.train.labels, small.train_plain.labels)
    assert torch.equal(small.train.images, small.train_plain.images)
    again = create_dataset("animals", limit=50)
    assert torch.equal(again.train.images, small.train.images)


def test_animals_image_size_resizes():
    big = create_dataset("animals", image_size=56, limit=10)
    assert big.image_size == 56
    assert big.train[0][0].shape == (1, 56, 56) and big.test[0][0].shape == (1, 56, 56)


def test_animals_rejects_crop():
    with pytest.raises(ProtoKNNError, match="bounding boxes"):
        create_dataset("animals", crop=True)


def test_denormalize_batch_and_wrong_channels(animals):
    batch = torch.stack([animals.test[i][0] for i in range(3)])
    out = animals.denormalize(batch)
    assert out.shape == (3, 1, 28, 28) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ProtoKNNError, match="channel"):
        animals.denormalize(torch.zeros(3, 28, 28))


def test_load_image_matches_dataset_and_converts_channels(animals, tmp_path):
    animals.test.raw_image(7).save(tmp_path / "a.png")
    loaded = animals.load_image(tmp_path / "a.png")
    assert torch.allclose(loaded, animals.test[7][0], atol=1e-6)
    Image.new("RGBA", (40, 30), (255, 0, 0, 255)).save(tmp_path / "big.png")
    assert animals.load_image(tmp_path / "big.png").shape == (1, 28, 28)
    assert load_image(tmp_path / "big.png").mode == "RGB"
    assert load_image(tmp_path / "big.png", channels=1).mode == "L"


def test_load_image_missing_or_corrupt_raises(animals, tmp_path):
    with pytest.raises(ProtoKNNError, match="not found"):
        animals.load_image(tmp_path / "absent.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ProtoKNNError, match="junk.png"):
        animals.load_image(tmp_path / "junk.png")


def test_animals_files_are_decoded_once_per_process(monkeypatch):
    reads = []
    real_read = animals_module._read_array
    monkeypatch.setattr(animals_module, "_read_array", lambda path: reads.append(path.name) or real_read(path))
    animals_module.load_animal_arrays.cache_clear()
    first = create_dataset("animals")
    second = create_dataset("animals", augment=False)
    assert sorted(reads) == sorted([animals_module.DATA_FILE, animals_module.LABEL_FILE])  # one read each
    assert animals_module.load_animal_arrays() is animals_module.load_animal_arrays()
    assert torch.equal(first.train_labels, second.train_labels)


# --------------------------------------------------------------------------- fashion-mnist (IDX)

def _idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) \
        + array.astype(np.uint8).tobytes()


def _write_idx_set(folder: Path, gz: bool, n_train=30, n_test=20) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    for stem, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_tiny_idx_set(tmp_path, gz):
    arrays = _write_idx_set(tmp_path / "fm", gz)
    splits = create_dataset("fashion-mnist", str(tmp_path / "fm"))
    assert (len(splits.train), len(splits.test)) == (30, 20)
    assert splits.classes[0] == "T-shirt/top" and splits.classes[9] == "Ankle boot"
    assert splits.train_labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert splits.test_labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    images, labels = next(iter(DataLoader(splits.train, batch_size=8)))
    assert images.shape == (8, 1, 28, 28) and labels.tolist() == list(range(8))
    plain = splits.train_plain[3][0]
    expected = (torch.from_numpy(arrays["train-images-idx3-ubyte"][3]).float() / 255 - splits.mean[0]) / splits.std[0]
    assert torch.allclose(plain[0], expected, atol=1e-5)


def test_fashion_mnist_missing_dir_names_the_debian_package(tmp_path):
    with pytest.raises(ProtoKNNError, match="dataset-fashion-mnist") as info:
        create_dataset("fashion-mnist", str(tmp_path / "absent"))
    assert str(tmp_path / "absent") in str(info.value) and "--data-dir" in str(info.value)


def test_fashion_mnist_missing_file_is_named(tmp_path):
    _write_idx_set(tmp_path / "fm", gz=False)
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ProtoKNNError, match="t10k-labels-idx1-ubyte.*dataset-fashion-mnist"):
        create_dataset("fashion-mnist", str(tmp_path / "fm"))


def test_idx_truncated_and_bad_magic_name_the_file(tmp_path):
    good = _idx_bytes(np.zeros((4, 28, 28)))
    (tmp_path / "short").write_bytes(good[:-10])
    with pytest.raises(ProtoKNNError, match="short.*truncated"):
        read_idx(tmp_path / "short", 3)
    (tmp_path / "magic").write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(ProtoKNNError, match="magic.*bad magic"):
        read_idx(tmp_path / "magic", 3)
    (tmp_path / "cut.gz").write_bytes(gzip.compress(good)[:-20])
    with pytest.raises(ProtoKNNError, match="cut.gz"):
        read_idx(tmp_path / "cut.gz", 3)
    (tmp_path / "ok").write_bytes(good)
    assert read_idx(tmp_path / "ok", 3).shape == (4, 28, 28)


def test_fashion_mnist_bad_file_inside_dataset_is_named(tmp_path):
    _write_idx_set(tmp_path / "fm", gz=True)
    path = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))
    with pytest.raises(ProtoKNNError, match="train-images-idx3-ubyte.gz"):
        create_dataset("fashion-mnist", str(tmp_path / "fm"))


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_has_official_split():
    splits = create_dataset("fashion-mnist")
    assert (len(splits.train), len(splits.test)) == (60000, 10000)
    assert torch.bincount(splits.train_labels).tolist() == [6000] * 10
    raw = splits.train_plain.images.float() / 255
    assert raw.mean().item() == pytest.approx(splits.mean[0], abs=1e-3)
    assert raw.std().item() == pytest.approx(splits.std[0], abs=1e-3)
    assert describe_dataset("fashion-mnist")["status"] == "ok"


# --------------------------------------------------------------------------- imagefolder

def _save(path: Path, mode: str, size=(20, 16), fmt=None, colour=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = colour if colour is not None else {"L": 128, "RGB": (200, 30, 30), "RGBA": (0, 0, 255, 0)}[mode]
    Image.new(mode, size, colour).save(path, format=fmt)


def _make_flat_folder(root: Path, per_class=5):
    for c, name in enumerate(["cats", "dogs"]):
        for i in range(per_class):
            _save(root / name / f"{i}.png", "RGB", colour=(c * 100, i * 20, 50))
    _save(root / "cats" / "grey.jpg", "L")
    _save(root / "dogs" / "alpha.png", "RGBA")
    (root / "dogs" / "notes.txt").write_text("not an image, ignored")
    # A JPEG cut inside its compressed data: verify() accepts it, only a decode fails.
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "dogs" / "truncated.jpg")
    data = (root / "dogs" / "truncated.jpg").read_bytes()
    (root / "dogs" / "truncated.jpg").write_bytes(data[: int(len(data) * 0.7)])
    with Image.open(root / "dogs" / "truncated.jpg") as img:
        img.verify()  # the header is intact
    (root / "cats" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")


def test_imagefolder_flat_split_batch_and_skipped_files(tmp_path):
    _make_flat_folder(tmp_path / "imgs")
    with pytest.warns(DatasetWarning, match="skipped 2 unreadable"):
        splits = create_dataset("imagefolder", str(tmp_path / "imgs"), image_size=32)
    assert splits.classes == ["cats", "dogs"] and splits.channels == 3
    assert sorted(Path(p).name for p in splits.skipped) == ["garbage.png", "truncated.jpg"]
    # 6 readable images per class -> round(1.2) = 1 test image each
    assert len(splits.train) == 10 and len(splits.test) == 2
    assert torch.bincount(splits.test_labels).tolist() == [1, 1]
    all_names = {p.name for p in splits.train.paths + splits.test.paths}
    assert {"grey.jpg", "alpha.png"} <= all_names and "notes.txt" not in all_names
    images, labels = next(iter(DataLoader(splits.train, batch_size=10)))
    assert images.shape == (10, 3, 32, 32) and labels.shape == (10,)
    assert splits.test[0][0].shape == (3, 32, 32)


def test_imagefolder_converts_grey_and_rgba_to_rgb(tmp_path):
    _make_flat_folder(tmp_path / "imgs")
    with pytest.warns(DatasetWarning):
        splits = create_dataset("imagefolder", str(tmp_path / "imgs"), image_size=32, augment=False)
    every = splits.train_plain
    for name in ("grey.jpg", "alpha.png"):
        dataset = every if any(p.name == name for p in every.paths) else splits.test
        index = [p.name for p in dataset.paths].index(name)
        raw = dataset.raw_image(index)
        assert raw.mode == "RGB"
        if name == "alpha.png":  # fully transparent blue pixels become white, not black or blue
            assert raw.getpixel((0, 0)) == (255, 255, 255)
        assert dataset[index][0].shape == (3, 32, 32)


def test_imagefolder_strict_names_the_corrupt_file(tmp_path):
    _make_flat_folder(tmp_path / "imgs")
    with pytest.raises(ProtoKNNError, match=r"garbage\.png|truncated\.jpg"):
        create_dataset("imagefolder", str(tmp_path / "imgs"), strict=True)


def test_imagefolder_train_test_layout(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for name in ("a", "b", "c"):
            for i in range(n):
                _save(tmp_path / "d" / split / name / f"{i}.jpg", "RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to skip, so no warning
        splits = create_dataset("imagefolder", str(tmp_path / "d"))
    assert splits.image_size == 224 and splits.classes == ["a", "b", "c"]
    assert splits.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert splits.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert splits.train[0][0].shape == (3, 224, 224) and splits.skipped == []


def test_imagefolder_test_class_without_train_partner(tmp_path):
    _save(tmp_path / "d" / "train" / "a" / "0.png", "RGB")
    _save(tmp_path / "d" / "test" / "a" / "0.png", "RGB")
    _save(tmp_path / "d" / "test" / "zz" / "0.png", "RGB")
    with pytest.raises(ProtoKNNError, match="zz"):
        create_dataset("imagefolder", str(tmp_path / "d"))


def test_imagefolder_empty_class_folder_is_named(tmp_path):
    _save(tmp_path / "d" / "full" / "0.png", "RGB")
    _save(tmp_path / "d" / "full" / "1.png", "RGB")
    (tmp_path / "d" / "hollow").mkdir()
    (tmp_path / "d" / "hollow" / "readme.txt").write_text("x")
    with pytest.raises(ProtoKNNError, match="hollow.*no images"):
        create_dataset("imagefolder", str(tmp_path / "d"))


def test_imagefolder_missing_or_empty_dir(tmp_path):
    with pytest.raises(ProtoKNNError, match="--data-dir"):
        create_dataset("imagefolder")
    with pytest.raises(ProtoKNNError, match="not found at"):
        create_dataset("imagefolder", str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProtoKNNError, match="no class sub-folders"):
        create_dataset("imagefolder", str(tmp_path / "empty"))


def test_imagefolder_limit_and_load_image(tmp_path):
    for name in ("a", "b"):
        for i in range(10):
            _save(tmp_path / "d" / name / f"{i}.png", "RGB", colour=(i, 0, 0))
    splits = create_dataset("imagefolder", str(tmp_path / "d"), image_size=32, limit=4)
    assert torch.bincount(splits.train_labels).tolist() == [2, 2]
    assert splits.train_plain.paths == splits.train.paths
    assert torch.allclose(splits.load_image(splits.test.paths[0]), splits.test[0][0], atol=1e-6)
    assert isinstance(splits, DatasetSplits)
