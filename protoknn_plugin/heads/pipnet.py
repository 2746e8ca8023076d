"""The PIP-Net head (Nauta et al., CVPR 2023): latent patch prototypes and a sparse class layer.

The add-on (1x1 conv to P channels) is followed by a softmax over the P channels at every
patch, so each patch is (softly) one prototype; a prototype's presence p_i is its maximum
over patches (the prototype layer's ``channel-softmax`` profile). There are no prototype
vectors and no push. Each training image is seen as two augmented views; the loss has

* alignment L_A = 1/2 [ -mean_n log(z1_n . sg(z2_n) + 1e-12) - mean_n log(z2_n . sg(z1_n) + 1e-12) ]
  over every patch n of the two views (``alignment_loss``),
* tanh L_T = -1/2 sum_views mean_i log(tanh(sum_b p_{b,i}) + 1e-8) (``tanh_loss``),
* classification L_C = NLL(log_softmax(log(1 + o^m)), y) with o = p relu(W)^T and m = 2
  (``class_loss``), over both views.

Phases: pretrain (weights (e / E_pre) L_A + 5 L_T, no class layer), finetune (class layer
only, 2 L_C), joint (5 L_A + 2 L_T + 2 L_C). After every finetune/joint step
W <- max(W - 1e-3, 0). At the end, prototypes never present above 0.1 on the training set
lose their weights. Prediction: presence below 0.1 counts as 0, then argmax of o.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ProtoKNNError
from ..prototypes import PrototypeOutputs
from . import register_head
from .base import Head, Phase, PrototypeSpec
from .space import FloatRange

PRESENCE_THRESHOLD = 0.1  # the reference's inference threshold and its unused-prototype test
WEIGHT_EPSILON = 1e-3  # the reference's "zero" for weights and presence x weight


def alignment_loss(z1: Tensor, z2: Tensor) -> Tensor:
    """L_A of two views' per-patch prototype distributions z1, z2 (B, P, H, W), each patch's
    target detached (a stop-gradient), averaged over both directions."""
    e1 = z1.flatten(2).transpose(1, 2).reshape(-1, z1.shape[1])
    e2 = z2.flatten(2).transpose(1, 2).reshape(-1, z2.shape[1])

    def one_way(inputs: Tensor, targets: Tensor) -> Tensor:
        return -torch.log((inputs * targets).sum(dim=1) + 1e-12).mean()

    return (one_way(e1, e2.detach()) + one_way(e2, e1.detach())) / 2


def tanh_loss(p1: Tensor, p2: Tensor) -> Tensor:
    """L_T of two views' presences (B, P): every prototype should be present somewhere in the batch."""
    def one_view(p: Tensor) -> Tensor:
        return torch.log(torch.tanh(p.sum(dim=0)) + 1e-8).mean()

    return -(one_view(p1) + one_view(p2)) / 2


def class_loss(scores: Tensor, labels: Tensor, multiplier: float) -> Tensor:
    """NLL(log_softmax(log(1 + o^m)), y) of class scores o (B, C) >= 0."""
    return F.nll_loss(F.log_softmax(torch.log1p(scores ** multiplier), dim=1), labels)


class NonNegativeLinear(nn.Module):
    """o = p relu(W)^T, W (C, P) initialised N(1, 0.1), no bias. ``weight`` is the effective relu(W)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.raw_weight = nn.Parameter(torch.randn(out_features, in_features) * 0.1 + 1.0)

    @property
    def weight(self) -> Tensor:
        return F.relu(self.raw_weight)

    def forward(self, presence: Tensor) -> Tensor:
        return presence @ self.weight.t()


def two_views(images: Tensor, shift: int, brightness: float, contrast: float) -> Tensor:
    """Two differently augmented views of every image, interleaved: (B, C, H, W) -> (2B, C, H, W),
    rows 2b and 2b+1 being views of image b.

    Each view gets its own random translation of up to ``shift`` pixels (reflection padding,
    the reference's RandomCrop(s) from s + 4) and its own brightness offset and contrast
    factor (the reference's colour-only TrivialAugment), on the already augmented image.
    """
    b = images.shape[0]
    stacked = images.repeat_interleave(2, dim=0)
    if shift > 0:
        padded = F.pad(stacked, (shift, shift, shift, shift), mode="reflect")
        h, w = images.shape[-2:]
        offsets = torch.randint(0, 2 * shift + 1, (2 * b, 2))
        stacked = torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(offsets.tolist())])
    scale = 1 + (torch.rand(2 * b, 1, 1, 1) * 2 - 1) * contrast
    offset = (torch.rand(2 * b, 1, 1, 1) * 2 - 1) * brightness
    mean = stacked.mean(dim=(1, 2, 3), keepdim=True)
    return (stacked - mean) * scale.to(stacked) + mean + offset.to(stacked)


@register_head("pipnet")
class PIPNetHead(Head):
    name = "pipnet"
    description = "PIP-Net: softmax over prototypes per patch, max-pooled presence, sparse non-negative class layer"
    actions = ("zero-unused",)
    # Two views are augmentations of the image; a frozen-backbone cache holds one map per image.
    supports_frozen_backbone = False

    def __init__(self, num_classes: int, backbone_channels: int, dim: int = 64, num_prototypes: int = 64,
                 multiplier: float = 2.0, pretrain_fraction: float = 1 / 7, finetune_fraction: float = 3 / 70,
                 lr: float = 5e-4, addon_lr_scale: float = 10.0, class_lr: float = 0.05, view_shift: int = 2,
                 view_brightness: float = 0.2, view_contrast: float = 0.2):
        super().__init__(num_classes, backbone_channels, num_prototypes, num_prototypes)
        self.multiplier = float(multiplier)
        self.pretrain_fraction, self.finetune_fraction = float(pretrain_fraction), float(finetune_fraction)
        self.lr, self.addon_lr_scale, self.class_lr = lr, addon_lr_scale, class_lr
        self.view_shift, self.view_brightness, self.view_contrast = int(view_shift), view_brightness, view_contrast
        self.last_layer = NonNegativeLinear(num_prototypes, num_classes)
        self.stage, self.align_weight = "joint", 5.0

    @classmethod
    def defaults(cls) -> Dict[str, object]:
        return {
            "loss": "pretrain (e/E) L_align + 5 L_tanh; finetune 2 L_class; joint 5 L_align + 2 L_tanh + 2 L_class",
            "prototypes": "--prototypes add-on channels (1x1 conv), softmax over them per patch, presence = max "
                          "over patches; no push (sources are the most present training patches)",
            "class layer": "relu(W), W ~ N(1, 0.1), no bias; log(1 + o^2) before the softmax; after every "
                           "finetune/joint step W <- max(W - 1e-3, 0); unused prototypes (presence <= 0.1) zeroed",
            "views": "two per image: own shift (2 px), brightness and contrast (0.2) on the augmented image; "
                     "--frozen-backbone is refused",
            "phases": "pretrain 1/7, finetune 3/70 (class layer only; pretrained backbones only), joint the rest; "
                      "Adam, backbone 5e-4, "
                      "add-on 5e-3, class layer 0.05, cosine decay",
            "predict": "presence < 0.1 counts as 0, then argmax of o",
        }

    def prototype_spec(self) -> PrototypeSpec:
        return PrototypeSpec(self.requested_prototypes, similarity="channel-softmax", addon="linear",
                             extra={"dim": self.requested_prototypes})

    # ---- training -------------------------------------------------------------------
    def prepare_batch(self, images: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        views = two_views(images, self.view_shift, self.view_brightness, self.view_contrast)
        return views, labels.repeat_interleave(2)

    def begin_epoch(self, phase: Phase, epoch: int, steps: int, first_step: int, run_epoch: int) -> None:
        self.stage = phase.name
        # the reference ramps the alignment weight over the pretraining epochs, e / E_pre (e from 1)
        self.align_weight = (epoch + 1) / phase.epochs if phase.name == "pretrain" else 5.0

    def loss(self, out: PrototypeOutputs, labels: Tensor) -> Dict[str, Tensor]:
        if out.profile.shape[0] % 2:
            raise ProtoKNNError("pipnet trains on pairs of views; its batch must come from prepare_batch")
        z = out.feature_map.softmax(dim=1)
        terms = {"align": alignment_loss(z[0::2], z[1::2]),
                 "tanh": tanh_loss(out.profile[0::2], out.profile[1::2])}
        if self.stage == "pretrain":
            terms["total"] = self.align_weight * terms["align"] + 5.0 * terms["tanh"]
            return terms
        terms["class"] = class_loss(self.last_layer(out.profile), labels, self.multiplier)
        if self.stage == "finetune":
            terms["total"] = 2.0 * terms["class"]
        else:
            terms["total"] = self.align_weight * terms["align"] + 2.0 * terms["tanh"] + 2.0 * terms["class"]
        return terms

    @torch.no_grad()
    def after_step(self) -> None:
        if self.stage != "pretrain":
            self.last_layer.raw_weight.sub_(WEIGHT_EPSILON).clamp_(min=0.0)

    def run_action(self, action: str, train_profiles: Callable[[], Tuple[Tensor, Tensor]]) -> None:
        if action != "zero-unused":
            raise NotImplementedError(action)
        presence, _ = train_profiles()
        unused = presence.max(dim=0).values <= PRESENCE_THRESHOLD  # (P,): never present on the training set
        with torch.no_grad():
            self.last_layer.raw_weight[:, unused.to(self.last_layer.raw_weight.device)] = 0.0

    def stage_info(self, profiles: Callable[[], Tensor]) -> Dict[str, float]:
        weight = self.last_layer.weight.detach()
        presence = self.kept_presence(profiles().to(weight))
        predicted = self.last_layer(presence).argmax(dim=1)
        # the reference counts on the thresholded presence its inference uses
        relevant = presence * weight[predicted] > WEIGHT_EPSILON  # (N, P)
        return {"sparsity": float((weight <= WEIGHT_EPSILON).float().mean()),
                "prototypes_used": int((weight > WEIGHT_EPSILON).any(dim=0).sum()),
                "local_explanation_size": float(relevant.sum(dim=1).float().mean()) if len(presence) else math.nan}

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"last_layer": [self.last_layer.raw_weight]}

    @classmethod
    def search_space(cls, pretrained_backbone: bool = False) -> Dict[str, object]:
        # Around the reference's rates: backbone 5e-4, add-on 10x that, class layer 0.05.
        return {"lr": FloatRange(1e-4, 5e-3, log=True), "class_lr": FloatRange(5e-3, 0.5, log=True)}

    def phases(self, epochs: int, pretrained_backbone: bool, frozen_backbone: bool = False) -> List[Phase]:
        # The class-layer-only epochs fit a classifier to pretrained parts while the backbone
        # rests; a backbone trained from scratch trains in every epoch (the protocol gives every
        # row the same backbone steps), so then the class layer starts in the joint phase.
        pretrain = max(1, round(epochs * self.pretrain_fraction)) if epochs >= 3 else 0
        finetune = max(1, round(epochs * self.finetune_fraction)) if epochs >= 2 and pretrained_backbone else 0
        joint = epochs - pretrain - finetune
        net = {"backbone": self.lr, "addon": self.lr * self.addon_lr_scale}
        phases = []
        if pretrain:
            phases.append(Phase("pretrain", pretrain, net, schedule="cosine"))
        if finetune:
            phases.append(Phase("finetune", finetune, {"last_layer": self.class_lr}))
        phases.append(Phase("joint", joint, {**net, "last_layer": self.class_lr}, schedule="cosine",
                            after=("zero-unused", "project")))
        return phases

    # ---- inference --------------------------------------------------------------------
    @staticmethod
    def kept_presence(presence: Tensor) -> Tensor:
        """Presences (B, P) with those below 0.1 set to 0 (the reference's inference)."""
        return torch.where(presence < PRESENCE_THRESHOLD, torch.zeros_like(presence), presence)

    def scores(self, presence: Tensor) -> Tensor:
        """Class scores o (B, C) of presences (B, P) at inference: o = kept_presence(p) relu(W)^T."""
        return self.last_layer(self.kept_presence(presence))

    def logits(self, out: PrototypeOutputs) -> Tensor:
        """log(1 + o^m) (B, C): the scores the class loss softmaxes."""
        return torch.log1p(self.scores(out.profile) ** self.multiplier)

    def predict_all(self, out: PrototypeOutputs) -> Dict[str, Tensor]:
        return {"top1": self.scores(out.profile).argmax(dim=1)}
