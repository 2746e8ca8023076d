"""Write a tiny ImageFolder copy of the embedded ``animals`` data, and ready CaBRNet configs.

    python -m protoknn_plugin.adapters.cabrnet.make_tiny_dataset OUT [--train 60] [--val 30] [--test 30]

writes ``OUT/tiny-animals/{train,val,test}/NN-class/*.png`` (RGB PNGs, 28x28, classes
balanced, picked by ``create_dataset("animals", limit=...)``) and ``OUT/configs/``: the
packaged ``model_arch.yml``, ``training.yml`` and a ``dataset.yml`` whose roots point at
those folders (absolute), so that

    cabrnet train -c OUT/configs -o RUN --device cpu
    cabrnet evaluate -c RUN/final --device cpu

run from any directory. Class folders are named ``00-bear`` ... ``09-zebra`` so that
ImageFolder's sorted order equals the dataset's label order. Rerunning rewrites the three
folders from scratch (same arguments, same files).
"""
from __future__ import annotations

import argparse
import shutil
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from protoknn_plugin.errors import ProtoKNNError, check

CONFIG_FILES = ("model_arch.yml", "training.yml", "dataset.yml")
DATASET_NAME = "tiny-animals"


def write_image_folder(out: Path, train: int = 60, test: int = 30, val: int = 30) -> Dict[str, int]:
    """``out/tiny-animals/{train,val,test}/NN-class/i.png`` from ``animals``; returns the image counts.

    train and val are disjoint picks of animals' training split, test of its test split.
    """
    import torch

    from protoknn_plugin.data import create_dataset, stratified_pick

    check(isinstance(train, int) and train >= 2 and isinstance(test, int) and test >= 1
          and isinstance(val, int) and val >= 1,
          f"need at least 2 training, 1 validation and 1 test image, got --train {train} --val {val} --test {test}")
    splits = create_dataset("animals", augment=False)
    train_labels = splits.train_plain.labels
    # validation: the next `val` images of the same class-balanced order, so disjoint from train
    train_pick = stratified_pick(train_labels, train)
    val_pick = stratified_pick(train_labels, train + val)
    val_pick = val_pick[~torch.isin(val_pick, train_pick)]
    counts = {}
    for part, dataset, picked in (("train", splits.train_plain, train_pick), ("val", splits.train_plain, val_pick),
                                  ("test", splits.test, stratified_pick(splits.test.labels, test))):
        labels = dataset.labels
        root = out / DATASET_NAME / part
        shutil.rmtree(root, ignore_errors=True)  # a rerun with other counts leaves no stale images
        for index in picked.tolist():
            label = int(labels[index])
            folder = root / f"{label:02d}-{splits.classes[label]}"
            folder.mkdir(parents=True, exist_ok=True)
            dataset.raw_image(index).convert("RGB").save(folder / f"{index:05d}.png")
        counts[part] = len(picked)
    return counts


def write_configs(out: Path, data_root: Path, classifier_options: Optional[Mapping[str, Any]] = None) -> Path:
    """``out/configs/`` with the packaged configs; dataset roots made absolute under ``data_root``.

    ``classifier_options`` replace entries of ``classifier.params`` in model_arch.yml
    (e.g. ``{"aux_loss": "none"}``); without them model_arch.yml is the packaged file as is.
    """
    import yaml  # comes with cabrnet

    config_dir = out / "configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    packaged = resources.files("protoknn_plugin.adapters.cabrnet") / "configs"
    for name in CONFIG_FILES:
        text = (packaged / name).read_text()
        if name == "dataset.yml":
            config = yaml.safe_load(text)
            for part in config.values():
                relative = Path(part["params"]["root"]).relative_to(DATASET_NAME)
                part["params"]["root"] = str((data_root / DATASET_NAME / relative).resolve())
            text = yaml.safe_dump(config, sort_keys=False)
        if name == "model_arch.yml" and classifier_options:
            config = yaml.safe_load(text)
            config["classifier"]["params"].update(classifier_options)
            text = yaml.safe_dump(config, sort_keys=False)
        (config_dir / name).write_text(text)
    return config_dir


def parse_options(pairs: Sequence[str]) -> Dict[str, Any]:
    """["aux_loss=none", "k=3"] -> {"aux_loss": "none", "k": 3} (values read as YAML scalars)."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        check(bool(sep) and key.isidentifier(),
              f"--classifier-opt takes KEY=VALUE, e.g. aux_loss=none; got {pair!r}")
        options[key] = yaml.safe_load(value)
    return options


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write tiny-animals/ and configs/ into")
    parser.add_argument("--train", type=int, default=60, help="training images (default 60, 6 per class)")
    parser.add_argument("--val", type=int, default=30, help="validation images (default 30, 3 per class)")
    parser.add_argument("--test", type=int, default=30, help="test images (default 30, 3 per class)")
    parser.add_argument("--classifier-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="set classifier.params.KEY in model_arch.yml (VALUE read as YAML), e.g. aux_loss=none")
    args = parser.parse_args(argv)
    try:
        options = parse_options(args.classifier_opt)
        counts = write_image_folder(args.out, args.train, args.test, args.val)
        config_dir = write_configs(args.out, args.out, options)
    except ProtoKNNError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {counts['train']} training, {counts['val']} validation and {counts['test']} test images under "
          f"{args.out / DATASET_NAME} and configs in {config_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
