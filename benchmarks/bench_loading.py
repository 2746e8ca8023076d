"""Start-up time and images/s of the ``imagefolder`` dataset on a generated folder of JPEGs.

Generates (once, then reuses) ``--images`` JPEGs of 256 x 256 px in ``--classes`` class
sub-folders under ``--root``, then measures:
  start-up       seconds of ``create_dataset("imagefolder", root)`` (listing, checks), and
                 the peak resident memory (RSS) of the process after it;
  images/s       training items (decode + augmentation at ``--image-size``) through a
                 DataLoader with 0, 2 and 4 workers, over ``--measure`` images each.
The numbers depend on the machine's cores and disk cache; the folder is read once before
timing so that every setting sees a warm page cache.

    python benchmarks/bench_loading.py                                   # this checkout
    python benchmarks/bench_loading.py --label before --out bench-out/loading-before.json
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import generate_jpegs, print_and_save  # noqa: E402  (benchmarks/, the script's folder)
from protoknn_plugin.data import create_dataset  # noqa: E402


def warm_cache(root: Path) -> None:
    for path in root.rglob("*.jpg"):
        path.read_bytes()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def images_per_second(dataset, workers: int, count: int, batch: int) -> float:
    subset = torch.utils.data.Subset(dataset, range(min(count, len(dataset))))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch, num_workers=workers)
    started, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += len(images)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/protoknn-bench-jpegs")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--size", type=int, default=256, help="generated JPEG side in pixels")
    parser.add_argument("--image-size", type=int, default=224, help="training crop side")
    parser.add_argument("--measure", type=int, default=1024, help="images timed per worker count")
    parser.add_argument("--workers", default="0,2,4")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(args.root)
    generate_jpegs(root, args.images, args.classes, args.size)
    warm_cache(root)
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    splits = create_dataset("imagefolder", str(root), image_size=args.image_size)
    startup = time.perf_counter() - started
    result = {"label": args.label, "images": args.images, "jpeg_px": args.size, "image_size": args.image_size,
              "startup_seconds": startup, "peak_rss_mb_after_startup": peak_rss_mb(),
              "peak_rss_mb_before_startup": rss_before, "train_images": len(splits.train),
              "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
              "images_per_second": {}}
    for workers in (int(w) for w in args.workers.split(",")):
        result["images_per_second"][str(workers)] = images_per_second(splits.train, workers, args.measure, args.batch)
    rows = [("start-up (s)", f"{startup:.2f}"),
            ("peak RSS after start-up (MB)", f"{result['peak_rss_mb_after_startup']:.0f}")]
    rows += [(f"images/s, {workers} workers", f"{rate:.0f}") for workers, rate in result["images_per_second"].items()]
    print_and_save(f"imagefolder loading ({args.label}): {args.images} JPEGs at {args.size} px", rows, result, args.out)


if __name__ == "__main__":
    main()
