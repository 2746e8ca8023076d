"""Batched entropic optimal transport in the log domain (Sinkhorn), in plain torch.

One call solves Y independent problems stacked as (Y, N, P):

    min_T  <T, C> + reg * sum T log T   s.t.  T 1 = a,  T^T 1 = b,  T >= 0

with POT's convention for ``reg`` (the kernel is exp(-C / reg)). The scaling
vectors live in the log domain because exp(-C / reg) underflows in float32 for
reg <= 0.05 and costs of a few units. Zero masses are log-masses of -inf: a
padded row (a = 0) or an undrawn prototype (b = 0) gets a potential of -inf and
a plan entry of exactly 0, never NaN, as long as every problem keeps at least
one row and one column of positive mass.

Convergence is checked every ``check_every`` iterations (10 on a GPU, where every
check is a host-device sync; 5 on the CPU, where a check costs a few small
operations). The check reuses the row log-sums that the next u-update needs
anyway, so it adds no pass over the (Y, N, P) block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class SinkhornResult:
    """plan: (Y, N, P), rows exactly a (the solve ends on a row update);
    marginal_error: the convergence measure at the last check, max |T 1 - a| after
    a column update, which bounds how far the columns are from b; n_iter:
    iterations run; converged: marginal_error < tol."""

    plan: Tensor
    marginal_error: float
    n_iter: int
    converged: bool


def _logsumexp_(x: Tensor, dim: int) -> Tensor:
    """log sum exp over ``dim``, overwriting ``x`` (a scratch buffer); a slice of only
    -inf gives -inf, not NaN. Working in place saves an allocation and a pass per
    call, which matters because Sinkhorn spends nearly all its time here.
    """
    m = x.amax(dim, keepdim=True).clamp_(min=torch.finfo(x.dtype).min)
    return x.sub_(m).exp_().sum(dim).log_().add_(m.squeeze(dim))


@torch.no_grad()
def log_sinkhorn_batched(
    cost: Tensor,
    log_a: Tensor,
    log_b: Tensor,
    reg: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    check_every: Optional[int] = None,
) -> SinkhornResult:
    """Solve Y entropic OT problems at once.

    cost: (Y, N, P); log_a: (Y, N) log row masses (-inf for padding);
    log_b: (Y, P) log column masses (-inf for zero mass). The masses of a problem
    must have equal totals in the working dtype (the caller renormalises b).
    Returns a detached plan (Y, N, P) in the dtype of ``cost``.
    ``check_every``: iterations between convergence checks; by default 10 on an
    accelerator (each check is a host sync) and 5 on the CPU (a check costs about
    six small operations on (N, Y); a coarser check overshoots more iterations).
    """
    if check_every is None:
        check_every = 5 if cost.device.type == "cpu" else 10
    # Work in (N, Y, P), laid out contiguously (a plain transpose-then-divide would
    # keep the (Y, N, P) memory order): the column update then reduces over the
    # outermost axis, i.e. over N contiguous (Y, P) slabs, not a strided middle axis.
    y, n, p = cost.shape
    log_k = torch.empty((n, y, p), dtype=cost.dtype, device=cost.device)  # never a view of cost
    torch.div(cost.transpose(0, 1), -reg, out=log_k)
    log_a = log_a.transpose(0, 1)  # (N, Y)
    a = log_a.exp()
    buf = torch.empty_like(log_k)  # scratch for every log-sum-exp
    v = torch.zeros_like(log_b)
    # row log-sums of K diag(exp v); reused by the next u-update and the error check
    row_lse = _logsumexp_(torch.add(log_k, v, out=buf), dim=2)  # (N, Y)
    err = float("inf")
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        u = log_a - row_lse
        v = log_b - _logsumexp_(torch.add(log_k, u.unsqueeze(2), out=buf), dim=0)
        row_lse = _logsumexp_(torch.add(log_k, v, out=buf), dim=2)
        if n_iter % check_every == 0 or n_iter == max_iter:
            # row sums of the current plan are exp(u + row_lse); padded rows give 0 - 0
            err = float((torch.exp(u + row_lse) - a).abs().amax())
            if err < tol:
                break
    # End on a row update: every sample then carries exactly mass 1 (the same weight
    # in the loss) even when max_iter stops an unconverged solve; the column
    # marginals carry the remaining error.
    u = log_a - row_lse
    plan = log_k.add_(u.unsqueeze(2)).add_(v).exp_().transpose(0, 1)  # log_k is ours
    return SinkhornResult(plan=plan, marginal_error=err, n_iter=n_iter, converged=err < tol)
