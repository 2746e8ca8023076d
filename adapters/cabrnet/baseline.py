"""CaBRNet's own ProtoPNet as a baseline row of ``protoknn benchmark`` (``--heads cabrnet:protopnet``).

The row shares everything with the plugin's rows except the head: the same dataset
splits, the same backbone (built by ``create_backbone`` under the same seed, so it starts
from the same weights), the same class-balanced batches (``train.epoch_batches``) and
the same epoch budget. The head is CaBRNet's: ``ProtoPNetClassifier`` with its
``ProtoPNetSimilarity`` (squared L2 by cdist, log similarity), its prototype init
(``SHIFTED_NORMAL``), its loss (CE + 0.8 cluster - 0.08 separation + 1e-4 L1) and its
training code (``ProtoPNet.train_epoch``: projection then last-layer fine-tuning on
images). The add-on is the reference one (1x1 conv, ReLU, 1x1 conv, Sigmoid, D channels).

Schedule, as in the plugin's ProtoPNet head: warm epochs (backbone frozen, capped at a
quarter of the budget), then joint epochs (StepLR 5, 0.1). CaBRNet projects every
``push_every`` epochs on a fixed grid; the grid is aligned so that the last projection
follows the final epoch, each projection followed by ``last_layer_epochs`` last-layer
epochs. The epilogue projects again (a no-op by then), without pruning.

Entry points for the benchmark: ``run_cabrnet_head(name, settings, splits, out_dir, seed,
label=..., options=...)`` with ``name`` the part after ``cabrnet:``, and ``cabrnet_budget``,
which the protocol check compares with the other rows' budgets before anything trains (it
needs no CaBRNet install). Both dispatch to ``prototree.py`` for ``cabrnet:prototree``, which
uses the steps every CaBRNet row shares (``start_run``, ``row_loaders``, ``train_epochs``,
``row_metrics``, ``save_row``).
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from protoknn_plugin.errors import ProtoKNNError, UnknownNameError, check

from .extra import require_cabrnet

DEFAULT_OPTIONS: Dict[str, Any] = {
    "prototypes_per_class": 10,   # used unless settings.prototypes is a multiple of the class count
    "warm_epochs": 5,
    "push_every": 10,
    "last_layer_epochs": 20,
    "warm_lr": 3e-3,
    "pretrained_backbone_lr": 1e-4,
    "scratch_backbone_lr": 1e-3,  # the benchmark protocol's from-scratch rate, as the plugin's ProtoPNet head
    "weight_decay": 1e-3,         # reference code: on the features and the add-on layers
    "last_layer_lr": 1e-4,
    "joint_step": (5, 0.1),
    "proto_init_mode": "SHIFTED_NORMAL",
}


class BackboneExtractor(nn.Module):
    """CaBRNet extractor around a plugin backbone: (B, C_in, H, W) -> add-on map (B, D, h, w)."""

    def __init__(self, backbone: nn.Module, dim: int):
        super().__init__()
        self.convnet = backbone
        channels = backbone.out_channels
        self.add_on = nn.Sequential(nn.Conv2d(channels, dim, 1), nn.ReLU(), nn.Conv2d(dim, dim, 1), nn.Sigmoid())
        self.arch_name = type(backbone).__name__

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        return self.add_on(self.convnet(x))


class BalancedBatches:
    """A batch sampler that draws a fresh epoch of class-balanced batches on every pass."""

    def __init__(self, labels: Tensor, train_config: Any):
        self.labels, self.config = labels, train_config
        # MPerClassSampler yields exactly steps * batch indices, so the length is known
        # without drawing (which would advance PML's random state).
        self._length = train_config.steps_per_epoch or max(1, len(labels) // train_config.batch_size)

    def __iter__(self) -> Iterator[List[int]]:
        from protoknn_plugin.train import epoch_batches

        return iter(epoch_batches(self.labels, self.config))

    def __len__(self) -> int:
        return self._length


def protopnet_schedule(epochs: int, options: Dict[str, Any], pretrained: bool) -> Dict[str, Any]:
    """CaBRNet training config (the content of a training.yml) and ProtoPNet's projection config."""
    check(isinstance(epochs, int) and epochs >= 1, f"the CaBRNet ProtoPNet baseline needs epochs >= 1, got {epochs!r}")
    # The benchmark protocol, as for the plugin's ProtoPNet head: warm epochs (inside the
    # budget) only for a pretrained backbone; from scratch the backbone gets the common rate.
    warm = min(options["warm_epochs"], max(1, epochs // 4)) if pretrained and epochs > 1 else 0
    warm_lr, decay = options["warm_lr"], options["weight_decay"]
    backbone_lr = options["pretrained_backbone_lr"] if pretrained else options["scratch_backbone_lr"]
    step, gamma = options["joint_step"]
    optimizers: Dict[str, Any] = {
        "joint_optimizer": {
            "type": "Adam",
            "groups": {"backbone": {"lr": backbone_lr, "weight_decay": decay},
                       "add_on": {"lr": warm_lr, "weight_decay": decay}, "prototypes": {"lr": warm_lr}},
            "scheduler": {"type": "StepLR", "params": {"step_size": step, "gamma": gamma}},
        },
        "last_layer_optimizer": {"type": "Adam", "groups": {"last_layer": {"lr": options["last_layer_lr"]}}},
    }
    periods: Dict[str, Any] = {}
    if warm:
        optimizers["warm_optimizer"] = {"type": "Adam",
                                        "groups": {"add_on": {"lr": warm_lr, "weight_decay": decay},
                                                   "prototypes": {"lr": warm_lr}}}
        periods["warmup"] = {"epoch_range": [0, warm - 1], "freeze": ["backbone", "last_layer"],
                             "optimizers": "warm_optimizer"}
    if epochs > warm:
        periods["joint"] = {"epoch_range": [warm, epochs - 1], "freeze": ["last_layer"],
                            "optimizers": "joint_optimizer"}
    training = {
        "param_groups": {"backbone": "extractor.convnet", "add_on": "extractor.add_on",
                         "prototypes": "classifier.prototypes", "last_layer": "classifier.last_layer"},
        "optimizers": optimizers,
        "num_epochs": epochs,
        "periods": periods,
    }
    every = options["push_every"]
    projection = {"start_epoch": (epochs - 1) % every, "frequency": every,
                  "num_ft_epochs": options["last_layer_epochs"]}
    return {"training": training, "projection": projection, "warm_epochs": warm}


def protopnet_budget(epochs: int, steps_per_epoch: int, batch_size: int, options: Optional[Dict[str, Any]],
                     pretrained: bool) -> Dict[str, int]:
    """The row's budget in the protocol's units (``benchmark.protocol.budget``), from its schedule.

    Every training epoch and every last-layer epoch is one pass of ``steps_per_epoch``
    class-balanced batches of images (CaBRNet fine-tunes the last layer on images, not on
    cached profiles). ``pushes`` counts the projections inside training; the epilogue's final
    projection repeats the last one on an unchanged model and is not counted.
    """
    opts = checked_options(options)
    schedule = protopnet_schedule(epochs, opts, pretrained)
    projection = schedule["projection"]
    pushes = sum(1 for epoch in range(epochs) if epoch >= projection["start_epoch"]
                 and (epoch - projection["start_epoch"]) % projection["frequency"] == 0)
    feature_steps = epochs * steps_per_epoch
    return {
        "feature_steps": feature_steps,
        "images_seen": feature_steps * batch_size,
        "backbone_steps": (epochs - schedule["warm_epochs"]) * steps_per_epoch,
        "last_layer_steps": pushes * projection["num_ft_epochs"] * steps_per_epoch,
        "pushes": pushes,
    }


def checked_options(options: Optional[Dict[str, Any]], defaults: Optional[Dict[str, Any]] = None,
                    row: str = "cabrnet:protopnet") -> Dict[str, Any]:
    """``defaults`` (ProtoPNet's unless given) updated with ``options``; a one-line error naming
    ``row`` and the valid keys otherwise."""
    defaults = DEFAULT_OPTIONS if defaults is None else defaults
    unknown = sorted(set(options or {}) - set(defaults))
    if unknown:
        raise ProtoKNNError(f"unknown {row} option(s) {', '.join(unknown)}; valid: {', '.join(defaults)}")
    return {**defaults, **(options or {})}


def build_cabrnet_protopnet(settings: Any, num_classes: int, in_channels: int, seed: int,
                            options: Dict[str, Any]) -> nn.Module:
    """CaBRNet ``ProtoPNet`` on the plugin backbone named by ``settings.backbone`` (seeded like PrototypeModel)."""
    from cabrnet.archs.protopnet.decision import ProtoPNetClassifier
    from cabrnet.archs.protopnet.model import ProtoPNet

    from protoknn_plugin.backbones import create_backbone

    torch.manual_seed(seed)  # as PrototypeModel: the same seed gives every row the same backbone init
    weights = {} if settings.weights is None else {"weights": settings.weights}
    backbone = create_backbone(settings.backbone, in_channels=in_channels, **weights, **dict(settings.backbone_options))
    extractor = BackboneExtractor(backbone, settings.dim)
    per_class = options["prototypes_per_class"]
    if settings.prototypes and settings.prototypes % num_classes == 0:
        per_class = settings.prototypes // num_classes
    classifier = ProtoPNetClassifier(
        similarity_config={"name": "ProtoPNetSimilarity"}, num_classes=num_classes, num_features=settings.dim,
        num_proto_per_class=per_class, proto_init_mode=options["proto_init_mode"],
    )
    return ProtoPNet(extractor=extractor, classifier=classifier)


def run_cabrnet_protopnet(settings: Any, splits: Any, out_dir: Path | str, seed: int,
                          label: str = "cabrnet:protopnet", options: Optional[Dict[str, Any]] = None,
                          progress: bool = False) -> Dict[str, Any]:
    """Train and evaluate CaBRNet's ProtoPNet once; returns ``benchmark.run_one``'s metrics dict.

    Keys: label, head ("cabrnet:protopnet"), seed, accuracy[top1], images_per_second,
    test_images, train_seconds, peak_memory_mb, prototype_spread. Writes metrics.json,
    model_state.pth (CaBRNet's state dict) and projection_info.csv into ``out_dir``.
    """
    require_cabrnet()
    opts = checked_options(options)
    out, train_config, device = start_run(settings, splits, out_dir, seed)
    with quiet_cabrnet(not progress):
        model, schedule, projection_info, stats, timing, peak_mb = _train_and_evaluate(
            settings, splits, train_config, device, seed, opts, str(out), progress)
    result = row_metrics(label, "cabrnet:protopnet", seed, model, stats, timing, peak_mb, len(splits.test))
    result["warm_epochs"] = schedule["warm_epochs"]
    return save_row(result, model, projection_info, out)


def start_run(settings: Any, splits: Any, out_dir: Path | str, seed: int) -> tuple:
    """What every CaBRNet row does before it builds its model: (output folder, TrainConfig of
    ``seed``, device), with the seeds and the thread count set as the plugin's rows set them."""
    from protoknn_plugin.checkpoint import ensure_writable_dir
    from protoknn_plugin.train import TrainConfig, resolve_device, seed_everything

    check(len(splits.test) > 0, "the evaluation set is empty; check the dataset path and --limit")
    out = ensure_writable_dir(str(out_dir))
    train_config = TrainConfig(**{**asdict(settings.train), "seed": seed})
    device = resolve_device(train_config.device)
    seed_everything(seed)
    if train_config.threads:
        torch.set_num_threads(train_config.threads)
    return out, train_config, device


def row_loaders(splits: Any, train_config: Any) -> Dict[str, DataLoader]:
    """CaBRNet's dataloaders on the benchmark's splits: the class-balanced training batches of
    ``train.epoch_batches``, the training images without augmentation (projection), the test set."""
    eval_batch = train_config.eval_batch_size
    return {
        "train_set": DataLoader(splits.train, batch_sampler=BalancedBatches(splits.train_labels, train_config),
                                num_workers=0, generator=torch.Generator()),
        "projection_set": DataLoader(splits.train_plain, batch_size=eval_batch, shuffle=False, num_workers=0),
        "test_set": DataLoader(splits.test, batch_size=eval_batch, shuffle=False, num_workers=0),
    }


def train_epochs(model: nn.Module, loaders: Dict[str, DataLoader], optimizer_mngr: Any, epochs: int,
                 device: Any, progress: bool) -> None:
    """CaBRNet's own epoch loop (``cabrnet train`` without its checkpoints): freeze, train, schedule."""
    for epoch in range(epochs):
        optimizer_mngr.freeze(epoch=epoch)
        model.train_epoch(dataloaders=loaders, optimizer_mngr=optimizer_mngr, device=device,
                          epoch_idx=epoch, verbose=progress)
        optimizer_mngr.scheduler_step(epoch=epoch, metric=None)


def row_metrics(label: str, head: str, seed: int, model: nn.Module, stats: Dict[str, float],
                timing: Dict[str, float], peak_mb: float, test_images: int) -> Dict[str, Any]:
    """The keys every benchmark row reports, from CaBRNet's test statistics and the timings."""
    from protoknn_plugin.prototypes import prototype_spread

    return {
        "label": label, "head": head, "seed": seed,
        "accuracy[top1]": float(stats["test_set/accuracy"]),
        "images_per_second": test_images / max(timing["evaluate"], 1e-9), "test_images": test_images,
        "train_seconds": timing["train"], "peak_memory_mb": peak_mb,
        "prototype_spread": prototype_spread(model.classifier.prototypes.detach().flatten(1)),
    }


def save_row(result: Dict[str, Any], model: nn.Module, projection_info: List[Dict[str, Any]],
             out: Path) -> Dict[str, Any]:
    """Write model_state.pth (CaBRNet's state dict), projection_info.csv and metrics.json; return ``result``."""
    from cabrnet.core.utils.save import save_projection_info

    torch.save(model.state_dict(), out / "model_state.pth")
    if projection_info:
        save_projection_info(projection_info, str(out / "projection_info.csv"))
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def _train_and_evaluate(settings, splits, train_config, device, seed, opts, out, progress):
    """Build, train (epochs + epilogue) and evaluate; returns what the metrics need."""
    model = build_cabrnet_protopnet(settings, len(splits.classes), splits.channels, seed, opts)
    schedule = protopnet_schedule(train_config.epochs, opts, has_pretrained_backbone(model))
    model.projection_config.update(schedule["projection"])
    # no pruning (num_nearest_patches=0), as the plugin's ProtoPNet head
    projection_info, stats, timing, peak_mb = train_and_evaluate(model, schedule, splits, train_config, device, out,
                                                                 progress, num_nearest_patches=0)
    return model, schedule, projection_info, stats, timing, peak_mb


def has_pretrained_backbone(model) -> bool:
    """Whether the CaBRNet model's convnet starts from pretrained weights (not random ones)."""
    from protoknn_plugin.backbones import RANDOM_WEIGHTS

    return getattr(model.extractor.convnet, "weights", None) not in RANDOM_WEIGHTS


def train_and_evaluate(model, schedule, splits, train_config, device, out, progress, **epilogue_options):
    """Train a built CaBRNet model for the budget's epochs under ``schedule``, run its epilogue
    (projection, and what ``epilogue_options`` ask of it), then score the test split.
    Returns (projection info, test stats, {"train", "evaluate"} seconds, peak MB)."""
    from cabrnet.core.utils.optimizers import OptimizerManager

    from protoknn_plugin.resources import PeakRAM

    optimizer_mngr = OptimizerManager(config_dict=schedule["training"], module=model)
    loaders = row_loaders(splits, train_config)
    timing = {}
    with PeakRAM(device) as peak:
        started = time.perf_counter()
        train_epochs(model, loaders, optimizer_mngr, train_config.epochs, device, progress)
        projection_info = model.epilogue(dataloaders=loaders, optimizer_mngr=optimizer_mngr, output_dir=out,
                                         device=device, verbose=progress, **epilogue_options)
        timing["train"] = time.perf_counter() - started
    started = time.perf_counter()
    stats = model.evaluate(dataloaders=loaders, dataset_name="test_set", device=device, verbose=progress)
    timing["evaluate"] = time.perf_counter() - started
    return projection_info, stats, timing, peak.peak_mb


def run_cabrnet_prototree(*args: Any, **kwargs: Any) -> Dict[str, Any]:
    """CaBRNet's ProtoTree row (``prototree.run_cabrnet_prototree``), imported when it runs."""
    from .prototree import run_cabrnet_prototree as run

    return run(*args, **kwargs)


def prototree_budget(*args: Any, **kwargs: Any) -> Dict[str, int]:
    """CaBRNet's ProtoTree budget (``prototree.prototree_budget``); needs no CaBRNet install."""
    from .prototree import prototree_budget as budget

    return budget(*args, **kwargs)


CABRNET_HEADS: Dict[str, Callable[..., Dict[str, Any]]] = {"protopnet": run_cabrnet_protopnet,
                                                          "prototree": run_cabrnet_prototree}
CABRNET_BUDGETS: Dict[str, Callable[..., Dict[str, int]]] = {"protopnet": protopnet_budget,
                                                            "prototree": prototree_budget}


def cabrnet_budget(name: str, epochs: int, steps_per_epoch: int, batch_size: int,
                   options: Optional[Dict[str, Any]], pretrained: bool) -> Dict[str, int]:
    """The budget of CaBRNet architecture ``name``'s row, for the protocol check before training."""
    if name not in CABRNET_BUDGETS:
        raise UnknownNameError("CaBRNet baseline", name, CABRNET_BUDGETS)
    return CABRNET_BUDGETS[name](epochs, steps_per_epoch, batch_size, options, pretrained)


def run_cabrnet_head(name: str, settings: Any, splits: Any, out_dir: Path | str, seed: int,
                     label: Optional[str] = None, options: Optional[Dict[str, Any]] = None,
                     progress: bool = False) -> Dict[str, Any]:
    """Run CaBRNet architecture ``name`` (the part after ``cabrnet:``) as one benchmark row."""
    if name not in CABRNET_HEADS:
        raise UnknownNameError("CaBRNet baseline", name, CABRNET_HEADS)
    return CABRNET_HEADS[name](settings, splits, out_dir, seed, label=label or f"cabrnet:{name}",
                               options=options, progress=progress)


@contextmanager
def quiet_cabrnet(quiet: bool) -> Iterator[None]:
    """Silence CaBRNet's loguru output (DEBUG by default) inside the block, unless not ``quiet``."""
    from loguru import logger

    if quiet:
        logger.disable("cabrnet")
    try:
        yield
    finally:
        if quiet:
            logger.enable("cabrnet")

