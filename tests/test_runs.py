"""runs: building a run to train (model seeded by the run's seed, an optional feature cache) and the
checks on a run directory; formatting: how numbers and classes are written."""
import contextlib
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from protoknn_plugin.data import create_dataset
from protoknn_plugin.errors import ProtoKNNError
from protoknn_plugin.formatting import class_name, format_number
from protoknn_plugin.runs import build_run, open_run_dir
from protoknn_plugin.train import TrainConfig


@pytest.fixture(scope="module")
def animals_small():
    return create_dataset("animals", limit=100)


def _build(splits, head, seed, **kwargs):
    options = dict(head=head, backbone="small-cnn", num_prototypes=20, dim=16, backbone_options={"width": 8})
    return build_run(splits, TrainConfig(epochs=1, steps_per_epoch=1, seed=seed), options, dataset_name="animals",
                     data_info={"limit": 100}, progress=False, **kwargs)


def _backbone(run):
    return {k: v for k, v in run.model.state_dict().items() if k.startswith("backbone.")}


def test_heads_built_under_one_seed_start_from_the_same_backbone(animals_small):
    knn, cnn, other = (_build(animals_small, "protoknn", 0), _build(animals_small, "cnn", 0),
                       _build(animals_small, "protoknn", 1))
    assert knn.model.config.seed == 0 and other.model.config.seed == 1
    first, same, different = _backbone(knn), _backbone(cnn), _backbone(other)
    assert first and all(torch.equal(first[k], same[k]) for k in first)
    assert any(not torch.equal(first[k], different[k]) for k in first)
    assert knn.trainer.model is knn.model and knn.frozen is None
    assert knn.trainer.data_info["limit"] == 100


def test_a_feature_cache_from_prepare_feeds_the_trainer(animals_small):
    seen, entered = [], []
    cached = dataclasses.replace(animals_small)  # another splits object, the same data

    @contextlib.contextmanager
    def frozen_backbone():
        entered.append(True)
        yield

    def prepare(model, splits):
        seen.append((model, splits))
        return SimpleNamespace(splits=cached, info={"frozen_backbone": True, "feature_cache": "here"},
                               frozen_backbone=frozen_backbone)

    run = _build(animals_small, "protoknn", 0, prepare=prepare)
    assert seen == [(run.model, animals_small)]  # prepare sees the new model and the image splits
    assert run.splits is cached and run.trainer.splits is cached
    assert run.trainer.data_info["feature_cache"] == "here" and run.trainer.data_info["limit"] == 100
    with run.frozen_backbone():
        assert entered == [True]


def test_a_run_directory_is_checked_before_it_is_read(tmp_path):
    assert open_run_dir(tmp_path, resume=False, overwrite=False) is None
    with pytest.raises(ProtoKNNError, match="holds no checkpoint.pt"):
        open_run_dir(tmp_path, resume=True, overwrite=False)
    (tmp_path / "checkpoint.pt").write_bytes(b"not read")
    with pytest.raises(ProtoKNNError, match="already holds a run"):
        open_run_dir(tmp_path, resume=False, overwrite=False)
    assert open_run_dir(tmp_path, resume=False, overwrite=True) is None  # a new run replaces it, nothing read


@pytest.mark.parametrize("value, sign, text", [
    (0.0, False, "0.000"), (1.5, False, "1.500"), (-0.0123441, False, "-0.01234"), (123.456, True, "+123.5"),
    (99999.0, False, "99999"), (123456.0, False, "1.235e+05"), (0.0004, True, "+4.000e-04"), (-2.5, True, "-2.500"),
])
def test_numbers_have_four_significant_digits(value, sign, text):
    assert format_number(value, sign=sign) == text


def test_class_names_fall_back_to_the_index():
    splits = SimpleNamespace(classes=["cat", "dog"])
    assert [class_name(splits, i) for i in (0, 1, 2, -1, None)] == ["cat", "dog", "class 2", "class -1", "?"]
    assert class_name(object(), 3) == "class 3"
