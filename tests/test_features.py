"""The frozen-backbone feature cache: same losses as the image path, reuse, rebuilds, atomicity, CLI."""
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from conftest import TINY, run_cli
from protoknn_plugin.checkpoint import load_checkpoint
from protoknn_plugin.data import create_dataset
from protoknn_plugin.errors import ProtoKNNError
from protoknn_plugin.features import FeatureCache, weights_digest
from protoknn_plugin.frozen import prepare_feature_cache
from protoknn_plugin.model import ModelConfig, PrototypeModel
from protoknn_plugin.train import TrainConfig, Trainer, evaluate

LIMIT = 100


def tiny_model(head="protoknn", **backbone_options):
    options = {"width": 8, **backbone_options}
    return PrototypeModel(ModelConfig(head=head, backbone="small-cnn", num_classes=10, in_channels=1,
                                      num_prototypes=20, dim=16, backbone_options=options))


@pytest.fixture(scope="module")
def splits():
    return create_dataset("animals", limit=LIMIT)


class CountCalls:
    """Counts forward calls of a module (here: the backbone) through a hook."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1


def prepare(model, splits, cache_dir, **kw):
    return prepare_feature_cache(model, splits, dataset="animals", limit=LIMIT, cache_dir=cache_dir,
                                 progress=False, **kw)


def images_and_labels(dataset, indices):
    items = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def loss_on_batch(model, frozen, splits, indices):
    """Loss terms of one batch from images (backbone run in eval mode, as frozen) and from the cache."""
    images, labels = images_and_labels(splits.train_plain, indices)
    maps, cached_labels = images_and_labels(frozen.splits.train, indices)
    assert torch.equal(labels, cached_labels)
    model.train()
    model.backbone.eval()  # a frozen backbone: BatchNorm uses its running statistics
    torch.manual_seed(0)  # the cluster loss samples (Gumbel-max): same draws on both paths
    from_images = model.loss(images, labels)
    with frozen.frozen_backbone():
        torch.manual_seed(0)
        from_maps = model.loss(maps, labels)
    return from_images, from_maps


BATCH = list(range(0, LIMIT, 5))  # 20 images, 2 per class


def test_float32_cache_holds_the_backbone_maps_and_gives_the_same_loss_exactly(splits, tmp_path):
    model = tiny_model()
    # The default memory layout, as on the image path (channels_last would round differently).
    frozen = prepare(model, splits, tmp_path, dtype="float32", channels_last=False)
    images, _ = images_and_labels(splits.train_plain, range(LIMIT))
    with torch.no_grad():
        expected = model.backbone.eval()(images)
    stored, _ = images_and_labels(frozen.splits.train_plain, range(LIMIT))
    assert torch.equal(stored, expected)
    # Same float32 maps through the same layers: the loss is identical, not just close.
    from_images, from_maps = loss_on_batch(model, frozen, splits, BATCH)
    for term in ("task", "cluster", "aux", "total"):
        assert torch.equal(from_images[term], from_maps[term]), term


def test_channels_last_build_matches_up_to_float32_rounding_and_leaves_weights_alone(splits, tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    plain = prepare(model, splits, tmp_path / "a", dtype="float32", channels_last=False)
    fast = prepare(model, splits, tmp_path / "b", dtype="float32")  # channels_last is the default
    a, _ = images_and_labels(plain.splits.test, range(LIMIT))
    b, _ = images_and_labels(fast.splits.test, range(LIMIT))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # another summation order, same maps
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].is_contiguous() for k in after)


def test_float16_cache_rounds_each_value_and_the_loss_stays_within_fp16_precision(splits, tmp_path):
    model = tiny_model()
    exact = prepare(model, splits, tmp_path / "f32", dtype="float32")
    half = prepare(model, splits, tmp_path / "f16")  # float16 is the default
    a, _ = images_and_labels(exact.splits.test, range(LIMIT))
    b, _ = images_and_labels(half.splits.test, range(LIMIT))
    # float16 keeps 11 significant bits: rounding moves a value by at most 2^-11 of itself
    # (plus 2^-25 absolute where float16 runs out of exponent, below 6e-5).
    assert ((a - b).abs() <= a.abs() * 2.0 ** -11 + 2.0 ** -25).all()
    assert not torch.equal(a, b)  # it did round (the test would prove nothing otherwise)
    # The loss is made of cosines, norms and distances of those maps, each of which moves by a
    # small multiple of the relative error of its inputs: 2^-9 (4 x 2^-11) relative bounds it.
    # atol covers terms near zero, where a relative bound means nothing.
    from_images, from_maps = loss_on_batch(model, half, splits, BATCH)
    for term in ("task", "cluster", "aux", "total"):
        torch.testing.assert_close(from_maps[term], from_images[term], rtol=2.0 ** -9, atol=1e-5)


def test_cached_splits_keep_labels_classes_and_order(splits, tmp_path):
    frozen = prepare(tiny_model(), splits, tmp_path)
    cached = frozen.splits
    assert cached.classes == splits.classes and torch.equal(cached.train_labels, splits.train_labels)
    assert cached.test.labels.tolist() == splits.test_labels.tolist()
    # Frozen mode has no augmentation, so train is train_plain: cached once, shared.
    assert cached.train is cached.train_plain
    x, y = cached.test[3]  # small-cnn width 8: 8-16-32-32 channels, 28 px -> 7x7
    assert x.dtype == torch.float32 and x.shape == (32, 7, 7) and y == int(splits.test_labels[3])
    assert frozen.info["frozen_backbone"] is True
    part = cached.train.subset([7, 2])  # e.g. a validation split carved from train
    assert len(part) == 2 and part.labels.tolist() == [int(splits.train_labels[7]), int(splits.train_labels[2])]
    assert torch.equal(part[0][0], cached.train[7][0])


def test_cache_is_reused_when_nothing_changes(splits, tmp_path):
    model = tiny_model()
    first = prepare(model, splits, tmp_path)
    assert len(first.cache.built) == 2  # train_plain and test
    counter = CountCalls(model.backbone)
    second = prepare(tiny_model(), splits, tmp_path)  # a fresh model with the same seed: same weights
    again = prepare(model, splits, tmp_path)
    assert counter.calls == 0
    assert second.cache.built == [] and again.cache.built == []
    assert sorted(again.cache.reused) == sorted(first.cache.built)


@pytest.mark.parametrize("change", ["backbone option", "weights", "image size"])
def test_cache_is_rebuilt_when_backbone_weights_or_image_size_change(splits, tmp_path, change):
    model = tiny_model()
    first = prepare(model, splits, tmp_path)
    data = splits
    if change == "backbone option":
        model = tiny_model(width=12)
    elif change == "weights":
        with torch.no_grad():  # the same configuration, other weights (as after fine-tuning)
            next(model.backbone.parameters())[0, 0, 0, 0] += 0.5
    else:
        data = create_dataset("animals", limit=LIMIT, image_size=32)
    counter = CountCalls(model.backbone)
    rebuilt = prepare(model, data, tmp_path)
    assert counter.calls > 0 and rebuilt.cache.reused == []
    assert set(rebuilt.cache.built).isdisjoint(first.cache.built)


def test_weights_digest_sees_buffers_too():
    model = tiny_model()
    before = weights_digest(model.backbone)
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean += 1e-3  # BatchNorm statistics change the maps as much as weights do
    assert weights_digest(model.backbone) != before


class Interrupting(Dataset):
    """A split whose reading is interrupted (Ctrl-C) at item ``at``."""

    def __init__(self, base, at):
        self.base, self.at, self.labels = base, at, base.labels

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i == self.at:
            raise KeyboardInterrupt
        return self.base[i]


def test_an_interrupted_build_leaves_no_cache_that_would_be_reused(splits, tmp_path):
    model = tiny_model()
    cache = FeatureCache(tmp_path, batch_size=16, progress=False)
    identity = {"dataset": "animals", "split": "test", "weights_digest": weights_digest(model.backbone)}
    with pytest.raises(KeyboardInterrupt):
        cache.load_or_build(model.backbone, Interrupting(splits.test, at=40), identity)  # after 2 batches written
    assert list(tmp_path.iterdir()) == []  # neither a cache folder nor its temporary folder
    counter = CountCalls(model.backbone)
    cached = cache.load_or_build(model.backbone, splits.test, identity)
    assert counter.calls == -(-LIMIT // 16) and len(cached) == LIMIT  # computed in full again


def test_a_damaged_cache_is_rebuilt_not_read(splits, tmp_path):
    model = tiny_model()
    first = prepare(model, splits, tmp_path)
    for folder in first.cache.built:
        (Path(folder) / "maps.npy").write_bytes(b"not an array")
    counter = CountCalls(model.backbone)
    prepare(model, splits, tmp_path)
    assert counter.calls > 0


def test_frozen_backbone_mode_freezes_the_backbone_and_keeps_the_state_dict(splits, tmp_path):
    model = tiny_model()
    keys = list(model.state_dict())
    with model.frozen_backbone():
        assert model.components()["backbone"] == []
        assert list(model.state_dict()) == keys
        images, _ = images_and_labels(splits.test, range(4))
        with pytest.raises(ProtoKNNError, match="backbone is frozen"):
            model(images)  # images where maps are expected: a clear error, not a conv shape error
    assert len(model.components()["backbone"]) > 0
    assert model(images).profile.shape == (4, 20)  # images again outside the context


@pytest.mark.parametrize("head", ["protoknn", "protopnet", "cnn"])
def test_every_head_trains_on_the_cache_and_its_backbone_does_not_change(splits, tmp_path, head):
    model = tiny_model(head)
    # float32 maps in the image path's memory layout: the cache holds exactly what the backbone computes
    frozen = prepare(model, splits, tmp_path, dtype="float32", channels_last=False)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = Trainer(model, frozen.splits, TrainConfig(epochs=1, steps_per_epoch=2, per_class=5, device="cpu"), progress=False)
    with frozen.frozen_backbone():
        trainer.fit()
        on_cache = evaluate(model, frozen.splits.test)
    after = model.backbone.state_dict()
    assert all(torch.equal(backbone_before[k], after[k]) for k in after)  # BatchNorm statistics included
    on_images = evaluate(model, splits.test)  # the trained model reads images again
    accuracies = sorted(key for key in on_cache if key.startswith("accuracy"))
    assert accuracies and sorted(key for key in on_images if key.startswith("accuracy")) == accuracies
    # and scores the test set exactly as it did from the cache
    assert all(on_images[key] == on_cache[key] for key in accuracies)


def test_cli_train_with_frozen_backbone_then_evaluate_on_images(tmp_path):
    cache_dir, run = tmp_path / "cache", tmp_path / "run"
    result = run_cli("train", *TINY, "--frozen-backbone", "--cache-dir", cache_dir, "--out", run)
    assert result.returncode == 0, result.stderr
    assert "feature cache: built train_plain" in result.stdout and "feature cache: built test" in result.stdout
    saved = load_checkpoint(run)
    assert saved["data"]["frozen_backbone"] is True and saved["train_state"]["complete"]
    manifests = sorted(cache_dir.glob("*/manifest.json"))
    assert len(manifests) == 2 and json.loads(manifests[0].read_text())["dtype"] == "float16"
    trained = json.loads((run / "metrics.json").read_text())
    result = run_cli("evaluate", run)  # on images, through the real backbone
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((run / "metrics.json").read_text())
    for key in ("accuracy[k=1]", "accuracy[k=5]"):
        # float16 maps vs exact maps: at most a test image or two may flip (200 images).
        assert abs(evaluated[key] - trained[key]) <= 2 / 200, key
    result = run_cli("train", *TINY, "--frozen-backbone", "--cache-dir", cache_dir, "--out", tmp_path / "again")
    assert result.returncode == 0, result.stderr
    assert "feature cache: reused" in result.stdout and "built" not in result.stdout
