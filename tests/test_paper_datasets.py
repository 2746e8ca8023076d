"""The paper's datasets on tiny fake trees in each official archive layout."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from protoknn_plugin.errors import ProtoKNNError
from protoknn_plugin.data import create_dataset, describe_dataset

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
needs_scipy = pytest.mark.skipif(not HAS_SCIPY, reason="scipy is needed to write the .mat fixtures")


def _jpeg(path: Path, size, colour=(120, 60, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=90)


# --------------------------------------------------------------------------- CUB-200-2011

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def _make_cub(parent: Path) -> dict:
    """3 classes x 3 images; images 2 and 3 of each class are train. Returns id -> facts."""
    root = parent / "CUB_200_2011"
    facts, images, labels, split, boxes = {}, [], [], [], []
    image_id = 0
    for c, cls in enumerate(CUB_CLASSES, 1):
        for k in range(3):
            image_id += 1
            rel = f"{cls}/{cls.split('.')[1]}_{k}.jpg"
            size = (60 + 4 * image_id, 40 + 2 * image_id)
            box = (2.0 + image_id, 3.0, 10.0 + image_id, 12.0 + c)  # x, y, width, height
            _jpeg(root / "images" / rel, size)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {int(k > 0)}")
            boxes.append(f"{image_id} " + " ".join(f"{v:.1f}" for v in box))
            facts[image_id] = {"label": c - 1, "train": k > 0, "box": box, "size": size}
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{i} {c}" for i, c in enumerate(CUB_CLASSES, 1)) + "\n")
    return facts


def test_cub_labels_split_and_names(tmp_path):
    facts = _make_cub(tmp_path)
    splits = create_dataset("cub200", str(tmp_path), image_size=32)
    assert splits.classes == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    train_ids = [i for i in sorted(facts) if facts[i]["train"]]
    test_ids = [i for i in sorted(facts) if not facts[i]["train"]]
    assert splits.train_labels.tolist() == [facts[i]["label"] for i in train_ids] == [0, 0, 1, 1, 2, 2]
    assert splits.test_labels.tolist() == [facts[i]["label"] for i in test_ids] == [0, 1, 2]
    assert not splits.cropped and splits.train_plain.raw_image(0).size == facts[train_ids[0]]["size"]
    images, labels = next(iter(DataLoader(splits.train, batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1]
    assert splits.test[2][0].shape == (3, 32, 32)


def test_cub_accepts_the_inner_folder_and_crops_to_boxes(tmp_path):
    facts = _make_cub(tmp_path)
    splits = create_dataset("cub200", str(tmp_path / "CUB_200_2011"), crop=True, image_size=32)
    assert splits.cropped
    test_ids = [i for i in sorted(facts) if not facts[i]["train"]]
    for index, image_id in enumerate(test_ids):
        _, _, width, height = facts[image_id]["box"]
        assert splits.test.raw_image(index).size == (int(width), int(height))
        assert splits.test[index][0].shape == (3, 32, 32)
    # crop happens before the (random) training transform too
    assert splits.train[0][0].shape == (3, 32, 32)


def test_cub_missing_pieces_are_named(tmp_path):
    _make_cub(tmp_path)
    root = tmp_path / "CUB_200_2011"
    (root / "bounding_boxes.txt").unlink()
    create_dataset("cub200", str(tmp_path))  # boxes are only needed for crop
    with pytest.raises(ProtoKNNError, match="bounding_boxes.txt"):
        create_dataset("cub200", str(tmp_path), crop=True)
    next(root.glob("images/*/*.jpg")).unlink()
    with pytest.raises(ProtoKNNError, match="missing"):
        create_dataset("cub200", str(tmp_path))
    (root / "train_test_split.txt").write_text("1 1\nnonsense\n")
    with pytest.raises(ProtoKNNError, match=r"train_test_split.txt:2"):
        create_dataset("cub200", str(tmp_path))


def test_cub_absent_and_describe(tmp_path):
    info = describe_dataset("cub200", str(tmp_path / "nope"))
    assert info["status"] == f"not found at {tmp_path / 'nope'}"
    (tmp_path / "other").mkdir()
    with pytest.raises(ProtoKNNError, match="images.txt"):
        create_dataset("cub200", str(tmp_path / "other"))
    _make_cub(tmp_path / "real")
    info = describe_dataset("cub200", str(tmp_path / "real"))
    assert (info["status"], info["classes"], info["train"], info["test"]) == ("ok", 3, 6, 3)


# --------------------------------------------------------------------------- Stanford Dogs

DOG_FOLDERS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]


def _voc(path: Path, boxes):
    objects = "".join(
        f"<object><name>dog</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for b in boxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><size><width>50</width><height>40</height></size>{objects}</annotation>")


def _make_dogs(root: Path):
    """2 classes x 3 images; lists: train = images 0, 1 of each class, test = image 2."""
    files = {}
    for c, folder in enumerate(DOG_FOLDERS):
        for k in range(3):
            rel = f"{folder}/{folder.split('-')[0]}_{k}.jpg"
            _jpeg(root / "Images" / rel, (50, 40))
            # two dogs; the larger box (4..30 x 5..25 = 26 x 20) must be chosen
            _voc(root / "Annotation" / rel[:-4], [(1, 1, 6, 6), (4, 5, 30, 25)])
            files.setdefault("train" if k < 2 else "test", []).append((rel, c + 1))
    return files


def _write_dog_mat(root: Path, split: str, entries):
    from scipy.io import savemat
    file_list = np.empty((len(entries), 1), dtype=object)
    annotation_list = np.empty((len(entries), 1), dtype=object)
    for i, (rel, _) in enumerate(entries):
        file_list[i, 0] = rel
        annotation_list[i, 0] = rel[:-4]
    labels = np.array([[label] for _, label in entries], dtype=np.uint8)
    savemat(root / f"{split}_list.mat", {"file_list": file_list, "annotation_list": annotation_list,
                                         "labels": labels})


@needs_scipy
def test_dogs_mat_lists_labels_and_crop(tmp_path):
    files = _make_dogs(tmp_path)
    for split in ("train", "test"):
        _write_dog_mat(tmp_path, split, files[split])
    splits = create_dataset("stanford-dogs", str(tmp_path), image_size=32)
    assert splits.classes == ["Chihuahua", "Japanese spaniel"]
    assert splits.train_labels.tolist() == [0, 0, 1, 1] and splits.test_labels.tolist() == [0, 1]
    assert [p.name for p in splits.test.paths] == ["n02085620_2.jpg", "n02085782_2.jpg"]
    assert splits.test.raw_image(0).size == (50, 40)
    cropped = create_dataset("stanford-dogs", str(tmp_path), image_size=32, crop=True)
    assert cropped.test.raw_image(1).size == (26, 20)
    images, _ = next(iter(DataLoader(cropped.train, batch_size=4)))
    assert images.shape == (4, 3, 32, 32)


def test_dogs_text_lists_with_and_without_labels(tmp_path):
    files = _make_dogs(tmp_path)
    (tmp_path / "train_list.txt").write_text("".join(f"{rel} {label}\n" for rel, label in files["train"]))
    (tmp_path / "test_list.txt").write_text("".join(f"{rel}\n" for rel, _ in files["test"]))
    splits = create_dataset("stanford-dogs", str(tmp_path), image_size=32)
    assert splits.train_labels.tolist() == [0, 0, 1, 1]
    assert splits.test_labels.tolist() == [0, 1]  # from the folder ranks


def test_dogs_mat_without_scipy_says_install_scipy(tmp_path, monkeypatch):
    files = _make_dogs(tmp_path)
    for split in ("train", "test"):
        (tmp_path / f"{split}_list.mat").write_bytes(b"placeholder")  # never read without scipy
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ProtoKNNError, match="pip install scipy"):
        create_dataset("stanford-dogs", str(tmp_path))
    # the text lists are the documented way around it
    (tmp_path / "train_list.txt").write_text("".join(f"{rel}\n" for rel, _ in files["train"]))
    (tmp_path / "test_list.txt").write_text("".join(f"{rel}\n" for rel, _ in files["test"]))
    assert len(create_dataset("stanford-dogs", str(tmp_path)).train) == 4


def test_dogs_errors(tmp_path):
    with pytest.raises(ProtoKNNError, match="not found at"):
        create_dataset("stanford-dogs", str(tmp_path / "absent"))
    files = _make_dogs(tmp_path)
    with pytest.raises(ProtoKNNError, match="lists.tar"):
        create_dataset("stanford-dogs", str(tmp_path))
    (tmp_path / "train_list.txt").write_text("".join(f"{rel}\n" for rel, _ in files["train"]))
    (tmp_path / "test_list.txt").write_text("n099-Unknown/x.jpg\n")
    with pytest.raises(ProtoKNNError, match="test_list.txt:1"):
        create_dataset("stanford-dogs", str(tmp_path))
    (tmp_path / "test_list.txt").write_text("".join(f"{rel}\n" for rel, _ in files["test"]))
    (tmp_path / "Annotation" / files["test"][0][0][:-4]).write_text("<annotation>broken")
    splits = create_dataset("stanford-dogs", str(tmp_path), crop=True)  # annotations read lazily
    with pytest.raises(ProtoKNNError, match="annotation"):
        splits.test.raw_image(0)


# --------------------------------------------------------------------------- Stanford Cars

CAR_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]


def _write_cars_annos(path: Path, records, with_class=True):
    from scipy.io import savemat
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    annotations = np.zeros((1, len(records)), dtype=[(f, object) for f in fields])
    for i, rec in enumerate(records):
        for f in fields:
            value = rec[f]
            annotations[0, i][f] = np.array([[value]], dtype=np.uint16) if f != "fname" else value
    savemat(path, {"annotations": annotations})


def _make_cars(root: Path, test_at_root=True, test_labels=True):
    from scipy.io import savemat
    (root / "devkit").mkdir(parents=True)
    class_names = np.empty((1, len(CAR_CLASSES)), dtype=object)
    class_names[0, :] = CAR_CLASSES
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": class_names})
    made = {}
    for split, folder in (("train", "cars_train"), ("test", "cars_test")):
        records = []
        for i in range(4 if split == "train" else 3):
            fname = f"{i + 1:05d}.jpg"
            _jpeg(root / folder / fname, (70, 50))
            records.append({"bbox_x1": 3 + i, "bbox_y1": 4, "bbox_x2": 40 + i * 5, "bbox_y2": 30,
                            "class": (i % 3) + 1, "fname": fname})
        made[split] = records
    _write_cars_annos(root / "devkit" / "cars_train_annos.mat", made["train"])
    test_path = (root if test_at_root else root / "devkit") / "cars_test_annos_withlabels.mat"
    _write_cars_annos(test_path, made["test"], with_class=test_labels)
    return made


@needs_scipy
@pytest.mark.parametrize("test_at_root", [True, False])
def test_cars_labels_split_and_crop(tmp_path, test_at_root):
    made = _make_cars(tmp_path, test_at_root)
    splits = create_dataset("stanford-cars", str(tmp_path), image_size=32)
    assert splits.classes == CAR_CLASSES
    assert splits.train_labels.tolist() == [0, 1, 2, 0] and splits.test_labels.tolist() == [0, 1, 2]
    assert [p.name for p in splits.train.paths] == ["00001.jpg", "00002.jpg", "00003.jpg", "00004.jpg"]
    assert splits.train.paths[0].parent.name == "cars_train" and splits.test.paths[0].parent.name == "cars_test"
    assert splits.test.raw_image(0).size == (70, 50)
    cropped = create_dataset("stanford-cars", str(tmp_path), image_size=32, crop=True)
    for i, rec in enumerate(made["test"]):
        size = (rec["bbox_x2"] - rec["bbox_x1"], rec["bbox_y2"] - rec["bbox_y1"])
        assert cropped.test.raw_image(i).size == size
    images, labels = next(iter(DataLoader(cropped.train, batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 1, 2, 0]


@needs_scipy
def test_cars_unlabelled_test_annotations_are_refused(tmp_path):
    _make_cars(tmp_path, test_labels=False)
    with pytest.raises(ProtoKNNError, match="withlabels"):
        create_dataset("stanford-cars", str(tmp_path))


@needs_scipy
def test_cars_missing_pieces(tmp_path):
    _make_cars(tmp_path)
    (tmp_path / "cars_test_annos_withlabels.mat").unlink()
    info = describe_dataset("stanford-cars", str(tmp_path))
    assert "cars_test_annos_withlabels.mat not found at" in info["status"]
    with pytest.raises(ProtoKNNError, match="cars_test_annos_withlabels.mat"):
        create_dataset("stanford-cars", str(tmp_path))


def test_cars_without_scipy_says_install_scipy(tmp_path, monkeypatch):
    (tmp_path / "devkit").mkdir()
    for name in ("cars_meta.mat", "cars_train_annos.mat", "cars_test_annos_withlabels.mat"):
        (tmp_path / "devkit" / name).write_bytes(b"placeholder")
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ProtoKNNError, match="pip install scipy"):
        create_dataset("stanford-cars", str(tmp_path))


def test_crop_is_refused_where_there_are_no_boxes(tmp_path):
    with pytest.raises(ProtoKNNError, match="bounding boxes"):
        create_dataset("fashion-mnist", str(tmp_path), crop=True)
    assert torch.is_tensor(create_dataset("animals", limit=2).train_labels)
