"""A prototype network: backbone + shared prototype layer + a head chosen by name."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from .backbones import RANDOM_WEIGHTS, create_backbone
from .deformable import DeformablePrototypeLayer
from .errors import ProtoKNNError
from .heads import create_head, get_head_class
from .heads.base import Head
from .prototypes import PrototypeLayer, PrototypeOutputs, ProjectionRecord, project


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (stored in every checkpoint)."""

    head: str = "protoknn"
    backbone: str = "small-cnn"
    num_classes: int = 10
    in_channels: int = 1
    num_prototypes: int = 100
    dim: int = 64
    weights: Optional[str] = None
    backbone_options: Dict[str, object] = field(default_factory=dict)
    head_options: Dict[str, object] = field(default_factory=dict)
    seed: int = 0
    # The normalisation of the images the model is fed (the dataset's mean/std per channel).
    # When set, the backbone converts them to its own (e.g. EfficientNet-Lite0's 127/128).
    input_mean: Optional[Tuple[float, ...]] = None
    input_std: Optional[Tuple[float, ...]] = None

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def for_data(cls, splits, **kwargs) -> "ModelConfig":
        """A config sized for ``splits`` (classes, channels).

        For a pretrained backbone it also records the data's normalisation, so the backbone
        converts it to the statistics its weights were trained on. A backbone trained from
        scratch learns on the data's normalisation as it is.
        """
        from .backbones import BACKBONES

        config = cls(num_classes=len(splits.classes), in_channels=splits.channels, **kwargs)
        weights = config.weights if config.weights is not None else getattr(BACKBONES.get(config.backbone),
                                                                              "default_weights", None)
        if weights not in RANDOM_WEIGHTS:
            config.input_mean, config.input_std = tuple(splits.mean), tuple(splits.std)
            config.head_options = {**get_head_class(config.head).pretrained_defaults, **config.head_options}
        return config


class PrototypeModel(nn.Module):
    """backbone (B, C_in, H, W) -> (B, C, h, w) -> prototype layer -> head."""

    def __init__(self, config: ModelConfig, for_loading: bool = False):
        """``for_loading``: weights come from a checkpoint next, so skip the costly prototype init."""
        super().__init__()
        self.config = config
        # Seed before building so every head compared under one seed starts from the
        # same backbone initialisation.
        torch.manual_seed(config.seed)
        # weights=None in the config means "the backbone's own default" (random for
        # torchvision trunks, the shipped ImageNet file for efficientnet-lite0).
        weights = {} if config.weights is None else {"weights": config.weights}
        self.backbone = create_backbone(config.backbone, in_channels=config.in_channels,
                                        **weights, **config.backbone_options)
        if config.input_mean is not None and config.input_std is not None:
            self.backbone.set_input_normalization(tuple(config.input_mean), tuple(config.input_std))
        self.head: Head = create_head(
            config.head, num_classes=config.num_classes, backbone_channels=self.backbone.out_channels,
            dim=config.dim, num_prototypes=config.num_prototypes, **config.head_options,
        )
        self.prototype_layer: Optional[PrototypeLayer] = None
        if self.head.uses_prototypes:
            spec = self.head.prototype_spec()
            dim = int(spec.extra.get("dim") or config.dim)
            self.prototype_layer = self._deformable_layer(spec, for_loading) if spec.parts else PrototypeLayer(
                self.backbone.out_channels, spec.num_prototypes, dim, similarity=spec.similarity,
                addon=spec.addon, cost_space=spec.cost_space, init="random" if for_loading else spec.init,
                frozen=spec.frozen_prototypes, seed=config.seed,
            )
        self.projection: Optional[ProjectionRecord] = None
        self._frozen_backbone = False  # see frozen_backbone(); not saved: a run-time mode

    def _deformable_layer(self, spec, for_loading: bool) -> PrototypeLayer:
        return DeformablePrototypeLayer(self.backbone.out_channels, spec.num_prototypes, self.config.dim,
                                        parts=spec.parts, dilation=spec.dilation, addon=spec.addon,
                                        init="random" if for_loading else spec.init, frozen=spec.frozen_prototypes,
                                        seed=self.config.seed)

    @property
    def pretrained_backbone(self) -> bool:
        return getattr(self.backbone, "weights", None) not in RANDOM_WEIGHTS

    @contextmanager
    def frozen_backbone(self) -> Iterator["PrototypeModel"]:
        """Frozen-backbone mode: inside, ``forward``, ``loss``, ``predict_all`` and
        ``project_prototypes`` take precomputed backbone maps (B, C, h, w) instead of images,
        and ``components()`` gives the backbone no parameters, so it never trains. The
        backbone stays a submodule: state dicts and checkpoints are unchanged, and outside
        the context the model reads images again (see ``protoknn_plugin.features``)."""
        previous, self._frozen_backbone = self._frozen_backbone, True
        try:
            yield self
        finally:
            self._frozen_backbone = previous

    backbone_bypassed = frozen_backbone  # the earlier name, for callers that use it

    def features(self, x: Tensor) -> Tensor:
        """Backbone maps (B, C, h, w): ``backbone(x)``, or ``x`` itself in frozen-backbone mode."""
        if not self._frozen_backbone:
            return self.backbone(x)
        channels = self.backbone.out_channels
        if not (isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] == channels):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ProtoKNNError(f"the backbone is frozen (cached), so the model takes its maps "
                                f"(B, {channels}, h, w), got {shape}; feed the feature cache's splits, or "
                                "leave frozen_backbone() to feed images")
        return x

    def forward(self, images: Tensor, maps: bool = False) -> PrototypeOutputs:
        """images (B, C_in, H, W), or backbone maps (B, C, h, w) inside ``frozen_backbone()``."""
        features = self.features(images)
        if self.prototype_layer is None:
            return PrototypeOutputs(None, None, None, None, None, features)
        return self.prototype_layer(features, maps=maps)

    def loss(self, images: Tensor, labels: Tensor) -> Dict[str, Tensor]:
        return self.head.loss(self(images), labels)

    @torch.no_grad()
    def predict_all(self, images: Tensor) -> Dict[str, Tensor]:
        return self.head.predict_all(self(images))

    def components(self) -> Dict[str, list]:
        """Parameters by component name (see heads.base.COMPONENTS)."""
        groups = {"backbone": [] if self._frozen_backbone else list(self.backbone.parameters())}
        if self.prototype_layer is not None:
            groups.update(self.prototype_layer.component_parameters())
        for name, params in self.head.param_groups().items():
            groups.setdefault(name, []).extend(params)
        return groups

    @torch.no_grad()
    def project_prototypes(self, batches: Iterable[Tuple[Tensor, Tensor, Tensor]]) -> ProjectionRecord:
        """Eq. 14 over (images, labels, indices) batches; ProtoPNet heads search only their own class."""
        assert self.prototype_layer is not None
        was_training = self.training
        self.eval()
        device = self.prototype_layer.prototypes.device
        feats = ((self.features(x.to(device)), y, i) for x, y, i in batches)
        self.projection = project(self.prototype_layer, feats, prototype_class=self.head.projection_classes())
        self.train(was_training)
        return self.projection

    def projection_state(self) -> Optional[Dict[str, object]]:
        if self.projection is None:
            return None
        return {k: getattr(self.projection, k) for k in ("image_index", "location", "similarity", "map_size", "cosine")
                if getattr(self.projection, k) is not None}

    def load_projection_state(self, state: Optional[Dict[str, object]]) -> None:
        self.projection = ProjectionRecord(**state) if state else None


def create_model(**kwargs) -> PrototypeModel:
    """``create_model(head="protoknn", backbone="small-cnn", num_classes=10, in_channels=1, ...)``."""
    return PrototypeModel(ModelConfig(**kwargs))
