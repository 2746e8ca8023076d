"""One training step per head on the same backbone and batch, split into its parts.

Every head (``protoknn``, ``protopnet`` and the plain ``cnn`` reference) is built as
``PrototypeModel(ModelConfig(head=...))`` with one seed, so all start from the same backbone
weights, and is given the trainer's own optimiser (``Trainer.optimizers.build``) for its first
phase that trains the backbone (ProtoKNN ``train``, ProtoPNet ``joint``, cnn ``train``). One
fixed random batch (B, C, H, W) with class-balanced labels (``--batch-classes`` x ``--per-class``)
feeds every step.

Timed, median over ``--repeats`` after ``--warmup`` (heads round-robin, so load changes on a
shared machine hit every head alike):

  full step     ``Trainer._train_step``: forward, loss, finiteness check, backward, Adam step
  split step    the same work cut into backbone forward, prototype layer forward, head loss,
                backward + optimiser step; inside it (forward only, not backpropagated) the
                head loss's parts: task loss, cluster loss (ProtoKNN: sampling ``sample_counts``,
                ``affiliation``, ``transport_plan``, the weighted sum, and the whole loss module),
                aux loss (ProtoKNN: metric loss on g = Linear(GAP); ProtoPNet: the L1 term)

Before every timed step the model, the optimiser state and the RNG are restored to one
snapshot, so every repeat does exactly the same work (same Gumbel draws, same Sinkhorn
iterations). Peak memory of one full step: CUDA ``max_memory_allocated``; on the CPU the
process's VmHWM (/proc/self/status) after ``malloc_trim`` and a reset via /proc/self/clear_refs,
with the step's growth over the resident set before it.

Headline: ProtoKNN full step / ProtoPNet full step, same process, same batch. Targets: <= 1.25
with the small CNN at 28 px, <= 1.05 with a big backbone (resnet50 at 224 px).

    python benchmarks/bench_step.py --threads 1                          # small CNN, 10 x 11, P 100, D 64
    python benchmarks/bench_step.py --batch-classes 56 --per-class 2 --prototypes 512 --dim 256
    python benchmarks/bench_step.py --threads 1 --heads full=protoknn relaxed=protoknn \
        --head-opt relaxed.cluster_variant=full-relaxed       # rows of one head with other options
    python benchmarks/bench_step.py --backbone resnet50 --batch-classes 56 --per-class 2 \\
        --prototypes 512 --dim 256 --device cuda --out bench-out/step-resnet50.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import statistics
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _stub_faiss_if_missing() -> bool:
    """Put a stub in place of faiss when it is not installed; returns whether it did.

    ``protoknn_plugin.knn`` imports faiss at import time, but a training step never searches
    the kNN memory, and GPU images often lack faiss-cpu. Any use of the stub raises.
    """
    try:
        import faiss  # noqa: F401
        return False
    except ImportError:
        stub = types.ModuleType("faiss")

        def __getattr__(name):
            raise AttributeError(f"faiss.{name}: faiss is not installed (bench_step.py stubbed it; "
                                 f"a training step never searches the kNN memory)")

        stub.__getattr__ = __getattr__
        sys.modules["faiss"] = stub
        return True


FAISS_STUBBED = _stub_faiss_if_missing()

from protoknn_plugin import transport as transport_module  # noqa: E402
from protoknn_plugin.backbones import BACKBONES  # noqa: E402
from protoknn_plugin.cluster import affiliation, sample_counts, transport_plan  # noqa: E402
from protoknn_plugin.errors import ProtoKNNError  # noqa: E402
from protoknn_plugin.heads import HEADS as HEAD_REGISTRY  # noqa: E402
from protoknn_plugin.heads.base import Phase  # noqa: E402
from protoknn_plugin.heads.options import assign_head_options, parse_rows  # noqa: E402
from protoknn_plugin.model import ModelConfig, PrototypeModel  # noqa: E402
from protoknn_plugin.prototypes import PrototypeOutputs  # noqa: E402
from protoknn_plugin.train import TrainConfig, Trainer, resolve_device  # noqa: E402

HEADS = ("protoknn", "protopnet", "cnn")
MIB = 2.0 ** 20

# Rows of the split, in print order; indented rows are parts of the row above them.
FULL = "full step"
BACKBONE = "backbone forward"
PROTO = "prototype layer forward"
HEAD_LOSS = "head loss (all)"
TASK = "  task loss"
CLUSTER = "  cluster loss (all)"
SAMPLING = "    sampling (sample_counts)"
AFFIL = "    affiliation"
TRANSPORT = "    transport (transport_plan)"
WSUM = "    weighted sum"
AUX = "  aux loss"
BACKWARD = "backward + optimiser step"
SPLIT_SUM = "sum of split (backbone+proto+head+backward)"
ROWS = (FULL, BACKBONE, PROTO, HEAD_LOSS, TASK, CLUSTER, SAMPLING, AFFIL, TRANSPORT, WSUM, AUX, BACKWARD,
        SPLIT_SUM)


# ---------------------------------------------------------------- timing and memory
class Clock:
    """Times calls by name: wall ms (on CUDA synchronised before and after) and process CPU ms.

    On the CPU with one torch thread the CPU time is the work itself: other processes on a
    shared machine stretch the wall time far more than they stretch it.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.wall_ms: Dict[str, float] = {}
        self.cpu_ms: Dict[str, float] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, key: str, fn: Callable[[], object]):
        self.sync()
        cpu_start, start = time.process_time(), time.perf_counter()
        result = fn()
        self.sync()
        self.wall_ms[key] = (time.perf_counter() - start) * 1e3
        self.cpu_ms[key] = (time.process_time() - cpu_start) * 1e3
        return result

    def reset(self) -> None:
        self.wall_ms, self.cpu_ms = {}, {}


def _status_bytes(field_name: str) -> Optional[int]:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> bool:
    """Give freed heap memory back to the OS, so RSS is close to the live memory before a step."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0) >= 0)
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def count_sinkhorn_iterations(into: List[int]):
    """Record the iteration count of every Sinkhorn solve of the cluster loss (split step only)."""
    original = getattr(transport_module, "log_sinkhorn_batched", None)
    if original is None:
        yield
        return

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        into.append(int(result.n_iter))
        return result

    transport_module.log_sinkhorn_batched = recording  # the name transport_plan calls
    try:
        yield
    finally:
        transport_module.log_sinkhorn_batched = original


# ---------------------------------------------------------------- the head loss's parts
def protoknn_parts(head, out: PrototypeOutputs, labels: torch.Tensor, clock: Clock,
                   info: Dict[str, object]) -> None:
    """ProtoKNNHead.loss cut into its terms (eq. 13) and the cluster loss into its four steps."""
    clock.time(TASK, lambda: head.task_loss(out.profile, labels))
    loss = head.cluster_loss
    weighted = out.gap_cost if loss.uses_gap_cost else out.cost
    if loss.variant in ("linear-assignment", "full"):
        counts = clock.time(SAMPLING, lambda: sample_counts(out.profile, loss.tau))
        (classes, affil) = clock.time(AFFIL, lambda: affiliation(counts, labels, debias=True))
        plan = clock.time(TRANSPORT, lambda: transport_plan(
            weighted, labels, classes, affil, reg=loss.reg, max_iter=loss.max_iter, tol=loss.tol,
            solver=loss.solver))
        info["transport_width"] = int((affil > 0).sum(dim=1).max())  # prototypes solved per class
        scale = 1.0 / weighted.shape[0] if loss.reduction == "mean" else 1.0
        clock.time(WSUM, lambda: (plan.to(weighted.dtype) * weighted).sum() * scale)
    clock.time(CLUSTER, lambda: loss(out.profile, out.cost, out.gap_cost, labels))
    if head.aux_embedding is not None:
        clock.time(AUX, lambda: head.aux_loss(
            head.aux_embedding(out.backbone_features.mean(dim=(2, 3))), labels))


def protopnet_parts(head, out: PrototypeOutputs, labels: torch.Tensor, clock: Clock,
                    info: Dict[str, object]) -> None:
    """ProtoPNetHead.loss's terms, written out as heads/protopnet.py computes them (timing only)."""
    clock.time(TASK, lambda: F.cross_entropy(head.last_layer(out.profile), labels))

    def cluster_and_separation():
        own = head.prototype_class[None, :] == labels[:, None]
        inf = torch.finfo(out.cost.dtype).max
        return (out.cost.masked_fill(~own, inf).min(dim=1).values.mean(),
                out.cost.masked_fill(own, inf).min(dim=1).values.mean())

    clock.time(CLUSTER, cluster_and_separation)
    clock.time(AUX, head._l1)  # ProtoPNet's third term: L1 on the off-class last-layer weights


def cnn_parts(head, out: PrototypeOutputs, labels: torch.Tensor, clock: Clock,
              info: Dict[str, object]) -> None:
    clock.time(TASK, lambda: F.cross_entropy(head.logits(out), labels))


PARTS = {"protoknn": protoknn_parts, "protopnet": protopnet_parts, "cnn": cnn_parts}


# ---------------------------------------------------------------- one head
@dataclass
class HeadBench:
    name: str  # the row label (the head name unless --heads gave LABEL=HEAD)
    head: str  # the registered head
    model: PrototypeModel
    trainer: Trainer
    phase: Phase
    snapshot: Optional[Tuple[dict, dict]] = None
    wall_ms: Dict[str, List[float]] = field(default_factory=dict)  # row -> one value per repeat
    cpu_ms: Dict[str, List[float]] = field(default_factory=dict)
    sinkhorn_iterations: List[int] = field(default_factory=list)
    info: Dict[str, object] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    def record(self, clock: Clock) -> None:
        for key, value in clock.wall_ms.items():
            self.wall_ms.setdefault(key, []).append(value)
        for key, value in clock.cpu_ms.items():
            self.cpu_ms.setdefault(key, []).append(value)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.trainer.optimizer

    def take_snapshot(self) -> None:
        self.snapshot = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict()))

    def restore(self, seed: int) -> None:
        """Same weights, optimiser state and RNG before every timed step: every repeat is the same work."""
        model_state, opt_state = self.snapshot
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(opt_state)
        self.optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(seed)


def pick_phase(phases: List[Phase]) -> Phase:
    """The first phase that trains the backbone from images (the step every head shares)."""
    trains_images = [p for p in phases if not p.cached_profiles]
    for phase in trains_images:
        if "backbone" in phase.lrs:
            return phase
    if not trains_images:
        raise ProtoKNNError("the head declares no phase that trains on images; nothing to benchmark")
    return trains_images[0]


def build_head(label: str, name: str, options: Dict[str, object], args, device: torch.device) -> HeadBench:
    config = ModelConfig(head=name, backbone=args.backbone, num_classes=args.num_classes,
                         in_channels=args.in_channels, num_prototypes=args.prototypes, dim=args.dim,
                         weights=args.weights, seed=args.seed, head_options=dict(options))
    model = PrototypeModel(config)
    train = TrainConfig(epochs=args.epochs, batch_classes=args.batch_classes, per_class=args.per_class,
                        seed=args.seed, device=str(device))
    # The trainer needs only the training labels to lay out its phases (and to check k against
    # the smallest class); no data is read. At least 10 per class, as a real training set has.
    labels = torch.arange(args.num_classes).repeat_interleave(max(args.per_class, 10))
    splits = types.SimpleNamespace(train_labels=labels, name="synthetic",
                                   classes=[str(c) for c in range(args.num_classes)])
    trainer = Trainer(model, splits, train, progress=False)
    phase = pick_phase(trainer.phases)
    trainer.optimizers.build(phase)  # the trainer's own Adam groups and learning rates
    model.train()
    bench = HeadBench(label, name, model, trainer, phase)
    layer = model.prototype_layer
    bench.info.update({
        "head": name, "head_options": dict(options), "phase": phase.name, "phase_lrs": dict(phase.lrs),
        "prototypes": None if layer is None else layer.num_prototypes,
        "dim": None if layer is None else int(layer.prototypes.shape[1]),
        "trainable_parameters": sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]),
    })
    return bench


def full_step(bench: HeadBench, images: torch.Tensor, labels_host: torch.Tensor) -> None:
    bench.trainer._train_step(images, labels_host)


def split_step(bench: HeadBench, images: torch.Tensor, labels: torch.Tensor, clock: Clock) -> None:
    """The full step's work cut into timed segments (into ``clock``); the head loss's parts inside it."""
    model, head, optimizer = bench.model, bench.model.head, bench.optimizer
    features = clock.time(BACKBONE, lambda: model.backbone(images))
    if model.prototype_layer is not None:
        out = clock.time(PROTO, lambda: model.prototype_layer(features))
    else:
        out = PrototypeOutputs(None, None, None, None, None, features)
    parts = PARTS.get(bench.head)
    if parts is not None:
        iterations: List[int] = []
        with count_sinkhorn_iterations(iterations):
            parts(head, out, labels, clock, bench.info)
        if iterations:
            bench.sinkhorn_iterations.extend(iterations)  # one per solve
    terms = clock.time(HEAD_LOSS, lambda: head.loss(out, labels))

    def backward_and_step():
        bench.trainer.finite.check(terms, bench.trainer.state.global_step)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()

    clock.time(BACKWARD, backward_and_step)
    for times in (clock.wall_ms, clock.cpu_ms):
        times[SPLIT_SUM] = times[BACKBONE] + times.get(PROTO, 0.0) + times[HEAD_LOSS] + times[BACKWARD]


@contextlib.contextmanager
def recorded_warnings(into: List[str]):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    into.extend(str(w.message).split(";")[0] for w in caught)


def peak_memory(bench: HeadBench, images, labels_host, device: torch.device, seed: int) -> Dict[str, object]:
    """Peak memory of one full step (after the timed ones, from the same snapshot)."""
    bench.restore(seed)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        full_step(bench, images, labels_host)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
        return {"how": "torch.cuda.max_memory_allocated", "peak_mib": peak / MIB,
                "step_mib": (peak - base) / MIB, "before_step_mib": base / MIB}
    trimmed = _malloc_trim()
    reset = _reset_hwm()
    base = _status_bytes("VmRSS")
    full_step(bench, images, labels_host)
    peak = _status_bytes("VmHWM")
    if base is None or peak is None:
        return {"how": "unavailable (no /proc/self/status)", "peak_mib": None, "step_mib": None}
    return {"how": "VmHWM of the process" + (" after malloc_trim" if trimmed else "")
                   + ("" if reset else " (clear_refs failed: HWM since process start)"),
            "peak_mib": peak / MIB, "step_mib": (peak - base) / MIB if reset else None,
            "before_step_mib": base / MIB}


def profile_step(bench: HeadBench, images, labels_host, kind: str, seed: int, path: Path) -> str:
    """One full step under cProfile (top functions by own time) or torch.profiler (top ops)."""
    bench.restore(seed)
    if kind == "cprofile":
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        full_step(bench, images, labels_host)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        text = buf.getvalue()
    else:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if images.is_cuda else [])
        with profile(activities=activities, record_shapes=True) as prof:
            full_step(bench, images, labels_host)
        sort = "self_device_time_total" if images.is_cuda else "self_cpu_time_total"
        text = prof.key_averages().table(sort_by=sort, row_limit=25)
    path.write_text(text)
    return text


# ---------------------------------------------------------------- the run
def make_batch(args, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fixed random images (B, C, H, W) and class-balanced labels (B,), per_class of each class."""
    g = torch.Generator().manual_seed(args.seed)
    b = args.batch_classes * args.per_class
    images = torch.randn(b, args.in_channels, args.image_size, args.image_size, generator=g)
    labels = torch.arange(args.batch_classes).repeat_interleave(args.per_class)
    return images.to(device), labels


def run(args) -> Dict[str, object]:
    device = resolve_device(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and args.tf32 != "default":
        # the trainer runs with torch's defaults (TF32 off for matmuls, on for cuDNN convolutions)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    clock = Clock(device)
    images, labels_host = make_batch(args, device)
    labels = labels_host.to(device)
    benches = [build_head(label, name, args.row_options[label], args, device) for label, name in args.rows]

    # Prime: one full and one split step per head (lazy Adam state, allocator, kernels), then
    # the snapshot that every later step starts from.
    for bench in benches:
        with recorded_warnings(bench.warnings):
            torch.manual_seed(args.seed)
            full_step(bench, images, labels_host)
            split_step(bench, images, labels, clock)
        bench.take_snapshot()
        bench.sinkhorn_iterations.clear()
    load_before = list(os.getloadavg())
    for round_index in range(args.warmup - 1 + args.repeats):
        timed = round_index >= args.warmup - 1
        for bench in benches:  # round-robin: load changes on the machine hit every head alike
            clock.reset()
            with recorded_warnings(bench.warnings):
                bench.restore(args.seed)
                clock.time(FULL, lambda: full_step(bench, images, labels_host))
            if timed:
                bench.record(clock)
        for bench in benches:
            clock.reset()
            with recorded_warnings(bench.warnings):
                bench.restore(args.seed)
                split_step(bench, images, labels, clock)
            if timed:
                bench.record(clock)
            else:
                bench.sinkhorn_iterations.clear()
    load_after = list(os.getloadavg())

    heads: Dict[str, Dict[str, object]] = {}
    for bench in benches:
        with recorded_warnings(bench.warnings):
            memory = peak_memory(bench, images, labels_host, device, args.seed)
        heads[bench.name] = {
            **bench.info,
            "median_ms": {k.strip(): statistics.median(v) for k, v in bench.wall_ms.items()},
            "min_ms": {k.strip(): min(v) for k, v in bench.wall_ms.items()},
            "times_ms": {k.strip(): v for k, v in bench.wall_ms.items()},
            "median_cpu_ms": {k.strip(): statistics.median(v) for k, v in bench.cpu_ms.items()},
            "sinkhorn_iterations": sorted(set(bench.sinkhorn_iterations)),
            "memory": memory,
            "warnings": sorted(set(bench.warnings)),
        }
    profiles = {}
    if args.profile != "none":
        for bench in benches:
            if bench.head in ("protoknn", "protopnet"):
                path = args.out.with_name(f"{args.out.stem}-profile-{bench.name}.txt")
                profile_step(bench, images, labels_host, args.profile, args.seed, path)
                profiles[bench.name] = str(path)

    result: Dict[str, object] = {"heads": heads, "profiles": profiles,
                                 "load_average_1min_before_after": [load_before[0], load_after[0]]}
    if "protoknn" in heads and "protopnet" in heads:
        knn, pnet = heads["protoknn"], heads["protopnet"]
        per_round = [a / b for a, b in zip(knn["times_ms"][FULL], pnet["times_ms"][FULL])]
        ratio = knn["median_ms"][FULL] / pnet["median_ms"][FULL]
        result["headline"] = {
            "ratio_protoknn_over_protopnet_full_step": ratio,
            "ratio_of_min_times": knn["min_ms"][FULL] / pnet["min_ms"][FULL],
            "median_of_per_round_ratios": statistics.median(per_round),
            # process CPU time: on a shared CPU with one thread, the least disturbed measure
            "ratio_of_median_cpu_times": (knn["median_cpu_ms"][FULL] / pnet["median_cpu_ms"][FULL]
                                          if device.type == "cpu" else None),
            "target": args.target, "meets_target": ratio <= args.target,
            "protoknn_extra_ms": knn["median_ms"][FULL] - pnet["median_ms"][FULL],
        }
    return result


def environment(device: torch.device) -> Dict[str, object]:
    cuda = device.type == "cuda"
    return {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device_type": device.type,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "device": torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu"),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min": list(os.getloadavg()),
        "dtype": "float32",
        "cudnn_benchmark": torch.backends.cudnn.benchmark if cuda else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32 if cuda else None,
        "faiss_stubbed": FAISS_STUBBED,
    }


# ---------------------------------------------------------------- command line
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    ap.add_argument("--backbone", default="small-cnn", help="a registered backbone (default: %(default)s)")
    ap.add_argument("--image-size", type=int, default=None, help="square input side (default: the backbone's own)")
    ap.add_argument("--in-channels", type=int, default=None, help="default: 1 for small-cnn, else 3")
    ap.add_argument("--batch-classes", type=int, default=10, help="classes per batch (default: %(default)s)")
    ap.add_argument("--per-class", type=int, default=11, help="images per class (default: %(default)s)")
    ap.add_argument("--num-classes", type=int, default=None,
                    help="classes of the model (default: --batch-classes); ProtoPNet keeps P / classes "
                         "prototypes per class when that divides, else 10 per class")
    ap.add_argument("--prototypes", type=int, default=100, help="P (default: %(default)s)")
    ap.add_argument("--dim", type=int, default=64, help="D, the add-on's output channels (default: %(default)s)")
    ap.add_argument("--weights", default="none", help="backbone weights: none (random), imagenet or PATH "
                                                      "(default: %(default)s)")
    ap.add_argument("--heads", nargs="+", default=list(HEADS),
                    help="rows to time, in this order: HEAD or LABEL=HEAD, so one head can appear twice "
                         "(default: %(default)s)")
    ap.add_argument("--head-opt", action="append", default=[], metavar="LABEL.KEY=VALUE",
                    help="a head option for one row (its label) or every row of a head (its name), repeatable, "
                         "as `protoknn --head-opt`; e.g. full-implicit.cluster_variant=full-implicit")
    ap.add_argument("--epochs", type=int, default=20,
                    help="epochs the phases are laid out for; picks the phase (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="rounds before timing, >= 1; the first primes the optimiser (default: %(default)s)")
    ap.add_argument("--tf32", choices=("default", "on", "off"), default="default",
                    help="CUDA only: TF32 for matmuls and convolutions (default: torch's, as the trainer runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--seed", type=int, default=0, help="model, batch and sampling seed (default: %(default)s)")
    ap.add_argument("--target", type=float, default=None,
                    help="ratio target (default: 1.25 for small-cnn, 1.05 otherwise)")
    ap.add_argument("--profile", choices=("none", "cprofile", "torch"), default="none",
                    help="also profile one full step of protoknn and protopnet; text next to --out "
                         "(default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/step.json"), help="JSON (default: %(default)s)")
    args = ap.parse_args(argv)

    backbone_cls = BACKBONES.get(args.backbone)  # an unknown name raises with close matches
    if args.image_size is None:
        args.image_size = getattr(backbone_cls, "default_image_size", 224)
    if args.in_channels is None:
        args.in_channels = 1 if args.backbone == "small-cnn" else 3
    if args.num_classes is None:
        args.num_classes = args.batch_classes
    if args.target is None:
        args.target = 1.25 if args.backbone == "small-cnn" else 1.05
    checks = [
        (args.batch_classes >= 2, f"--batch-classes must be >= 2 (a one-class batch has no negatives), "
                                  f"got {args.batch_classes}"),
        (args.per_class >= 1, f"--per-class must be >= 1, got {args.per_class}"),
        (args.num_classes >= args.batch_classes, f"--num-classes {args.num_classes} is below --batch-classes "
                                                 f"{args.batch_classes}; raise it or leave it out"),
        (args.image_size >= 1, f"--image-size must be >= 1, got {args.image_size}"),
        (args.repeats >= 1, f"--repeats must be >= 1, got {args.repeats}"),
        (args.warmup >= 1, f"--warmup must be >= 1 (the first round primes the optimiser), got {args.warmup}"),
        (args.threads is None or args.threads >= 1, f"--threads must be >= 1, got {args.threads}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ProtoKNNError(message)
    args.rows = parse_rows(",".join(args.heads))  # a label named twice is a one-line error
    for _, name in args.rows:
        HEAD_REGISTRY.get(name)  # an unknown head raises with close matches
    args.row_options = assign_head_options(args.rows, args.head_opt)
    return args


def print_report(result: Dict[str, object], args, console: Console) -> None:
    heads = result["heads"]
    cfg = result["config"]
    env = result["environment"]
    table = Table(title=f"One training step: {cfg['backbone']} at {cfg['image_size']} px, batch "
                        f"{cfg['batch_classes']} x {cfg['per_class']}, P {cfg['prototypes']}, D {cfg['dim']}, "
                        f"{env['device']}, {env['threads']} threads; median ms of {cfg['repeats']} (cpu: process CPU time)")
    table.add_column("part")
    with_cpu = env["device_type"] == "cpu"
    for name in heads:
        table.add_column(f"{name} wall", justify="right")
        if with_cpu:
            table.add_column(f"{name} cpu", justify="right")

    def cells(row_of: Callable[[Dict[str, object]], Tuple[str, str]]) -> List[str]:
        out: List[str] = []
        for h in heads.values():
            wall, cpu = row_of(h)
            out += [wall, cpu] if with_cpu else [wall]
        return out

    def timed(key: str) -> Callable[[Dict[str, object]], Tuple[str, str]]:
        def row_of(h):
            if key not in h["median_ms"]:
                return "-", "-"
            return f"{h['median_ms'][key]:.2f}", f"{h['median_cpu_ms'][key]:.2f}"
        return row_of

    for row in ROWS:
        values = cells(timed(row.strip()))
        if any(v != "-" for v in values):
            table.add_row(row, *values)

    def fmt(value, spec=".0f"):
        return "-" if value is None else format(value, spec)

    table.add_row("peak memory MiB (+ step growth)", *cells(lambda h: (
        f"{fmt(h['memory'].get('peak_mib'))} (+{fmt(h['memory'].get('step_mib'))})", "")))
    table.add_row("prototypes / phase", *cells(lambda h: (f"{h['prototypes'] or '-'} / {h['phase']}", "")))
    table.add_row("Sinkhorn iterations / width", *cells(lambda h: (
        (" ".join(map(str, h["sinkhorn_iterations"])) or "-") + f" / {h.get('transport_width', '-')}", "")))
    console.print(table)
    console.print("aux loss: ProtoKNN's metric loss on g = Linear(GAP); ProtoPNet's L1 on the last layer. "
                  "Parts of the head loss run inside it, forward only; split rows are synchronised per segment.")
    console.print(f"memory: {next(iter(heads.values()))['memory'].get('how')}")
    for name, h in heads.items():
        if h["warnings"]:
            console.print(f"[yellow]{name} warnings:[/] " + " | ".join(h["warnings"]))
    head = result.get("headline")
    if head:
        verdict = "meets" if head["meets_target"] else "misses"
        console.print(f"[bold]ProtoKNN step / ProtoPNet step = {head['ratio_protoknn_over_protopnet_full_step']:.3f}"
                      f"[/] (median ms; min-time ratio {head['ratio_of_min_times']:.3f}, median per-round "
                      f"{head['median_of_per_round_ratios']:.3f}"
                      + (f", CPU-time ratio {head['ratio_of_median_cpu_times']:.3f}"
                         if head.get("ratio_of_median_cpu_times") else "")
                      + f"; +{head['protoknn_extra_ms']:.1f} ms) "
                      f"{verdict} the target <= {head['target']}")
    for name, path in result.get("profiles", {}).items():
        console.print(f"profile of {name}: {path}")


def main(argv=None) -> Dict[str, object]:
    console = Console(width=160)
    try:
        args = parse_args(argv)
        result = run(args)
    except ProtoKNNError as err:
        console.print(f"[red]error:[/] {err}", highlight=False)
        raise SystemExit(2)
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["environment"] = environment(resolve_device(args.device))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_report(result, args, console)
    console.print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
