"""torch.distributed helpers: N processes train like one process on the same global batch.

Launched by torchrun (``torchrun --nproc_per_node=N -m protoknn_plugin train ...``),
which sets RANK/WORLD_SIZE/LOCAL_RANK. Each rank forwards its shard of the global
batch; the losses see the whole global batch (``gather_with_grad``), and gradients
are summed across ranks, so the update equals the single-process one on that batch.
"""
from __future__ import annotations

import os
from dataclasses import fields
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

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


def teardown() -> None:
    if is_active():
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
    """Concatenate every rank's x along dim 0, in rank order; gradients flow through this rank's part."""
    if not is_active():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank()] = x
    return torch.cat(parts)


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


def reduce_gradients(local: Iterable[nn.Parameter], shared: Iterable[nn.Parameter] = ()) -> None:
    """Make every rank's gradients those of one process on the global batch.

    ``local``: parameters used before the gather (backbone, add-on, prototypes); each rank
    holds d(global loss)/d(its own part), so they are summed. ``shared``: parameters used
    after the gather (the head's own); each rank already holds the full gradient, so they
    are averaged, which only keeps the ranks bit-identical.
    """
    if not is_active():
        return
    sum_gradients(local)
    shared = [p for p in shared if p.grad is not None]
    sum_gradients(shared)
    for p in shared:
        p.grad.div_(world_size())


def sum_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """All-reduce (sum) gradients in one flat buffer."""
    if not is_active():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_sum(values: Tensor) -> Tensor:
    if is_active():
        values = values.clone()
        dist.all_reduce(values)
    return values
