"""torch.distributed helpers: N processes train like one process on the same global batch.

Launched by torchrun (``torchrun --nproc_per_node=N -m protoknn_plugin train ...``),
which sets RANK/WORLD_SIZE/LOCAL_RANK. Each rank forwards its shard of the global
batch inside torch's DistributedDataParallel; the losses see the whole global batch,
gathered with ``torch.distributed.nn.functional.all_gather`` (as pytorch-metric-learning's
DistributedLossWrapper does). Its backward sums, over ranks, the gradient that every rank's
copy of the loss sends to each shard, so rank r holds W x d(loss)/d(its shard); DDP's
average over the W ranks then gives exactly the single-process gradient on the global batch.
"""
from __future__ import annotations

import os
from dataclasses import fields
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ProtoKNNError


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> Optional[torch.device]:
    """Initialise the process group when torchrun started us: gloo on CPU, nccl on GPU.

    Returns the device this rank should use (cuda:LOCAL_RANK on GPU).
    """
    if not launched_by_torchrun() or is_active():
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend)
    except (RuntimeError, ValueError) as err:
        raise ProtoKNNError(f"could not start torch.distributed ({backend}): {err}; launch with torchrun") from None
    return device


def teardown(timeout_s: float = 600.0) -> None:
    """Wait for every rank, then destroy the process group.

    Without the barrier a rank that finishes first destroys its group and exits while a peer
    is still in a collective or about to destroy its own; gloo's worker thread then dies with
    its peer and aborts the process. A barrier that fails (a peer died or never arrived within
    ``timeout_s``) ends in one ProtoKNNError line instead.
    """
    if not is_active():
        return
    try:
        if dist.get_backend() == "gloo":  # gloo's barrier takes a timeout and names the missing rank
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    except RuntimeError as err:  # DistBackendError and gloo timeouts are RuntimeErrors
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ProtoKNNError(f"rank {rank()} could not reach the final barrier ({first_line}); "
                            "another process ended early: check its log, then rerun with --resume") from None
    dist.destroy_process_group()


def shard(items: list) -> list:
    """This rank's part of a global batch (every world_size-th item)."""
    n = world_size()
    if len(items) % n:
        raise ProtoKNNError(
            f"the global batch of {len(items)} images does not split evenly over {n} processes; "
            "choose --batch-classes x --per-class divisible by --nproc_per_node"
        )
    return items[rank()::n]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate every rank's x along dim 0, in rank order; the backward is gradient-carrying."""
    if not is_active():
        return x
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # torch 2.14 marks it deprecated; it is still the gradient-carrying gather that PML's
        # DistributedLossWrapper uses, and its backward (a sum over ranks) is what the
        # gradient argument in this module's docstring relies on.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()))


def gather_labels(labels: Tensor) -> Tensor:
    """Every rank's labels in global batch order (no gradient)."""
    if not is_active():
        return labels
    parts = [torch.empty_like(labels) for _ in range(world_size())]
    dist.all_gather(parts, labels.contiguous())
    gathered = torch.cat(parts)
    return gathered[unshard_order(len(gathered)).to(gathered.device)]


def unshard_order(n_global: int) -> Tensor:
    """Index that puts a rank-ordered concatenation of strided shards back in global batch order."""
    w = world_size()
    order = torch.arange(n_global).view(-1, w).t().reshape(-1)  # global index of each gathered position
    return torch.argsort(order)


def gather_outputs(out):
    """Gather every tensor field of a PrototypeOutputs that the losses read, in global batch order."""
    if not is_active():
        return out
    values = {}
    for f in fields(out):
        value = getattr(out, f.name)
        if isinstance(value, Tensor) and f.name in ("profile", "cost", "gap_cost", "backbone_features"):
            gathered = gather_with_grad(value)
            value = gathered[unshard_order(gathered.shape[0]).to(gathered.device)]
        elif f.name in ("feature_map", "similarity_maps", "locations"):
            value = None  # per-patch data stays local: no loss reads it
        values[f.name] = value
    return type(out)(**values)


def all_reduce_sum(values: Tensor) -> Tensor:
    if is_active():
        values = values.clone()
        dist.all_reduce(values)
    return values


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics, a kNN memory) on every rank; nothing without torchrun."""
    if is_active():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)
