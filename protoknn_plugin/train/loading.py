"""Batches for training and evaluation: class-balanced epochs drawn up front, per-item
augmentation seeds, and DataLoader workers (pinned memory on CUDA, kept alive across epochs).

Every training item is fetched as ``(index, seed)`` and augmented under that seed, so the
images, and hence the weights, are the same for any number of workers or processes.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .. import distributed
from ..errors import ProtoKNNError
from .config import TrainConfig


class IndexedDataset(Dataset):
    """Wraps a dataset so items are (image, label, index): projection records source images."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return image, label, i


class SeededItems(Dataset):
    """Items are fetched as ``(index, seed)`` and augmented under that seed.

    Augmentations then depend only on the item's place in the global batch, not on
    which process or worker loads it or whether the run was resumed in between.
    """

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # Only the CPU generator, which is all that fork_rng restores and all that CPU-side
            # augmentation draws from. torch.manual_seed would also queue a lazy CUDA seeding
            # that captures a Python stack trace per item, a large share of an epoch's time.
            torch.random.default_generator.manual_seed(seed)
            return self.base[index]


def item_seed(run_seed: int, global_step: int, position: int) -> int:
    return (run_seed * 1_000_003 + global_step * 65_537 + position) % (2**62)


def worker_options(workers: int, device: Optional[torch.device]) -> Dict[str, Any]:
    """DataLoader keywords: workers kept alive between epochs, pinned memory for a GPU."""
    options: Dict[str, Any] = {"num_workers": workers,
                               "pin_memory": device is not None and device.type == "cuda"}
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=2)
    return options


def plain_loader(dataset: Dataset, batch_size: int, sharded: bool = False, workers: int = 0,
                 device: Optional[torch.device] = None) -> DataLoader:
    """Batches of (image, label, index) in dataset order; ``sharded``: only this rank's part."""
    indexed = IndexedDataset(dataset)
    if sharded and distributed.is_active():
        indexed = torch.utils.data.Subset(indexed, range(distributed.rank(), len(indexed), distributed.world_size()))
    options = worker_options(workers, device)
    options.pop("persistent_workers", None)  # one pass: nothing to keep alive
    # A private generator, so that evaluating mid-run does not draw from the global RNG.
    return DataLoader(indexed, batch_size=batch_size, shuffle=False, generator=torch.Generator(), **options)


class KeyedBatches:
    """A batch sampler whose batches are replaced every epoch (``set``).

    One DataLoader iterates it for the whole run, so persistent workers stay alive; the
    sampler runs in the main process, so replacing its batches reaches every worker.
    """

    def __init__(self):
        self.batches: List[List[Any]] = []

    def set(self, batches: List[List[Any]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


def keyed_batches(batches: List[List[int]], first_step: int, seed: int) -> List[List[Any]]:
    """This rank's shard of each global batch, every item as (index, augmentation seed)."""
    return [distributed.shard([(index, item_seed(seed, first_step + j, pos)) for pos, index in enumerate(batch)])
            for j, batch in enumerate(batches)]


def training_loader(dataset: Dataset, sampler: KeyedBatches, workers: int, device: torch.device) -> DataLoader:
    # A private generator: creating a DataLoader iterator draws a seed, and drawing it
    # from the global RNG would shift the Gumbel draws of a resumed run.
    return DataLoader(SeededItems(dataset), batch_sampler=sampler, generator=torch.Generator(),
                      **worker_options(workers, device))


class TrainingBatches:
    """The training split's batches, this rank's shard of each global batch, every item with its
    own augmentation seed. One DataLoader serves the whole run so that its worker processes stay alive."""

    def __init__(self, splits, seed: int, workers: int, device: torch.device):
        """``splits``: DatasetSplits, whose ``train`` is read when the first batches are asked for."""
        self.splits, self.seed, self.workers, self.device = splits, seed, workers, device
        self._sampler = KeyedBatches()
        self._loader: Optional[DataLoader] = None

    def loader(self, batches: List[List[int]], first_step: int) -> DataLoader:
        """The loader of ``batches`` (global batches of indices), the first one being run step ``first_step``."""
        self._sampler.set(keyed_batches(batches, first_step, self.seed))
        if self._loader is None:
            self._loader = training_loader(self.splits.train, self._sampler, self.workers, self.device)
        return self._loader


def epoch_batches(labels: Tensor, config: TrainConfig) -> List[List[int]]:
    """One epoch of class-balanced batches from PML's MPerClassSampler, drawn up front."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    check_batch_settings(labels, config)
    batch = config.batch_size
    steps = config.steps_per_epoch or max(1, len(labels) // batch)
    sampler = MPerClassSampler(labels.numpy(), m=config.per_class, batch_size=batch,
                               length_before_new_iter=steps * batch)
    order = [int(i) for i in iter(sampler)]  # plain ints: checkpoints hold no numpy objects
    return [order[i * batch:(i + 1) * batch] for i in range(len(order) // batch)]


def check_batch_settings(labels: Tensor, config: TrainConfig) -> None:
    """Refuse batch settings the training labels (N,) cannot fill: checked before a run writes anything."""
    counts = torch.bincount(labels)
    present = int((counts > 0).sum())
    if config.batch_classes < 2:
        raise ProtoKNNError("--batch-classes must be at least 2: a batch with a single class has no negatives")
    if config.batch_classes > present:
        raise ProtoKNNError(
            f"--batch-classes {config.batch_classes} is more than the {present} classes in the training set; lower it"
        )
    if config.per_class < 1:
        raise ProtoKNNError(f"--per-class must be at least 1, got {config.per_class}")
    smallest = int(counts[counts > 0].min())
    if config.per_class > smallest:
        raise ProtoKNNError(
            f"--per-class {config.per_class} is larger than the smallest class ({smallest} images); lower --per-class"
        )
