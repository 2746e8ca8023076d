"""The relaxed (Gumbel-softmax) sampler against the hard Gumbel-max sampler of eqs. 2-3."""
from __future__ import annotations

import pytest
import torch

from protoknn_plugin import sampling
from protoknn_plugin.errors import ProtoKNNError
from protoknn_plugin.sampling import relaxed_counts, sample_counts


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def profiles(n=12, p=20, seed=0, dtype=torch.float32):
    return 0.3 * torch.rand(n, p, generator=gen(seed), dtype=dtype)


def test_relaxed_rows_sum_to_batch_minus_one_and_are_positive():
    s = profiles()
    counts = relaxed_counts(s, tau_soft=0.5, generator=gen())
    assert torch.allclose(counts.sum(1), torch.full((12,), 11.0), atol=1e-5)
    assert bool((counts > 0).all())  # soft: every prototype gets some mass
    assert torch.equal(relaxed_counts(s[:1], generator=gen()), torch.zeros(1, 20))


def test_relaxed_gradient_is_finite_and_non_zero():
    s = profiles().requires_grad_(True)
    weights = torch.randn(12, 20, generator=gen(1))
    (relaxed_counts(s, tau_soft=0.5, generator=gen()) * weights).sum().backward()
    assert bool(torch.isfinite(s.grad).all()) and float(s.grad.abs().max()) > 0
    assert sample_counts(s, generator=gen()).requires_grad is False  # the hard one has none


def test_relaxed_gradient_matches_finite_differences_in_float64():
    s = profiles(n=5, p=4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: relaxed_counts(x, tau_soft=0.7, generator=gen(3)), (s,),
                                    eps=1e-6, atol=1e-6)


def test_counts_approach_the_hard_draws_as_tau_soft_goes_to_zero():
    s = profiles(n=16, p=30)
    hard = sample_counts(s, generator=gen(4))
    errors = [float((relaxed_counts(s, tau_soft=t, generator=gen(4)) - hard).abs().max())
              for t in (1.0, 0.1, 0.01, 1e-4)]
    assert errors[0] > 0.5  # clearly soft at tau_soft = 1
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-3


def test_relaxed_and_hard_consume_the_same_random_stream():
    s = profiles()
    g_hard, g_soft = gen(9), gen(9)
    sample_counts(s, generator=g_hard)
    relaxed_counts(s, generator=g_soft)
    assert torch.equal(torch.rand(5, generator=g_hard), torch.rand(5, generator=g_soft))


def test_straight_through_forward_is_hard_and_backward_is_soft():
    s = profiles()
    st_in, soft_in = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    weights = torch.randn(12, 20, generator=gen(2))
    st = relaxed_counts(st_in, tau_soft=0.5, straight_through=True, generator=gen(6))
    assert torch.equal(st.detach(), sample_counts(s, generator=gen(6)))
    (st * weights).sum().backward()
    (relaxed_counts(soft_in, tau_soft=0.5, generator=gen(6)) * weights).sum().backward()
    assert torch.allclose(st_in.grad, soft_in.grad, atol=1e-6)


def test_relaxed_blocks_give_the_same_counts(monkeypatch):
    # one anchor per noise block draws the uniforms in the same order
    s = profiles()
    whole = relaxed_counts(s, generator=gen(8))
    monkeypatch.setattr(sampling, "_MAX_NOISE_ELEMENTS", 1)
    assert torch.allclose(relaxed_counts(s, generator=gen(8)), whole, atol=1e-6)


def test_bad_tau_soft_is_a_one_line_error():
    with pytest.raises(ProtoKNNError, match="tau_soft must be > 0"):
        relaxed_counts(profiles(), tau_soft=0.0)
