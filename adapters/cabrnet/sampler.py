"""Class-balanced training batches for ProtoKNN inside CaBRNet.

CaBRNet builds every loader as ``DataLoader(dataset, batch_size, shuffle)``: its
dataset.yml has no place for a sampler. ProtoKNN's losses, however, want what
``protoknn train`` gives them: batches of ``batch_size / per_class`` classes with
``per_class`` images each, so that every anchor has positives (eq. 1) and every class in
the batch has several samples for its transport problem (eq. 10).

So the dataset carries the request. Name ``ClassBalancedImageFolder`` as the train set in
dataset.yml (an ``ImageFolder`` plus ``per_class``)::

    train_set:
      module: protoknn_plugin.adapters.cabrnet.sampler
      name: ClassBalancedImageFolder
      params: {root: ..., transform: ..., per_class: 2}
      batch_size: 20          # 10 classes x 2 images
      shuffle: True           # ignored for this dataset: the batches are drawn per class

and ``ProtoKNNCaBRNet.train_epoch`` trains on ``class_balanced_loader(loader)``, which keeps
the loader's dataset, batch size and workers and draws each batch with
pytorch-metric-learning's ``MPerClassSampler``, the sampler behind ``protoknn train``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder

from protoknn_plugin.errors import check


class ClassBalancedImageFolder(ImageFolder):
    """``torchvision.datasets.ImageFolder`` whose training batches hold ``per_class`` images per class.

    The items are ImageFolder's own (image, label); only the batching changes, and only
    where ``class_balanced_loader`` is used (``ProtoKNNCaBRNet`` does it for its train set).
    """

    def __init__(self, root: str, per_class: int = 2, **kwargs: Any):
        check(isinstance(per_class, int) and per_class >= 2,
              f"ClassBalancedImageFolder needs per_class >= 2 (an anchor needs a positive), got {per_class!r}; "
              "set it under params in dataset.yml")
        super().__init__(root, **kwargs)
        self.per_class = per_class


def _balanced_source(dataset: Dataset) -> tuple[Optional[ClassBalancedImageFolder], Optional[torch.Tensor]]:
    """(the ClassBalancedImageFolder, labels (N,) of ``dataset``'s items), or (None, None).

    CaBRNet wraps a dataset in a Subset for ``partition`` and ``--sampling-ratio``.
    """
    if isinstance(dataset, ClassBalancedImageFolder):
        return dataset, torch.as_tensor(dataset.targets)
    if isinstance(dataset, Subset):
        inner, labels = _balanced_source(dataset.dataset)
        if inner is not None:
            return inner, labels[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    return None, None


def is_class_balanced(loader: DataLoader) -> bool:
    return _balanced_source(loader.dataset)[0] is not None


def class_balanced_loader(loader: DataLoader) -> DataLoader:
    """The same data, batch size and workers as ``loader``, in class-balanced batches.

    One epoch = len(dataset) // batch_size batches (drop_last), each of batch_size / per_class
    classes drawn without replacement and per_class images of each (with replacement only in
    a class smaller than per_class). The draws use numpy's global generator, which
    ``cabrnet train --seed`` seeds.
    """
    from pytorch_metric_learning.samplers import MPerClassSampler

    source, labels = _balanced_source(loader.dataset)
    check(source is not None, "class_balanced_loader needs a ClassBalancedImageFolder train set in dataset.yml")
    batch, m = loader.batch_size, source.per_class
    counts = torch.bincount(labels)
    classes = int((counts > 0).sum())
    check(batch is not None and batch % m == 0 and batch // m >= 2,
          f"train_set batch_size {batch} must be a multiple of per_class {m} with at least 2 classes per batch; "
          "set batch_size to (classes per batch) x per_class in dataset.yml")
    check(batch // m <= classes,
          f"train_set batch_size {batch} asks for {batch // m} classes per batch but the train set has {classes}; "
          "lower batch_size in dataset.yml")
    steps = len(labels) // batch
    check(steps >= 1, f"the train set holds {len(labels)} images, fewer than one batch of {batch}; lower batch_size")
    sampler = MPerClassSampler(labels.numpy(), m=m, batch_size=batch, length_before_new_iter=steps * batch)
    return DataLoader(
        loader.dataset, batch_sampler=BatchSampler(sampler, batch, drop_last=True),
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
    )


__all__ = ["ClassBalancedImageFolder", "class_balanced_loader", "is_class_balanced"]
