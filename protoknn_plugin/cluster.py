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

import inspect
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .errors import ProtoKNNError, UnknownNameError
from .registry import Registry
from .sampling import relaxed_counts, sample_counts  # noqa: F401  (sample_counts: public here)
from .transport import (  # noqa: F401  (transport_plan, SOLVERS, stack_by_class: public here too)
    SOLVERS, check_labels, check_matrix, class_index, stack_by_class, transport_from_index, transport_plan,
)

# The paper's Table 6 ablation in its order, then ours (appendix B); each is a registered ClusterPlan.
CLUSTER_VARIANTS = ("most-similar", "sampling", "debias", "linear-assignment", "full",
                    "full-relaxed", "full-implicit", "full-differentiable")
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

# --------------------------------------------------------------------------- the plans T*
CLUSTER_PLANS: Registry = Registry("cluster-loss variant")
register_cluster_plan = CLUSTER_PLANS.register


def create_cluster_plan(name: str, **settings) -> "ClusterPlan":
    """Build a plan by variant name, e.g. ``create_cluster_plan("full", reg=0.1)``."""
    return CLUSTER_PLANS.create(name, **settings)


def list_cluster_plans() -> List[str]:
    return CLUSTER_PLANS.names()


class ClusterPlan:
    """How one variant picks T* (B, P) for a batch; every row of T* sums to 1.

    Class attributes say what the variant needs: ``uses_gap_cost`` (the loss weights C^, eq. 11,
    instead of C, eq. 9), ``uses_profiles`` (it samples from the profiles), ``relaxed``
    (Gumbel-softmax counts, ``tau_soft`` and ``straight_through`` apply) and ``implicit`` (T* carries
    a gradient). Subclasses implement ``build``; ``plan`` gives it the cost in float32 or float64.
    """

    name = "base"
    uses_gap_cost = False
    uses_profiles = True
    relaxed = False
    implicit = False

    def __init__(self, tau: float = 0.05, reg: float = 0.05, solver: str = "torch", max_iter: int = 1000,
                 tol: float = 1e-6, plan_cost: str = "gap", tau_soft: float = 0.5, straight_through: bool = False):
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
        if self.implicit and solver != "torch":
            raise ProtoKNNError(
                f"cluster loss: variant {self.name!r} differentiates our own Sinkhorn solve; "
                f"use solver='torch', not {solver!r}."
            )
        self.tau, self.reg, self.solver = float(tau), float(reg), solver
        self.max_iter, self.tol = int(max_iter), float(tol)
        self.plan_cost, self.tau_soft, self.straight_through = plan_cost, float(tau_soft), bool(straight_through)

    @property
    def solves_on_cost(self) -> bool:
        """True when the plan is solved on C (eq. 8) rather than on the weighted cost."""
        return False

    def plan(self, profiles: Optional[Tensor], solved: Tensor, labels: Tensor,
             generator: Optional[torch.Generator], grad: bool) -> Tensor:
        """T* (B, P) from ``solved`` (B, P), the cost the plan is solved on; with ``grad`` (implicit
        variants) it carries a gradient to ``solved`` and, for ``full-differentiable``, to ``profiles``."""
        dtype = solved.dtype if solved.dtype in (torch.float32, torch.float64) else torch.float32
        solved = solved.to(dtype)
        if not grad:
            solved = solved.detach()
        return self.build(profiles, solved, labels, generator, grad)

    def build(self, profiles, solved: Tensor, labels: Tensor, generator, grad: bool) -> Tensor:
        raise NotImplementedError

    def counts(self, profiles: Tensor, generator, grad: bool) -> Tensor:
        """E (B, P): how often each sample's pairs drew each prototype (eqs. 2-3)."""
        if not self.relaxed:
            return sample_counts(profiles, self.tau, generator)
        source = profiles if grad else profiles.detach()
        return relaxed_counts(source, self.tau, self.tau_soft, self.straight_through, generator)

    def class_affiliation(self, profiles: Tensor, labels: Tensor, generator, grad: bool,
                          debias: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """(P(y, .) (Y, P) from this batch's drawn counts (eqs. 2-6), each sample's class row (B,),
        the class sizes (Y,)): what the sampling and transport plans start from."""
        counts = self.counts(profiles, generator, grad and self.relaxed)
        _, index, sizes = class_index(labels)
        return _affiliation_from_index(counts, index, sizes, debias=debias), index, sizes

    def extra_repr(self) -> str:
        extra = f", plan_cost={self.plan_cost!r}" if self.uses_gap_cost else ""
        if self.relaxed:
            extra += f", tau_soft={self.tau_soft}, straight_through={self.straight_through}"
        return extra

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(tau={self.tau}, reg={self.reg}, solver={self.solver!r}"
                f"{self.extra_repr()})")


@register_cluster_plan("most-similar")
class MostSimilarPlan(ClusterPlan):
    """T*_a one-hot on argmin_i C_{a,i}; no sampling."""

    name = "most-similar"
    uses_profiles = False

    def build(self, profiles, solved, labels, generator, grad):
        nearest = solved.argmin(dim=1, keepdim=True)
        return torch.zeros_like(solved).scatter_(1, nearest, 1.0)


@register_cluster_plan("sampling")
class SamplingPlan(ClusterPlan):
    """T*_a = Ebar(y_a, .) normalised to sum 1 (eq. 4, no de-biasing)."""

    name = "sampling"
    debias = False

    def build(self, profiles, solved, labels, generator, grad):
        affil, index, _ = self.class_affiliation(profiles, labels, generator, grad, debias=self.debias)
        return affil[index].to(solved.dtype)  # rows of P(y, .) already sum to 1


@register_cluster_plan("debias")
class DebiasPlan(SamplingPlan):
    """T*_a = Ehat(y_a, .) normalised to sum 1 (eqs. 5-6)."""

    name = "debias"
    debias = True


@register_cluster_plan("linear-assignment")
class LinearAssignmentPlan(ClusterPlan):
    """Per-class Sinkhorn plan (eq. 10) on C; the loss weights C (eq. 9)."""

    name = "linear-assignment"

    @property
    def solves_on_cost(self) -> bool:
        return True

    def build(self, profiles, solved, labels, generator, grad):
        affil, index, sizes = self.class_affiliation(profiles, labels, generator, grad, debias=True)
        return transport_from_index(solved, index, sizes, affil, self.reg, self.max_iter, self.tol, self.solver,
                                    differentiable=grad)


@register_cluster_plan("full")
class FullPlan(LinearAssignmentPlan):
    """Per-class Sinkhorn plan (eq. 10) on C^ (``plan_cost="gap"``) or C; the loss weights C^ (eq. 11)."""

    name = "full"
    uses_gap_cost = True

    @property
    def solves_on_cost(self) -> bool:
        return self.plan_cost == "cost"


@register_cluster_plan("full-relaxed")
class FullRelaxedPlan(FullPlan):
    """``full`` with Gumbel-softmax counts (the plan stays a constant)."""

    name = "full-relaxed"
    relaxed = True


@register_cluster_plan("full-implicit")
class FullImplicitPlan(FullPlan):
    """``full`` with T* differentiable by the implicit function theorem."""

    name = "full-implicit"
    implicit = True


@register_cluster_plan("full-differentiable")
class FullDifferentiablePlan(FullPlan):
    """Both: the gradient reaches the cost through T* and the profiles through the affiliation."""

    name = "full-differentiable"
    relaxed = True
    implicit = True


# The plan settings a loss passes on, and their defaults (a loss given a built plan leaves them be).
PLAN_DEFAULTS = {key: param.default for key, param in inspect.signature(ClusterPlan.__init__).parameters.items()
                 if key != "self"}
RELAXED_VARIANTS = tuple(name for name in CLUSTER_VARIANTS if CLUSTER_PLANS.get(name).relaxed)
IMPLICIT_VARIANTS = tuple(name for name in CLUSTER_VARIANTS if CLUSTER_PLANS.get(name).implicit)


# --------------------------------------------------------------------------- step 4
def _plan_setting(name: str, doc: str) -> property:
    return property(lambda self: getattr(self.planner, name), doc=doc)


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

    Each variant is a registered ``ClusterPlan`` (``create_cluster_plan``, ``list_cluster_plans``);
    ``variant`` is its name, with the plan's settings passed here, or a built plan (then its own
    settings apply and the loss takes only ``reduction``).

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
        variant: Union[str, ClusterPlan] = "full",
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
        settings = dict(tau=tau, reg=reg, solver=solver, max_iter=max_iter, tol=tol, plan_cost=plan_cost,
                        tau_soft=tau_soft, straight_through=straight_through)
        plan_class = None if isinstance(variant, ClusterPlan) else CLUSTER_PLANS.get(variant)
        if reduction not in REDUCTIONS:
            raise UnknownNameError("cluster-loss reduction", reduction, REDUCTIONS)
        if plan_class is None:
            changed = sorted(key for key, value in settings.items() if value != PLAN_DEFAULTS[key])
            if changed:
                raise ProtoKNNError(f"cluster loss: {', '.join(changed)} set on the loss and on the plan it was "
                                    f"given; pass them to create_cluster_plan({variant.name!r}, ...) only.")
        self.planner: ClusterPlan = variant if plan_class is None else plan_class(**settings)
        self.reduction = reduction

    variant = _plan_setting("name", "The variant's name.")
    tau = _plan_setting("tau", "Gumbel-max temperature of the sampling (eqs. 2-3).")
    reg = _plan_setting("reg", "Sinkhorn entropy weight (eq. 10).")
    solver = _plan_setting("solver", "Transport solver: torch, pot or pot-loop.")
    max_iter = _plan_setting("max_iter", "Sinkhorn iteration limit.")
    tol = _plan_setting("tol", "Sinkhorn row-marginal tolerance.")
    plan_cost = _plan_setting("plan_cost", "gap or cost: what the full family solves its plan on.")
    tau_soft = _plan_setting("tau_soft", "Gumbel-softmax temperature of the relaxed variants.")
    straight_through = _plan_setting("straight_through", "Hard forward counts in the relaxed variants.")
    uses_gap_cost = _plan_setting("uses_gap_cost", "The loss weights C^ (eq. 11) rather than C (eq. 9).")
    uses_profiles = _plan_setting("uses_profiles", "The plan samples from the profiles.")
    relaxed = _plan_setting("relaxed", "Gumbel-softmax counts.")
    implicit = _plan_setting("implicit", "T* carries a gradient.")
    solves_on_cost = _plan_setting("solves_on_cost", "The plan is solved on C (eq. 8), not the weighted cost.")

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, tau={self.tau}, reg={self.reg}, "
            f"reduction={self.reduction!r}, solver={self.solver!r}{self.planner.extra_repr()}"
        )

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
        return self.planner.plan(profiles, solved, labels, generator, grad=False)

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
            t = self.planner.plan(profiles, solved, labels, generator, grad=True)
        else:
            with torch.no_grad():
                t = self.planner.plan(profiles, solved, labels, generator, grad=False)
        value = (t.to(weighted.dtype) * weighted).sum()
        if self.reduction == "mean":
            value = value / weighted.shape[0]
        return value
