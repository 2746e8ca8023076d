"""Compact kNN memory: accuracy at k = 1, 5 and memory kept, full vs condensed vs ivfpq.

Trains one ProtoKNN model per dataset (or reuses a finished run directory), computes the
training and test profiles once, then fits a KNNClassifier with each memory kind on the
same profiles. Writes JSON and prints a rich table.

    python benchmarks/bench_memory.py --dataset animals --epochs 4
    python benchmarks/bench_memory.py --dataset fashion-mnist --epochs 2 --run runs/fmnist
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from protoknn_plugin.data import create_dataset
from protoknn_plugin.knn import KNNClassifier
from protoknn_plugin.model import ModelConfig, PrototypeModel
from protoknn_plugin.train import TrainConfig, Trainer, model_from_checkpoint

MEMORIES = {
    "full": {},
    "condensed (k-means, 10%)": {"memory": "condensed", "fraction": 0.1},
    "condensed (k-means, 5%)": {"memory": "condensed", "fraction": 0.05},
    "condensed (Hart CNN)": {"memory": "condensed", "method": "cnn"},
    "ivfpq (m=P/8)": {"memory": "ivfpq"},
    "ivfpq (m=P/10)": {"memory": "ivfpq", "m": 10},
}


def trained_model(args) -> tuple:
    splits = create_dataset(args.dataset, args.data_dir)
    run = Path(args.run)
    if (run / "checkpoint.pt").exists():
        model, saved = model_from_checkpoint(run)
        if saved["train_state"].get("complete"):
            args.epochs = saved["train_config"]["epochs"]  # report the run's own budget
            return model, splits, saved["train_state"]["train_seconds"]
    config = ModelConfig(head="protoknn", num_classes=len(splits.classes), in_channels=splits.channels,
                         num_prototypes=args.prototypes, dim=args.dim, seed=args.seed)
    model = PrototypeModel(config)
    trainer = Trainer(model, splits, TrainConfig(epochs=args.epochs, seed=args.seed), out_dir=str(run),
                      dataset_name=args.dataset, data_info={"data_dir": args.data_dir, "limit": None})
    started = time.perf_counter()
    trainer.fit(resume=(run / "checkpoint.pt").exists())
    return model, splits, time.perf_counter() - started


@torch.no_grad()
def profiles_of(model, dataset, batch=512):
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
    outs, labels = [], []
    for x, y in loader:
        outs.append(model(x).profile)
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="animals")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--prototypes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--run", default=None, help="run directory to reuse or write (default bench-out/memory-<dataset>)")
    parser.add_argument("--out", default=None, help="JSON path (default bench-out/memory-<dataset>.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.run = args.run or f"bench-out/memory-{args.dataset}"
    out = Path(args.out or f"bench-out/memory-{args.dataset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    model, splits, train_seconds = trained_model(args)
    train_x, train_y = profiles_of(model, splits.train_plain)
    test_x, test_y = profiles_of(model, splits.test)
    rows = []
    for label, options in MEMORIES.items():
        knn = KNNClassifier(k=5, ks=(1, 5), num_classes=len(splits.classes), **options)
        started = time.perf_counter()
        knn.fit(train_x, train_y)
        fit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        preds = knn.predict_many(test_x)
        search_seconds = time.perf_counter() - started
        rows.append({
            "memory": label, "kept_items": len(knn), "kept_fraction": len(knn) / len(train_y),
            "memory_bytes": knn.memory_bytes(), "full_bytes": train_x.numel() * 4,
            "accuracy[k=1]": float((preds[1] == test_y).float().mean()),
            "accuracy[k=5]": float((preds[5] == test_y).float().mean()),
            "fit_seconds": fit_seconds, "queries_per_second": len(test_y) / max(search_seconds, 1e-9),
        })
    full = rows[0]
    for row in rows:
        row["delta_k5_points"] = 100 * (row["accuracy[k=5]"] - full["accuracy[k=5]"])
    result = {"dataset": args.dataset, "train_images": len(train_y), "test_images": len(test_y),
              "epochs": args.epochs, "train_seconds": train_seconds, "rows": rows,
              "command": "python benchmarks/bench_memory.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)}
    out.write_text(json.dumps(result, indent=2))

    table = Table(title=f"kNN memory on {args.dataset} ({len(train_y)} training profiles, P={train_x.shape[1]})")
    for col in ("memory", "kept", "bytes kept", "acc k=1 %", "acc k=5 %", "Δ k=5 (points)", "queries/s"):
        table.add_column(col, justify="left" if col == "memory" else "right")
    for row in rows:
        table.add_row(row["memory"], f"{row['kept_items']} ({100 * row['kept_fraction']:.1f}%)",
                      f"{row['memory_bytes'] / 2**20:.2f} MiB", f"{100 * row['accuracy[k=1]']:.2f}",
                      f"{100 * row['accuracy[k=5]']:.2f}", f"{row['delta_k5_points']:+.2f}",
                      f"{row['queries_per_second']:.0f}")
    Console().print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
