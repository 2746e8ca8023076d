"""The ProtoKNN cluster loss: hand-computed cases and invariants (eqs. 2-11, Table 6)."""
from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from protoknn_plugin import cluster, sampling
from protoknn_plugin.cluster import (
    CLUSTER_VARIANTS,
    ProtoKNNClusterLoss,
    affiliation,
    sample_counts,
    transport_plan,
)
from protoknn_plugin.errors import ProtoKNNError, UnknownNameError
from protoknn_plugin.sinkhorn import log_sinkhorn_batched

# Three samples whose pairwise profile differences each have one clear winner
# (margin >= 0.1, so with tau = 1e-4 the Gumbel noise cannot change any draw):
#   (0,1): [ .9, -.1, -.2] -> 0    (0,2): [ .1,  .5, -.1] -> 1
#   (1,0): [-.9,  .1,  .2] -> 2    (1,2): [-.8,  .6,  .1] -> 1
#   (2,0): [-.1, -.5,  .1] -> 2    (2,1): [ .8, -.6, -.1] -> 0
DETERMINISTIC_PROFILES = torch.tensor([[0.9, 0.5, 0.0], [0.0, 0.6, 0.2], [0.8, 0.0, 0.1]])
DETERMINISTIC_COUNTS = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def realistic_batch(n_classes=6, per_class=2, n_protos=32, dim=16, patches=9, seed=0, dtype=torch.float32):
    """Profiles, costs and gap costs of random unit patch features vs unit prototypes."""
    g = gen(seed)
    protos = F.normalize(torch.randn(n_protos, dim, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    parts = torch.randint(0, n_protos, (n_classes, 3), generator=g)
    n = labels.shape[0]
    pick = parts[labels][torch.arange(n)[:, None], torch.randint(0, 3, (n, patches), generator=g)]
    z = F.normalize(protos[pick] + 0.3 * torch.randn(n, patches, dim, generator=g, dtype=torch.float64), dim=2)
    cos = torch.einsum("bhd,pd->bhp", z, protos)
    sq = 2 - 2 * cos
    cost = sq.amin(1)
    return (cos.amax(1).to(dtype), cost.to(dtype), (cost - sq.mean(1)).to(dtype), labels)


def class_column_error(plan, labels, classes, affil):
    """Largest |sum over class-y samples of T - N_y P(y, .)| over all classes."""
    worst = 0.0
    for k, y in enumerate(classes.tolist()):
        rows = labels == y
        target = rows.sum() * affil[k].to(plan.dtype)
        worst = max(worst, float((plan[rows].sum(0) - target).abs().max()))
    return worst


# ---------------------------------------------------------------- sample_counts
def test_counts_rows_sum_to_batch_minus_one():
    s, _, _, _ = realistic_batch()
    counts = sample_counts(s, generator=gen())
    assert counts.shape == s.shape
    assert torch.equal(counts.sum(1), torch.full((s.shape[0],), s.shape[0] - 1.0))
    assert torch.equal(counts, counts.round()) and bool((counts >= 0).all())


def test_counts_hand_computed_when_tau_is_tiny():
    counts = sample_counts(DETERMINISTIC_PROFILES, tau=1e-4, generator=gen())
    assert torch.equal(counts, DETERMINISTIC_COUNTS)


def test_counts_chunked_noise_gives_the_same_deterministic_draws(monkeypatch):
    monkeypatch.setattr(sampling, "_MAX_NOISE_ELEMENTS", 1)  # one anchor per block
    counts = sample_counts(DETERMINISTIC_PROFILES, tau=1e-4, generator=gen())
    assert torch.equal(counts, DETERMINISTIC_COUNTS)
    s, _, _, _ = realistic_batch()
    assert torch.equal(sample_counts(s, generator=gen()).sum(1), torch.full((s.shape[0],), s.shape[0] - 1.0))


def test_counts_reproducible_with_generator_and_no_gradient():
    s, _, _, _ = realistic_batch()
    s.requires_grad_(True)
    first = sample_counts(s, generator=gen(3))
    assert torch.equal(first, sample_counts(s, generator=gen(3)))
    assert not torch.equal(first, sample_counts(s, generator=gen(4)))
    assert not first.requires_grad


def test_counts_single_sample_is_all_zeros():
    assert torch.equal(sample_counts(torch.rand(1, 5)), torch.zeros(1, 5))


def test_counts_draw_frequency_matches_softmax():
    # anchor 0 has s = [.05, 0]; the other 1000 samples s = [0, .02]. Each of anchor 0's
    # pairs draws prototype 0 with probability softmax([.05, -.02] / .05)[0] = sigmoid(1.4).
    n, calls, tau = 1001, 10, 0.05
    s = torch.zeros(n, 2)
    s[0] = torch.tensor([0.05, 0.0])
    s[1:, 1] = 0.02
    g = gen(7)
    drawn0 = sum(float(sample_counts(s, tau=tau, generator=g)[0, 0]) for _ in range(calls))
    expected = 1.0 / (1.0 + math.exp(-1.4))  # 0.802
    # 10,000 draws: binomial std 0.004, so 0.02 is a 5-sigma band
    assert abs(drawn0 / ((n - 1) * calls) - expected) < 0.02


# ---------------------------------------------------------------- affiliation
# counts of 4 samples over 4 prototypes; labels unsorted; prototype 3 never drawn.
HAND_COUNTS = torch.tensor([[2.0, 1, 0, 0], [0, 3, 0, 0], [0, 1, 2, 0], [1, 0, 2, 0]])
HAND_LABELS = torch.tensor([2, 0, 2, 1])


def test_affiliation_hand_computed_debiased():
    # Ebar: y0 = [0,3,0,0], y1 = [1,0,2,0], y2 = mean(a0, a2) = [1,1,1,0]; column sums [2,4,3,0]
    # Ehat: y0 = [0,3/4,0,0], y1 = [1/2,0,2/3,0], y2 = [1/2,1/4,1/3,0]
    # P:    y0 = [0,1,0,0],   y1 = [3/7,0,4/7,0], y2 = [6/13,3/13,4/13,0]
    classes, p = affiliation(HAND_COUNTS, HAND_LABELS)
    assert classes.tolist() == [0, 1, 2]
    expected = torch.tensor([[0, 1, 0, 0], [3 / 7, 0, 4 / 7, 0], [6 / 13, 3 / 13, 4 / 13, 0]])
    assert torch.allclose(p, expected, atol=1e-6)
    assert torch.allclose(p.sum(1), torch.ones(3), atol=1e-6)
    assert bool((p[:, 3] == 0).all())  # undrawn prototype: exactly 0, not NaN


def test_affiliation_without_debias_is_the_normalised_class_mean():
    # Ebar rows normalised: y0 = [0,1,0,0], y1 = [1/3,0,2/3,0], y2 = [1/3,1/3,1/3,0]
    _, p = affiliation(HAND_COUNTS, HAND_LABELS, debias=False)
    expected = torch.tensor([[0, 1, 0, 0], [1 / 3, 0, 2 / 3, 0], [1 / 3, 1 / 3, 1 / 3, 0]])
    assert torch.allclose(p, expected, atol=1e-6)


def test_affiliation_all_zero_counts_fall_back_to_uniform():
    classes, p = affiliation(torch.zeros(1, 4), torch.tensor([5]))
    assert classes.tolist() == [5]
    assert torch.equal(p, torch.full((1, 4), 0.25))


def test_affiliation_rejects_mismatched_labels():
    with pytest.raises(ProtoKNNError, match="labels"):
        affiliation(HAND_COUNTS, torch.tensor([0, 1]))
    with pytest.raises(ProtoKNNError, match="integer"):
        affiliation(HAND_COUNTS, torch.zeros(4))


# ---------------------------------------------------------------- transport_plan
def plan_for(dtype, reg=0.05, tol=1e-6, solver="torch", seed=0, **kw):
    s, cost, gap, labels = realistic_batch(seed=seed, dtype=dtype, **kw)
    classes, affil = affiliation(sample_counts(s, generator=gen(seed)), labels)
    plan = transport_plan(gap, labels, classes, affil, reg=reg, tol=tol, max_iter=5000, solver=solver)
    return plan, gap, labels, classes, affil


@pytest.mark.parametrize("dtype, tol, bound", [(torch.float32, 1e-6, 1e-4), (torch.float64, 1e-10, 1e-8)])
def test_plan_marginals(dtype, tol, bound):
    plan, _, labels, classes, affil = plan_for(dtype, tol=tol)
    assert plan.dtype == dtype and not plan.requires_grad
    assert bool((plan >= 0).all())
    assert float((plan.sum(1) - 1).abs().max()) < bound
    assert class_column_error(plan, labels, classes, affil) < bound


def test_plan_matches_exact_emd_as_reg_goes_to_zero():
    # one class, 2 samples x 3 prototypes, b = 2 * [.5, .25, .25] = [1, .5, .5].
    # With t00 = x, t01 = y the cost is x + 4y + 0.5 on x + y >= .5: unique optimum
    # x = .5, y = 0, i.e. T = [[.5, 0, .5], [.5, .5, 0]] (cost 1.0).
    cost = torch.tensor([[0.0, 2.0, 1.0], [1.0, 0.0, 3.0]], dtype=torch.float64)
    labels, classes = torch.tensor([4, 4]), torch.tensor([4])
    affil = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    exact = ot.emd(np.ones(2), np.array([1.0, 0.5, 0.5]), cost.numpy())
    assert np.allclose(exact, [[0.5, 0, 0.5], [0.5, 0.5, 0]])
    plan = transport_plan(cost, labels, classes, affil, reg=1e-3, tol=1e-12, max_iter=20000)
    assert np.allclose(plan.numpy(), exact, atol=1e-6)


def test_plan_matches_pot_log_sinkhorn_per_class_with_unequal_class_sizes():
    # class sizes 1, 3, 2, 5: the padded (Y, 5, P) block must not change any class's plan
    labels = torch.tensor([0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3])
    g = gen(1)
    cost = 2 - 2 * torch.rand(labels.shape[0], 20, generator=g, dtype=torch.float64)
    s = torch.rand(labels.shape[0], 20, generator=g, dtype=torch.float64)
    classes, affil = affiliation(sample_counts(s, generator=g), labels)
    plan = transport_plan(cost, labels, classes, affil, reg=0.05, tol=1e-12, max_iter=5000)
    for k, y in enumerate(classes.tolist()):
        rows = labels == y
        b = (rows.sum() * affil[k]).numpy()
        with np.errstate(divide="ignore"):  # log(0) of undrawn prototypes is fine here
            ref = ot.sinkhorn(np.ones(int(rows.sum())), b, cost[rows].numpy(), 0.05,
                              method="sinkhorn_log", stopThr=1e-12, numItermax=5000)
        assert np.allclose(plan[rows].numpy(), ref, atol=1e-7), f"class {y}"


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.float64, 1e-7)])
def test_solvers_agree(dtype, atol):
    plans = {solver: plan_for(dtype, tol=1e-9 if dtype == torch.float64 else 1e-6, solver=solver)[0]
             for solver in cluster.SOLVERS}
    assert torch.allclose(plans["torch"], plans["pot"], atol=atol)
    assert torch.allclose(plans["torch"], plans["pot-loop"], atol=atol)


def test_compaction_to_drawn_prototypes_does_not_change_the_plan():
    s, _, gap, labels = realistic_batch(dtype=torch.float64, n_protos=64)
    classes, affil = affiliation(sample_counts(s, generator=gen()), labels)
    assert bool((affil == 0).any(dim=1).all())  # every class leaves some prototype out
    full = transport_plan(gap, labels, classes, affil, tol=1e-10, compact=False)
    compact = transport_plan(gap, labels, classes, affil, tol=1e-10, compact=True)
    assert torch.allclose(full, compact, atol=1e-9)
    assert bool((compact[affil[torch.searchsorted(classes, labels)] == 0] == 0).all())


def test_plan_small_reg_float32_is_finite_with_exact_marginals():
    plan, _, labels, classes, affil = plan_for(torch.float32, reg=0.01)
    assert bool(torch.isfinite(plan).all())
    assert float((plan.sum(1) - 1).abs().max()) < 1e-4
    assert class_column_error(plan, labels, classes, affil) < 1e-4


def test_unconverged_solve_warns_and_keeps_rows_exact():
    s, cost, gap, labels = realistic_batch(dtype=torch.float64)
    classes, affil = affiliation(sample_counts(s, generator=gen()), labels)
    with pytest.warns(RuntimeWarning, match="max_iter=2"):
        plan = transport_plan(gap, labels, classes, affil, max_iter=2)
    assert torch.allclose(plan.sum(1), torch.ones(labels.shape[0], dtype=torch.float64), atol=1e-12)
    assert class_column_error(plan, labels, classes, affil) > 1e-6  # columns not there yet


def test_plan_rejects_wrong_classes_and_solver():
    plan_args = plan_for(torch.float64)
    _, gap, labels, classes, affil = plan_args
    with pytest.raises(ProtoKNNError, match="classes"):
        transport_plan(gap, labels, classes + 1, affil)
    with pytest.raises(UnknownNameError, match="pot-loop"):
        transport_plan(gap, labels, classes, affil, solver="pot_loop")


@pytest.mark.parametrize("shape", [(1, 3, 4), (3, 1, 4)])
def test_sinkhorn_leaves_its_inputs_untouched(shape):
    cost = torch.rand(*shape, generator=gen())
    before = cost.clone()
    b = torch.full((shape[0], shape[2]), shape[1] / shape[2])
    res = log_sinkhorn_batched(cost, torch.zeros(shape[:2]), b.log(), reg=0.05)
    assert torch.equal(cost, before)
    assert torch.allclose(res.plan.sum(2), torch.ones(shape[:2]), atol=1e-6)


def test_sinkhorn_zero_mass_rows_and_columns_give_zero_not_nan():
    cost = torch.rand(2, 3, 4, generator=gen())
    log_a = torch.tensor([[0.0, 0.0, -math.inf], [0.0, -math.inf, -math.inf]])
    b = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 0.0]])
    # the plan sits near a vertex of the polytope here, so Sinkhorn converges slowly
    res = log_sinkhorn_batched(cost, log_a, b.log(), reg=0.05, tol=1e-4)
    assert res.converged and bool(torch.isfinite(res.plan).all())
    assert bool((res.plan[0, 2] == 0).all()) and bool((res.plan[1, 1:] == 0).all())
    assert bool((res.plan[:, :, 1] == 0).all())
    assert torch.allclose(res.plan.sum(2), log_a.exp(), atol=1e-6)  # rows exact
    assert torch.allclose(res.plan.sum(1), b, atol=2e-4)


# ---------------------------------------------------------------- ProtoKNNClusterLoss
def test_most_similar_is_one_hot_on_the_nearest_prototype():
    cost = torch.tensor([[0.5, 0.2, 0.9], [1.0, 0.3, 0.1]], requires_grad=True)
    loss = ProtoKNNClusterLoss("most-similar")
    plan = loss.plan(None, cost, None, torch.tensor([0, 1]))
    assert torch.equal(plan, torch.tensor([[0.0, 1, 0], [0, 0, 1]]))
    value = loss(None, cost, None, torch.tensor([0, 1]))
    assert math.isclose(float(value.detach()), (0.2 + 0.1) / 2, rel_tol=1e-6)
    value.backward()
    assert torch.equal(cost.grad, plan / 2)


@pytest.mark.parametrize("variant, expected_plan", [
    # counts [[1,1,0],[0,1,1],[1,0,1]], labels [0,0,1]: Ebar y0 = [.5,1,.5], y1 = [1,0,1]
    ("sampling", [[0.25, 0.5, 0.25], [0.25, 0.5, 0.25], [0.5, 0, 0.5]]),
    # column sums [1.5,1,1.5] -> Ehat y0 = [1/3,1,1/3], y1 = [2/3,0,2/3] -> normalised
    ("debias", [[0.2, 0.6, 0.2], [0.2, 0.6, 0.2], [0.5, 0, 0.5]]),
])
def test_sampling_and_debias_plans_hand_computed(variant, expected_plan):
    cost = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0], [4.0, 0.0, 2.0]])
    labels = torch.tensor([0, 0, 1])
    loss = ProtoKNNClusterLoss(variant, tau=1e-4, reduction="sum")
    plan = loss.plan(DETERMINISTIC_PROFILES, cost, None, labels, generator=gen())
    expected = torch.tensor(expected_plan)
    assert torch.allclose(plan, expected, atol=1e-6)
    value = loss(DETERMINISTIC_PROFILES, cost, None, labels, generator=gen())
    assert math.isclose(float(value), float((expected * cost).sum()), rel_tol=1e-6)


@pytest.mark.parametrize("variant", CLUSTER_VARIANTS)
def test_mean_is_sum_over_batch_size(variant):
    s, cost, gap, labels = realistic_batch()
    total = ProtoKNNClusterLoss(variant, reduction="sum")(s, cost, gap, labels, generator=gen(2))
    mean = ProtoKNNClusterLoss(variant, reduction="mean")(s, cost, gap, labels, generator=gen(2))
    assert math.isclose(float(mean), float(total) / labels.shape[0], rel_tol=1e-5)


@pytest.mark.parametrize("variant, weighted", [("linear-assignment", "cost"), ("full", "gap")])
def test_gradient_reaches_the_cost_but_not_through_the_plan(variant, weighted):
    s, cost, gap, labels = realistic_batch(dtype=torch.float64)
    cost.requires_grad_(True)
    gap.requires_grad_(True)
    s.requires_grad_(True)
    loss = ProtoKNNClusterLoss(variant)
    value = loss(s, cost, gap, labels, generator=gen(5))
    value.backward()
    plan = loss.plan(s, cost, gap, labels, generator=gen(5))
    # d/dC of sum T C / B is exactly T / B only when T is a constant
    grad, other = (cost.grad, gap.grad) if weighted == "cost" else (gap.grad, cost.grad)
    assert torch.allclose(grad, plan / labels.shape[0], atol=1e-12)
    assert other is None and s.grad is None
    # and the plan is the per-class Sinkhorn plan on that same cost
    classes, affil = affiliation(sample_counts(s, generator=gen(5)), labels)
    target = cost if weighted == "cost" else gap
    assert torch.allclose(plan, transport_plan(target, labels, classes, affil), atol=1e-12)


def test_full_and_linear_assignment_differ_only_in_the_cost_they_use():
    s, cost, gap, labels = realistic_batch()
    full = ProtoKNNClusterLoss("full").plan(s, cost, gap, labels, generator=gen(1))
    linear = ProtoKNNClusterLoss("linear-assignment").plan(s, cost, gap, labels, generator=gen(1))
    assert not torch.allclose(full, linear, atol=1e-3)
    swapped = ProtoKNNClusterLoss("linear-assignment").plan(s, gap, None, labels, generator=gen(1))
    assert torch.allclose(full, swapped, atol=1e-6)


def edge_cases():
    s, cost, gap, labels = realistic_batch(n_classes=3, per_class=3, dtype=torch.float32)
    one_class = (s, cost, gap, torch.zeros_like(labels))
    one_per_class = (s[::3], cost[::3], gap[::3], labels[::3])
    single = (s[:1], cost[:1], gap[:1], labels[:1])
    flat = (torch.full_like(s, 0.3), cost, gap, labels)
    zeros = (s, torch.zeros_like(cost), torch.zeros_like(gap), labels)
    # prototype 0 is flat (difference 0 in every pair) while each sample a owns prototype
    # 1 + a with a difference >= 0.5 over every other sample: with tau tiny nobody draws 0
    owned = 0.5 * s.clamp(-1, 1)
    owned[:, 0] = 0.0
    owned[torch.arange(s.shape[0]), 1 + torch.arange(s.shape[0])] = 1.0
    undrawn = (owned, cost, gap, labels)
    return {"one-class": one_class, "one-per-class": one_per_class, "single-sample": single,
            "all-equal-profiles": flat, "zero-costs": zeros, "undrawn-prototype": undrawn}


# near-degenerate plans (one class, reg 0.01; deterministic draws) converge slowly: the
# solver may stop at max_iter with a warning, but rows stay exact and nothing is NaN
@pytest.mark.filterwarnings("ignore:cluster loss. Sinkhorn stopped")
@pytest.mark.parametrize("case", sorted(edge_cases()))
@pytest.mark.parametrize("variant", CLUSTER_VARIANTS)
@pytest.mark.parametrize("reg", [0.05, 0.01])
def test_every_variant_is_finite_on_edge_cases(variant, case, reg):
    s, cost, gap, labels = edge_cases()[case]
    loss = ProtoKNNClusterLoss(variant, reg=reg, tau=1e-4 if case == "undrawn-prototype" else 0.05)
    plan = loss.plan(s, cost, gap, labels, generator=gen())
    assert bool(torch.isfinite(plan).all())
    assert torch.allclose(plan.sum(1), torch.ones(labels.shape[0]), atol=1e-4)
    if case == "undrawn-prototype" and variant != "most-similar":
        assert bool((plan[:, 0] == 0).all())
    assert math.isfinite(float(loss(s, cost, gap, labels, generator=gen())))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["profiles", "cost", "gap"])
def test_non_finite_input_raises_a_one_line_error(bad, where):
    s, cost, gap, labels = realistic_batch()
    {"profiles": s, "cost": cost, "gap": gap}[where][1, 2] = bad
    variant = "linear-assignment" if where == "cost" else "full"
    with pytest.raises(ProtoKNNError, match="non-finite .* cluster loss input") as info:
        ProtoKNNClusterLoss(variant)(s, cost, gap, labels)
    assert "\n" not in str(info.value) and "learning rate" in str(info.value)


def test_bad_names_and_shapes_raise_clear_errors():
    with pytest.raises(UnknownNameError, match="linear-assignment"):
        ProtoKNNClusterLoss("linear_assignment")
    with pytest.raises(UnknownNameError):
        ProtoKNNClusterLoss(reduction="avg")
    s, cost, gap, labels = realistic_batch()
    with pytest.raises(ProtoKNNError, match="shape"):
        ProtoKNNClusterLoss("full")(s[:, :5], cost, gap, labels)
    with pytest.raises(ProtoKNNError, match="labels"):
        ProtoKNNClusterLoss("full")(s, cost, gap, labels[:3])
    with pytest.raises(ProtoKNNError, match="gap_cost"):
        ProtoKNNClusterLoss("full")(s, cost, None, labels)


# ---------------------------------------------------------------- beyond the paper (appendix B)
def central_difference(fn, x, idx, eps=1e-6):
    e = torch.zeros_like(x)
    e[idx] = eps
    return (float(fn(x + e)) - float(fn(x - e))) / (2 * eps)


def test_full_implicit_gradient_matches_finite_differences():
    s, cost, gap, labels = realistic_batch(dtype=torch.float64)
    loss = ProtoKNNClusterLoss("full-implicit", reg=0.2, tol=1e-13, max_iter=100000)
    g = gap.clone().requires_grad_(True)
    loss(s, cost, g, labels, generator=gen(5)).backward()
    plan = loss.plan(s, cost, gap, labels, generator=gen(5))
    # not the constant-plan gradient T / B ...
    assert float((g.grad - plan / labels.shape[0]).abs().max()) > 1e-3
    # ... but the true derivative of the loss, sampling held fixed by the generator
    fn = lambda x: loss(s, cost, x, labels, generator=gen(5))  # noqa: E731
    for idx in [(0, 0), (3, 7), (11, 31), (5, int(plan[5].argmax()))]:
        assert abs(float(g.grad[idx]) - central_difference(fn, gap, idx)) < 1e-6


def test_full_differentiable_gradient_reaches_the_profiles_and_matches_finite_differences():
    s, cost, gap, labels = realistic_batch(dtype=torch.float64, n_protos=12)
    loss = ProtoKNNClusterLoss("full-differentiable", reg=0.2, tol=1e-13, max_iter=100000, tau_soft=0.5)
    sp = s.clone().requires_grad_(True)
    loss(sp, cost, gap, labels, generator=gen(5)).backward()
    assert bool(torch.isfinite(sp.grad).all()) and float(sp.grad.abs().max()) > 1e-4
    fn = lambda x: loss(x, cost, gap, labels, generator=gen(5))  # noqa: E731
    for idx in [(0, 0), (2, 5), (7, 11), (11, 3)]:
        assert abs(float(sp.grad[idx]) - central_difference(fn, s, idx)) < 1e-6


@pytest.mark.parametrize("variant, profile_grad", [
    ("full", False), ("full-relaxed", False), ("full-implicit", False), ("full-differentiable", True)])
def test_which_variants_send_a_gradient_to_the_profiles(variant, profile_grad):
    s, cost, gap, labels = realistic_batch()
    s.requires_grad_(True)
    gap.requires_grad_(True)
    ProtoKNNClusterLoss(variant)(s, cost, gap, labels, generator=gen(1)).backward()
    assert (s.grad is not None) == profile_grad
    assert gap.grad is not None and bool(torch.isfinite(gap.grad).all())


def test_full_relaxed_plan_is_constant_and_straight_through_gives_full():
    s, cost, gap, labels = realistic_batch(dtype=torch.float64)
    relaxed = ProtoKNNClusterLoss("full-relaxed", tau_soft=0.5)
    g = gap.clone().requires_grad_(True)
    relaxed(s, cost, g, labels, generator=gen(2)).backward()
    plan = relaxed.plan(s, cost, gap, labels, generator=gen(2))
    assert torch.allclose(g.grad, plan / labels.shape[0], atol=1e-12)  # T* constant
    full = ProtoKNNClusterLoss("full").plan(s, cost, gap, labels, generator=gen(2))
    assert not torch.allclose(plan, full, atol=1e-3)  # soft affiliation: another plan
    st = ProtoKNNClusterLoss("full-relaxed", straight_through=True).plan(s, cost, gap, labels, generator=gen(2))
    assert torch.allclose(st, full, atol=1e-12)


def test_plan_cost_cost_solves_on_c_and_weights_the_gap_cost():
    s, cost, gap, labels = realistic_batch(dtype=torch.float64)
    on_cost = ProtoKNNClusterLoss("full", plan_cost="cost", reduction="sum")
    plan = on_cost.plan(s, cost, gap, labels, generator=gen(3))
    linear = ProtoKNNClusterLoss("linear-assignment").plan(s, cost, None, labels, generator=gen(3))
    assert torch.allclose(plan, linear, atol=1e-12)
    value = on_cost(s, cost, gap, labels, generator=gen(3))
    assert math.isclose(float(value), float((plan * gap).sum()), rel_tol=1e-12)
    with pytest.raises(ProtoKNNError, match="needs cost"):
        on_cost(s, None, gap, labels)
    with pytest.raises(UnknownNameError, match="gap"):
        ProtoKNNClusterLoss("full", plan_cost="C")


def test_implicit_variants_need_our_solver():
    with pytest.raises(ProtoKNNError, match="solver='torch'"):
        ProtoKNNClusterLoss("full-implicit", solver="pot")


def test_implicit_plan_on_c_sends_the_plan_gradient_to_c_and_t_over_b_to_the_gap_cost():
    s, cost, gap, labels = realistic_batch(dtype=torch.float64)
    loss = ProtoKNNClusterLoss("full-implicit", plan_cost="cost", reg=0.2, tol=1e-12, max_iter=100000)
    c, g = cost.clone().requires_grad_(True), gap.clone().requires_grad_(True)
    loss(s, c, g, labels, generator=gen(4)).backward()
    plan = loss.plan(s, cost, gap, labels, generator=gen(4))
    assert torch.allclose(g.grad, plan / labels.shape[0], atol=1e-12)  # T* does not depend on C^
    assert c.grad is not None and float(c.grad.abs().max()) > 1e-4 and bool(torch.isfinite(c.grad).all())


# ---------------------------------------------------------------- plans as registered parts
def test_every_variant_is_a_registered_plan_and_a_built_plan_gives_the_same_loss():
    assert set(cluster.list_cluster_plans()) == set(CLUSTER_VARIANTS)
    s, cost, gap, labels = realistic_batch()
    built = ProtoKNNClusterLoss(cluster.create_cluster_plan("full", reg=0.2), reduction="sum")
    named = ProtoKNNClusterLoss("full", reg=0.2, reduction="sum")
    assert built.variant == "full" and built.reg == 0.2
    assert torch.equal(built(s, cost, gap, labels, generator=gen(1)), named(s, cost, gap, labels, generator=gen(1)))
    with pytest.raises(ProtoKNNError, match="reg set on the loss and on the plan"):
        ProtoKNNClusterLoss(cluster.create_cluster_plan("full"), reg=0.2)
    with pytest.raises(UnknownNameError, match="cluster-loss variant"):
        cluster.create_cluster_plan("fulll")


def test_a_plan_registered_outside_is_used_by_the_loss(monkeypatch):
    # T = 1/P everywhere: the summed loss is sum(cost) / P, the mean one that over B.
    monkeypatch.setattr(cluster, "CLUSTER_PLANS", cluster.Registry("cluster-loss variant"))

    @cluster.CLUSTER_PLANS.register("uniform")
    class UniformPlan(cluster.ClusterPlan):
        name, uses_profiles = "uniform", False

        def build(self, profiles, solved, labels, generator, grad):
            return torch.full_like(solved, 1.0 / solved.shape[1])

    cost = torch.tensor([[1.0, 3.0], [2.0, 6.0]])
    labels = torch.tensor([0, 1])
    assert float(ProtoKNNClusterLoss("uniform", reduction="sum")(None, cost, None, labels)) == 6.0
    assert float(ProtoKNNClusterLoss(UniformPlan())(None, cost, None, labels)) == 3.0
