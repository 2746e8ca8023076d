"""Commands that compare runs side by side: benchmark and ablate."""
from __future__ import annotations

import contextlib
import signal
import sys

import click

from ..errors import ProtoKNNError
from . import cli
from .common import (comparison_settings, setup_threads, comparison_options, console, err_console,
                     frozen_backbone_options, run_cli, training_options, with_preset)


# Seeds of `benchmark` when --seeds is not given. On the feature cache a run costs little, and
# five seeds keep a paired interval's t quantile at 2.78 instead of 4.30 (n = 3).
DEFAULT_SEEDS = "0,1,2"
FROZEN_SEEDS = "0,1,2,3,4"


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM outside training (loading data, scoring) stops like Ctrl-C; inside training the
    Trainer's own handler finishes the step and writes the checkpoint first."""
    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _run_interruptibly(specs, settings, out, title, executor=None, **options):
    """run_comparison; an interruption ends with one line and exit code 130, finished runs kept.
    ``executor``: the keyword arguments of benchmark.executors.create_executor, or None (in-process)."""
    from ..benchmark import run_comparison
    from ..train import Interrupted

    try:
        with _sigterm_as_interrupt():
            if executor is not None:
                from ..benchmark.executors import create_executor

                executor = create_executor(say=console.print, progress=False, **executor)
            run_comparison(specs, settings, out, title=title, console=console, executor=executor, **options)
    except (Interrupted, KeyboardInterrupt) as why:
        name = str(why) or "Ctrl-C"
        err_console.print(f"interrupted by {name}: finished runs and checkpoints are kept in {out}; "
                          "run the same command again to resume", markup=False)
        sys.exit(130)


def _specs(rows, head_opts):
    from ..benchmark import RunSpec
    from ..heads.options import assign_head_options
    from ..run_backends import backend_for

    for _, head in rows:  # fail fast on an unknown name or a missing extra, before any training
        backend_for(head).check(head)
    options = assign_head_options(rows, head_opts)
    return [RunSpec(label, head, options[label]) for label, head in rows]


BENCHMARK_HELP = """Train and evaluate every head on the same data, backbone initialisation and budget (images seen and
backbone steps, checked before training), and print one table: mean ± 95% t-interval over seeds of
test accuracy (per k for kNN heads), budget, push and last-layer cost, prototype spread, train seconds,
peak memory, test images/s; then the paired difference of every two rows.

\b
Every choice is made on the validation split (--val-fraction); the test
set is scored once per run, after every choice:
- --lr-scales and --schedules sweep each row's learning-rate scale and
  schedule on --sweep-seeds, on the same terms for every row: `own` (the
  head's schedule) and `cosine` (warm-up + cosine decay); each row keeps
  the pair with the best validation accuracy. Default: no sweep.
- kNN heads predict with k = 1, 3, 5 and 10; `acc %` uses the k with the
  best mean validation accuracy over the seeds; the table shows every k.
- A difference between two rows is claimed only when Holm's correction
  over every pair of the table rejects 0 at 5%; the 95% intervals and
  p-values shown are uncorrected.

Writes OUT/results.json, results.csv, results.md, results.png, curves.png and
OUT/runs/<label>-<hash>-seed<N>/; the same command again skips finished runs and resumes
interrupted ones. Cost with no options: 3 heads x 3 seeds x 4 epochs on `animals`
(docs/results.md gives measured wall times); a sweep adds one run per extra setting, row
and sweep seed."""


@cli.command(help=BENCHMARK_HELP)
@click.option("--heads", "head_names", default="protoknn,protopnet,cnn", show_default=True,
              help="Comma-separated rows, HEAD or LABEL=HEAD (the same head twice with different --head-opt); "
                   "`cnn` is the plain CNN reference; `all` is every registered head (`protoknn heads`); "
                   "cabrnet:protopnet runs CaBRNet's own ProtoPNet (extra protoknn-plugin[cabrnet]).")
@training_options
@comparison_options
@frozen_backbone_options
@click.option("--explanations", is_flag=True,
              help="Also measure every prototype row's explanations (protoknn faithfulness: deletion, stability, "
                   "purity on 200 test images) as extra columns, and write OUT/report/, one HTML report of the "
                   "first seed's runs. Adds time to every prototype run (docs/results.md gives measured times).")
@click.option("--seeds", default=None,
              help=f"Comma-separated seeds [default: {DEFAULT_SEEDS}; {FROZEN_SEEDS} with --frozen-backbone, where "
                   "runs are cheap].")
@click.option("--out", default="runs/benchmark", show_default=True, type=click.Path(), help="Output directory.")
@click.option("--tune", type=click.IntRange(min=0), default=0, show_default=True,
              help="Equal-budget search: N trials per row of Optuna's TPE sampler (seeded) over each head's search "
                   "space (`protoknn heads`), on the validation split, pruned after each epoch; the study is kept "
                   "in OUT/tuning.db, so a rerun resumes. The chosen settings go to results.md before the seeds run. "
                   "0: no search (--lr-scales is the cheap grid). Extra protoknn-plugin[tune].")
@click.option("--executor", type=click.Choice(["in-process", "ray"]), default="in-process", show_default=True,
              help="Where the runs and trials execute: in this process, or as Ray tasks (extra "
                   "protoknn-plugin[cluster]); with ray, --out must be on storage every node sees.")
@click.option("--address", default=None,
              help="Ray cluster to join: `auto` or HOST:PORT of the head node (docs/cluster.md); default: a local Ray.")
@click.option("--cpus-per-run", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="CPUs each Ray task requests (and its torch threads, unless --threads says otherwise).")
@click.option("--gpus-per-run", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="GPUs each Ray task requests (Ray sets CUDA_VISIBLE_DEVICES for it).")
@click.option("--ray-cpus", type=click.IntRange(min=1), default=None,
              help="CPUs of the local Ray started when --address is not given (default: every CPU).")
@run_cli
@with_preset
def benchmark(head_names, head_opts, threads, explanations, out, tune, executor, address, cpus_per_run, gpus_per_run,
              ray_cpus, **shared):
    from ..heads.options import parse_rows

    setup_threads(threads)
    if shared.get("seeds") is None:
        shared["seeds"] = FROZEN_SEEDS if shared.get("frozen_backbone") else DEFAULT_SEEDS
    from ..heads.options import expand_all

    head_names = expand_all(head_names, bool(shared.get("frozen_backbone")), err_console.print)
    specs = _specs(parse_rows(head_names), head_opts)
    settings = comparison_settings(**shared)
    if tune:  # say now, not after loading the data, when the search library is missing
        from ..benchmark.tuning import optuna_module

        if len(settings.lr_scales) > 1 or len(settings.schedules) > 1:
            raise ProtoKNNError("--tune and --lr-scales/--schedules both choose the rates; use one of them")
        optuna_module()
    runner = None
    if executor != "in-process" or address is not None:
        runner = {"name": executor, "address": address, "cpus": cpus_per_run, "gpus": gpus_per_run,
                  "threads": threads, "local_cpus": ray_cpus}
    _run_interruptibly(specs, settings, out, f"heads on {settings.dataset} ({settings.backbone}, "
                                             f"{settings.train.epochs} epochs)", executor=runner,
                       explanations=explanations, tune=tune)


@cli.command()
@click.option("--variants", default="most-similar,sampling,debias,linear-assignment,full,full:sum", show_default=True,
              help="Comma-separated rows, VARIANT or LABEL=VARIANT. Variants: the paper's most-similar, sampling, "
                   "debias, linear-assignment, full, and beyond it full-relaxed, full-implicit, full-differentiable. "
                   "VARIANT:sum uses the paper's literal sum instead of the per-sample mean. A label lets one variant "
                   "appear twice, e.g. full,learnable=full --head-opt learnable.frozen_prototypes=false.")
@training_options
@comparison_options
@frozen_backbone_options
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--out", default="runs/ablate", show_default=True, type=click.Path(), help="Output directory.")
@run_cli
@with_preset
def ablate(variants, head_opts, threads, out, **shared):
    """The paper's Table 7 on any dataset: ProtoKNN with each cluster-loss variant, accuracy at k = 1, 3, 5
    and prototype spread, with paired differences between rows. --head-opt protoknn.KEY=VALUE applies to
    every row, LABEL.KEY=VALUE to one (the label is the variant unless the row is LABEL=VARIANT).
    Writes OUT/results.json, results.csv, results.md, the figures and one run directory per variant and
    seed (rerunning resumes). Cost: one ProtoKNN training per variant and seed."""
    from ..benchmark import RunSpec
    from ..cluster import CLUSTER_VARIANTS
    from ..errors import UnknownNameError
    from ..heads.options import assign_head_options, parse_rows

    setup_threads(threads)
    rows, base = [], {}
    for label, item in parse_rows(variants, "--variants", "full,learnable=full"):
        variant, _, reduction = item.partition(":")
        if variant not in CLUSTER_VARIANTS:
            raise UnknownNameError("cluster variant", variant, CLUSTER_VARIANTS)
        if reduction not in ("", "mean", "sum"):
            raise ProtoKNNError(f"unknown reduction {reduction!r} in {item!r}; use VARIANT, VARIANT:mean or VARIANT:sum")
        rows.append((label, "protoknn"))
        base[label] = {"cluster_variant": variant, "cluster_reduction": reduction or "mean"}
    options = assign_head_options(rows, head_opts)
    specs = [RunSpec(label, head, {**base[label], **options[label]}) for label, head in rows]
    settings = comparison_settings(**shared)
    # The main table's `acc %` is each row's k chosen on validation; k = 1, spread and step time are compared too.
    _run_interruptibly(specs, settings, out, f"cluster-loss ablation on {settings.dataset}",
                       paired_keys=("accuracy[k=1]", "prototype_spread", "step_ms", "peak_memory_mb"))
