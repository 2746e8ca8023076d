"""Gradients of the entropic transport plan: implicit (the product) and unrolled (the check).

The plan of ``sinkhorn.log_sinkhorn_batched`` is T_ij = exp((f_i + g_j - C_ij) / reg)
with potentials (f, g) such that T 1 = a and T^T 1 = b. Differentiating those two
conditions (Eisenberger et al., CVPR 2022; Luise et al., NeurIPS 2018) gives, for a
loss L(T) with G = dL/dT, r = (G * T) 1 and c = (G * T)^T 1:

    H [x; y] = [r; c],   H = [[diag(T 1), T], [T^T, diag(T^T 1)]]
    dL/dC = T * (x_i + y_j - G_ij) / reg,   dL/da = x,   dL/db = y.

H is singular: (1, -1) spans its null space (the gauge f + k, g - k leaves T
unchanged), and [r; c] is orthogonal to it, so the system is consistent. We solve
it through the Schur complement of the larger block: with n <= m,
S = diag(T 1) - T diag(T^T 1)^-1 T^T (n x n, batched over classes), S x = r - T
diag(T^T 1)^-1 c, y = diag(T^T 1)^-1 (c - T^T x). S 1 = 0 exactly because S is
built from the plan's own marginals, and adding 1 1^T to S pins the gauge
(sum x = 0) without changing S x. dL/dC does not depend on the gauge; the
marginal gradients do, by (k 1, -k 1), which no mass-preserving change of (a, b)
sees: we return the pair orthogonal to that direction.

Rows and columns of zero mass (padding, undrawn prototypes) are taken out of the
system (identity rows) and get a zero gradient. The backward runs in float64: the
systems are tiny (N_y x N_y per class) and a sharp plan (reg 0.05) makes S ill-
conditioned in float32.

``sinkhorn_unrolled`` differentiates through the iterations with plain autograd;
its memory grows with their number. It exists for the tests and the benchmark.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .sinkhorn import log_sinkhorn_batched


def _masked_log(mass: Tensor) -> Tensor:
    """log of masses with -inf (and a zero, not NaN, gradient) where the mass is 0."""
    positive = mass > 0
    return torch.where(positive, torch.where(positive, mass, torch.ones_like(mass)).log(),
                       torch.full_like(mass, float("-inf")))


def _schur_solve(plan: Tensor, r: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """Solve H [x; y] = [r; c] eliminating the second block. plan (Y, n, m), r (Y, n), c (Y, m)."""
    row_mass, col_mass = plan.sum(2), plan.sum(1)
    rows_on, cols_on = row_mass > 0, col_mass > 0
    inv_col = torch.where(cols_on, 1.0 / torch.where(cols_on, col_mass, torch.ones_like(col_mass)),
                          torch.zeros_like(col_mass))
    scaled = plan * inv_col.unsqueeze(1)  # T diag(1 / col mass), (Y, n, m)
    schur = torch.diag_embed(row_mass) - scaled @ plan.transpose(1, 2)
    rhs = r - (scaled @ c.unsqueeze(2)).squeeze(2)
    on = rows_on.to(plan.dtype)
    # gauge: + 1 1^T on the active rows; inactive rows become identity rows (x = 0)
    schur = schur + on.unsqueeze(2) * on.unsqueeze(1) + torch.diag_embed(1.0 - on)
    rhs = (rhs * on).unsqueeze(2)
    x, failed = torch.linalg.solve_ex(schur, rhs)
    if bool(failed.any()):
        # a plan whose support splits into pieces (entries exactly 0) leaves one gauge per
        # piece, so S + 1 1^T stays singular; the system is still consistent, and the
        # minimum-norm solution gives the same dL/dC
        x = torch.where((failed != 0)[:, None, None], torch.linalg.pinv(schur, hermitian=True) @ rhs, x)
    x = x.squeeze(2) * on
    y = inv_col * (c - (plan.transpose(1, 2) @ x.unsqueeze(2)).squeeze(2))
    return x, y


def implicit_backward(plan: Tensor, grad_plan: Tensor, reg: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(dL/dC, dL/da, dL/db) for plan (Y, N, P) and dL/dT (Y, N, P); all in float64."""
    t, g = plan.double(), grad_plan.double()
    gt = g * t
    r, c = gt.sum(2), gt.sum(1)
    if t.shape[1] <= t.shape[2]:
        x, y = _schur_solve(t, r, c)
    else:  # more rows than columns: eliminate the rows instead
        y, x = _schur_solve(t.transpose(1, 2), c, r)
    rows_on, cols_on = t.sum(2) > 0, t.sum(1) > 0
    # gauge: the (a, b) gradient orthogonal to (1, -1) on the active entries
    shift = ((y * cols_on).sum(1) - (x * rows_on).sum(1)) / (rows_on.sum(1) + cols_on.sum(1)).clamp_min(1)
    grad_a = (x + shift.unsqueeze(1)) * rows_on
    grad_b = (y - shift.unsqueeze(1)) * cols_on
    grad_cost = t * (x.unsqueeze(2) + y.unsqueeze(1) - g) / reg
    return grad_cost, grad_a, grad_b


class ImplicitSinkhorn(torch.autograd.Function):
    """T*(C, a, b): forward = the batched log-domain solve (no graph), backward = ``implicit_backward``.

    cost (Y, N, P); a (Y, N) and b (Y, P) masses (zeros allowed: padding), with equal
    totals per problem. ``info`` (a dict or None) receives the solve's
    ``marginal_error``, ``n_iter`` and ``converged``.
    """

    @staticmethod
    def forward(ctx, cost: Tensor, a: Tensor, b: Tensor, reg: float, max_iter: int, tol: float,
                info: Optional[Dict[str, object]] = None) -> Tensor:
        res = log_sinkhorn_batched(cost.detach(), _masked_log(a.detach()), _masked_log(b.detach()),
                                   reg, max_iter=max_iter, tol=tol)
        if info is not None:
            info.update(marginal_error=res.marginal_error, n_iter=res.n_iter, converged=res.converged)
        ctx.reg = reg
        ctx.save_for_backward(res.plan)
        return res.plan

    @staticmethod
    def backward(ctx, grad_plan: Tensor):
        (plan,) = ctx.saved_tensors
        grad_cost, grad_a, grad_b = implicit_backward(plan, grad_plan, ctx.reg)
        dtype = plan.dtype
        return grad_cost.to(dtype), grad_a.to(dtype), grad_b.to(dtype), None, None, None, None


def sinkhorn_implicit(cost: Tensor, a: Tensor, b: Tensor, reg: float, max_iter: int = 1000,
                      tol: float = 1e-6, info: Optional[Dict[str, object]] = None) -> Tensor:
    """Differentiable plan (Y, N, P) of Y problems; memory independent of the iteration count."""
    return ImplicitSinkhorn.apply(cost, a, b, reg, max_iter, tol, info)


def sinkhorn_unrolled(cost: Tensor, a: Tensor, b: Tensor, reg: float, n_iter: int) -> Tensor:
    """The same plan by ``n_iter`` log-domain iterations recorded by autograd (no in-place ops).

    cost (Y, N, P), a (Y, N), b (Y, P). Ends on a row update like the batched solver.
    Its graph holds two (Y, N, P) tensors per iteration.
    """
    log_k = -cost / reg
    log_a, log_b = _masked_log(a), _masked_log(b)
    v = torch.zeros_like(log_b)
    u = log_a - torch.logsumexp(log_k + v.unsqueeze(1), dim=2)
    for _ in range(n_iter):
        v = log_b - torch.logsumexp(log_k + u.unsqueeze(2), dim=1)
        u = log_a - torch.logsumexp(log_k + v.unsqueeze(1), dim=2)
    return torch.exp(log_k + u.unsqueeze(2) + v.unsqueeze(1))
