"""Commands that compare runs side by side: benchmark and ablate."""
from __future__ import annotations


import click

from ..errors import ProtoKNNError
from . import cli
from .common import (_comparison_settings, _setup_threads, _split_list, console, run_cli, training_options, with_preset)


@cli.command()
@click.option("--heads", "head_names", default="protoknn,protopnet,cnn", show_default=True,
              help="Comma-separated heads; `cnn` is the plain CNN reference row; cabrnet:protopnet runs "
                   "CaBRNet's own ProtoPNet (extra protoknn-plugin[cabrnet]).")
@training_options
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds, e.g. 0,1,2.")
@click.option("--out", default="runs/benchmark", show_default=True, type=click.Path(), help="Output directory.")
@run_cli
@with_preset
def benchmark(head_names, dataset, data_dir, limit, strict, crop, backbone, weights, backbone_opts, epochs, batch_classes, per_class, prototypes,
              dim, steps_per_epoch, device, threads, seeds, out):
    """Train and evaluate every head on the same data, backbone initialisation and budget, and print one
    table (mean ± std over seeds): accuracy (per k for kNN heads), prototype spread, train seconds, peak
    memory, test images/s. Writes OUT/results.json, results.csv, results.md and OUT/runs/<head>-seed<N>/.
    Cost with no options: 3 heads x 3 seeds x 4 epochs on `animals`, about 8 minutes on a 2-core CPU."""
    from ..benchmark import RunSpec, run_comparison

    _setup_threads(threads)
    specs = [RunSpec(name, name) for name in _split_list(head_names)]
    from ..heads import get_head_class

    for spec in specs:  # fail fast on an unknown name, before any training
        if spec.head.startswith("cabrnet:"):
            from protoknn_plugin.adapters.cabrnet import require_cabrnet

            require_cabrnet()
        else:
            get_head_class(spec.head)
    settings = _comparison_settings(dataset, data_dir, limit, strict, crop, backbone, weights, backbone_opts, epochs, batch_classes, per_class,
                                    prototypes, dim, steps_per_epoch, device, seeds)
    run_comparison(specs, settings, out, title=f"heads on {dataset} ({backbone}, {epochs} epochs)", console=console)


@cli.command()
@click.option("--variants", default="most-similar,sampling,debias,linear-assignment,full,full:sum", show_default=True,
              help="Cluster-loss variants; VARIANT:sum uses the paper's literal sum instead of the per-sample mean.")
@training_options
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--out", default="runs/ablate", show_default=True, type=click.Path(), help="Output directory.")
@run_cli
@with_preset
def ablate(variants, dataset, data_dir, limit, strict, crop, backbone, weights, backbone_opts, epochs, batch_classes, per_class, prototypes, dim,
           steps_per_epoch, device, threads, seeds, out):
    """The paper's Table 7 on any dataset: ProtoKNN with each cluster-loss variant, accuracy at k = 1, 3, 5
    and prototype spread. Writes OUT/results.json, results.csv, results.md. Cost: one ProtoKNN training
    per variant and seed."""
    from ..benchmark import RunSpec, run_comparison
    from ..cluster import CLUSTER_VARIANTS
    from ..errors import UnknownNameError

    _setup_threads(threads)
    specs = []
    for item in _split_list(variants):
        variant, _, reduction = item.partition(":")
        if variant not in CLUSTER_VARIANTS:
            raise UnknownNameError("cluster variant", variant, CLUSTER_VARIANTS)
        if reduction not in ("", "mean", "sum"):
            raise ProtoKNNError(f"unknown reduction {reduction!r} in {item!r}; use VARIANT, VARIANT:mean or VARIANT:sum")
        specs.append(RunSpec(item, "protoknn", {"cluster_variant": variant, "cluster_reduction": reduction or "mean"}))
    settings = _comparison_settings(dataset, data_dir, limit, strict, crop, backbone, weights, backbone_opts, epochs, batch_classes, per_class,
                                    prototypes, dim, steps_per_epoch, device, seeds)
    run_comparison(specs, settings, out, title=f"cluster-loss ablation on {dataset}", console=console)
