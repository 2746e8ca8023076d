"""The ProtoKNN cluster loss (paper sec. 2.2.2-2.2.3, eqs. 2-11) and its Table 6 ablations.

Built from one mini-batch in four steps, none of which carries a gradient except
the final weighted sum of costs:

1. ``sample_counts`` (eqs. 2-3, in ``sampling``): for each ordered pair (a, b), a != b,
   one Gumbel-max draw of a prototype from (s_a - s_b) / tau; E(a, i) counts the draws of i.
2. ``affiliation`` (eqs. 4-6): class mean Ebar, de-biased Ehat, normalised P(y, .).
3. ``transport_plan`` (eqs. 7/10): per class, entropic OT between its samples (mass 1
   each) and the prototypes (mass N_y P(y, .)), all classes in one batched
   log-domain Sinkhorn solve.
4. ``ProtoKNNClusterLoss`` (eqs. 9/11): sum_{a,i} T*_{a,i} C_{a,i}, T* constant.

Beyond the paper (its appendix B): the ``full-relaxed`` variant samples with the
Gumbel-softmax (``sampling.relaxed_counts``), ``full-implicit`` differentiates T*
by the implicit function theorem (``sinkhorn_grad``), ``full-differentiable`` both,
so that the gradient also reaches the profiles through the affiliation.

Shapes: B samples, P prototypes, Y classes present in the batch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .errors import ProtoKNNError, UnknownNameError
from .sampling import relaxed_counts, sample_counts  # noqa: F401  (sample_counts: public here)
from .transport import (  # noqa: F401  (transport_plan, SOLVERS, stack_by_class: public here too)
    SOLVERS, check_labels, check_matrix, class_index, stack_by_class, transport_from_index, transport_plan,
)

CLUSTER_VARIANTS = ("most-similar", "sampling", "debias", "linear-assignment", "full",
                    "full-relaxed", "full-implicit", "full-differentiable")
# Beyond the paper (its appendix B): a relaxed sampler and/or a differentiable plan.
RELAXED_VARIANTS = ("full-relaxed", "full-differentiable")
IMPLICIT_VARIANTS = ("full-implicit", "full-differentiable")
# The cost the `full` family solves its plan on: the gap cost C^ (eq. 11) or C (eq. 8).
PLAN_COSTS = ("gap", "cost")
REDUCTIONS = ("mean", "sum")


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
    check_matrix(counts, "counts")
    check_labels(labels, counts.shape[0])
    counts = counts.detach()
    if not counts.dtype.is_floating_point:
        counts = counts.float()
    classes, index, sizes = class_index(labels.to(counts.device))
    return classes, _affiliation_from_index(counts, index, sizes, debias)


# --------------------------------------------------------------------------- step 3: transport.py

# --------------------------------------------------------------------------- step 4
class ProtoKNNClusterLoss(nn.Module):
    """L_clst = sum_{a,i} T*_{a,i} cost_{a,i} (eqs. 9/11).

    ``variant`` picks T* and the cost it weights (the paper's Table 6 ablation, then ours):

    ========================  ==========================================  ===========
    variant                   T*_a                                        loss on
    ========================  ==========================================  ===========
    ``most-similar``          one-hot on argmin_i C_{a,i}                 C (eq. 9)
    ``sampling``              Ebar(y_a, .) normalised to sum 1 (eq. 4)    C (eq. 9)
    ``debias``                Ehat(y_a, .) normalised to sum 1 (eq. 5-6)  C (eq. 9)
    ``linear-assignment``     per-class Sinkhorn plan on C (eq. 10)       C (eq. 9)
    ``full`` (default)        per-class Sinkhorn plan on C^ (eq. 10)      C^ (eq. 11)
    ``full-relaxed``          ``full`` with Gumbel-softmax counts         C^
    ``full-implicit``         ``full``, T* differentiable (implicit)      C^
    ``full-differentiable``   both: gradient via T* and the affiliation   C^
    ========================  ==========================================  ===========

    Our reading: the paper's appendix says only ``full`` changes the loss from eq. 9
    to eq. 11 and that ``full`` uses the same T* definition as ``linear-assignment``;
    we take "the same definition" to mean the same eq. 10 solved on the cost that
    the loss weights (``plan_cost="gap"``, C^); ``plan_cost="cost"`` solves the plan
    of the ``full`` family on C and still weights C^.

    ``reduction``: ``"mean"`` divides by the batch size B (our default), ``"sum"`` is
    the paper's literal sum. In the paper's variants sampling (eqs. 2-3) and the plan
    carry no gradient (appendix B); the gradient reaches only the weighted cost.
    ``full-relaxed`` changes only the forward (soft counts, the plan stays a constant,
    so no gradient reaches the sampling); ``full-implicit`` adds dT*/dC;
    ``full-differentiable`` adds dT*/dC and dT*/d(affiliation) d(affiliation)/ds.
    ``tau_soft`` is the Gumbel-softmax temperature of the relaxed variants and
    ``straight_through`` makes their forward counts hard (then ``full-relaxed`` is
    ``full`` exactly, and only ``full-differentiable`` differs in its gradient).

    forward(profiles (B, P), cost (B, P), gap_cost (B, P), labels (B,), generator=None)
    -> scalar. ``gap_cost`` may be None unless the variant is of the ``full`` family,
    ``profiles`` may be None for ``most-similar``.
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
        plan_cost: str = "gap",
        tau_soft: float = 0.5,
        straight_through: bool = False,
    ):
        super().__init__()
        if variant not in CLUSTER_VARIANTS:
            raise UnknownNameError("cluster-loss variant", variant, CLUSTER_VARIANTS)
        if reduction not in REDUCTIONS:
            raise UnknownNameError("cluster-loss reduction", reduction, REDUCTIONS)
        if solver not in SOLVERS:
            raise UnknownNameError("transport solver", solver, SOLVERS)
        if plan_cost not in PLAN_COSTS:
            raise UnknownNameError("plan cost", plan_cost, PLAN_COSTS)
        if not tau > 0 or not reg > 0 or not tau_soft > 0:
            raise ProtoKNNError(
                f"cluster loss: tau, reg and tau_soft must be > 0, got tau={tau}, reg={reg}, "
                f"tau_soft={tau_soft}; use the paper's 0.05 for tau and reg."
            )
        if max_iter < 1:
            raise ProtoKNNError(f"cluster loss: max_iter must be >= 1, got {max_iter}.")
        if variant in IMPLICIT_VARIANTS and solver != "torch":
            raise ProtoKNNError(
                f"cluster loss: variant {variant!r} differentiates our own Sinkhorn solve; "
                f"use solver='torch', not {solver!r}."
            )
        self.variant, self.tau, self.reg = variant, float(tau), float(reg)
        self.reduction, self.solver = reduction, solver
        self.max_iter, self.tol = int(max_iter), float(tol)
        self.plan_cost, self.tau_soft, self.straight_through = plan_cost, float(tau_soft), bool(straight_through)

    def extra_repr(self) -> str:
        extra = f", plan_cost={self.plan_cost!r}" if self.uses_gap_cost else ""
        if self.relaxed:
            extra += f", tau_soft={self.tau_soft}, straight_through={self.straight_through}"
        return (
            f"variant={self.variant!r}, tau={self.tau}, reg={self.reg}, "
            f"reduction={self.reduction!r}, solver={self.solver!r}{extra}"
        )

    @property
    def uses_gap_cost(self) -> bool:
        return self.variant.startswith("full")

    @property
    def uses_profiles(self) -> bool:
        return self.variant != "most-similar"

    @property
    def relaxed(self) -> bool:
        return self.variant in RELAXED_VARIANTS

    @property
    def implicit(self) -> bool:
        return self.variant in IMPLICIT_VARIANTS

    @property
    def solves_on_cost(self) -> bool:
        """True when the plan is solved on C (eq. 8) rather than on the weighted cost."""
        return self.variant == "linear-assignment" or (self.uses_gap_cost and self.plan_cost == "cost")

    def _inputs(self, profiles, cost, gap_cost, labels) -> Tuple[Tensor, Tensor, Tensor]:
        """Validate the inputs (one host sync for the finiteness check); return the
        cost the loss weights, the cost the plan is solved on, and the labels on
        their device."""
        weighted = gap_cost if self.uses_gap_cost else cost
        weighted_name = "gap_cost" if self.uses_gap_cost else "cost"
        if weighted is None:
            raise ProtoKNNError(
                f"cluster loss: variant {self.variant!r} needs {weighted_name}, got None; "
                f"pass the prototype layer's {weighted_name}."
            )
        check_matrix(weighted, weighted_name)
        n, p = weighted.shape
        if n == 0 or p == 0:
            raise ProtoKNNError(
                f"cluster loss: empty input {tuple(weighted.shape)}; pass at least one sample "
                f"and one prototype."
            )
        used = {weighted_name: weighted}
        if self.solves_on_cost or self.variant == "most-similar":
            if cost is None:
                raise ProtoKNNError(
                    f"cluster loss: variant {self.variant!r} with plan_cost={self.plan_cost!r} needs "
                    f"cost, got None; pass the prototype layer's cost."
                )
            used["cost"] = cost
        if self.uses_profiles:
            if profiles is None:
                raise ProtoKNNError(
                    f"cluster loss: variant {self.variant!r} needs the profiles, got None; "
                    f"pass the prototype layer's profile."
                )
            used["profiles"] = profiles
        for name, x in used.items():
            check_matrix(x, name)
            if x.shape != (n, p):
                raise ProtoKNNError(
                    f"cluster loss: {name} has shape {tuple(x.shape)} but {weighted_name} has "
                    f"{(n, p)}; pass all of them for the same batch and prototypes."
                )
        check_labels(labels, n)
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
        solved = weighted
        if self.solves_on_cost and self.uses_gap_cost:
            solved = cost if cost.dtype.is_floating_point else cost.float()
        return weighted, solved, labels.to(weighted.device)

    @torch.no_grad()
    def plan(
        self,
        profiles: Optional[Tensor],
        cost: Optional[Tensor],
        gap_cost: Optional[Tensor],
        labels: Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """The plan T* (B, P) of this variant, detached; every row sums to 1."""
        _, solved, labels = self._inputs(profiles, cost, gap_cost, labels)
        return self._plan(profiles, solved, labels, generator, grad=False)

    def _counts(self, profiles: Tensor, generator, grad: bool) -> Tensor:
        if not self.relaxed:
            return sample_counts(profiles, self.tau, generator)
        source = profiles if grad else profiles.detach()
        return relaxed_counts(source, self.tau, self.tau_soft, self.straight_through, generator)

    def _plan(self, profiles, solved, labels, generator, grad: bool) -> Tensor:
        """T* (B, P); with ``grad`` (implicit variants) it carries a gradient to
        ``solved`` and, for ``full-differentiable``, to ``profiles``."""
        dtype = solved.dtype if solved.dtype in (torch.float32, torch.float64) else torch.float32
        solved = solved.to(dtype)
        if not grad:
            solved = solved.detach()
        if self.variant == "most-similar":
            nearest = solved.argmin(dim=1, keepdim=True)
            return torch.zeros_like(solved).scatter_(1, nearest, 1.0)
        counts = self._counts(profiles, generator, grad and self.relaxed)
        _, index, sizes = class_index(labels)
        affil = _affiliation_from_index(counts, index, sizes, debias=self.variant != "sampling")
        if self.variant in ("sampling", "debias"):
            return affil[index].to(dtype)  # rows of P(y, .) already sum to 1
        return transport_from_index(
            solved, index, sizes, affil, self.reg, self.max_iter, self.tol, self.solver,
            differentiable=grad,
        )

    def forward(
        self,
        profiles: Optional[Tensor],
        cost: Optional[Tensor],
        gap_cost: Optional[Tensor],
        labels: Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        weighted, solved, labels = self._inputs(profiles, cost, gap_cost, labels)
        if self.implicit:
            t = self._plan(profiles, solved, labels, generator, grad=True)
        else:
            with torch.no_grad():
                t = self._plan(profiles, solved, labels, generator, grad=False)
        value = (t.to(weighted.dtype) * weighted).sum()
        if self.reduction == "mean":
            value = value / weighted.shape[0]
        return value
