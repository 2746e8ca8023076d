"""Gradients of the transport plan: implicit differentiation against finite differences,
unrolled autograd, hand-derived cases and the envelope theorem."""
from __future__ import annotations

import math

import pytest
import torch

from protoknn_plugin.sinkhorn_grad import implicit_backward, sinkhorn_implicit, sinkhorn_unrolled

F64 = torch.float64


def problems(reg_scale=2.0, seed=0):
    """3 problems, 4 rows x 6 columns, with padding: problem 1 has 3 real rows,
    problem 2 has 2; column 5 of problem 0 and column 0 of problem 2 carry no mass."""
    g = torch.Generator().manual_seed(seed)
    cost = reg_scale * torch.rand(3, 4, 6, generator=g, dtype=F64)
    a = torch.ones(3, 4, dtype=F64)
    a[1, 3] = 0.0
    a[2, 2:] = 0.0
    w = torch.rand(3, 6, generator=g, dtype=F64) + 0.2
    w[0, 5] = 0.0
    w[2, 0] = 0.0
    b = w / w.sum(1, keepdim=True) * a.sum(1, keepdim=True)
    weights = torch.randn(3, 4, 6, generator=g, dtype=F64)
    return cost, a, b, weights


def loss_implicit(cost, a, b, weights, reg):
    return (sinkhorn_implicit(cost, a, b, reg, max_iter=200000, tol=1e-14) * weights).sum()


def grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    fn(*leaves).backward()
    return [x.grad for x in leaves]


def project_gauge(grad_a, grad_b, a, b):
    """The (a, b) gradient is defined up to (k 1, -k 1) on the entries of positive mass:
    remove that component (what the implicit route returns) so two routes compare."""
    ra, rb = (a > 0).to(F64), (b > 0).to(F64)
    k = ((grad_b * rb).sum(1) - (grad_a * ra).sum(1)) / (ra.sum(1) + rb.sum(1))
    return (grad_a + k[:, None]) * ra, (grad_b - k[:, None]) * rb


@pytest.mark.parametrize("reg", [0.2, 0.5])
def test_cost_gradient_matches_central_differences(reg):
    cost, a, b, weights = problems()
    (grad,) = grads(lambda c: loss_implicit(c, a, b, weights, reg), cost)
    eps = 1e-6
    fd = torch.zeros_like(cost)
    for idx in torch.nonzero((a[:, :, None] > 0) & (b[:, None, :] > 0)).tolist():
        e = torch.zeros_like(cost)
        e[tuple(idx)] = eps
        fd[tuple(idx)] = (loss_implicit(cost + e, a, b, weights, reg)
                          - loss_implicit(cost - e, a, b, weights, reg)) / (2 * eps)
    assert float((grad - fd).abs().max()) < 1e-6


def test_marginal_gradients_match_central_differences_along_mass_preserving_directions():
    cost, a, b, weights = problems()
    reg = 0.3
    grad_a, grad_b = grads(lambda x, y: loss_implicit(cost, x, y, weights, reg), a, b)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        da = torch.randn(a.shape, generator=g, dtype=F64) * (a > 0)
        db = torch.randn(b.shape, generator=g, dtype=F64) * (b > 0)
        # keep every problem's totals equal: shift db on its positive entries
        db += ((da.sum(1) - db.sum(1)) / (b > 0).sum(1))[:, None] * (b > 0)
        eps = 1e-6
        fd = (loss_implicit(cost, a + eps * da, b + eps * db, weights, reg)
              - loss_implicit(cost, a - eps * da, b - eps * db, weights, reg)) / (2 * eps)
        analytic = (grad_a * da).sum() + (grad_b * db).sum()
        assert abs(float(analytic - fd)) < 1e-6


def test_implicit_matches_converged_unrolled_autograd():
    cost, a, b, weights = problems()
    reg = 0.2
    imp = grads(lambda c, x, y: loss_implicit(c, x, y, weights, reg), cost, a, b)
    unr = grads(lambda c, x, y: (sinkhorn_unrolled(c, x, y, reg, 3000) * weights).sum(), cost, a, b)
    # the unrolled solve has converged: same plan
    plan_gap = sinkhorn_unrolled(cost, a, b, reg, 3000) - sinkhorn_implicit(cost, a, b, reg, tol=1e-14, max_iter=200000)
    assert float(plan_gap.abs().max()) < 1e-10
    assert float((imp[0] - unr[0]).abs().max()) < 1e-5
    ua, ub = project_gauge(unr[1], unr[2], a, b)
    assert float((imp[1] - ua).abs().max()) < 1e-5
    assert float((imp[2] - ub).abs().max()) < 1e-5


def test_unrolled_differs_before_it_converges():
    # the check above is not vacuous: 3 iterations give another gradient
    cost, a, b, weights = problems()
    imp = grads(lambda c: loss_implicit(c, a, b, weights, 0.05), cost)[0]
    unr = grads(lambda c: (sinkhorn_unrolled(c, a, b, 0.05, 3) * weights).sum(), cost)[0]
    assert float((imp - unr).abs().max()) > 1e-3


def test_two_by_two_hand_derived():
    # a = b = (1, 1): T = [[1-q, q], [q, 1-q]] with ((1-q)/q)^2 = exp(D / reg),
    # D = C01 + C10 - C00 - C11, so q = sigmoid(-D / (2 reg)) and
    # dq/dC = -q (1 - q) / (2 reg) * [[-1, 1], [1, -1]].
    reg = 0.25
    cost = torch.tensor([[[0.1, 0.7], [0.4, 0.2]]], dtype=F64)
    ones = torch.ones(1, 2, dtype=F64)
    d = 0.7 + 0.4 - 0.1 - 0.2
    q = 1 / (1 + math.exp(d / (2 * reg)))
    plan = sinkhorn_implicit(cost, ones, ones, reg, tol=1e-14, max_iter=10000)
    assert torch.allclose(plan, torch.tensor([[[1 - q, q], [q, 1 - q]]], dtype=F64), atol=1e-12)
    (grad,) = grads(lambda c: sinkhorn_implicit(c, ones, ones, reg, tol=1e-14, max_iter=10000)[0, 0, 1], cost)
    expected = -q * (1 - q) / (2 * reg) * torch.tensor([[[-1.0, 1.0], [1.0, -1.0]]], dtype=F64)
    assert torch.allclose(grad, expected, atol=1e-10)


def test_single_row_plan_is_b_and_ignores_the_cost():
    # one sample of mass 1: T = b whatever the cost, so dT/dC = 0 and dL/db = dL/dT
    # (up to the gauge, removed here by hand: subtract the mean over all 1 + P entries)
    cost = torch.tensor([[[0.3, 1.5, 0.2]]], dtype=F64)
    a, b = torch.ones(1, 1, dtype=F64), torch.tensor([[0.5, 0.2, 0.3]], dtype=F64)
    upstream = torch.tensor([[[1.0, -2.0, 4.0]]], dtype=F64)
    grad_c, grad_a, grad_b = grads(lambda c, x, y: (sinkhorn_implicit(c, x, y, 0.05) * upstream).sum(), cost, a, b)
    assert float(grad_c.abs().max()) < 1e-12
    # dL/db = upstream + k, dL/da = -k with sum of all four = 0 -> k = -3 / 4
    assert torch.allclose(grad_b, torch.tensor([[0.25, -2.75, 3.25]], dtype=F64), atol=1e-12)
    assert torch.allclose(grad_a, torch.tensor([[0.75]], dtype=F64), atol=1e-12)


def test_envelope_theorem_entropic_objective():
    # OT_reg = <T, C> + reg sum T (log T - 1) is stationary in T on the polytope, so its
    # change through T alone is 0 (the full derivative is T, carried by C directly)
    cost, a, b, _ = problems()
    reg = 0.2

    def objective_through_plan(c):
        t = sinkhorn_implicit(c, a, b, reg, tol=1e-14, max_iter=200000)
        logs = torch.where(t > 0, t, torch.ones_like(t)).log()
        return (t * cost).sum() + reg * (t * (logs - 1)).sum()

    (grad,) = grads(objective_through_plan, cost)
    assert float(grad.abs().max()) < 1e-8


def test_padding_gets_zero_gradient_and_no_nan():
    cost, a, b, weights = problems()
    grad_c, grad_a, grad_b = grads(lambda c, x, y: loss_implicit(c, x, y, weights, 0.05), cost, a, b)
    for g in (grad_c, grad_a, grad_b):
        assert bool(torch.isfinite(g).all())
    dead = (a[:, :, None] == 0) | (b[:, None, :] == 0)
    assert bool((grad_c[dead] == 0).all()) and bool((grad_c[~dead] != 0).any())
    assert bool((grad_a[a == 0] == 0).all()) and bool((grad_b[b == 0] == 0).all())


def test_float32_plan_gets_float32_finite_gradients_at_the_paper_reg():
    cost, a, b, weights = problems()
    c32 = cost.float().requires_grad_(True)
    (sinkhorn_implicit(c32, a.float(), b.float(), 0.05) * weights.float()).sum().backward()
    assert c32.grad.dtype == torch.float32 and bool(torch.isfinite(c32.grad).all())
    ref = grads(lambda c: loss_implicit(c, a, b, weights, 0.05), cost)[0]
    assert float((c32.grad.double() - ref).abs().max()) < 1e-3


def test_more_rows_than_columns_eliminates_the_rows():
    # 6 rows x 2 columns uses the other Schur complement; checked against unrolled
    g = torch.Generator().manual_seed(2)
    cost = torch.rand(1, 6, 2, generator=g, dtype=F64)
    a, b = torch.ones(1, 6, dtype=F64), torch.tensor([[4.0, 2.0]], dtype=F64)
    w = torch.randn(1, 6, 2, generator=g, dtype=F64)
    imp = grads(lambda c: loss_implicit(c, a, b, w, 0.3), cost)[0]
    unr = grads(lambda c: (sinkhorn_unrolled(c, a, b, 0.3, 3000) * w).sum(), cost)[0]
    assert float((imp - unr).abs().max()) < 1e-8


def test_backward_function_matches_its_autograd_wrapper():
    cost, a, b, weights = problems()
    plan = sinkhorn_implicit(cost, a, b, 0.3, tol=1e-14, max_iter=200000)
    gc, ga, gb = implicit_backward(plan, weights, 0.3)
    wc, wa, wb = grads(lambda c, x, y: loss_implicit(c, x, y, weights, 0.3), cost, a, b)
    assert torch.equal(gc, wc) and torch.equal(ga, wa) and torch.equal(gb, wb)


def test_plan_split_into_pieces_still_gets_the_right_cost_gradient():
    # cross costs of 100 at reg 0.05 make T exactly diagonal (exp(-2000) == 0): the
    # support splits in two, S + 1 1^T is singular, and the gradient must stay finite
    # and equal the unsplit limit, here 0 (a diagonal plan does not move)
    cost = torch.tensor([[[0.0, 100.0], [100.0, 0.0]]], dtype=F64)
    ones = torch.ones(1, 2, dtype=F64)
    upstream = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]], dtype=F64)
    grad_c, grad_a, grad_b = grads(lambda c, x, y: (sinkhorn_implicit(c, x, y, 0.05) * upstream).sum(), cost, ones, ones)
    for g in (grad_c, grad_a, grad_b):
        assert bool(torch.isfinite(g).all())
    assert float(grad_c.abs().max()) < 1e-12
