"""A plain CNN classifier (GAP + linear, cross-entropy): the reference row, no prototypes."""
from __future__ import annotations

from typing import Dict, List

import torch.nn.functional as F
from torch import Tensor, nn

from ..prototypes import PrototypeOutputs
from . import register_head
from .base import Head, Phase


@register_head("cnn")
class PlainCNNHead(Head):
    """Global average pooling + linear layer on the backbone's map, trained with cross-entropy.

    It has no prototypes and no explanations: it shows what the same backbone reaches
    without interpretability, so the prototype heads can be judged against it.
    """

    name = "cnn"
    description = "plain CNN classifier (GAP + linear, cross-entropy); reference row, no prototypes"
    uses_prototypes = False

    def __init__(self, num_classes: int, backbone_channels: int, dim: int = 0, num_prototypes: int = 0, lr: float = 1e-3):
        super().__init__(num_classes, backbone_channels, dim, num_prototypes)
        self.lr = lr
        self.classifier = nn.Linear(backbone_channels, num_classes)

    @classmethod
    def defaults(cls) -> Dict[str, object]:
        return {"loss": "cross-entropy", "lr": 1e-3}

    def logits(self, out: PrototypeOutputs) -> Tensor:
        return self.classifier(out.backbone_features.mean(dim=(2, 3)))

    def loss(self, out: PrototypeOutputs, labels: Tensor) -> Dict[str, Tensor]:
        ce = F.cross_entropy(self.logits(out), labels)
        return {"ce": ce, "total": ce}

    def predict_all(self, out: PrototypeOutputs) -> Dict[str, Tensor]:
        return {"top1": self.logits(out).argmax(dim=1)}

    def phases(self, epochs: int, pretrained_backbone: bool) -> List[Phase]:
        backbone_lr = 1e-5 if pretrained_backbone else self.lr
        return [Phase("train", epochs, {"backbone": backbone_lr, "head": self.lr})]
