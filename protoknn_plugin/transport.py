"""Step 3 of the cluster loss (paper eqs. 7/10): the per-class entropic transport plan T*.

For each class y of the batch: rows = its N_y samples (mass 1 each), columns = the
prototypes (mass N_y P(y, .)); all classes are stacked as (Y, Nmax, W) blocks and
solved at once by ``sinkhorn.log_sinkhorn_batched`` (or POT, for reference), or,
differentiably, by ``sinkhorn_grad.sinkhorn_implicit``.

Shapes: B samples, P prototypes, Y classes present in the batch.
"""
from __future__ import annotations

import warnings
from typing import Tuple

import torch
from torch import Tensor

from .errors import ProtoKNNError, UnknownNameError
from .sinkhorn import log_sinkhorn_batched
from .sinkhorn_grad import sinkhorn_implicit

SOLVERS = ("torch", "pot", "pot-loop")


def check_matrix(x: Tensor, name: str, what: str = "(B, P)") -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ProtoKNNError(
            f"cluster loss: {name} must be a 2-D tensor {what}, got {shape}; "
            f"pass one row per sample and one column per prototype."
        )


def check_labels(labels: Tensor, batch: int) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != batch:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ProtoKNNError(
            f"cluster loss: labels must be a 1-D tensor of {batch} class ids (one per sample), "
            f"got {shape}; pass the batch's integer labels."
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ProtoKNNError(
            f"cluster loss: labels must be integer class ids, got dtype {labels.dtype}; "
            f"convert them with labels.long()."
        )


def class_index(labels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """classes (Y,) sorted unique labels, index (B,) of each sample's class, sizes (Y,)."""
    classes, index, sizes = torch.unique(labels, sorted=True, return_inverse=True, return_counts=True)
    return classes, index, sizes


def _class_slots(index: Tensor, sizes: Tensor) -> Tensor:
    """Slot (B,) of each sample inside its class block (0 .. N_y - 1)."""
    n = index.shape[0]
    order = torch.argsort(index, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes  # first sorted position of each class
    slot = torch.empty_like(index)
    slot[order] = torch.arange(n, device=index.device) - starts[index[order]]
    return slot


def stack_by_class(index: Tensor, sizes: Tensor) -> Tuple[Tensor, int]:
    """Slot (B,) of each sample inside its class block, and the largest class size."""
    return _class_slots(index, sizes), int(sizes.max())  # host sync: the block's shape


def _solve_pot_batch(cost, log_a, log_b, reg, max_iter, tol):
    from ot.batch import solve_batch

    res = solve_batch(
        cost, reg=reg, a=log_a.exp(), b=log_b.exp(), max_iter=max_iter, tol=tol,
        method="log_sinkhorn", grad="detach",
    )
    return res.plan


def _solve_pot_loop(cost, log_a, log_b, reg, max_iter, tol):
    import ot

    a, b = log_a.exp(), log_b.exp()
    plan = torch.zeros_like(cost)
    for y in range(cost.shape[0]):  # reference path: the benchmark's baseline
        rows = a[y] > 0
        plan[y, rows] = ot.sinkhorn(
            a[y, rows], b[y], cost[y, rows], reg, method="sinkhorn_log",
            numItermax=max_iter, stopThr=tol,
        )
    return plan


def _warn_unconverged(max_iter: int, tol: float) -> None:
    # The text holds only the settings, which stay fixed through a run, so Python's default filter
    # shows it once instead of once per training step (the error itself varies from step to step).
    warnings.warn(
        f"cluster loss: Sinkhorn stopped at max_iter={max_iter} with a marginal error above tol={tol:.0e}; "
        f"the plan's rows are exact, its columns approximate. Raise max_iter or reg if this persists.",
        RuntimeWarning, stacklevel=4,
    )


def transport_from_index(
    cost: Tensor, index: Tensor, sizes: Tensor, affil: Tensor,
    reg: float, max_iter: int, tol: float, solver: str, compact: bool = True,
    differentiable: bool = False,
) -> Tensor:
    """The plan (B, P). ``differentiable``: built with autograd and solved by
    ``sinkhorn_implicit``, so it carries a gradient to ``cost`` and ``affil``."""
    dtype = cost.dtype
    n, p = cost.shape
    y = sizes.shape[0]
    slot = _class_slots(index, sizes)
    # b = N_y P(y, .), renormalised in the working dtype so that sum b == sum a == N_y
    b = affil.to(dtype)
    b = b / b.sum(dim=1, keepdim=True) * sizes.to(dtype).unsqueeze(1)
    # Compaction: a prototype of zero mass for class y gets T = 0 from every sample of
    # y, so only the W <= P columns that some class draws need solving. Each class's
    # drawn columns come first in ``cols`` (Y, W); the rest of a row is zero-mass
    # filler. W is usually a small share of P (bench_sinkhorn.py), and the plan is unchanged.
    has_mass = b > 0
    # one host sync for both block dimensions: largest class and widest class row
    n_max, width = torch.stack([sizes.max(), has_mass.sum(dim=1).max()]).tolist()
    cols = None
    if compact:
        if width < p:
            cols = torch.sort(has_mass.to(torch.uint8), dim=1, descending=True, stable=True).indices
            cols = cols[:, :width]
            b = b.gather(1, cols)
            cost = cost.gather(1, cols[index])
    w = cost.shape[1]
    # (Y, Nmax, W) blocks; padded rows carry zero mass (log-mass -inf) and zero cost
    blocks = torch.zeros(y, n_max, w, dtype=dtype, device=cost.device)
    blocks[index, slot] = cost
    log_a = torch.full((y, n_max), float("-inf"), dtype=dtype, device=cost.device)
    log_a[index, slot] = 0.0
    if differentiable:
        info: dict = {}
        plan = sinkhorn_implicit(blocks, log_a.exp(), b, reg, max_iter=max_iter, tol=tol, info=info)
        if not info["converged"]:
            _warn_unconverged(max_iter, tol)
        plan = plan[index, slot]
        if cols is None:
            return plan
        return torch.zeros(n, p, dtype=dtype, device=plan.device).scatter(1, cols[index], plan)
    log_b = b.log()
    if solver == "torch":
        res = log_sinkhorn_batched(blocks, log_a, log_b, reg, max_iter=max_iter, tol=tol)
        if not res.converged:
            _warn_unconverged(max_iter, tol)
        plan = res.plan
    elif solver == "pot":
        plan = _solve_pot_batch(blocks, log_a, log_b, reg, max_iter, tol)
    elif solver == "pot-loop":
        plan = _solve_pot_loop(blocks, log_a, log_b, reg, max_iter, tol)
    else:
        raise UnknownNameError("transport solver", solver, SOLVERS)
    plan = plan[index, slot]  # (B, W)
    if cols is None:
        return plan
    return torch.zeros(n, p, dtype=dtype, device=plan.device).scatter_(1, cols[index], plan)


def _check_plan_inputs(cost: Tensor, labels: Tensor, classes: Tensor, affiliation: Tensor,
                       reg: float, max_iter: int, solver: str) -> None:
    """One-line errors for ``transport_plan``'s arguments (shapes as there)."""
    check_matrix(cost, "cost")
    if not bool(torch.isfinite(cost).all()):
        raise ProtoKNNError(
            "non-finite values (NaN or inf) in the transport cost; check the feature maps and "
            "prototypes upstream, or lower the learning rate"
        )
    check_labels(labels, cost.shape[0])
    check_matrix(affiliation, "affiliation", "(Y, P)")
    if solver not in SOLVERS:
        raise UnknownNameError("transport solver", solver, SOLVERS)
    if not reg > 0:
        raise ProtoKNNError(f"cluster loss: reg must be > 0, got {reg}; use the paper's 0.05.")
    if max_iter < 1:
        raise ProtoKNNError(f"cluster loss: max_iter must be >= 1, got {max_iter}.")
    if classes.dim() != 1 or affiliation.shape != (classes.shape[0], cost.shape[1]):
        raise ProtoKNNError(
            f"cluster loss: affiliation {tuple(affiliation.shape)} does not match "
            f"{classes.shape[0]} classes x {cost.shape[1]} prototypes; pass the "
            f"(classes, P) pair returned by affiliation(counts, labels)."
        )


@torch.no_grad()
def transport_plan(
    cost: Tensor,
    labels: Tensor,
    classes: Tensor,
    affiliation: Tensor,
    reg: float = 0.05,
    max_iter: int = 1000,
    tol: float = 1e-6,
    solver: str = "torch",
    compact: bool = True,
) -> Tensor:
    """Per-class entropic transport plan T* (eqs. 7/10), all classes in one batched solve.

    cost: (B, P); labels: (B,); classes: (Y,) sorted, and affiliation: (Y, P), both as
    returned by ``affiliation``. For each class y: rows = its N_y samples (mass 1 each),
    columns = prototypes (mass N_y P(y, i)), entropy weight ``reg`` as in POT
    (kernel exp(-C / reg)), solved in the log domain until the largest row-marginal
    error is below ``tol`` (checked every 10 iterations on a GPU, every 5 on the CPU)
    or ``max_iter`` (then a RuntimeWarning; rows stay exact).
    Returns T: (B, P), detached, in the dtype of ``cost`` (float32 or float64); row a
    sums to 1 and, per class, the column sums over its samples equal N_y P(y, .).
    ``solver``: "torch" (ours, batched), "pot" (``ot.batch.solve_batch``, method
    "log_sinkhorn") or "pot-loop" (a loop of ``ot.sinkhorn(method="sinkhorn_log")``).
    No cost normalisation: squared distances of unit vectors lie in [-4, 4].
    ``compact`` solves only the prototypes that some class of the batch drew (the
    others get T = 0 anyway); it changes the speed, not the plan.
    """
    _check_plan_inputs(cost, labels, classes, affiliation, reg, max_iter, solver)
    cost = cost.detach()
    if cost.dtype not in (torch.float32, torch.float64):
        cost = cost.float()
    labels, classes, affiliation = (t.to(cost.device) for t in (labels, classes, affiliation))
    found, index, sizes = class_index(labels)
    if found.shape != classes.shape or not bool((found == classes.to(found.dtype)).all()):
        raise ProtoKNNError(
            "cluster loss: classes do not equal the sorted unique labels of this batch; "
            "pass the classes returned by affiliation(counts, labels) for the same labels."
        )
    return transport_from_index(
        cost, index, sizes, affiliation.detach(), reg, max_iter, tol, solver, compact
    )
