"""The trainer: follows the head's declared phases, checkpoints atomically, resumes exactly.

Every epoch's batch order is drawn up front from pytorch-metric-learning's
class-balanced MPerClassSampler and stored in the checkpoint together with every
RNG state, so a run interrupted mid-epoch (SIGINT/SIGTERM) resumes bit-for-bit on CPU.
"""
from __future__ import annotations

import json
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from . import distributed
from .checkpoint import CHECKPOINT_NAME, check_compatible, ensure_writable_dir, load_checkpoint, save_atomic
from .errors import ProtoKNNError
from .heads.base import Phase
from .losses import single_class_guard
from .model import ModelConfig, PrototypeModel
from .schedules import build_optimizer, steps_per_epoch_schedule


@dataclass
class TrainConfig:
    """How to train. ``steps_per_epoch=None`` means len(train) // batch size."""

    epochs: int = 4
    batch_classes: int = 10
    per_class: int = 11
    steps_per_epoch: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 256
    deterministic: bool = False
    threads: Optional[int] = None
    # Steps between host syncs (loss check, progress bar). None: every step on CPU, where a
    # sync is free, and every 10 on GPU, where it stalls the queue.
    sync_every: Optional[int] = None
    # Share of the training set held out as a validation split (stratified, fixed seed, the
    # same for every run seed so that paired comparisons see the same data). 0: none.
    val_fraction: float = 0.0

    @property
    def batch_size(self) -> int:
        return self.batch_classes * self.per_class


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ProtoKNNError(f"--device {name} asked for a GPU but torch sees none; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ProtoKNNError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None


def seed_everything(seed: int) -> None:
    from pytorch_metric_learning.utils import common_functions as c_f

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # MPerClassSampler draws from PML's own numpy RandomState, not from torch.
    c_f.NUMPY_RANDOM = np.random.RandomState(seed)


def rng_state() -> Dict[str, Any]:
    from pytorch_metric_learning.utils import common_functions as c_f

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "pml": c_f.NUMPY_RANDOM.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    from pytorch_metric_learning.utils import common_functions as c_f

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    c_f.NUMPY_RANDOM.set_state(state["pml"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class IndexedDataset(Dataset):
    """Wraps a dataset so items are (image, label, index): projection records source images."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return image, label, i


class SeededItems(Dataset):
    """Items are fetched as ``(index, seed)`` and augmented under that seed.

    Augmentations then depend only on the item's place in the global batch, not on
    which process loads it or whether the run was resumed in between.
    """

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]


def item_seed(run_seed: int, global_step: int, position: int) -> int:
    return (run_seed * 1_000_003 + global_step * 65_537 + position) % (2**62)


def plain_loader(dataset: Dataset, batch_size: int, sharded: bool = False) -> DataLoader:
    """Batches of (image, label, index) in dataset order; ``sharded``: only this rank's part."""
    indexed = IndexedDataset(dataset)
    if sharded and distributed.is_active():
        indexed = torch.utils.data.Subset(indexed, range(distributed.rank(), len(indexed), distributed.world_size()))
    return DataLoader(indexed, batch_size=batch_size, shuffle=False, num_workers=0)


def epoch_batches(labels: Tensor, config: TrainConfig) -> List[List[int]]:
    """One epoch of class-balanced batches from PML's MPerClassSampler, drawn up front."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    counts = torch.bincount(labels)
    present = int((counts > 0).sum())
    if config.batch_classes < 2:
        raise ProtoKNNError("--batch-classes must be at least 2: a batch with a single class has no negatives")
    if config.batch_classes > present:
        raise ProtoKNNError(
            f"--batch-classes {config.batch_classes} is more than the {present} classes in the training set; lower it"
        )
    smallest = int(counts[counts > 0].min())
    if config.per_class > smallest:
        raise ProtoKNNError(
            f"--per-class {config.per_class} is larger than the smallest class ({smallest} images); lower --per-class"
        )
    batch = config.batch_size
    steps = config.steps_per_epoch or max(1, len(labels) // batch)
    sampler = MPerClassSampler(labels.numpy(), m=config.per_class, batch_size=batch,
                               length_before_new_iter=steps * batch)
    order = list(iter(sampler))
    return [order[i * batch:(i + 1) * batch] for i in range(len(order) // batch)]


@dataclass
class TrainState:
    phase: int = 0
    epoch: int = 0  # epoch within the phase
    step: int = 0  # step within the epoch
    global_step: int = 0
    batches: Optional[List[List[int]]] = None  # the current epoch's batch order
    epoch_sums: Dict[str, float] = field(default_factory=dict)  # loss sums so far in this epoch (for logging)
    history: List[Dict[str, Any]] = field(default_factory=list)
    # Accuracy at phase boundaries (e.g. ProtoPNet before push, after push, after last layer).
    stages: List[Dict[str, Any]] = field(default_factory=list)
    # Optimiser and scheduler states kept across phases that share an optimizer_key.
    optimizer_states: Dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    train_seconds: float = 0.0


class Interrupted(Exception):
    """Raised after the step in flight when SIGINT/SIGTERM arrived; the checkpoint is written."""


class _SignalGuard:
    """Turns SIGINT/SIGTERM into a flag checked between steps."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old: Dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """Trains a PrototypeModel on DatasetSplits following ``model.head.phases``."""

    def __init__(self, model: PrototypeModel, splits, config: TrainConfig, out_dir: Optional[str] = None,
                 progress: bool = True, dataset_name: str = "", on_step: Optional[Callable[[int], None]] = None,
                 data_info: Optional[Dict[str, Any]] = None, stage_eval: Optional[Dataset] = None):
        """``stage_eval``: a dataset scored at every phase boundary (recorded in ``state.stages``)."""
        from .data.base import carve_validation

        if config.val_fraction and getattr(splits, "val", None) is None:
            splits = carve_validation(splits, config.val_fraction)
        self.model, self.splits, self.config = model, splits, config
        self.stage_eval = stage_eval
        self.out_dir = ensure_writable_dir(out_dir) if out_dir else None
        self.progress = progress
        self.dataset_name = dataset_name or getattr(splits, "name", "")
        self.data_info = dict(data_info or {})  # data_dir, limit: how to rebuild the data for evaluate/explain
        self.device = distributed.setup(resolve_device(config.device))
        if distributed.is_active() and self.device.type == "cuda":
            # Global batch statistics, as one process would see them (CPU has no SyncBatchNorm).
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.model.to(self.device)
        model.head.check_data(splits.train_labels)  # fail now, not after hours of training
        self.phases: List[Phase] = model.head.phases(config.epochs, model.pretrained_backbone)
        self.state = TrainState()
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None
        self.on_step = on_step
        self.sync_every = config.sync_every or (1 if self.device.type == "cpu" else 10)
        self.steps_per_epoch = config.steps_per_epoch or max(1, len(splits.train_labels) // config.batch_size)
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._cached: Optional[Tuple[Tensor, Tensor]] = None

    # ---- checkpoints ---------------------------------------------------------------
    def checkpoint_state(self) -> Dict[str, Any]:
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
            "train_state": asdict(self.state),
            "rng": rng_state(),
        }

    def save(self) -> None:
        if self.out_dir is not None and distributed.is_main():  # one set of checkpoints per run
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
        load_model_state(self.model, saved)
        self.state = TrainState(**saved["train_state"])
        if not self.state.complete and self.state.phase < len(self.phases):
            self._build_optimizer(self.phases[self.state.phase])
            if saved.get("optimizer"):
                self.optimizer.load_state_dict(saved["optimizer"])
            if self.scheduler is not None and saved.get("scheduler"):
                self.scheduler.load_state_dict(saved["scheduler"])
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

    def _keep_optimizer(self, phase: Phase) -> None:
        if phase.optimizer_key and self.optimizer is not None:
            self.state.optimizer_states[phase.optimizer_key] = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None}

    def _loader(self, batches: List[List[int]], first_step: int) -> DataLoader:
        """This rank's shard of each global batch, every item with its own augmentation seed."""
        keyed = [distributed.shard([(index, item_seed(self.config.seed, first_step + j, pos))
                                    for pos, index in enumerate(batch)])
                 for j, batch in enumerate(batches)]
        # A private generator: creating a DataLoader iterator draws a seed, and drawing it
        # from the global RNG would shift the Gumbel draws of a resumed run.
        return DataLoader(SeededItems(self.splits.train), batch_sampler=keyed, num_workers=0,
                          generator=torch.Generator())

    def _train_step(self, images: Tensor, labels: Tensor) -> Dict[str, Tensor]:
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        out = distributed.gather_outputs(self.model(images))
        if distributed.is_active():
            gathered = distributed.gather_with_grad(labels)
            labels = gathered[distributed.unshard_order(len(gathered)).to(gathered.device)]
        try:
            terms = self.model.head.loss(out, labels)
        except ProtoKNNError as err:  # e.g. the cluster loss refusing NaN profiles: say when
            kept = "; the last good checkpoint is kept" if "non-finite" in str(err) else ""
            raise ProtoKNNError(f"at step {self.state.global_step + 1}: {err}{kept}") from None
        if self.sync_every == 1:  # check before the update, so the weights stay finite
            self._check_finite(terms, self.state.global_step + 1)
        else:  # remember on the device; checked at the next sync point
            self._nonfinite = self._nonfinite | ~torch.isfinite(terms["total"].detach())
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        if distributed.is_active():
            before_gather = [p for name in ("backbone", "addon", "prototypes") for p in self.components.get(name, [])]
            local_ids = {id(p) for p in before_gather}
            distributed.reduce_gradients(
                local=before_gather,
                shared=[p for g in self.optimizer.param_groups for p in g["params"] if id(p) not in local_ids])
        self.optimizer.step()
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

    def _run_epoch(self, phase: Phase, guard: _SignalGuard, bar) -> Dict[str, float]:
        st = self.state
        if st.batches is None:
            st.batches = epoch_batches(self.splits.train_labels, self.config)
            st.step = 0
        self.model.train()
        # Loss sums stay on the device between sync points (no per-step .item()).
        sums: Dict[str, Any] = dict(st.epoch_sums)  # carries over a resumed epoch's first part
        seen, started = 0, time.perf_counter()
        labels_all = self.splits.train_labels
        for j, (images, labels) in enumerate(self._loader(st.batches[st.step:], st.global_step)):
            single_class_guard(labels_all[st.batches[st.step]])  # the global batch, on the host
            terms = self._train_step(images, labels)
            st.step += 1
            st.global_step += 1
            seen += len(labels)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            at_sync = st.step % self.sync_every == 0 or st.step == len(st.batches) or guard.received is not None
            if at_sync:
                self._check_finite(terms, st.global_step)
                st.epoch_sums = {k: float(v) for k, v in sums.items()}
                if bar is not None:
                    rate = seen / max(time.perf_counter() - started, 1e-9)
                    bar.update(phase.name, st, len(st.batches), {k: v / st.step for k, v in st.epoch_sums.items()},
                               rate)
            if self.on_step is not None:
                self.on_step(st.global_step)
            if guard.received is not None:
                self.save()
                raise Interrupted(signal.Signals(guard.received).name)
        if self.scheduler is not None and not self._step_schedule:
            self.scheduler.step()
        means = {k: v / max(len(st.batches), 1) for k, v in st.epoch_sums.items()}
        means["lr"] = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        st.batches, st.step, st.epoch_sums = None, 0, {}
        return means

    def _sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics everywhere, so every rank projects and evaluates the same model."""
        if distributed.is_active():
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, 0)

    def _cached_profiles(self) -> Tuple[Tensor, Tensor]:
        profiles, labels = self.profiles(self.splits.train_plain)
        return profiles, labels

    @torch.no_grad()
    def profiles(self, dataset: Dataset) -> Tuple[Tensor, Tensor]:
        """Profiles (N, P) and labels (N,) of a dataset in order, in eval mode."""
        was = self.model.training
        self.model.eval()
        outs, labels = [], []
        for images, y, _ in plain_loader(dataset, self.config.eval_batch_size):
            outs.append(self.model(images.to(self.device)).profile)
            labels.append(y)
        self.model.train(was)
        return torch.cat(outs), torch.cat(labels).to(self.device)

    def _run_cached_phase(self, phase: Phase) -> None:
        profiles, labels = self._cached_profiles()
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
        metrics = evaluate(self.model, dataset, self.config.eval_batch_size, self.device)
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

    def _record_stage(self, phase: Phase, when: str) -> None:
        if self.stage_eval is not None:
            self.state.stages.append({"phase": phase.name, "phase_index": self.state.phase, "when": when,
                                      **self.score(self.stage_eval)})

    def _after(self, phase: Phase) -> None:
        if phase.after:
            self._record_stage(phase, "before " + "+".join(phase.after))
        for action in phase.after:
            if action == "project":
                self.model.project_prototypes(plain_loader(self.splits.train_plain, self.config.eval_batch_size))
            elif action == "build_memory":
                profiles, labels = self.profiles(self.splits.train_plain)
                self.model.head.fit_memory(profiles, labels)
            else:
                raise ProtoKNNError(f"phase {phase.name!r} asks for unknown action {action!r}")
        self._record_stage(phase, "end")

    def fit(self, resume: bool = False) -> TrainState:
        if resume:
            self.resume()
        else:
            seed_everything(self.config.seed)
        st = self.state
        started = time.perf_counter() - st.train_seconds
        bar = _ProgressBar(self.phases) if self.progress and distributed.is_main() else None
        with _SignalGuard() as guard, (bar or _NullContext()):
            while st.phase < len(self.phases):
                phase = self.phases[st.phase]
                if self.optimizer is None:
                    self._build_optimizer(phase)
                if phase.cached_profiles:
                    self._run_cached_phase(phase)
                    st.epoch = phase.epochs
                while st.epoch < phase.epochs:
                    logs = self._run_epoch(phase, guard, bar)
                    st.epoch += 1
                    self._sync_buffers()
                    logs.update(self._validation())
                    st.history.append({"phase": phase.name, "epoch": st.epoch, "global_step": st.global_step,
                                       "seconds": time.perf_counter() - started, **logs})
                    st.train_seconds = time.perf_counter() - started
                    self.save()
                    if guard.received is not None:
                        raise Interrupted(signal.Signals(guard.received).name)
                self._keep_optimizer(phase)
                self._after(phase)
                st.phase, st.epoch = st.phase + 1, 0
                self.optimizer, self.scheduler = None, None
                st.train_seconds = time.perf_counter() - started
                if st.phase == len(self.phases):
                    st.complete = True
                self.save()
                if guard.received is not None and not st.complete:
                    raise Interrupted(signal.Signals(guard.received).name)
        return st


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _ProgressBar:
    """A rich progress bar: phase, epoch, step, loss terms and images per second."""

    def __init__(self, phases: List[Phase]):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[terms]}"), TimeElapsedColumn(), transient=False)
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("train", total=1, terms="")
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, phase: str, st: TrainState, steps: int, means: Dict[str, float], rate: float) -> None:
        terms = " ".join(f"{k} {v:.3f}" for k, v in means.items()) + f"  {rate:.0f} img/s"
        self.progress.update(self.task, description=f"{phase} epoch {st.epoch + 1}", completed=st.step,
                             total=steps, terms=terms)


def load_model_state(model: PrototypeModel, saved: Dict[str, Any]) -> None:
    """Load weights (including a kNN memory of any size) and the projection record."""
    model.load_state_dict(saved["model"])
    model.load_projection_state(saved.get("projection"))


def model_from_checkpoint(path) -> Tuple[PrototypeModel, Dict[str, Any]]:
    """Rebuild the model of a run directory (or checkpoint file) with its weights."""
    saved = load_checkpoint(path)
    cfg = dict(saved["model_config"])
    cfg["weights"] = "none"  # the trained weights come from the checkpoint, not from the original source
    model = PrototypeModel(ModelConfig(**cfg), for_loading=True)
    load_model_state(model, saved)
    model.config.weights = saved["model_config"].get("weights")
    return model, saved


@torch.no_grad()
def evaluate(model: PrototypeModel, dataset: Dataset, batch_size: int = 256,
             device: Optional[torch.device] = None) -> Dict[str, float]:
    """Accuracy of every named prediction (``top1`` or ``k=1``, ``k=3``, ...) and images per second."""
    device = device or next(model.parameters()).device
    model.eval()
    correct: Dict[str, int] = {}
    total, started = 0, time.perf_counter()
    # Under torchrun every rank evaluates its shard; the counts are summed over ranks.
    for images, labels, _ in plain_loader(dataset, batch_size, sharded=True):
        preds = model.predict_all(images.to(device))
        for name, p in preds.items():
            correct[name] = correct.get(name, 0) + int((p.cpu() == labels).sum())
        total += len(labels)
    if distributed.is_active():
        names = sorted(correct)
        counts = distributed.all_reduce_sum(torch.tensor([total] + [correct[n] for n in names], dtype=torch.float64))
        total, correct = int(counts[0]), {n: int(c) for n, c in zip(names, counts[1:])}
    seconds = time.perf_counter() - started
    if total == 0:
        raise ProtoKNNError("the evaluation set is empty; check the dataset path and --limit")
    metrics = {f"accuracy[{name}]": c / total for name, c in correct.items()}
    metrics["images_per_second"] = total / max(seconds, 1e-9)
    metrics["test_images"] = total
    return metrics


def write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
