"""The ProtoKNN cluster loss (paper sec. 2.2.2-2.2.3, eqs. 2-11) and its Table 6 ablations.

Built from one mini-batch in four steps, none of which carries a gradient except
the final weighted sum of costs:

1. ``sample_counts`` (eqs. 2-3): for each ordered pair (a, b), a != b, one Gumbel-max
   draw of a prototype from (s_a - s_b) / tau; E(a, i) counts the draws of i.
2. ``affiliation`` (eqs. 4-6): class mean Ebar, de-biased Ehat, normalised P(y, .).
3. ``transport_plan`` (eqs. 7/10): per class, entropic OT between its samples (mass 1
   each) and the prototypes (mass N_y P(y, .)), all classes in one batched
   log-domain Sinkhorn solve.
4. ``ProtoKNNClusterLoss`` (eqs. 9/11): sum_{a,i} T*_{a,i} C_{a,i}, T* constant.

Shapes: B samples, P prototypes, Y classes present in the batch.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .errors import ProtoKNNError, UnknownNameError
from .sinkhorn import log_sinkhorn_batched

CLUSTER_VARIANTS = ("most-similar", "sampling", "debias", "linear-assignment", "full")
SOLVERS = ("torch", "pot", "pot-loop")
REDUCTIONS = ("mean", "sum")

# Largest Gumbel-noise block drawn at once in ``sample_counts`` (elements); the
# default batch (112 x 112 x 512 = 6.4M) fits in one block.
_MAX_NOISE_ELEMENTS = 1 << 24


def _check_matrix(x: Tensor, name: str, what: str = "(B, P)") -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ProtoKNNError(
            f"cluster loss: {name} must be a 2-D tensor {what}, got {shape}; "
            f"pass one row per sample and one column per prototype."
        )


def _check_labels(labels: Tensor, batch: int) -> None:
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


# --------------------------------------------------------------------------- step 1
@torch.no_grad()
def sample_counts(
    profiles: Tensor, tau: float = 0.05, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Gumbel-max sampling counts E (eqs. 2-3).

    profiles: (B, P) prototype profiles s. For every ordered pair (a, b), a != b, one
    independent draw argmax_i ((s_{a,i} - s_{b,i}) / tau + g_i), g_i ~ Gumbel(0, 1).
    Returns E: (B, P), float64 for float64 profiles and float32 otherwise; E[a, i] =
    number of b whose draw for anchor a was i; every row sums to B - 1 (all zeros
    when B == 1). The noise is drawn in blocks of whole anchors ((rows, B, P), one
    block up to 2^24 elements), with no Python loop over pairs.
    No gradient. ``generator`` (on the device of ``profiles``) makes it reproducible.
    """
    _check_matrix(profiles, "profiles")
    if not tau > 0:
        raise ProtoKNNError(f"cluster loss: tau must be > 0, got {tau}; use the paper's 0.05.")
    if generator is not None and generator.device.type != profiles.device.type:
        raise ProtoKNNError(
            f"cluster loss: the generator is on {generator.device} but the profiles are on "
            f"{profiles.device}; create it with torch.Generator(device=profiles.device)."
        )
    # half precision would make the Gumbel noise coarse: sample in float32 at least
    s = profiles.detach()
    if s.dtype != torch.float64:
        s = s.float()
    n, p = s.shape
    counts = torch.zeros(n, p, dtype=s.dtype, device=s.device)
    if n < 2:
        return counts
    s = s / tau
    # anchors per noise block; the (rows, B, P) block is the only large allocation
    rows = max(1, min(n, _MAX_NOISE_ELEMENTS // (n * p)))
    not_self = ~torch.eye(n, dtype=torch.bool, device=s.device)
    for start in range(0, n, rows):  # one iteration at the default batch size
        stop = min(n, start + rows)
        # standard Gumbel noise g = -log(-log U), U ~ U[0, 1); uniform_ + two logs is
        # ~2x faster on CPU than exponential_ + one log. We build the negated score
        # -(s_a - s_b + g) = log(-log U) - s_a + s_b in place and take its argmin
        # (U = 0 gives +inf there: never drawn).
        neg_score = torch.empty(stop - start, n, p, dtype=s.dtype, device=s.device)
        neg_score.uniform_(generator=generator).log_().neg_().log_()
        neg_score -= s[start:stop, None, :]
        neg_score += s[None, :, :]
        drawn = neg_score.argmin(dim=2)  # (rows, B): prototype drawn for pair (a, b)
        counts[start:stop].scatter_add_(1, drawn, not_self[start:stop].to(s.dtype))
    return counts


# --------------------------------------------------------------------------- step 2
def _class_index(labels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """classes (Y,) sorted unique labels, index (B,) of each sample's class, sizes (Y,)."""
    classes, index, sizes = torch.unique(labels, sorted=True, return_inverse=True, return_counts=True)
    return classes, index, sizes


def _affiliation_from_index(
    counts: Tensor, index: Tensor, sizes: Tensor, debias: bool
) -> Tensor:
    y = sizes.shape[0]
    ebar = torch.zeros(y, counts.shape[1], dtype=counts.dtype, device=counts.device)
    ebar.index_add_(0, index, counts)
    ebar /= sizes.to(counts.dtype).unsqueeze(1)  # eq. 4
    if debias:  # eq. 5; an undrawn prototype (column of zeros) stays 0
        col = ebar.sum(dim=0, keepdim=True)
        ebar = torch.where(col > 0, ebar / torch.where(col > 0, col, torch.ones_like(col)), 0.0)
    row = ebar.sum(dim=1, keepdim=True)  # eq. 6
    uniform = torch.full_like(ebar, 1.0 / ebar.shape[1])
    return torch.where(row > 0, ebar / torch.where(row > 0, row, torch.ones_like(row)), uniform)


@torch.no_grad()
def affiliation(counts: Tensor, labels: Tensor, debias: bool = True) -> Tuple[Tensor, Tensor]:
    """Prototype affiliation P(y, i) of the classes in the batch (eqs. 4-6).

    counts: (B, P) from ``sample_counts``; labels: (B,) integer class ids.
    Ebar(y, i) = mean of counts over the samples of class y (eq. 4);
    Ehat(y, i) = Ebar(y, i) / sum_y' Ebar(y', i) (eq. 5, skipped when ``debias=False``,
    the Table 6 ``sampling`` ablation), 0 for a prototype drawn by no class;
    P(y, i) = Ehat(y, i) / sum_j Ehat(y, j) (eq. 6).
    Returns (classes (Y,) sorted unique labels, P (Y, P)); every row sums to 1.
    A class whose row is all zeros (only when B == 1, where nothing is drawn) falls
    back to the uniform 1/P, so rows always sum to 1 and nothing divides by zero.
    """
    _check_matrix(counts, "counts")
    _check_labels(labels, counts.shape[0])
    counts = counts.detach()
    if not counts.dtype.is_floating_point:
        counts = counts.float()
    classes, index, sizes = _class_index(labels.to(counts.device))
    return classes, _affiliation_from_index(counts, index, sizes, debias)


# --------------------------------------------------------------------------- step 3
def _class_slots(index: Tensor, sizes: Tensor) -> Tensor:
    """Slot (B,) of each sample inside its class block (0 .. N_y - 1)."""
    n = index.shape[0]
    order = torch.argsort(index, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes  # first sorted position of each class
    slot = torch.empty_like(index)
    slot[order] = torch.arange(n, device=index.device) - starts[index[order]]
    return slot


def _stack_by_class(index: Tensor, sizes: Tensor) -> Tuple[Tensor, int]:
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


def _transport_from_index(
    cost: Tensor, index: Tensor, sizes: Tensor, affil: Tensor,
    reg: float, max_iter: int, tol: float, solver: str, compact: bool = True,
) -> Tensor:
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
    # filler. W was 3-35% of P in bench_sinkhorn.py, and the plan is unchanged.
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
    log_b = b.log()
    if solver == "torch":
        res = log_sinkhorn_batched(blocks, log_a, log_b, reg, max_iter=max_iter, tol=tol)
        if not res.converged:  # Python's default filter shows it once per call site
            warnings.warn(
                f"cluster loss: Sinkhorn stopped at max_iter={max_iter} with marginal error "
                f"{res.marginal_error:.2e} > tol={tol:.0e}; the plan's rows are exact, its "
                f"columns approximate. Raise max_iter or reg if this persists.",
                RuntimeWarning, stacklevel=3,
            )
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
    _check_matrix(cost, "cost")
    if not bool(torch.isfinite(cost).all()):
        raise ProtoKNNError(
            "non-finite values (NaN or inf) in the transport cost; check the feature maps and "
            "prototypes upstream, or lower the learning rate"
        )
    _check_labels(labels, cost.shape[0])
    _check_matrix(affiliation, "affiliation", "(Y, P)")
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
    cost = cost.detach()
    if cost.dtype not in (torch.float32, torch.float64):
        cost = cost.float()
    labels, classes, affiliation = (t.to(cost.device) for t in (labels, classes, affiliation))
    found, index, sizes = _class_index(labels)
    if found.shape != classes.shape or not bool((found == classes.to(found.dtype)).all()):
        raise ProtoKNNError(
            "cluster loss: classes do not equal the sorted unique labels of this batch; "
            "pass the classes returned by affiliation(counts, labels) for the same labels."
        )
    return _transport_from_index(
        cost, index, sizes, affiliation.detach(), reg, max_iter, tol, solver, compact
    )


# --------------------------------------------------------------------------- step 4
class ProtoKNNClusterLoss(nn.Module):
    """L_clst = sum_{a,i} T*_{a,i} cost_{a,i} (eqs. 9/11) with a constant plan T*.

    ``variant`` picks T* and the cost it weights (the paper's Table 6 ablation):

    ============================  =========================================  ===========
    variant                       T*_a                                        loss on
    ============================  =========================================  ===========
    ``most-similar``              one-hot on argmin_i C_{a,i}                 C (eq. 9)
    ``sampling``                  Ebar(y_a, .) normalised to sum 1 (eq. 4)    C (eq. 9)
    ``debias``                    Ehat(y_a, .) normalised to sum 1 (eq. 5-6)  C (eq. 9)
    ``linear-assignment``         per-class Sinkhorn plan on C (eq. 10)       C (eq. 9)
    ``full`` (default)            per-class Sinkhorn plan on C^ (eq. 10)      C^ (eq. 11)
    ============================  =========================================  ===========

    Our reading: the paper's appendix says only ``full`` changes the loss from eq. 9
    to eq. 11 and that ``full`` uses the same T* definition as ``linear-assignment``;
    we take "the same definition" to mean the same eq. 10 solved on the cost that
    the loss weights (C^ for ``full``), so the plan and the loss always use one cost.

    ``reduction``: ``"mean"`` divides by the batch size B (our default, see
    docs/method.md), ``"sum"`` is the paper's literal sum. Sampling (eqs. 2-3) and the plan
    carry no gradient (appendix B); the gradient reaches only the weighted cost.

    forward(profiles (B, P), cost (B, P), gap_cost (B, P), labels (B,), generator=None)
    -> scalar. ``gap_cost`` may be None unless ``variant="full"``, ``profiles`` may be
    None for ``most-similar``.
    """

    def __init__(
        self,
        variant: str = "full",
        tau: float = 0.05,
        reg: float = 0.05,
        reduction: str = "mean",
        solver: str = "torch",
        max_iter: int = 1000,
        tol: float = 1e-6,
    ):
        super().__init__()
        if variant not in CLUSTER_VARIANTS:
            raise UnknownNameError("cluster-loss variant", variant, CLUSTER_VARIANTS)
        if reduction not in REDUCTIONS:
            raise UnknownNameError("cluster-loss reduction", reduction, REDUCTIONS)
        if solver not in SOLVERS:
            raise UnknownNameError("transport solver", solver, SOLVERS)
        if not tau > 0 or not reg > 0:
            raise ProtoKNNError(
                f"cluster loss: tau and reg must be > 0, got tau={tau}, reg={reg}; "
                f"use the paper's 0.05 for both."
            )
        if max_iter < 1:
            raise ProtoKNNError(f"cluster loss: max_iter must be >= 1, got {max_iter}.")
        self.variant, self.tau, self.reg = variant, float(tau), float(reg)
        self.reduction, self.solver = reduction, solver
        self.max_iter, self.tol = int(max_iter), float(tol)

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, tau={self.tau}, reg={self.reg}, "
            f"reduction={self.reduction!r}, solver={self.solver!r}"
        )

    @property
    def uses_gap_cost(self) -> bool:
        return self.variant == "full"

    @property
    def uses_profiles(self) -> bool:
        return self.variant != "most-similar"

    def _inputs(self, profiles, cost, gap_cost, labels) -> Tuple[Tensor, Tensor]:
        """Validate the inputs (one host sync for the finiteness check); return the
        cost the loss weights and the labels on its device."""
        weighted = gap_cost if self.uses_gap_cost else cost
        weighted_name = "gap_cost" if self.uses_gap_cost else "cost"
        if weighted is None:
            raise ProtoKNNError(
                f"cluster loss: variant {self.variant!r} needs {weighted_name}, got None; "
                f"pass the prototype layer's {weighted_name}."
            )
        _check_matrix(weighted, weighted_name)
        n, p = weighted.shape
        if n == 0 or p == 0:
            raise ProtoKNNError(
                f"cluster loss: empty input {tuple(weighted.shape)}; pass at least one sample "
                f"and one prototype."
            )
        used = {weighted_name: weighted}
        if self.variant == "linear-assignment" or self.variant == "most-similar":
            used["cost"] = cost
        if self.uses_profiles:
            if profiles is None:
                raise ProtoKNNError(
                    f"cluster loss: variant {self.variant!r} needs the profiles, got None; "
                    f"pass the prototype layer's profile."
                )
            used["profiles"] = profiles
        for name, x in used.items():
            _check_matrix(x, name)
            if x.shape != (n, p):
                raise ProtoKNNError(
                    f"cluster loss: {name} has shape {tuple(x.shape)} but {weighted_name} has "
                    f"{(n, p)}; pass all of them for the same batch and prototypes."
                )
        _check_labels(labels, n)
        finite = torch.stack([torch.isfinite(x).all() for x in used.values()])
        if not bool(finite.all()):  # the one host sync of the check
            bad = [name for name, ok in zip(used, finite.tolist()) if not ok]
            raise ProtoKNNError(
                f"non-finite values (NaN or inf) in the cluster loss input {', '.join(bad)}; "
                f"the model has diverged or got a bad image: lower the learning rate, "
                f"enable gradient clipping, or check the data."
            )
        if not weighted.dtype.is_floating_point:
            weighted = weighted.float()
        return weighted, labels.to(weighted.device)

    @torch.no_grad()
    def plan(
        self,
        profiles: Optional[Tensor],
        cost: Optional[Tensor],
        gap_cost: Optional[Tensor],
        labels: Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """The constant plan T* (B, P) of this variant; every row sums to 1."""
        weighted, labels = self._inputs(profiles, cost, gap_cost, labels)
        return self._plan(profiles, weighted, labels, generator)

    def _plan(self, profiles, weighted, labels, generator) -> Tensor:
        weighted = weighted.detach()
        dtype = weighted.dtype if weighted.dtype in (torch.float32, torch.float64) else torch.float32
        weighted = weighted.to(dtype)
        if self.variant == "most-similar":
            nearest = weighted.argmin(dim=1, keepdim=True)
            return torch.zeros_like(weighted).scatter_(1, nearest, 1.0)
        counts = sample_counts(profiles, self.tau, generator)
        _, index, sizes = _class_index(labels)
        affil = _affiliation_from_index(counts, index, sizes, debias=self.variant != "sampling")
        if self.variant in ("sampling", "debias"):
            return affil[index].to(dtype)  # rows of P(y, .) already sum to 1
        return _transport_from_index(
            weighted, index, sizes, affil, self.reg, self.max_iter, self.tol, self.solver
        )

    def forward(
        self,
        profiles: Optional[Tensor],
        cost: Optional[Tensor],
        gap_cost: Optional[Tensor],
        labels: Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        weighted, labels = self._inputs(profiles, cost, gap_cost, labels)
        with torch.no_grad():
            t = self._plan(profiles, weighted, labels, generator)
        value = (t.to(weighted.dtype) * weighted).sum()
        if self.reduction == "mean":
            value = value / weighted.shape[0]
        return value
