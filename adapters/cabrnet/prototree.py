"""CaBRNet's own ProtoTree as a baseline row of ``protoknn benchmark`` (``--heads cabrnet:prototree``).

The row shares with the plugin's ``prototree`` everything but the implementation: the same
splits, the same backbone (built by ``create_backbone`` under the same seed), the same
class-balanced batches (``train.epoch_batches``) and the same epoch budget. The rest is
CaBRNet 1.2's: ``ProtoTreeClassifier`` (a complete binary tree of depth 5, one prototype per
internal node, ``ProtoTreeSimilarity`` = exp(-L2), leaves initialised at zero), ``ProtoTree``'s
training epoch (NLL of the soft tree, then its derivative-free leaf update after every step)
and its epilogue: class-constrained projection, then pruning at 0.01 (in that order; the paper's
code prunes first). The add-on is CaBRNet's ProtoTree config: 1x1 conv without bias + Sigmoid,
Xavier-normal with the sigmoid gain.

Schedule: CaBRNet's shipped ProtoTree config (configs/prototree/cub200/training.yml) fitted
into the budget: AdamW (eps 1e-7) at 1e-3 for the add-on and the prototypes; MultiStepLR with
gamma 0.5 at 60, 70, 80, 90 and 100% of the epochs (its milestones of a 100-epoch run); the
backbone frozen for the first 30% only when it is pretrained (then at 1e-5), trained from
scratch at the protocol's 1e-3 otherwise, as the plugin's ProtoTree head. The shipped config
spells its weight decay ``weight_decay_rate``, a key AdamW does not read, so AdamW's default
1e-2 is what CaBRNet trains with; the row keeps that value (the paper's code uses 0).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from protoknn_plugin.errors import check

from .baseline import (checked_options, has_pretrained_backbone, quiet_cabrnet, row_metrics, save_row, start_run,
                       train_and_evaluate)
from .extra import require_cabrnet

ROW = "cabrnet:prototree"
PROTOTREE_OPTIONS: Dict[str, Any] = {
    "depth": 5,                      # 31 prototypes and 32 leaves, as the plugin's head
    "pruning_threshold": 0.01,
    "lr": 1e-3,                      # add-on and prototypes
    "pretrained_backbone_lr": 1e-5,
    "scratch_backbone_lr": 1e-3,     # the benchmark protocol's from-scratch rate, as the plugin's head
    "freeze_fraction": 0.3,          # of the epochs, backbone frozen; pretrained backbones only
    "milestones": (0.6, 0.7, 0.8, 0.9, 1.0),  # fractions of the epochs
    "gamma": 0.5,
    "eps": 1e-7,
    "weight_decay": 1e-2,            # AdamW's default, which CaBRNet's shipped config trains with
}


class TreeExtractor(nn.Module):
    """CaBRNet extractor around a plugin backbone with ProtoTree's add-on: (B, C_in, H, W) -> (B, D, h, w)."""

    def __init__(self, backbone: nn.Module, dim: int):
        super().__init__()
        self.convnet = backbone
        self.add_on = nn.Sequential(nn.Conv2d(backbone.out_channels, dim, 1, bias=False), nn.Sigmoid())
        nn.init.xavier_normal_(self.add_on[0].weight, gain=nn.init.calculate_gain("sigmoid"))
        self.arch_name = type(backbone).__name__

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        return self.add_on(self.convnet(x))


def fitted_milestones(epochs: int, fractions: Any) -> list:
    """The epochs after which the rate drops: round(f * epochs) for each fraction, repeats kept
    (MultiStepLR applies gamma once per repeat, as the paper's milestones would over those epochs).
    ``fractions`` may be one number, or None for a constant rate (the plugin head's schedule)."""
    if fractions is None:
        return []
    fractions = fractions if isinstance(fractions, (list, tuple)) else (fractions,)
    check(all(isinstance(f, (int, float)) and f > 0 for f in fractions),
          f"{ROW} milestones are fractions of the epochs above 0, e.g. 0.6,0.7, or none; got {fractions!r}")
    return [max(1, round(f * epochs)) for f in fractions]


def prototree_schedule(epochs: int, options: Dict[str, Any], pretrained: bool) -> Dict[str, Any]:
    """CaBRNet training config (the content of a training.yml) and the warm epochs."""
    check(isinstance(epochs, int) and epochs >= 1, f"the {ROW} baseline needs epochs >= 1, got {epochs!r}")
    warm = min(epochs - 1, round(epochs * options["freeze_fraction"])) if pretrained else 0
    backbone_lr = options["pretrained_backbone_lr"] if pretrained else options["scratch_backbone_lr"]
    optimizer = {
        "type": "AdamW",
        "groups": {"backbone": {"lr": backbone_lr}, "add_on": {"lr": options["lr"]},
                   "prototypes": {"lr": options["lr"]}},
        "params": {"lr": options["lr"], "eps": options["eps"], "weight_decay": options["weight_decay"]},
        "scheduler": {"type": "MultiStepLR", "params": {
            "milestones": fitted_milestones(epochs, options["milestones"]), "gamma": options["gamma"]}},
    }
    periods: Dict[str, Any] = {}
    if warm:
        periods["warmup"] = {"epoch_range": [0, warm - 1], "freeze": ["backbone"], "optimizers": "main_optimizer"}
    periods["joint"] = {"epoch_range": [warm, epochs - 1], "optimizers": "main_optimizer"}
    training = {
        # the leaves are in no group: CaBRNet updates them without gradients
        "param_groups": {"backbone": "extractor.convnet", "add_on": "extractor.add_on",
                         "prototypes": "classifier.prototypes"},
        "optimizers": {"main_optimizer": optimizer},
        "num_epochs": epochs,
        "periods": periods,
    }
    return {"training": training, "warm_epochs": warm}


def prototree_budget(epochs: int, steps_per_epoch: int, batch_size: int, options: Optional[Dict[str, Any]],
                     pretrained: bool) -> Dict[str, int]:
    """The row's budget in the protocol's units (``benchmark.protocol.budget``): every epoch is one
    pass of ``steps_per_epoch`` class-balanced batches; one projection (the epilogue's), no last layer."""
    schedule = prototree_schedule(epochs, checked_options(options, PROTOTREE_OPTIONS, ROW), pretrained)
    feature_steps = epochs * steps_per_epoch
    return {
        "feature_steps": feature_steps,
        "images_seen": feature_steps * batch_size,
        "backbone_steps": (epochs - schedule["warm_epochs"]) * steps_per_epoch,
        "last_layer_epochs": 0,
        "last_layer_steps": 0,
        "pushes": 1,
    }


def build_cabrnet_prototree(settings: Any, num_classes: int, in_channels: int, seed: int,
                            options: Dict[str, Any]) -> nn.Module:
    """CaBRNet ``ProtoTree`` on the plugin backbone named by ``settings.backbone`` (seeded like PrototypeModel)."""
    from cabrnet.archs.prototree.decision import ProtoTreeClassifier
    from cabrnet.archs.prototree.model import ProtoTree

    from protoknn_plugin.backbones import create_backbone

    torch.manual_seed(seed)  # as PrototypeModel: the same seed gives every row the same backbone init
    weights = {} if settings.weights is None else {"weights": settings.weights}
    backbone = create_backbone(settings.backbone, in_channels=in_channels, **weights, **dict(settings.backbone_options))
    classifier = ProtoTreeClassifier(
        similarity_config={"name": "ProtoTreeSimilarity"}, num_classes=num_classes, depth=options["depth"],
        num_features=settings.dim, leaves_init_mode="ZEROS", proto_init_mode="SHIFTED_NORMAL",
        log_probabilities=False,
    )
    return ProtoTree(extractor=TreeExtractor(backbone, settings.dim), classifier=classifier)


def run_cabrnet_prototree(settings: Any, splits: Any, out_dir: Path | str, seed: int, label: str = ROW,
                          options: Optional[Dict[str, Any]] = None, progress: bool = False) -> Dict[str, Any]:
    """Train and evaluate CaBRNet's ProtoTree once; returns ``benchmark.run_one``'s metrics dict.

    Keys: those of every CaBRNet row (``baseline.row_metrics``; ``accuracy[top1]`` is the soft
    tree's, CaBRNet's default ``DISTRIBUTED`` prediction), warm_epochs, and the pruned tree's
    tree_leaves and tree_prototypes. Writes metrics.json, model_state.pth and projection_info.csv.
    """
    require_cabrnet()
    opts = checked_options(options, PROTOTREE_OPTIONS, ROW)
    out, train_config, device = start_run(settings, splits, out_dir, seed)
    with quiet_cabrnet(not progress):
        model, schedule, projection_info, stats, timing, peak_mb = _train_and_evaluate(
            settings, splits, train_config, device, seed, opts, str(out), progress)
    result = row_metrics(label, ROW, seed, model, stats, timing, peak_mb, len(splits.test))
    result.update(warm_epochs=schedule["warm_epochs"], tree_leaves=model.classifier.tree.num_leaves,
                  tree_prototypes=len(model.classifier.tree.active_prototypes))
    return save_row(result, model, projection_info, out)


def _train_and_evaluate(settings, splits, train_config, device, seed, opts, out, progress):
    """Build, train (epochs, then CaBRNet's epilogue: projection and pruning) and evaluate."""
    model = build_cabrnet_prototree(settings, len(splits.classes), splits.channels, seed, opts)
    schedule = prototree_schedule(train_config.epochs, opts, has_pretrained_backbone(model))
    projection_info, stats, timing, peak_mb = train_and_evaluate(
        model, schedule, splits, train_config, device, out, progress, pruning_threshold=opts["pruning_threshold"])
    return model, schedule, projection_info, stats, timing, peak_mb
