"""Frozen-backbone feature cache: the cost of building it, and of one epoch trained on it.

For a dataset and backbone (default: CIFAR-10 upsampled to 128 px, EfficientNet-Lite0 with
its ImageNet weights, 1280 x 4 x 4 maps) it times:
  build   one backbone pass over train_plain and test into a fresh cache (img/s, MB on disk)
  reuse   the same call again (must not run the backbone)
  epoch   one feature-training epoch of each head on the cache (class-balanced batches of
          10 x 11, as the benchmark), then its after-phase actions (projection, kNN memory)
and extrapolates both to the full splits (50,000 / 10,000 for CIFAR-10) linearly: the
backbone pass and an epoch's steps are linear in the number of images, and so are the
projection and memory passes (the kNN search is not part of training).

    python benchmarks/bench_feature_cache.py --data-dir /tmp/cifar10-data --limit 1000
    python benchmarks/bench_feature_cache.py --data-dir DIR --limit 500 --heads protoknn --out bench-out/cache.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from protoknn_plugin.data import create_dataset  # noqa: E402
from protoknn_plugin.data.catalog import KNOWN_SIZES  # noqa: E402
from protoknn_plugin.frozen import prepare_feature_cache  # noqa: E402
from protoknn_plugin.model import ModelConfig, PrototypeModel  # noqa: E402
from protoknn_plugin.train import TrainConfig, Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--limit", type=int, default=1000, help="images kept per split (stratified)")
    parser.add_argument("--heads", default="protoknn,protopnet,cnn")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--out", default="bench-out/feature-cache.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()

    splits = create_dataset(args.dataset, args.data_dir, image_size=args.image_size, limit=args.limit)
    _, full_train, full_test, _ = KNOWN_SIZES.get(args.dataset, (None, len(splits.train), len(splits.test), None))
    rows, result = [], {"dataset": args.dataset, "image_size": args.image_size, "backbone": args.backbone,
                        "limit": args.limit, "threads": args.threads, "dtype": args.dtype,
                        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as cache_dir:
        model = PrototypeModel(ModelConfig(head="protoknn", backbone=args.backbone, num_classes=len(splits.classes),
                                           in_channels=splits.channels))
        started, cpu_started = time.perf_counter(), time.process_time()
        frozen = prepare_feature_cache(model, splits, dataset=args.dataset, data_dir=args.data_dir, limit=args.limit,
                                       cache_dir=cache_dir, dtype=args.dtype, log=console.print)
        build_s, build_cpu = time.perf_counter() - started, time.process_time() - cpu_started
        images = len(splits.train_plain) + len(splits.test)
        disk_mb = sum(f.stat().st_size for f in Path(cache_dir).rglob("*") if f.is_file()) / 2**20
        full_images = full_train + full_test
        result.update(build_seconds=build_s, build_cpu_seconds=build_cpu, build_images=images,
                      build_img_per_s=images / build_s, build_img_per_cpu_s=images / build_cpu,
                      full_build_cpu_seconds_extrapolated=build_cpu * full_images / images,
                      map_shape=list(frozen.splits.test[0][0].shape), cache_mb=disk_mb,
                      full_build_seconds_extrapolated=build_s * full_images / images,
                      full_cache_mb_extrapolated=disk_mb * full_images / images)
        rows.append(("build cache", f"{images} images", f"{build_s:.1f} s wall, {build_cpu:.1f} s CPU",
                     f"{images / build_s:.1f} img/s ({images / build_cpu:.1f} per CPU-s)",
                     f"{build_s * full_images / images / 60:.1f} min wall ({build_cpu * full_images / images / 60:.1f} "
                     f"CPU-min) for {full_images}"))
        started = time.perf_counter()
        again = prepare_feature_cache(model, splits, dataset=args.dataset, data_dir=args.data_dir, limit=args.limit,
                                      cache_dir=cache_dir, dtype=args.dtype)
        reuse_s = time.perf_counter() - started
        assert again.cache.built == [], "the second call rebuilt the cache"
        result["reuse_seconds"] = reuse_s
        rows.append(("reuse cache", "-", f"{reuse_s:.2f} s", "-", "weights digest + manifest read"))

        result["epochs"] = {}
        for head in args.heads.split(","):
            head_model = PrototypeModel(ModelConfig(head=head, backbone=args.backbone, num_classes=len(splits.classes),
                                                    in_channels=splits.channels))
            heads_frozen = prepare_feature_cache(head_model, splits, dataset=args.dataset, data_dir=args.data_dir,
                                                 limit=args.limit, cache_dir=cache_dir, dtype=args.dtype)
            stamps = []
            trainer = Trainer(head_model, heads_frozen.splits, TrainConfig(epochs=1, device="cpu"), progress=False,
                              on_step=lambda step: stamps.append(time.perf_counter()))
            phases = [f"{p.name}:{p.epochs}" for p in trainer.phases]
            with heads_frozen.frozen_backbone():
                started, cpu_started = time.perf_counter(), time.process_time()
                trainer.fit()
                total_s, total_cpu = time.perf_counter() - started, time.process_time() - cpu_started
            steps = len(stamps)
            steps_s = stamps[-1] - started if stamps else 0.0  # the image-batch steps (1 epoch in all)
            rest_s = total_s - steps_s  # projection, kNN memory, ProtoPNet's last layer on cached profiles
            scale = full_train / len(splits.train)
            batch = trainer.config.batch_size
            result["epochs"][head] = {"phases": phases, "steps": steps, "steps_seconds": steps_s,
                                      "rest_seconds": rest_s, "fit_seconds": total_s, "fit_cpu_seconds": total_cpu,
                                      "full_steps_seconds_extrapolated": steps_s * scale,
                                      "full_rest_seconds_extrapolated": rest_s * scale}
            rows.append((f"{head}: 1 epoch ({', '.join(phases)})", f"{steps} steps x {batch}", f"{steps_s:.1f} s",
                         f"{steps * batch / max(steps_s, 1e-9):.0f} img/s",
                         f"{steps_s * scale:.0f} s for {full_train} (+{rest_s * scale:.0f} s after-phase work)"))
    result["load_average_after"] = os.getloadavg()[0]

    table = Table(title=f"feature cache: {args.dataset} at {args.image_size} px, {args.backbone}, "
                        f"{args.threads} thread(s), load {result['load_average_before']:.1f}")
    for column in ("what", "size", "time", "rate", "full data (extrapolated)"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
