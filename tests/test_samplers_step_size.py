"""pib_bayes.samplers.step_size: the curvature tools behind ``step_size="auto"`` and the minibatch-noise
report, on operators and recursions whose answers are known exactly. (The end-to-end auto step size and
noise report through :func:`pib_bayes.sample` are tested in test_tuning.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from pib_bayes.samplers.step_size import (
    PSGLD_RULE,
    SGHMC_RULE,
    SGLD_RULE,
    SGNHT_RULE,
    estimate_lambda_max,
    hessian_diagonal,
    reshuffling_factor,
)

F64 = torch.float64


def _operator(eigenvalues, seed=0):
    """A symmetric matrix Q diag(eigenvalues) Q^T with a random orthogonal Q, split over two tensors."""
    d = len(eigenvalues)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    h = q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ q.T

    def hvp(v):
        flat = torch.cat([v[0].flatten(), v[1]])
        out = h @ flat
        return [out[:6].view(2, 3), out[6:]]

    return h, hvp, [torch.zeros(2, 3, dtype=F64), torch.zeros(d - 6, dtype=F64)]


def test_power_iteration_finds_the_top_eigenvalue_and_its_eigenvector():
    eig = [5.0, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05]
    h, hvp, like = _operator(eig)
    res = estimate_lambda_max(hvp, like, tol=1e-12, max_iters=2000)
    assert res.converged and res.value == pytest.approx(5.0, rel=1e-9) and res.shift == 0.0
    v = torch.cat([res.vector[0].flatten(), res.vector[1]])
    torch.testing.assert_close(h @ v, 5.0 * v, rtol=0, atol=1e-5)  # an eigenvector of lambda_max
    assert [tuple(t.shape) for t in res.vector] == [(2, 3), (2,)]
    # "would catch the bug": the second eigenvalue is far from the first at this tolerance
    assert abs(res.value - eig[1]) > 1.0


def test_power_iteration_is_seeded_by_its_generator():
    _, hvp, like = _operator([3.0, 2.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = estimate_lambda_max(hvp, like, max_iters=5, generator=torch.Generator().manual_seed(1))
    b = estimate_lambda_max(hvp, like, max_iters=5, generator=torch.Generator().manual_seed(1))
    c = estimate_lambda_max(hvp, like, max_iters=5, generator=torch.Generator().manual_seed(2))
    assert a.value == b.value and a.value != c.value


def test_power_iteration_shifts_past_a_dominant_negative_eigenvalue():
    h, hvp, like = _operator([2.0, 1.0, 0.5, 0.1, -0.2, -0.3, -1.0, -6.0])
    res = estimate_lambda_max(hvp, like, tol=1e-12, max_iters=5000)
    assert res.shift == pytest.approx(-6.0, rel=1e-6)
    assert res.value == pytest.approx(2.0, rel=1e-6)


def test_hessian_diagonal_exact_with_unit_vectors_and_unbiased_with_probes():
    h, hvp, like = _operator([4.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.25])
    exact = hessian_diagonal(hvp, like, num_probes=16)
    torch.testing.assert_close(torch.cat([exact[0].flatten(), exact[1]]), torch.diagonal(h), rtol=0,
                               atol=1e-12)
    # Hutchinson: mean_z z (H z) is unbiased for diag(H); each coordinate's estimate has variance
    # sum_{k != j} H_jk^2 / num_probes
    probes = 4000
    est = hessian_diagonal(hvp, like, num_probes=probes, generator=torch.Generator().manual_seed(0))
    est = torch.cat([est[0].flatten(), est[1]])
    se = ((h.square().sum(1) - torch.diagonal(h).square()) / probes).sqrt()
    assert bool(((est - torch.diagonal(h)).abs() <= 4.5 * se).all())
    # "would catch the bug": the off-diagonal row sums are many standard errors away from the diagonal
    assert bool(((h.sum(1) - torch.diagonal(h)).abs() > 4.5 * se).any())


def test_reshuffling_factor_matches_a_simulated_ar1_recursion():
    """w <- a w + e_t, e_t the mean of a centred finite population over batch t: with reshuffled epochs
    (the driver's batches) the stationary variance, averaged over the position in the epoch, is f times
    that with independent batches, c / (1 - a^2), c = s^2 / B (n - B) / (n - 1)."""
    n, b, a = 12, 3, 0.8
    epochs = n // b
    f = reshuffling_factor(a, b, n)
    g = torch.Generator().manual_seed(0)
    c = torch.randn(n, generator=g, dtype=F64)
    c -= c.mean()
    var_independent = float(c.square().mean()) / b * (n - b) / (n - 1) / (1 - a * a)
    chains = 40_000

    def stationary_variance(reshuffled: bool) -> float:
        w = torch.zeros(chains, dtype=F64)
        kept = []
        for epoch in range(30):  # a^100 < 1e-9: stationary long before the last 5 epochs
            perm = torch.argsort(torch.rand(chains, n, generator=g), dim=1)
            means = c[perm].view(chains, epochs, b).mean(-1)
            for p in range(epochs):
                if not reshuffled:  # a fresh batch drawn without replacement every step
                    means[:, p] = c[torch.argsort(torch.rand(chains, n, generator=g), dim=1)[:, :b]].mean(-1)
                w = a * w + means[:, p]
                if epoch >= 25:
                    kept.append(w.clone())
        return float(torch.stack(kept).var(dim=1).mean())

    se = math.sqrt(2 / chains)  # relative standard error of one variance estimate (conservative here)
    assert stationary_variance(True) / var_independent == pytest.approx(f, abs=4 * se)
    assert stationary_variance(False) / var_independent == pytest.approx(1.0, abs=4 * se)
    # "would catch the bug": the factor is far from the independent-batch value 1
    assert abs(f - 1.0) > 20 * se


def test_reshuffling_factor_limits():
    assert reshuffling_factor(0.0, 200, 2000) == 1.0  # no memory
    assert reshuffling_factor(0.9, 2000, 2000) == 1.0 and reshuffling_factor(0.9, 200, None) == 1.0
    assert reshuffling_factor(0.9, 1500, 2000) == 1.0  # one batch per epoch: nothing to cancel
    values = [reshuffling_factor(a, 100, 2000) for a in (0.5, 0.9, 0.99, 0.999)]
    assert all(0 < v < 1 for v in values) and values == sorted(values, reverse=True)


@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_the_sgld_rule_bounds_the_stationary_variance_bias_by_eps(eps):
    """SGLD on a harmonic direction: variance (1/lambda) / (1 - h lambda / 2); the rule's h gives a relative
    bias of exactly eps in the stiffest direction."""
    lam = 7.0
    h = SGLD_RULE.choose(lam, eps, {})["step_size"]
    assert 1 / (1 - h * lam / 2) - 1 == pytest.approx(eps, rel=1e-12)
    assert PSGLD_RULE.choose(lam, eps, {})["step_size"] == pytest.approx(h, rel=1e-12)


def test_the_sghmc_and_sgnht_rules_hold_their_bias_bounds():
    lam, eps = 4.0, 0.05
    s = SGHMC_RULE.choose(lam, eps, {})
    eta, alpha = s["step_size"], s["friction"]
    assert alpha == pytest.approx(math.sqrt(eta * lam), rel=1e-12)  # damping ratio 1/2
    assert 1 / (1 - eta * lam / (2 * (2 - alpha))) - 1 == pytest.approx(eps, rel=1e-12)
    given = SGHMC_RULE.choose(lam, eps, {"friction": 0.3})
    assert given["friction"] == 0.3
    assert 1 / (1 - given["step_size"] * lam / (2 * (2 - 0.3))) - 1 == pytest.approx(eps, rel=1e-12)
    h = SGNHT_RULE.choose(lam, eps, {"diffusion": 1.0})["step_size"]
    assert h == pytest.approx(min(eps / 1.0, math.sqrt(2 * eps / lam)), rel=1e-12)
