"""The one interface every head has.

A head turns the prototype layer's outputs into loss terms and predictions, and
declares its training phases as data that the trainer follows.
"""
from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from torch import Tensor, nn

from ..prototypes import PrototypeOutputs

# Components a phase can train. A component absent from a phase's lrs is untrained in that phase.
COMPONENTS = ("backbone", "addon", "prototypes", "offsets", "head", "last_layer", "beta", "proxies")


@dataclass
class Phase:
    """One training phase.

    name: shown in the progress bar.
    epochs: how many epochs.
    lrs: component -> learning rate; a component absent here is untrained in this phase.
    after: actions run at the end of the phase: ``project`` (prototype projection),
        ``build_memory`` (kNN memory from the training profiles).
    cached_profiles: train on cached training profiles instead of images
        (valid when nothing before the head trains, e.g. ProtoPNet's last-layer phase).
    step_lr: (step_size, gamma) of a StepLR schedule, or None.
    weight_decay: component -> Adam weight decay (coupled L2); absent means 0.
    schedule: ``constant``, ``step`` (needs ``step_lr``) or ``cosine`` (linear warm-up over
        ``warmup_epochs``, then cosine decay to 0, stepped every optimiser step). None picks
        ``step`` when ``step_lr`` is set, else ``constant``.
    optimizer_key: phases with the same key share one optimiser and schedule state: a
        later phase continues where the earlier one stopped instead of restarting Adam
        (ProtoPNet's joint cycles between pushes).
    """

    name: str
    epochs: int
    lrs: Dict[str, float]
    after: Tuple[str, ...] = ()
    cached_profiles: bool = False
    step_lr: Tuple[int, float] | None = None
    weight_decay: Dict[str, float] = field(default_factory=dict)
    schedule: Optional[str] = None
    warmup_epochs: float = 0.0
    optimizer_key: Optional[str] = None

    @property
    def schedule_name(self) -> str:
        if self.schedule is not None:
            return self.schedule
        return "step" if self.step_lr else "constant"


@dataclass
class PrototypeSpec:
    """What prototype layer a head needs (kwargs of PrototypeLayer).

    ``frozen_prototypes``: the prototypes never train (PrototypeLayer's ``frozen``), whatever the
    phases' learning rates say. ``frozen`` is accepted, and read, as the same setting."""

    num_prototypes: int
    similarity: str = "cosine"
    addon: str = "linear"
    init: str = "hypersphere"
    frozen_prototypes: bool = True
    cost_space: str = "unit"
    # extra["dim"]: the add-on's output channels when they are not the model's --dim (PIP-Net:
    # its prototypes are the add-on's channels, so they number the prototypes).
    extra: Dict[str, object] = field(default_factory=dict)
    # parts > 0: deformable prototypes of parts x parts parts on a grid of `dilation` spacing.
    parts: int = 0
    dilation: int = 2
    # Heads registered from other packages may still pass PrototypeSpec(frozen=...).
    frozen: InitVar[Optional[bool]] = None

    def __post_init__(self, frozen: Optional[bool]) -> None:
        if frozen is not None:
            self.frozen_prototypes = bool(frozen)


# Read access under the same other name (set after the class: the dataclass needs the field's default).
PrototypeSpec.frozen = property(lambda spec: spec.frozen_prototypes)  # type: ignore[assignment]


class Head(nn.Module):
    """Base class of all heads.

    Subclasses set ``name`` and ``description`` and implement ``loss``, ``predict_all``
    and ``phases``. ``predict_all`` returns named predictions (B,) — ``top1`` for
    linear heads, ``k=1``, ``k=3``, ... for kNN heads — and ``primary`` names the one
    that ``predict`` returns.
    """

    name: str = "base"
    description: str = ""
    # Bump when a default that changes results changes: benchmark run keys include it (from 2
    # on), so runs made under the old default are trained again rather than reused.
    revision: int = 1
    uses_prototypes: bool = True
    uses_memory: bool = False
    project_within_class: bool = False
    # Phase actions (Phase.after) this head runs itself through ``run_action``, e.g. pruning.
    actions: Tuple[str, ...] = ()
    # The explanation a head gives when it has neither a kNN memory nor a linear last layer
    # ("decision-path": a tree's path from the root to a leaf); None: chosen by those.
    explanation: Optional[str] = None
    # False when training needs something a frozen-backbone feature cache cannot give.
    supports_frozen_backbone: bool = True
    # Option defaults that replace the constructor's when the backbone is pretrained (chosen on
    # validation with a pretrained backbone); options the user gives win. ModelConfig.for_data
    # writes them into the run's head options, so a checkpoint records what was trained.
    pretrained_defaults: Dict[str, object] = {}

    def __init__(self, num_classes: int, backbone_channels: int, dim: int, num_prototypes: int):
        super().__init__()
        self.num_classes = num_classes
        self.backbone_channels = backbone_channels
        self.dim = dim
        self.requested_prototypes = num_prototypes

    @classmethod
    def from_options(cls, **options) -> "Head":
        """The head from flat options: the model's four arguments (num_classes, backbone_channels,
        dim, num_prototypes) plus the user's (``--head-opt``, config files). The registry builds
        every head this way; a head whose constructor takes parts (losses, a kNN) overrides it to
        build them, and its signature then lists the options."""
        return cls(**options)

    # ---- what the head needs -------------------------------------------------
    def prototype_spec(self) -> PrototypeSpec:
        return PrototypeSpec(self.requested_prototypes)

    @classmethod
    def defaults(cls) -> Dict[str, object]:
        """Head options and their defaults, for `protoknn heads`."""
        return {}

    @classmethod
    def search_space(cls, pretrained_backbone: bool = False) -> Dict[str, object]:
        """Option -> range (``heads.space``) that ``protoknn benchmark --tune`` searches; every
        key is a constructor option. Empty: nothing to tune (the row trains its defaults)."""
        return {}

    # ---- training --------------------------------------------------------------
    def check_data(self, labels: Tensor) -> None:
        """Raise ProtoKNNError before training if this head cannot work on these training labels (N,)."""
    def loss(self, out: PrototypeOutputs, labels: Tensor) -> Dict[str, Tensor]:
        """Named loss terms plus ``total`` (the one to backpropagate)."""
        raise NotImplementedError

    def phases(self, epochs: int, pretrained_backbone: bool, frozen_backbone: bool = False) -> List[Phase]:
        """The phases of ``epochs`` feature-training epochs. ``frozen_backbone``: the backbone is
        frozen and cached (it never trains, whatever the phases' rates say)."""
        raise NotImplementedError

    # ---- hooks the trainer calls (defaults do nothing) ---------------------------------
    def prepare_batch(self, images: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """The training batch the model is fed, e.g. two views of each image: images (B, C, H, W), labels (B,)."""
        return images, labels

    def begin_epoch(self, phase: Phase, epoch: int, steps: int, first_step: int, run_epoch: int) -> None:
        """Called before each training epoch runs: ``epoch`` counts from 0 within ``phase``, ``steps``
        is the epoch's length, ``first_step`` where it starts (0 unless resumed mid-epoch), and
        ``run_epoch`` counts the image-training epochs of every phase from 0 (ProtoPool's
        Gumbel-softmax scale follows it)."""

    def after_step(self) -> None:
        """Called after every optimiser step of a training epoch (derivative-free updates, clamps)."""

    def run_action(self, action: str, train_profiles: Callable[[], Tuple[Tensor, Tensor]]) -> None:
        """Run one of ``actions`` at the end of a phase; ``train_profiles()`` gives the training set's
        profiles (N, P) and labels (N,)."""
        raise NotImplementedError(action)

    def stage_info(self, profiles: Callable[[], Tensor]) -> Dict[str, float]:
        """Numbers recorded with every stage (e.g. a tree's size); ``profiles()`` gives the stage set's (N, P)."""
        return {}

    def projection_classes(self) -> Optional[Tensor]:
        """Whose training images each prototype may be projected onto: None (any image), (P,) one
        class per prototype, or a boolean (C, P) of the classes whose images each may use."""
        return getattr(self, "prototype_class", None) if self.project_within_class else None

    def make_scorer(self, anchors: Tensor):
        """The deletion test's scorer for profiles ``anchors`` (N, P) when this head scores in its own
        way (see faithfulness.scorers: ``evidence``, ``score``, ``predict``); None: kNN or linear."""
        return None

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """The head's own parameters by component (``head``, ``last_layer``, ``beta``, ``proxies``)."""
        params = [p for p in self.parameters()]
        return {"head": params} if params else {}

    # ---- inference ---------------------------------------------------------------
    primary: str = "top1"

    def predict_all(self, out: PrototypeOutputs) -> Dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, out: PrototypeOutputs) -> Tensor:
        return self.predict_all(out)[self.primary]

    def classes_using(self) -> Optional[List[List[int]]]:
        """Per prototype, the classes it belongs to by design (a ProtoPNet prototype: its own
        class; a pool prototype: the classes whose slots pick it); None for class-free prototypes."""
        own = getattr(self, "prototype_class", None)
        return None if own is None else [[int(c)] for c in own.tolist()]

    def class_weights(self) -> Optional[Tensor]:
        """(C, P) with logits = profile @ class_weights().T at inference, for heads linear in the
        prototype profile (explanations and deletion tests read it); None for the others."""
        last_layer = getattr(self, "last_layer", None)
        return None if last_layer is None else last_layer.weight

    def summary(self) -> Dict[str, object]:
        return {"name": self.name, **self.defaults()}
