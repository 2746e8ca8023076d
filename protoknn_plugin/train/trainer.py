"""The training loop: phases and their optimisers, one step (mixed precision, DDP),
validation after every epoch and after every push, best.pt, and checkpoints that resume
bit-for-bit.

For a head that projects its prototypes, best.pt is chosen only among projected models (after
a push, its rebuilt kNN memory and any last-layer phase): the model a user loads by default
must explain with real training patches. The un-projected epochs are still validated (the
``projected`` column of metrics.csv says so) and the best of them is kept apart in
best-unprojected.pt, which is loaded only when asked for by name."""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .. import distributed
from ..checkpoint import (BEST_NAME, BEST_UNPROJECTED_NAME, CHECKPOINT_NAME, check_compatible, ensure_writable_dir,
                          load_checkpoint, save_atomic)
from ..errors import ProtoKNNError
from ..heads.base import Phase
from ..losses import single_class_guard
from ..model import PrototypeModel
from ..prototypes import projection_summary
from ..schedules import build_optimizer, steps_per_epoch_schedule
from .config import TrainConfig, resolve_device
from .evaluation import evaluate, load_model_state
from .loading import KeyedBatches, epoch_batches, keyed_batches, plain_loader, training_loader
from .precision import Precision, outputs_to_float
from .resuming import resume_progress
from .records import METRICS_CSV, TensorBoardWriter, make_progress, write_metrics_csv
from .rng import rng_state, seed_everything, set_rng_state
from .state import SignalGuard, TrainState


class LossForward(nn.Module):
    """images, labels -> the head's loss terms on the global batch.

    The forward pass runs under autocast; the losses run in float32 on every rank's
    outputs gathered with gradient-carrying collectives, so DistributedDataParallel's
    gradient average equals the single-process gradient of the global batch.
    """

    def __init__(self, model: PrototypeModel, precision: Precision):
        super().__init__()
        self.model, self.precision = model, precision

    def forward(self, images: Tensor, labels: Tensor) -> Dict[str, Tensor]:
        images, labels = self.model.head.prepare_batch(images, labels)
        with self.precision.autocast():
            out = self.model(images)
        out = distributed.gather_outputs(outputs_to_float(out))
        labels = distributed.gather_labels(labels)
        return self.model.head.loss(out, labels)


class Trainer:
    """Trains a PrototypeModel on DatasetSplits following ``model.head.phases``."""

    def __init__(self, model: PrototypeModel, splits, config: TrainConfig, out_dir: Optional[str] = None,
                 progress: bool = True, dataset_name: str = "", on_step: Optional[Callable[[int], None]] = None,
                 data_info: Optional[Dict[str, Any]] = None, stage_eval: Optional[Dataset] = None,
                 run_settings: Optional[Dict[str, Any]] = None,
                 on_epoch: Optional[Callable[[List[Dict[str, Any]]], None]] = None):
        """``stage_eval``: a dataset scored at every phase boundary (recorded in ``state.stages``).
        ``run_settings``: the command's resolved options, kept in the checkpoint.
        ``on_epoch``: called with the whole history (resumed epochs included) after every feature
        epoch, once the checkpoint is written; an exception it raises (a tuner pruning the run)
        stops training with nothing lost."""
        from ..data.base import carve_validation

        if config.val_fraction and getattr(splits, "val", None) is None:
            splits = carve_validation(splits, config.val_fraction)
        self.model, self.splits, self.config = model, splits, config
        self.stage_eval = stage_eval
        self.out_dir = ensure_writable_dir(out_dir) if out_dir else None
        self.progress = progress
        self.dataset_name = dataset_name or getattr(splits, "name", "")
        self.data_info = dict(data_info or {})  # data_dir, limit: how to rebuild the data for evaluate/explain
        # The training part (and so the kNN memory's order) depends on the held-out validation share.
        self.data_info.setdefault("val_fraction", config.val_fraction or getattr(splits, "val_fraction", 0.0))
        self.run_settings = dict(run_settings or {})
        self.device = distributed.setup(resolve_device(config.device))
        if distributed.is_active() and self.device.type == "cuda":
            # Global batch statistics, as one process would see them (CPU has no SyncBatchNorm).
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.model.to(self.device)
        model.head.check_data(splits.train_labels)  # fail now, not after hours of training
        # data_info records a frozen (cached) backbone: nothing needs protecting from a warm phase then.
        self.phases: List[Phase] = model.head.phases(config.epochs, model.pretrained_backbone,
                                                     frozen_backbone=bool(self.data_info.get("frozen_backbone")))
        self.state = TrainState(projected=False if self.projects else None)
        # The validation of the model as it is now, while nothing has trained since (reused at a push).
        self._fresh_scores: Optional[Dict[str, float]] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None
        self.precision = Precision(config.precision, self.device)
        self.forward_loss: nn.Module = LossForward(self.model, self.precision)
        self.on_step = on_step
        self.on_epoch = on_epoch
        self.sync_every = config.sync_every or (1 if self.device.type == "cpu" else 10)
        self.steps_per_epoch = config.steps_per_epoch or max(1, len(splits.train_labels) // config.batch_size)
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._sampler = KeyedBatches()
        self._train_loader = None
        self._tensorboard: Optional[TensorBoardWriter] = None
        if config.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:  # say so now, not after the first epoch
                raise ProtoKNNError("--tensorboard needs the tensorboard package; "
                                    "install it with pip install 'protoknn-plugin[tensorboard]'")

    # ---- checkpoints ---------------------------------------------------------------
    def checkpoint_state(self) -> Dict[str, Any]:
        """Plain data only: tensors, numbers, strings, lists and dicts (settings as JSON)."""
        return {
            "model_config": self.model.config.to_dict(),
            "train_config": asdict(self.config),
            "dataset": self.dataset_name,
            "data": self.data_info,
            "classes": list(getattr(self.splits, "classes", [])),
            "model": self.model.state_dict(),
            "projection": self.model.projection_state(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None,
            "train_state": asdict(self.state),
            "rng": rng_state(),
        }

    def _writes(self) -> bool:
        return self.out_dir is not None and distributed.is_main()  # one set of files per run

    def save(self) -> None:
        if self._writes():
            save_atomic(self.checkpoint_state(), self.out_dir / CHECKPOINT_NAME)

    def resume(self) -> bool:
        """Load the run directory's checkpoint if there is one. Returns whether it did."""
        if self.out_dir is None or not (self.out_dir / CHECKPOINT_NAME).exists():
            return False
        saved = load_checkpoint(self.out_dir)
        check_compatible(saved["model_config"], self.model.config.to_dict())
        if saved.get("dataset") and self.dataset_name and saved["dataset"] != self.dataset_name:
            raise ProtoKNNError(
                f"checkpoint was made with dataset={saved['dataset']!r} but this run asks for dataset={self.dataset_name!r}; "
                "use the same settings or a new --out directory"
            )
        load_model_state(self.model, saved, str(self.out_dir / CHECKPOINT_NAME))
        self.state, _ = resume_progress(saved, self.model, self.config, self.phases,
                                        str(self.out_dir / CHECKPOINT_NAME))
        if self.projects and self.state.projected is None:  # a checkpoint written before the flag
            self.state.projected = bool(saved["train_state"].get("complete"))
        if not self.state.complete and self.state.phase < len(self.phases):
            self._build_optimizer(self.phases[self.state.phase])
            if saved.get("optimizer"):
                self.optimizer.load_state_dict(saved["optimizer"])
            if self.scheduler is not None and saved.get("scheduler"):
                self.scheduler.load_state_dict(saved["scheduler"])
        if self.precision.scaler is not None and saved.get("scaler"):
            self.precision.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        return True

    # ---- phases ----------------------------------------------------------------------
    def _build_optimizer(self, phase: Phase) -> None:
        """The phase's optimiser; a phase sharing an earlier one's optimizer_key continues its state."""
        self.components = self.model.components()
        self.optimizer, self.scheduler = build_optimizer(phase, self.components, self.steps_per_epoch)
        self._step_schedule = steps_per_epoch_schedule(phase)
        kept = self.state.optimizer_states.get(phase.optimizer_key) if phase.optimizer_key else None
        if kept:
            self.optimizer.load_state_dict(kept["optimizer"])
            if self.scheduler is not None and kept.get("scheduler"):
                self.scheduler.load_state_dict(kept["scheduler"])
        self.forward_loss = self._wrap_ddp()

    def _wrap_ddp(self) -> nn.Module:
        """DistributedDataParallel over this phase's trainable parameters (rebuilt per phase,
        since phases freeze and unfreeze components)."""
        plain = LossForward(self.model, self.precision)
        if not distributed.is_active():
            return plain
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # broadcast_buffers off: the kNN memory is a buffer; BatchNorm statistics are
        # broadcast once per epoch (_sync_buffers). find_unused_parameters: a phase may
        # train a component that one loss configuration leaves out of the graph.
        return DistributedDataParallel(plain, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True)

    def _keep_optimizer(self, phase: Phase) -> None:
        if phase.optimizer_key and self.optimizer is not None:
            self.state.optimizer_states[phase.optimizer_key] = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None}

    def _loader(self, batches: List[List[int]], first_step: int):
        """This rank's shard of each global batch, every item with its own augmentation seed.
        One DataLoader serves the whole run so that its worker processes stay alive."""
        self._sampler.set(keyed_batches(batches, first_step, self.config.seed))
        if self._train_loader is None:
            self._train_loader = training_loader(self.splits.train, self._sampler, self.config.workers, self.device)
        return self._train_loader

    def _train_step(self, images: Tensor, labels: Tensor) -> Dict[str, Tensor]:
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        try:
            terms = self.forward_loss(images, labels)
        except ProtoKNNError as err:  # e.g. the cluster loss refusing NaN profiles: say when
            kept = "; the last good checkpoint is kept" if "non-finite" in str(err) else ""
            raise ProtoKNNError(f"at step {self.state.global_step + 1}: {err}{kept}") from None
        if self.sync_every == 1:  # check before the update, so the weights stay finite
            self._check_finite(terms, self.state.global_step + 1)
        else:  # remember on the device; checked at the next sync point
            self._nonfinite = self._nonfinite | ~torch.isfinite(terms["total"].detach())
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(terms["total"])
        self.precision.step(self.optimizer)
        self.model.head.after_step()
        if self.scheduler is not None and self._step_schedule:
            self.scheduler.step()
        return terms

    def _check_finite(self, terms: Dict[str, Tensor], step: int) -> None:
        if bool(torch.isfinite(terms["total"])) and not bool(self._nonfinite):
            return
        bad = next((k for k, v in terms.items() if k != "total" and not bool(torch.isfinite(v).all())), "total")
        raise ProtoKNNError(
            f"non-finite loss {'at' if self.sync_every == 1 else 'by'} step {step} (term {bad!r}); the last good checkpoint is kept; "
            "lower the learning rate or check the data for NaN"
        )

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
        for images, labels in self._loader(st.batches[st.step:], st.global_step):
            single_class_guard(labels_all[st.batches[st.step]])  # the global batch, on the host
            terms = self._train_step(images, labels)
            st.step += 1
            st.global_step += 1
            seen += len(labels) * distributed.world_size()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            at_sync = st.step % self.sync_every == 0 or st.step == len(st.batches) or guard.received is not None
            if at_sync:
                self._check_finite(terms, st.global_step)
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
        if self.scheduler is not None and not self._step_schedule:
            self.scheduler.step()
        seconds = time.perf_counter() - started
        means: Dict[str, Any] = {k: v / max(len(st.batches), 1) for k, v in st.epoch_sums.items()}
        means["lr"] = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        means["epoch_seconds"] = seconds
        means["images_per_second"] = seen / max(seconds, 1e-9)
        st.batches, st.step, st.epoch_sums = None, 0, {}
        return means

    def _sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics everywhere, so every rank projects and evaluates the same model."""
        if distributed.is_active():
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, 0)

    @torch.no_grad()
    def profiles(self, dataset: Dataset) -> Tuple[Tensor, Tensor]:
        """Profiles (N, P) and labels (N,) of a dataset in order, in eval mode."""
        was = self.model.training
        self.model.eval()
        outs, labels = [], []
        # Float32 like ``evaluate``, so the kNN memory and its queries are computed alike.
        for images, y, _ in self._plain(dataset):
            outs.append(self.model(images.to(self.device, non_blocking=True)).profile)
            labels.append(y)
        self.model.train(was)
        return torch.cat(outs), torch.cat(labels).to(self.device)

    def _plain(self, dataset: Dataset):
        return plain_loader(dataset, self.config.eval_batch_size, workers=self.config.workers, device=self.device)

    def _run_cached_phase(self, phase: Phase) -> None:
        profiles, labels = self.profiles(self.splits.train_plain)
        generator = torch.Generator().manual_seed(self.config.seed + self.state.phase)
        batch = self.config.batch_size
        for _ in range(phase.epochs):
            order = torch.randperm(len(labels), generator=generator).to(labels.device)
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                terms = self.model.head.loss_from_profiles(profiles[idx], labels[idx])
                self.optimizer.zero_grad(set_to_none=True)
                terms["total"].backward()
                self.optimizer.step()

    @torch.no_grad()
    def score(self, dataset: Dataset) -> Dict[str, float]:
        """Accuracy of every named prediction on ``dataset`` with the model as it is now.

        A kNN head first gets a memory of the current training profiles, so its score is
        meaningful mid-training (the final memory is built the same way after projection).
        """
        if self.model.head.uses_memory:
            self.model.head.fit_memory(*self.profiles(self.splits.train_plain))
        metrics = evaluate(self.model, dataset, self.config.eval_batch_size, self.device, workers=self.config.workers)
        self.model.train()
        return {k: v for k, v in metrics.items() if k.startswith("accuracy[")}

    def _validation(self) -> Dict[str, float]:
        """Validation accuracies as ``val_accuracy[...]`` plus ``val_accuracy`` (the head's primary)."""
        val = getattr(self.splits, "val", None)
        if val is None:
            return {}
        scores = {"val_" + k: v for k, v in self.score(val).items()}
        scores["val_accuracy"] = scores.get(f"val_accuracy[{self.model.head.primary}]", float("nan"))
        return scores

    @property
    def projects(self) -> bool:
        """Whether the head's phases push its prototypes onto training patches."""
        return any("project" in p.after for p in self.phases)

    def _keep_best(self, scores: Dict[str, float], where: Dict[str, Any]) -> None:
        """Write best.pt when the validation accuracy beats every earlier one (ties: the later,
        more trained model). An un-projected model of a projecting head competes only for
        best-unprojected.pt."""
        acc = scores.get("val_accuracy")
        if acc is None or acc != acc:
            return
        st = self.state
        prefix, name = ("best_unprojected", BEST_UNPROJECTED_NAME) if st.projected is False else ("best", BEST_NAME)
        best = getattr(st, f"{prefix}_val_accuracy")
        if best is not None and acc < best:
            return
        setattr(st, f"{prefix}_val_accuracy", float(acc))
        setattr(st, f"{prefix}_epoch", {**where, "val_accuracy": float(acc), "projected": st.projected})
        if self._writes():
            save_atomic(self.checkpoint_state(), self.out_dir / name)

    def _record_stage(self, phase: Phase, when: str) -> None:
        if self.stage_eval is not None:
            self.state.stages.append({"phase": phase.name, "phase_index": self.state.phase, "when": when,
                                      **self.score(self.stage_eval),
                                      **self.model.head.stage_info(lambda: self.profiles(self.stage_eval)[0])})

    def _after(self, phase: Phase) -> None:
        if phase.after:
            self._record_stage(phase, "before " + "+".join(phase.after))
        push: Optional[Dict[str, Any]] = None
        for action in phase.after:
            if action == "project":
                before = self._current_validation()
                record = self.model.project_prototypes(self._plain(self.splits.train_plain))
                self.state.projected = True
                push = {"phase": phase.name, "phase_index": self.state.phase, "global_step": self.state.global_step,
                        **projection_summary(record), "val_accuracy_before": before.get("val_accuracy")}
            elif action == "build_memory":
                profiles, labels = self.profiles(self.splits.train_plain)
                self.model.head.fit_memory(profiles, labels)
            elif action in self.model.head.actions:
                self.model.head.run_action(action, lambda: self.profiles(self.splits.train_plain))
            else:
                raise ProtoKNNError(f"phase {phase.name!r} asks for unknown action {action!r}")
        self._fresh_scores = None
        if push is not None:  # after the push and the rebuilt memory: the projection's own cost
            push["val_accuracy_after"] = self._current_validation().get("val_accuracy")
            self.state.pushes.append(push)
        self._record_stage(phase, "end")

    def _current_validation(self) -> Dict[str, float]:
        """Validation scores of the model as it is now (those of the last epoch when nothing trained since)."""
        if self._fresh_scores is None:
            self._fresh_scores = self._validation()
        return self._fresh_scores

    def _record_epoch(self, entry: Dict[str, Any], bar) -> None:
        self.state.history.append(entry)
        if bar is not None:
            bar.epoch_done(entry)
        if not self._writes():
            return
        write_metrics_csv(self.out_dir / METRICS_CSV, self.state.history)
        if self.config.tensorboard:
            if self._tensorboard is None:
                self._tensorboard = TensorBoardWriter(self.out_dir / "tensorboard", purge_step=entry["global_step"])
            self._tensorboard.add(entry)

    def fit(self, resume: bool = False) -> TrainState:
        if resume:
            self.resume()
        else:
            seed_everything(self.config.seed)
        try:
            return self._fit()
        finally:
            if self._tensorboard is not None:
                self._tensorboard.close()
                self._tensorboard = None

    def _fit(self) -> TrainState:
        st = self.state
        started = time.perf_counter() - st.train_seconds
        bar = make_progress(self.progress and distributed.is_main())
        with SignalGuard() as guard, (bar or _NullContext()):
            while st.phase < len(self.phases):
                phase = self.phases[st.phase]
                if self.optimizer is None:
                    self._build_optimizer(phase)
                if phase.cached_profiles:
                    self._run_cached_phase(phase)
                    self._fresh_scores = None
                    st.epoch = phase.epochs
                while st.epoch < phase.epochs:
                    logs = self._run_epoch(phase, guard, bar)
                    st.epoch += 1
                    self._sync_buffers()
                    if self.projects:  # training moved the embedding or the prototypes off their patches
                        st.projected = logs["projected"] = False
                    scores = self._fresh_scores = self._validation()
                    logs.update(scores)
                    st.train_seconds = time.perf_counter() - started
                    self._record_epoch({"phase": phase.name, "epoch": st.epoch, "global_step": st.global_step,
                                        "seconds": st.train_seconds, **logs}, bar)
                    self._keep_best(scores, {"phase": phase.name, "epoch": st.epoch, "when": "after epoch"})
                    self.save()
                    guard.raise_if_received()
                    if self.on_epoch is not None:
                        self.on_epoch(st.history)
                self._keep_optimizer(phase)
                self._after(phase)
                st.phase, st.epoch = st.phase + 1, 0
                self.optimizer, self.scheduler = None, None
                st.train_seconds = time.perf_counter() - started
                if st.phase == len(self.phases):
                    st.complete = True
                if st.projected or (st.complete and not self.projects):
                    # A projected model (after its push, memory or last layer) competes for best.pt;
                    # so does the finished model of a head that never projects.
                    self._keep_best(self._current_validation(),
                                    {"phase": phase.name, "epoch": phase.epochs, "when": "end of phase"})
                self.save()
                # Also after the last phase: a signal that arrived during projection or the kNN
                # memory must still stop the caller (a benchmark would go on to the next run).
                # The run is saved complete, so resuming it only returns.
                guard.raise_if_received()
        return st


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
