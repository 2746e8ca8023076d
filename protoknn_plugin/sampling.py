"""Prototype sampling of the cluster loss (paper eqs. 2-3): hard and relaxed.

For every ordered pair (a, b), a != b, one Gumbel-perturbed score per prototype,
score_{ab,i} = (s_{a,i} - s_{b,i}) / tau + g_{ab,i}, g ~ Gumbel(0, 1).

* ``sample_counts`` (the paper): the draw is argmax_i score; E[a, i] counts the
  b whose draw for anchor a was i. No gradient (appendix B).
* ``relaxed_counts`` (appendix B's suggested fix, our extension): the one-hot draw
  becomes softmax_i(score / tau_soft) (Gumbel-softmax), so E and everything built
  from it carry a gradient to the profiles. ``straight_through=True`` keeps the
  hard one-hot in the forward and the softmax's gradient in the backward.

Both draw the same uniform numbers in the same blocks from the same generator, so
with one seed the relaxed draws are the softmax of exactly the hard draws' scores:
as tau_soft -> 0 the relaxed counts tend to the hard counts.

Shapes: B samples, P prototypes.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from .errors import ProtoKNNError

# Largest Gumbel-noise block drawn at once (elements); the default batch
# (112 x 112 x 512 = 6.4M) fits in one block.
_MAX_NOISE_ELEMENTS = 1 << 24


def _check_profiles(profiles: Tensor, tau: float, generator: Optional[torch.Generator]) -> None:
    if not isinstance(profiles, Tensor) or profiles.dim() != 2:
        shape = tuple(profiles.shape) if isinstance(profiles, Tensor) else type(profiles).__name__
        raise ProtoKNNError(
            f"cluster loss: profiles must be a 2-D tensor (B, P), got {shape}; "
            f"pass one row per sample and one column per prototype."
        )
    if not tau > 0:
        raise ProtoKNNError(f"cluster loss: tau must be > 0, got {tau}; use the paper's 0.05.")
    if generator is not None and generator.device.type != profiles.device.type:
        raise ProtoKNNError(
            f"cluster loss: the generator is on {generator.device} but the profiles are on "
            f"{profiles.device}; create it with torch.Generator(device=profiles.device)."
        )


def _working(profiles: Tensor) -> Tensor:
    # half precision would make the Gumbel noise coarse: sample in float32 at least
    return profiles if profiles.dtype == torch.float64 else profiles.float()


def _negated_scores(
    s: Tensor, tau: float, generator: Optional[torch.Generator]
) -> Iterator[Tuple[int, int, Tensor]]:
    """Blocks of whole anchors: (start, stop, -score (stop - start, B, P)).

    -score = log(-log U) - s_a / tau + s_b / tau, U ~ U[0, 1) (U = 0 gives +inf: never
    drawn). uniform_ + two logs is faster on CPU than exponential_ + one log. The
    noise is built in place; the profile terms are added out of place when ``s``
    needs a gradient, so autograd sees them.
    """
    n, p = s.shape
    s = s / tau
    rows = max(1, min(n, _MAX_NOISE_ELEMENTS // (n * p)))
    for start in range(0, n, rows):  # one iteration at the default batch size
        stop = min(n, start + rows)
        noise = torch.empty(stop - start, n, p, dtype=s.dtype, device=s.device)
        noise.uniform_(generator=generator).log_().neg_().log_()
        if s.requires_grad:
            yield start, stop, noise - s[start:stop, None, :] + s[None, :, :]
        else:
            noise -= s[start:stop, None, :]
            noise += s[None, :, :]
            yield start, stop, noise


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
    _check_profiles(profiles, tau, generator)
    s = _working(profiles.detach())
    n, p = s.shape
    counts = torch.zeros(n, p, dtype=s.dtype, device=s.device)
    if n < 2:
        return counts
    not_self = ~torch.eye(n, dtype=torch.bool, device=s.device)
    for start, stop, neg_score in _negated_scores(s, tau, generator):
        drawn = neg_score.argmin(dim=2)  # (rows, B): prototype drawn for pair (a, b)
        counts[start:stop].scatter_add_(1, drawn, not_self[start:stop].to(s.dtype))
    return counts


def relaxed_counts(
    profiles: Tensor,
    tau: float = 0.05,
    tau_soft: float = 0.5,
    straight_through: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Gumbel-softmax sampling counts: the differentiable relaxation of ``sample_counts``.

    profiles: (B, P). Each pair's one-hot draw is replaced by
    softmax_i(((s_{a,i} - s_{b,i}) / tau + g_i) / tau_soft); E[a, i] sums it over
    b != a, so rows still sum to B - 1. ``straight_through``: the forward gives the
    hard counts of the same draws, the backward the softmax's gradient.
    Returns (B, P) in float32 (float64 for float64 profiles) with a gradient to
    ``profiles`` when they require one. The graph keeps one (B, B, P) softmax
    (25 MB at 112 x 512 in float32).
    """
    _check_profiles(profiles, tau, generator)
    if not tau_soft > 0:
        raise ProtoKNNError(
            f"cluster loss: tau_soft must be > 0, got {tau_soft}; try 0.5 (smaller is closer to the hard draw)."
        )
    s = _working(profiles)
    n, p = s.shape
    if n < 2:
        return s * 0.0  # zeros that keep the graph (and dtype) of the profiles
    not_self = (~torch.eye(n, dtype=torch.bool, device=s.device)).to(s.dtype)
    blocks = []
    for start, stop, neg_score in _negated_scores(s, tau, generator):
        soft = torch.softmax(neg_score / -tau_soft, dim=2)  # (rows, B, P)
        if straight_through:
            hard = torch.zeros_like(soft).scatter_(2, neg_score.detach().argmin(dim=2, keepdim=True), 1.0)
            soft = hard + (soft - soft.detach())
        blocks.append(torch.einsum("abp,ab->ap", soft, not_self[start:stop]))
    return torch.cat(blocks, dim=0)
