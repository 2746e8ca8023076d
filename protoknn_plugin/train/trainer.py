"""The training loop: phases and their optimisers, one step (mixed precision, DDP),
validation after every epoch and after every push, best.pt, and checkpoints that resume
bit-for-bit.

For a head that projects its prototypes, best.pt is chosen only among projected models (after
a push, its rebuilt kNN memory and any last-layer phase): the model a user loads by default
must explain with real training patches. The un-projected epochs are still validated (the
``projected`` column of metrics.csv says so) and the best of them is kept apart in
best-unprojected.pt, which is loaded only when asked for by name.

The parts: ``optimizers.PhaseOptimizers`` (the phase's optimiser, scheduler and DDP wrap),
``run_checkpoint.RunCheckpoint`` (checkpoint.pt, best.pt, resuming), ``scoring.RunScoring``
(profiles, validation, stages) and ``actions.PhaseActions`` (push, kNN memory, cached
phases, with their seconds)."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .. import distributed
from ..checkpoint import ensure_writable_dir
from ..errors import ProtoKNNError
from ..heads.base import Phase
from ..losses import single_class_guard
from ..model import PrototypeModel
from .actions import PhaseActions
from .config import TrainConfig, resolve_device
from .finite import FiniteLossCheck
from .loading import TrainingBatches, epoch_batches
from .optimizers import LossForward, PhaseOptimizers
from .precision import Precision
from .records import EpochLog, make_progress
from .rng import seed_everything
from .run_checkpoint import RunCheckpoint
from .scoring import RunScoring
from .state import SignalGuard, TrainState

__all__ = ["Trainer", "LossForward", "head_phases"]


def training_data(splits, config: TrainConfig, data_info: Optional[Dict[str, Any]]) -> Tuple[Any, Dict[str, Any]]:
    """The splits with ``config.val_fraction`` held out when they have no validation split yet, and
    what evaluate and explain need to rebuild them (``data_info``: data_dir, limit, ...)."""
    from ..data.base import carve_validation

    if config.val_fraction and getattr(splits, "val", None) is None:
        splits = carve_validation(splits, config.val_fraction)
    info = dict(data_info or {})
    # The training part (and so the kNN memory's order) depends on the held-out validation share.
    info.setdefault("val_fraction", config.val_fraction or getattr(splits, "val_fraction", 0.0))
    return splits, info


def placed(model: PrototypeModel, config: TrainConfig) -> Tuple[PrototypeModel, torch.device]:
    """The model on its device (set up for torchrun when launched by it) and that device."""
    device = distributed.setup(resolve_device(config.device))
    if distributed.is_active() and device.type == "cuda":
        # Global batch statistics, as one process would see them (CPU has no SyncBatchNorm).
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return model.to(device), device


def head_phases(model: PrototypeModel, epochs: int, frozen_backbone: bool = False) -> List[Phase]:
    """The phases the model's head declares for ``epochs`` feature epochs (what a Trainer follows
    unless given others). ``frozen_backbone``: the backbone is frozen and cached."""
    return model.head.phases(epochs, model.pretrained_backbone, frozen_backbone=frozen_backbone)


class Trainer:
    """Trains a PrototypeModel on DatasetSplits following its phases (by default ``model.head.phases``)."""

    def __init__(self, model: PrototypeModel, splits, config: TrainConfig, out_dir: Optional[str] = None,
                 progress: bool = True, dataset_name: str = "", on_step: Optional[Callable[[int], None]] = None,
                 data_info: Optional[Dict[str, Any]] = None, stage_eval: Optional[Dataset] = None,
                 run_settings: Optional[Dict[str, Any]] = None,
                 on_epoch: Optional[Callable[[List[Dict[str, Any]]], None]] = None,
                 phases: Optional[Sequence[Phase]] = None):
        """``stage_eval``: a dataset scored at every phase boundary (recorded in ``state.stages``).
        ``run_settings``: the command's resolved options, kept in the checkpoint.
        ``on_epoch``: called with the whole history (resumed epochs included) after every feature
        epoch, once the checkpoint is written; an exception it raises (a tuner pruning the run)
        stops training with nothing lost. ``phases``: the phases to train (e.g. with scaled
        learning rates); None: the head's own for ``config.epochs``."""
        splits, self.data_info = training_data(splits, config, data_info)
        self.splits, self.config, self.progress, self.run_settings = splits, config, progress, dict(run_settings or {})
        self.out_dir = ensure_writable_dir(out_dir) if out_dir else None
        self.dataset_name = dataset_name or getattr(splits, "name", "")
        self.model, self.device = placed(model, config)
        model.head.check_data(splits.train_labels)  # fail now, not after hours of training
        # data_info records a frozen (cached) backbone: nothing needs protecting from a warm phase then.
        self.phases: List[Phase] = list(phases) if phases is not None else head_phases(
            model, config.epochs, frozen_backbone=bool(self.data_info.get("frozen_backbone")))
        self.state = TrainState(projected=False if self.projects else None)
        self.precision = Precision(config.precision, self.device)
        self.on_step, self.on_epoch = on_step, on_epoch
        self.sync_every = config.sync_every or (1 if self.device.type == "cpu" else 10)
        self.steps_per_epoch = config.steps_per_epoch or max(1, len(splits.train_labels) // config.batch_size)
        self.optimizers = PhaseOptimizers(self.model, self.precision, self.device, self.steps_per_epoch)
        self.checkpoint = RunCheckpoint(self.out_dir, self.model, config, self.dataset_name, self.data_info,
                                        getattr(splits, "classes", []), self.precision, self.optimizers)
        self.scoring = RunScoring(self.model, splits, config, self.device, stage_eval)
        self.actions = PhaseActions(self.model, self.scoring)
        self.log = EpochLog(self.out_dir if self.checkpoint.writes else None, config.tensorboard)
        self.finite = FiniteLossCheck(self.sync_every, self.device)
        self.batches = TrainingBatches(splits, config.seed, config.workers, self.device)

    @property
    def projects(self) -> bool:
        """Whether the phases push the prototypes onto training patches."""
        return any("project" in p.after for p in self.phases)

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimiser of the phase in progress (None between phases)."""
        return self.optimizers.optimizer

    # ---- checkpoints and scores (see RunCheckpoint and RunScoring) ---------------------
    def checkpoint_state(self) -> Dict[str, Any]:
        """Plain data only: tensors, numbers, strings, lists and dicts (settings as JSON)."""
        return self.checkpoint.state(self.state)

    def save(self) -> None:
        self.checkpoint.save(self.state)

    def resume(self) -> bool:
        """Load the run directory's checkpoint if there is one. Returns whether it did."""
        resumed = self.checkpoint.resume(self.phases, self.projects)
        self.state = resumed or self.state
        return resumed is not None

    def profiles(self, dataset: Dataset) -> Tuple[Tensor, Tensor]:
        """Profiles (N, P) and labels (N,) of a dataset in order, in eval mode."""
        return self.scoring.profiles(dataset)

    def score(self, dataset: Dataset) -> Dict[str, float]:
        """Accuracy of every named prediction on ``dataset`` with the model as it is now."""
        return self.scoring.score(dataset)

    # ---- one epoch ---------------------------------------------------------------------
    def _train_step(self, images: Tensor, labels: Tensor) -> Dict[str, Tensor]:
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        try:
            terms = self.optimizers.forward_loss(images, labels)
        except ProtoKNNError as err:  # e.g. the cluster loss refusing NaN profiles: say when
            kept = "; the last good checkpoint is kept" if "non-finite" in str(err) else ""
            raise ProtoKNNError(f"at step {self.state.global_step + 1}: {err}{kept}") from None
        self.finite.note(terms, self.state.global_step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(terms["total"])
        self.precision.step(self.optimizer)
        self.model.head.after_step()
        self.optimizers.step_per_batch()
        return terms

    def _run_epoch(self, phase: Phase, guard: SignalGuard, bar) -> Dict[str, Any]:
        st = self.state
        if st.batches is None:
            st.batches = epoch_batches(self.splits.train_labels, self.config)
            st.step = 0
        run_epoch = sum(p.epochs for p in self.phases[:st.phase] if not p.cached_profiles) + st.epoch
        self.model.head.begin_epoch(phase, st.epoch, len(st.batches), st.step, run_epoch)
        self.model.train()
        # Loss sums stay on the device between sync points (no per-step .item()).
        sums: Dict[str, Any] = dict(st.epoch_sums)  # carries over a resumed epoch's first part
        seen, started = 0, time.perf_counter()
        labels_all = self.splits.train_labels
        for images, labels in self.batches.loader(st.batches[st.step:], st.global_step):
            single_class_guard(labels_all[st.batches[st.step]])  # the global batch, on the host
            terms = self._train_step(images, labels)
            st.step += 1
            st.global_step += 1
            seen += len(labels) * distributed.world_size()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            at_sync = st.step % self.sync_every == 0 or st.step == len(st.batches) or guard.received is not None
            if at_sync:
                self.finite.check(terms, st.global_step)
                st.epoch_sums = {k: float(v) for k, v in sums.items()}
                if bar is not None:
                    rate = seen / max(time.perf_counter() - started, 1e-9)
                    bar.update(phase.name, st.epoch, st.step, len(st.batches),
                               {k: v / st.step for k, v in st.epoch_sums.items()}, rate)
            if self.on_step is not None:
                self.on_step(st.global_step)
            if guard.received is not None:
                self.save()
                guard.raise_if_received()
        self.optimizers.step_per_epoch()
        seconds = time.perf_counter() - started
        means: Dict[str, Any] = {k: v / max(len(st.batches), 1) for k, v in st.epoch_sums.items()}
        means["lr"] = self.optimizers.learning_rates()
        means["epoch_seconds"] = seconds
        means["images_per_second"] = seen / max(seconds, 1e-9)
        st.batches, st.step, st.epoch_sums = None, 0, {}
        return means

    # ---- phases --------------------------------------------------------------------------
    def _train_epochs(self, phase: Phase, guard: SignalGuard, bar, started: float) -> None:
        """The phase's remaining feature epochs, each validated, logged and checkpointed."""
        st = self.state
        while st.epoch < phase.epochs:
            logs = self._run_epoch(phase, guard, bar)
            st.epoch += 1
            distributed.broadcast_buffers(self.model)  # every rank projects and validates one model
            if self.projects:  # training moved the embedding or the prototypes off their patches
                st.projected = logs["projected"] = False
            scores = self.scoring.validate()
            logs.update(scores)
            st.train_seconds = time.perf_counter() - started
            self.log.epoch(st.history, {"phase": phase.name, "epoch": st.epoch, "global_step": st.global_step,
                                        "seconds": st.train_seconds, **logs}, bar)
            self.checkpoint.keep_best(st, scores, {"phase": phase.name, "epoch": st.epoch, "when": "after epoch"})
            self.save()
            guard.raise_if_received()
            if self.on_epoch is not None:
                self.on_epoch(st.history)

    def _end_phase(self, phase: Phase, started: float) -> None:
        """The phase's actions, then the next phase; a projected or finished model competes for best.pt."""
        st = self.state
        self.optimizers.keep(phase, st.optimizer_states)
        self.actions.after(phase, st)
        st.phase, st.epoch = st.phase + 1, 0
        self.optimizers.end_phase()
        st.train_seconds = time.perf_counter() - started
        if st.phase == len(self.phases):
            st.complete = True
        if st.projected or (st.complete and not self.projects):
            # A projected model (after its push, memory or last layer) competes for best.pt;
            # so does the finished model of a head that never projects.
            self.checkpoint.keep_best(st, self.scoring.current_validation(),
                                      {"phase": phase.name, "epoch": phase.epochs, "when": "end of phase"})
        self.save()

    def fit(self, resume: bool = False) -> TrainState:
        if resume:
            self.resume()
        else:
            seed_everything(self.config.seed)
        try:
            return self._fit()
        finally:
            self.log.close()

    def _fit(self) -> TrainState:
        st = self.state
        started = time.perf_counter() - st.train_seconds
        bar = make_progress(self.progress and distributed.is_main())
        with SignalGuard() as guard, (bar or contextlib.nullcontext()):
            while st.phase < len(self.phases):
                phase = self.phases[st.phase]
                if self.optimizer is None:
                    self.optimizers.build(phase, st.optimizer_states)
                if phase.cached_profiles:
                    self.actions.cached_phase(phase, self.optimizer, self.config.seed + st.phase,
                                              self.config.batch_size)
                    self.scoring.forget()
                    st.epoch = phase.epochs
                self._train_epochs(phase, guard, bar, started)
                self._end_phase(phase, started)
                # Also after the last phase: a signal that arrived during projection or the kNN
                # memory must still stop the caller (a benchmark would go on to the next run).
                # The run is saved complete, so resuming it only returns.
                guard.raise_if_received()
        return st
