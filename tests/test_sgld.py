"""SGLD against the exact facts of unadjusted Langevin on Gaussian energies (SPEC §2).

Every coordinate of a big parameter tensor under a separable energy is an independent chain,
so moments are pinned to a fraction of a percent in a few hundred steps. Per step we keep the
mean of the statistic over each of 100 blocks of chains; ArviZ's ESS over (block, step) then
gives the Monte-Carlo standard error. Each test also runs a sampler with the noise off by
sqrt(2) (``diffusion=0.5``: noise sqrt(h) instead of sqrt(2h)) and checks that the same
assertion fails on it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from stat_helpers import mean_and_mcse

from pib_bayes.samplers import GaussianNoise, build_sgld, langevin_move_
from pib_bayes.samplers.core import make_noise

N_CHAINS = 100_000
BLOCKS = 100


def _block_means(v: torch.Tensor) -> np.ndarray:
    return v.reshape(BLOCKS, -1, *v.shape[1:]).mean(1).numpy()


def _run(precision: torch.Tensor, h: float, steps: int, diffusion: float = 1.0, seed: int = 0):
    """Run N independent chains on U = x^T P x / 2; per step, block means of x_i x_j and x_i(t) x_i(t-1)."""
    d = precision.shape[0]
    noise = GaussianNoise(torch.Generator().manual_seed(seed))
    x = [torch.zeros(N_CHAINS // d // BLOCKS * BLOCKS, d, dtype=torch.float64)]
    burn = int(20 / (h * float(torch.linalg.eigvalsh(precision).min())))  # start-up bias e^-20
    second, lag1 = [], []
    for t in range(burn + steps):
        prev = x[0].clone() if t >= burn else None
        langevin_move_(x, [x[0] @ precision], h, noise, diffusion)
        if prev is not None:
            second.append(_block_means(x[0][:, :, None] * x[0][:, None, :]))
            lag1.append(_block_means(x[0] * prev))
    # -> (blocks, steps, ...) as ArviZ's (chain, draw)
    return np.stack(second, 1), np.stack(lag1, 1)


def _estimate(stat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shape = stat.shape[2:]
    est, se = np.zeros(shape), np.zeros(shape)
    for idx in np.ndindex(*shape):
        est[idx], se[idx] = mean_and_mcse(stat[(slice(None), slice(None), *idx)])
    return est, se


@pytest.mark.parametrize("s,h", [(1.0, 0.1), (2.0, 0.5)])
def test_sgld_stationary_variance_1d(s, h):
    prec = torch.tensor([[1 / s**2]], dtype=torch.float64)
    exact = s**2 / (1 - h / (2 * s**2))
    (est, se) = _estimate(_run(prec, h, 300)[0])
    est, se = est.item(), se.item()
    assert abs(est - exact) < 4 * se, (est, exact, se)
    assert se < 0.003 * exact  # the test has the resolution it claims
    # the naive target s^2 is excluded: the step-size bias is real and SGLD reproduces it
    assert abs(est - s**2) > 4 * se
    # would catch the bug: noise sqrt(h) instead of sqrt(2h)
    wrong = _estimate(_run(prec, h, 300, diffusion=0.5)[0])[0].item()
    assert abs(wrong - exact) > 10 * se


def test_sgld_lag1_autocorrelation():
    s, h = 1.0, 0.1
    prec = torch.tensor([[1 / s**2]], dtype=torch.float64)
    var = s**2 / (1 - h / (2 * s**2))
    est, se = _estimate(_run(prec, h, 300)[1] / var)
    assert abs(est.item() - (1 - h / s**2)) < 4 * se.item(), (est, se)


def test_sgld_multivariate_stationary_covariance():
    P = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=torch.float64)
    h = 0.3
    exact = (torch.linalg.inv(P) @ torch.linalg.inv(torch.eye(3, dtype=torch.float64) - h * P / 2)).numpy()
    est, se = _estimate(_run(P, h, 300)[0])
    assert np.all(np.abs(est - exact) < 4 * se), (est, exact, se)
    # the target's own covariance P^-1 is excluded at this step size
    assert np.any(np.abs(est - np.linalg.inv(P.numpy())) > 6 * se)
    # would catch the bug: noise sqrt(h) instead of sqrt(2h)
    wrong = _estimate(_run(P, h, 300, diffusion=0.5)[0])[0]
    assert np.any(np.abs(wrong - exact) > 10 * se)


def test_kernel_step_matches_update_equation():
    """One SGLD step equals w - h g + sqrt(2h) xi with xi from the same generator, in parameter order."""
    k = build_sgld()
    w = [torch.randn(5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)]
    g = [torch.randn_like(t) for t in w]
    before = [t.clone() for t in w]
    k.step(w, g, k.init(w), 0.01, GaussianNoise(torch.Generator().manual_seed(3)))
    xi = torch.randn(11, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for b, gg, x, after in zip(before, g, [xi[:5], xi[5:].view(2, 3)], w):
        torch.testing.assert_close(after, b - 0.01 * gg + math.sqrt(0.02) * x, rtol=0, atol=1e-15)


def _moments_with_noise(kind: str, h: float = 0.1, s: float = 1.0, steps: int = 300):
    """Per-block time averages of x^2 and x^4 (100 independent blocks of 1000 chains)."""
    noise = make_noise(kind, torch.Generator().manual_seed(0))
    x = [torch.zeros(N_CHAINS, dtype=torch.float64)]
    m2 = torch.zeros(BLOCKS, dtype=torch.float64)
    m4 = torch.zeros(BLOCKS, dtype=torch.float64)
    burn = int(20 * s**2 / h)
    for t in range(burn + steps):
        langevin_move_(x, [x[0] / s**2], h, noise)
        if t >= burn:
            v = x[0].view(BLOCKS, -1)
            m2 += (v * v).mean(1) / steps
            m4 += v.pow(4).mean(1) / steps
    kurt = m4 / m2**2 - 3.0
    se = lambda t: float(t.std() / math.sqrt(BLOCKS))  # noqa: E731 - blocks are independent
    return float(m2.mean()), se(m2), float(kurt.mean()), se(kurt)


def test_opt_in_rademacher_noise_keeps_the_variance_and_changes_the_kurtosis_as_derived():
    """Any unit-variance noise gives x' = a x + sqrt(2h) xi the variance s^2/(1 - h/(2s^2)); its
    stationary excess kurtosis is kappa4(xi) (1 - a^2)/(1 + a^2), a = 1 - h/s^2: 0 for Gaussian
    noise, -2 (1 - a^2)/(1 + a^2) for Rademacher signs (kappa4 = -2)."""
    h, s = 0.1, 1.0
    a = 1 - h / s**2
    exact_var = s**2 / (1 - h / (2 * s**2))
    var, var_se, kurt, kurt_se = _moments_with_noise("rademacher", h, s)
    assert abs(var - exact_var) < 4 * var_se
    assert abs(kurt - (-2 * (1 - a * a) / (1 + a * a))) < 4 * kurt_se
    # the kurtosis check is what tells the two laws apart: Gaussian noise sits at 0
    g_var, _, g_kurt, g_se = _moments_with_noise("gaussian", h, s)
    assert abs(g_kurt) < 4 * g_se and abs(g_var - exact_var) < 4 * var_se
    assert abs(g_kurt - kurt) > 10 * max(kurt_se, g_se)
