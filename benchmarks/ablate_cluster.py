"""Issue 14's ablation: the cluster-loss variants beyond the paper and learnable prototypes,
summarised as paired differences against ``full`` with 95% t-intervals over seeds.

Input: the ``results.json`` of

    protoknn ablate --variants full,full-relaxed,full-implicit,full-differentiable \\
        --seeds 0,1,2 --limit 800 --epochs 3 --steps-per-epoch 6 --threads 1 --out bench-out/ablate-variants

This script then
1. trains ProtoKNN ``full`` with learnable prototypes (head option ``frozen_prototypes=False``,
   ``prototype_lr`` 1e-3) through ``benchmark.run_comparison`` with the same settings and
   seeds (``--head-opt`` may not exist on this branch); its frozen partner is the ``full``
   row of the ablation above (same data, seeds, settings and initialisation);
2. times one training step per configuration (``Trainer._train_step`` on one fixed
   batch: forward, loss, backward, Adam; median of ``--repeats`` after a warm-up,
   configurations round-robin, so load on the shared machine hits all alike);
3. per metric and configuration, the seed-paired differences d_s = x_s - x_s(full),
   their mean and the 95% interval mean +- t_{0.975, n-1} sd / sqrt(n).

Writes OUT/paired.json and OUT/paired.md and prints rich tables.

    python benchmarks/ablate_cluster.py --variants-results bench-out/ablate-variants/results.json \\
        --steps-per-epoch 6 --out bench-out/ablate-prototypes
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import t as student_t

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from protoknn_plugin.benchmark import BenchmarkSettings, RunSpec, run_comparison  # noqa: E402
from protoknn_plugin.data import create_dataset  # noqa: E402
from protoknn_plugin.model import ModelConfig, PrototypeModel  # noqa: E402
from protoknn_plugin.train import TrainConfig, Trainer, epoch_batches  # noqa: E402

METRICS = ("accuracy[k=1]", "accuracy[k=5]", "prototype_spread", "train_seconds", "peak_memory_mb")
LEARNABLE = "full, learnable prototypes"
CONFIGS = {"full": {"cluster_variant": "full"}, "full-relaxed": {"cluster_variant": "full-relaxed"},
           "full-implicit": {"cluster_variant": "full-implicit"},
           "full-differentiable": {"cluster_variant": "full-differentiable"},
           LEARNABLE: {"cluster_variant": "full", "frozen_prototypes": False}}


def paired_interval(values: Sequence[float], reference: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """Mean of the paired differences and its two-sided t-interval (n - 1 degrees of freedom)."""
    d = [v - r for v, r in zip(values, reference)]
    n = len(d)
    mean = statistics.fmean(d)
    if n < 2:
        return {"n": n, "mean": mean, "low": float("nan"), "high": float("nan")}
    half = student_t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(d) / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half}


def time_steps(settings: BenchmarkSettings, splits, configs: Dict[str, dict], warmup: int, repeats: int) -> Dict[str, float]:
    """Median seconds of one ``Trainer._train_step`` per configuration on one fixed batch."""
    trainers, batch = {}, None
    for label, options in configs.items():
        model = PrototypeModel(ModelConfig(head="protoknn", backbone=settings.backbone, num_classes=len(splits.classes),
                                           in_channels=splits.channels, num_prototypes=settings.prototypes,
                                           dim=settings.dim, head_options=dict(options), seed=0))
        trainer = Trainer(model, splits, settings.train, progress=False)
        trainer._build_optimizer(trainer.phases[0])
        trainers[label] = trainer
        if batch is None:
            index = epoch_batches(splits.train_labels, trainer.config)[0]
            batch = (torch.stack([splits.train[i][0] for i in index]), torch.tensor([splits.train[i][1] for i in index]))
    times: Dict[str, List[float]] = {label: [] for label in configs}
    for rep in range(warmup + repeats):
        for label, trainer in trainers.items():  # round-robin
            start = time.perf_counter()
            trainer._train_step(*batch)
            if rep >= warmup:
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants-results", type=Path, required=True, help="results.json of the protoknn ablate run")
    ap.add_argument("--out", type=Path, default=Path("bench-out/ablate-prototypes"), help="output directory")
    ap.add_argument("--steps-per-epoch", type=int, required=True,
                    help="the --steps-per-epoch of the ablate run (its results do not record it)")
    ap.add_argument("--prototype-lr", type=float, default=1e-3, help="learning rate of learnable prototypes")
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    ap.add_argument("--skip-train", action="store_true", help="reuse OUT/results.json of a previous run")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    console = Console(width=160)

    ablation = json.loads(args.variants_results.read_text())
    meta = ablation["meta"]
    limit, epochs = meta["limit"], meta["epochs"]
    batch_classes, per_class = (int(x) for x in meta["batch"].split(" x "))
    steps_per_epoch = args.steps_per_epoch
    settings = BenchmarkSettings(dataset=meta["dataset"], backbone=meta["backbone"], prototypes=meta["prototypes"],
                                 dim=meta["dim"], limit=limit, seeds=tuple(meta["seeds"]),
                                 train=TrainConfig(epochs=epochs, batch_classes=batch_classes, per_class=per_class,
                                                   steps_per_epoch=steps_per_epoch))
    splits = create_dataset(settings.dataset, None, limit=limit)
    CONFIGS[LEARNABLE]["prototype_lr"] = args.prototype_lr
    if args.skip_train:
        learnable_runs = json.loads((args.out / "results.json").read_text())["runs"]
    else:
        run_comparison([RunSpec(LEARNABLE, "protoknn", dict(CONFIGS[LEARNABLE]))], settings, str(args.out),
                       title="learnable prototypes", console=console, progress=False, splits=splits)
        learnable_runs = json.loads((args.out / "results.json").read_text())["runs"]
    runs = ablation["runs"] + learnable_runs
    step_s = time_steps(settings, splits, CONFIGS, args.warmup, args.repeats)

    by_label: Dict[str, Dict[int, dict]] = {}
    for run in runs:
        by_label.setdefault(run["label"], {})[run["seed"]] = run
    total_steps = epochs * steps_per_epoch if steps_per_epoch else None
    rows = []
    for label in CONFIGS:
        seeds = sorted(set(by_label.get(label, {})) & set(by_label["full"]))
        row = {"label": label, "seeds": seeds, "median_step_s": step_s[label]}
        for metric in METRICS:
            vals = [by_label[label][s][metric] for s in seeds]
            ref = [by_label["full"][s][metric] for s in seeds]
            row[metric] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                           "diff_vs_full": paired_interval(vals, ref)}
        if total_steps:
            per = [by_label[label][s]["train_seconds"] / total_steps for s in seeds]
            row["train_s_per_step"] = statistics.fmean(per)
        rows.append(row)
    result = {"rows": rows, "settings": {"limit": limit, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                                         "batch": meta["batch"], "prototypes": meta["prototypes"], "dim": meta["dim"],
                                         "seeds": meta["seeds"], "prototype_lr": args.prototype_lr},
              "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paired.json").write_text(json.dumps(result, indent=2))

    def pct(x):
        return f"{100 * x:+.2f}"

    table = Table(title="ProtoKNN cluster variants and learnable prototypes on animals: mean ± std over seeds, "
                        "paired difference vs full [95% t-interval]")
    for col in ("config", "acc k=1 %", "Δ k=1", "acc k=5 %", "Δ k=5", "spread", "Δ spread", "step s (median)",
                "train s/step", "peak MB"):
        table.add_column(col, justify="left" if col == "config" else "right")
    lines = ["| config | acc k=1 % | Δ k=1 [95% CI] | acc k=5 % | Δ k=5 [95% CI] | spread (eq. 17) | Δ spread [95% CI] "
             "| step s (median) | train s / step | peak MB |", "|---|" + "---|" * 9]
    for row in rows:
        cells = [row["label"]]
        for metric in ("accuracy[k=1]", "accuracy[k=5]", "prototype_spread"):
            m, d = row[metric], row[metric]["diff_vs_full"]
            scale = 100 if metric.startswith("acc") else 1
            fmt = ".2f" if scale == 100 else ".4f"
            cells.append(f"{scale * m['mean']:{fmt}} ± {scale * m['std']:{fmt}}")
            cells.append("—" if row["label"] == "full" else
                         f"{scale * d['mean']:+{fmt}} [{scale * d['low']:+{fmt}}, {scale * d['high']:+{fmt}}]")
        cells.append(f"{row['median_step_s']:.3f}")
        cells.append(f"{row.get('train_s_per_step', float('nan')):.2f}")
        cells.append(f"{row['peak_memory_mb']['mean']:.0f} ± {row['peak_memory_mb']['std']:.0f}")
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    (args.out / "paired.md").write_text("\n".join(lines) + "\n")
    console.print(table)
    console.print(f"wrote {args.out / 'paired.json'} and paired.md")
    return result


if __name__ == "__main__":
    main()
