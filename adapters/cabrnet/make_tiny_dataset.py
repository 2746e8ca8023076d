"""Write a tiny ImageFolder copy of the embedded ``animals`` data, and ready CaBRNet configs.

    python -m protoknn_plugin.adapters.cabrnet.make_tiny_dataset OUT [--train 60] [--test 30]

writes ``OUT/tiny-animals/{train,test}/NN-class/*.png`` (RGB PNGs, 28x28, classes
balanced, picked by ``create_dataset("animals", limit=...)``) and ``OUT/configs/``: the
packaged ``model_arch.yml``, ``training.yml`` and a ``dataset.yml`` whose roots point at
those folders (absolute), so that

    cabrnet train -c OUT/configs -o RUN --device cpu
    cabrnet evaluate -c RUN/final --device cpu

run from any directory. Class folders are named ``00-bear`` ... ``09-zebra`` so that
ImageFolder's sorted order equals the dataset's label order. Rerunning rewrites both
folders from scratch (same arguments, same files).
"""
from __future__ import annotations

import argparse
import shutil
from importlib import resources
from pathlib import Path
from typing import Dict, Optional, Sequence

from protoknn_plugin.errors import ProtoKNNError, check

CONFIG_FILES = ("model_arch.yml", "training.yml", "dataset.yml")
DATASET_NAME = "tiny-animals"


def write_image_folder(out: Path, train: int = 60, test: int = 30) -> Dict[str, int]:
    """``out/tiny-animals/{train,test}/NN-class/i.png`` from ``animals``; returns the image counts."""
    from protoknn_plugin.data import create_dataset, stratified_pick

    check(isinstance(train, int) and train >= 2 and isinstance(test, int) and test >= 1,
          f"need at least 2 training and 1 test image, got --train {train} --test {test}")
    splits = create_dataset("animals", augment=False)
    counts = {}
    for part, dataset, limit in (("train", splits.train_plain, train), ("test", splits.test, test)):
        labels = dataset.labels
        picked = stratified_pick(labels, limit)
        root = out / DATASET_NAME / part
        shutil.rmtree(root, ignore_errors=True)  # a rerun with other counts leaves no stale images
        for index in picked.tolist():
            label = int(labels[index])
            folder = root / f"{label:02d}-{splits.classes[label]}"
            folder.mkdir(parents=True, exist_ok=True)
            dataset.raw_image(index).convert("RGB").save(folder / f"{index:05d}.png")
        counts[part] = len(picked)
    return counts


def write_configs(out: Path, data_root: Path) -> Path:
    """``out/configs/`` with the packaged configs; dataset roots made absolute under ``data_root``."""
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
        (config_dir / name).write_text(text)
    return config_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write tiny-animals/ and configs/ into")
    parser.add_argument("--train", type=int, default=60, help="training images (default 60, 6 per class)")
    parser.add_argument("--test", type=int, default=30, help="test images (default 30, 3 per class)")
    args = parser.parse_args(argv)
    try:
        counts = write_image_folder(args.out, args.train, args.test)
        config_dir = write_configs(args.out, args.out)
    except ProtoKNNError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {counts['train']} training and {counts['test']} test images under "
          f"{args.out / DATASET_NAME} and configs in {config_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
