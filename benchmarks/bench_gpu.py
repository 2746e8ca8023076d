"""One short GPU script for the training engine. Needs CUDA.

Reports, in one JSON file and a rich table:
  step ratio     ProtoKNN / ProtoPNet training step (``Trainer._train_step``: forward, losses,
                 backward, Adam) at 56 classes x 2 images, resnet50 (random init), 224 px,
                 float32; median of ``--repeats`` after ``--warmup``
  bf16 speed-up  the ProtoKNN step in float32 / the same step with --precision bf16
  loading        images/s of an ``imagefolder`` training split (decode + augmentation at 224 px)
                 through the trainer's DataLoader options (pinned memory, persistent workers)
                 with 0 and 8 workers, on ``--images`` generated 224-px JPEGs
  kNN search     queries/s of the exact kNN search on the GPU: faiss-gpu (when the installed
                 faiss has GPU support) against the chunked torch search, N = ``--memory``
                 profiles of P = 512, ``--queries`` queries, k = 10; and whether they agree

    python benchmarks/bench_gpu.py --device cuda --out bench-out/gpu.json
    python benchmarks/bench_gpu.py --device cuda --repeats 5 --images 2000 --memory 100000   # ~3 min
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import generate_jpegs, print_and_save  # noqa: E402  (benchmarks/, the script's folder)
from protoknn_plugin.model import ModelConfig, PrototypeModel  # noqa: E402
from protoknn_plugin.train import TrainConfig, Trainer  # noqa: E402
from protoknn_plugin.train.loading import worker_options  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms(head: str, precision: str, args, device: torch.device) -> float:
    """Median milliseconds of one training step of ``head`` on one fixed random batch."""
    classes, per_class = args.batch_classes, args.per_class
    labels = torch.arange(classes).repeat_interleave(per_class)
    model = PrototypeModel(ModelConfig(head=head, backbone=args.backbone, num_classes=classes, in_channels=3,
                                       num_prototypes=args.prototypes, dim=args.dim, weights="none"))
    # The trainer needs only the training labels to plan its phases; no data is read.
    splits = SimpleNamespace(train_labels=labels.repeat(4), name="synthetic", classes=[str(c) for c in range(classes)])
    trainer = Trainer(model, splits, TrainConfig(epochs=args.epochs, batch_classes=classes, per_class=per_class,
                                                 device=str(device), precision=precision), progress=False)
    phase = next(p for p in trainer.phases if not p.cached_profiles and "backbone" in p.lrs)
    trainer.optimizers.build(phase)
    trainer.optimizers.per_step_schedule = False
    model.train()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(len(labels), 3, args.image_size, args.image_size, generator=generator).to(device)
    labels = labels.to(device)
    times = []
    for i in range(args.warmup + args.repeats):
        synchronize(device)
        started = time.perf_counter()
        trainer._train_step(images, labels)
        synchronize(device)
        if i >= args.warmup:
            times.append(1000 * (time.perf_counter() - started))
    del trainer, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times)


def loading_rate(root: Path, workers: int, device: torch.device, batch: int) -> float:
    from protoknn_plugin.data import create_dataset

    splits = create_dataset("imagefolder", str(root), image_size=224)
    options = worker_options(workers, device)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=batch, shuffle=False, **options)
    started, seen = time.perf_counter(), 0
    for images, _ in loader:
        images.to(device, non_blocking=True)
        seen += len(images)
    synchronize(device)
    return seen / (time.perf_counter() - started)


def knn_rates(args, device: torch.device) -> dict:
    from protoknn_plugin.knn import KNNClassifier, faiss_gpu_available

    generator = torch.Generator().manual_seed(0)
    memory = torch.rand(args.memory, 512, generator=generator)
    labels = torch.randint(0, 100, (args.memory,), generator=generator)
    queries = torch.rand(args.queries, 512, generator=generator).to(device)
    result = {"faiss_gpu_available": faiss_gpu_available()}
    found = {}
    for backend in (("faiss", "torch") if result["faiss_gpu_available"] else ("torch",)):
        knn = KNNClassifier(k=10, backend=backend).fit(memory, labels).to(device)
        knn.search(queries[:100], 10)  # warm-up: index copy to the GPU, kernels
        synchronize(device)
        started = time.perf_counter()
        dist, idx = knn.search(queries, 10)
        synchronize(device)
        result[f"{backend}_queries_per_second"] = args.queries / (time.perf_counter() - started)
        found[backend] = idx.cpu()
    if len(found) == 2:
        result["same_neighbours"] = float((found["faiss"] == found["torch"]).float().mean())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-classes", type=int, default=56)
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--prototypes", type=int, default=512)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--images", type=int, default=2000, help="generated 224-px JPEGs for the loading test")
    ap.add_argument("--jpeg-root", default="/tmp/protoknn-gpu-jpegs")
    ap.add_argument("--workers", default="0,8")
    ap.add_argument("--memory", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: step, bf16, loading, knn")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no GPU; this script measures GPU numbers")
    skip = set(filter(None, args.skip.split(",")))
    torch.backends.cudnn.benchmark = True
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "settings": vars(args)}
    rows = []
    if "step" not in skip:
        knn_ms, pnet_ms = step_ms("protoknn", "32", args, device), step_ms("protopnet", "32", args, device)
        result.update(protoknn_step_ms=knn_ms, protopnet_step_ms=pnet_ms, step_ratio=knn_ms / pnet_ms)
        rows += [("ProtoKNN step (ms, fp32)", f"{knn_ms:.1f}"), ("ProtoPNet step (ms, fp32)", f"{pnet_ms:.1f}"),
                 ("ProtoKNN / ProtoPNet", f"{knn_ms / pnet_ms:.3f}")]
    if "bf16" not in skip:
        base = result.get("protoknn_step_ms") or step_ms("protoknn", "32", args, device)
        bf16 = step_ms("protoknn", "bf16", args, device)
        result.update(protoknn_bf16_step_ms=bf16, bf16_speedup=base / bf16)
        rows += [("ProtoKNN step (ms, bf16)", f"{bf16:.1f}"), ("bf16 speed-up", f"{base / bf16:.2f}x")]
    if "loading" not in skip:
        root = Path(args.jpeg_root)
        generate_jpegs(root, args.images, classes=10, size=224)
        result["images_per_second"] = {}
        for workers in (int(w) for w in args.workers.split(",")):
            rate = loading_rate(root, workers, device, args.batch_classes * args.per_class)
            result["images_per_second"][str(workers)] = rate
            rows.append((f"imagefolder images/s, {workers} workers", f"{rate:.0f}"))
    if "knn" not in skip:
        knn = knn_rates(args, device)
        result["knn"] = knn
        rows += [(f"kNN {key}", f"{value:.3g}" if isinstance(value, float) else str(value)) for key, value in knn.items()]
    print_and_save(f"protoknn engine on {result['device']}", rows, result, args.out)


if __name__ == "__main__":
    main()
