"""Faithfulness of a finished run directory: load, measure, write RUN_DIR/faithfulness.json.

This is the entry point ``benchmark`` calls per run (``faithfulness_for_run``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from .measure import DEFAULT_IMAGES, DEFAULT_MS, DEFAULT_SIGMA, check_options, evaluate_faithfulness

RESULT_NAME = "faithfulness.json"


def part_reader(saved, splits, data_dir=None):
    """A reader of part locations for the run's test images, or None when its dataset has none."""
    if saved.get("dataset") != "cub200":
        return None
    from ..data.cub import parts_in_test_images

    folder = data_dir or (saved.get("data") or {}).get("data_dir")
    return lambda indices: parts_in_test_images(folder, splits.test, indices, splits.image_size,
                                                crop=bool(splits.cropped))[1]


def measure_run(run_dir, splits=None, n: int = DEFAULT_IMAGES, seed: int = 0, sigma: float = DEFAULT_SIGMA,
                ms=DEFAULT_MS, data_dir=None, write: bool = True, nearest=None, model=None, choice: str = "best",
                say=None) -> Dict[str, object]:
    """The nested results of ``evaluate_faithfulness`` for a finished run, with run facts added
    (``checkpoint``: the file measured); written to RUN_DIR/faithfulness.json when ``write``.
    ``choice``/``say``: which model to load and where its one-line note goes (``runs.load_model``)."""
    from ..runs import check_run, load_model, run_splits
    from ..train import write_json

    check_options(n, sigma, tuple(ms))
    saved = check_run(run_dir)
    splits = splits if splits is not None else run_splits(saved, data_dir)
    model = model if model is not None else load_model(run_dir, choice, say)
    result = evaluate_faithfulness(model, splits, n=n, seed=seed, sigma=sigma, ms=tuple(ms),
                                   parts=part_reader(saved, splits, data_dir), nearest=nearest)
    result = {"run": str(run_dir), "head": saved["model_config"]["head"], "dataset": saved["dataset"],
              "checkpoint": getattr(model, "checkpoint_file", None), **result}
    if write:
        write_json(Path(run_dir) / RESULT_NAME, result)
    return result


def faithfulness_for_run(run_dir, splits=None, n: int = DEFAULT_IMAGES, seed: int = 0,
                         sigma: float = DEFAULT_SIGMA, data_dir: Optional[str] = None,
                         write: bool = True) -> Dict[str, Optional[float]]:
    """Flat faithfulness metrics of a finished run (for ``benchmark --explanations`` columns).

    Keys: ``del_drop[m=M]``, ``del_drop_rand_proto[m=M]``, ``del_drop_rand_box[m=M]``,
    ``del_flip[...]`` likewise, ``del_ratio_proto[m=M]``, ``del_ratio_box[m=M]`` for M = 1, 3, 5,
    and ``stability``, ``consistency`` (None without part annotations), ``purity``.
    ``splits``: the run's DatasetSplits if already built (saves reloading the data).
    """
    return measure_run(run_dir, splits=splits, n=n, seed=seed, sigma=sigma, data_dir=data_dir, write=write)["metrics"]
