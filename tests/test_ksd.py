"""Kernel Stein discrepancy (Gorham & Mackey 2017; SPEC §4): closed form, exact-draw law, power, API.

The oracle for exact draws: Stein's identity makes E[k_p(x, y)] = 0 for independent x, y ~ p, so
the V-statistic KSD^2 = (1/m^2) sum_{i,j} k_p(x_i, x_j) of m i.i.d. draws has the exact mean
E[m KSD^2] = E_p[k_p(x, x)] = -2 b d c^(2b-2) + c^(2b) E_p|s|^2 (IMQ exponent b; b = -1/2 gives
d/c^3 + E|s|^2/c), at every m: KSD shrinks like 1/sqrt(m). Replicated runs give the MC standard
error of the mean of m KSD^2; draws from another law (shifted, over-dispersed, ULA at a large step)
must fail the same check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import grad, jacrev

import pib_bayes as pb
from pib_bayes import GaussianPrior
from pib_bayes.diagnostics import kernel_stein_discrepancy, ksd
from pib_bayes.samplers import GaussianNoise, build_sgld

Z_PASS = 4.5
Z_CATCH = 10.0




def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ closed form
def _brute_ksd2(x: torch.Tensor, s: torch.Tensor, c: float, b: float) -> float:
    """(1/m^2) sum_ij k_p(x_i, x_j) with every derivative of k taken by autograd."""
    def k(a, y):
        return (c * c + ((a - y) ** 2).sum()) ** b

    m = x.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            xi, xj = x[i], x[j]
            div_div = torch.trace(jacrev(grad(k, 0), 1)(xi, xj))
            total += (div_div + grad(k, 0)(xi, xj) @ s[j] + grad(k, 1)(xi, xj) @ s[i]
                      + k(xi, xj) * (s[i] @ s[j]))
    return float(total) / m**2


@pytest.mark.parametrize("c,b", [(1.0, -0.5), (0.7, -0.3), (2.5, -0.9)])
def test_closed_form_equals_brute_force_autograd(c, b):
    g = _gen(0)
    x = 3.0 + torch.randn(7, 3, generator=g, dtype=torch.float64)  # off-centre: the centring is harmless
    s = torch.randn(7, 3, generator=g, dtype=torch.float64)  # any vectors: the identity is algebraic
    brute = _brute_ksd2(x, s, c, b)
    for block in (1, 3, 7, None):
        got = kernel_stein_discrepancy(x, s, c=c, power=b, block_size=block) ** 2
        assert got == pytest.approx(brute, rel=1e-10), (block, got, brute)
    # (chain, draw, d) input is pooled over chains, float32 is computed in float64
    pooled = kernel_stein_discrepancy(x.reshape(1, 7, 3).float(), s.reshape(1, 7, 3).float(), c=c, power=b)
    np.testing.assert_allclose(pooled**2, brute, rtol=1e-5)


# ------------------------------------------------------------------------------ exact draws
def _exact_mean(d: int, c: float, b: float, mean_sq_score: float) -> float:
    """E[m KSD^2] = E k_p(x, x) = -2 b d c^(2b-2) + c^(2b) E|s|^2 for exact i.i.d. draws."""
    return -2 * b * d * c ** (2 * b - 2) + c ** (2 * b) * mean_sq_score


def _replicated(make, m: int, reps: int, seed: int, **kw) -> np.ndarray:
    """m KSD^2 for ``reps`` independent sets of m draws: ``make(m, generator) -> (draws, scores)``."""
    g = _gen(seed)
    out = []
    for _ in range(reps):
        x, s = make(m, g)
        out.append(m * kernel_stein_discrepancy(x, s, **kw) ** 2)
    return np.array(out)


def _z(vals: np.ndarray, exact: float) -> float:
    return abs(vals.mean() - exact) / (vals.std(ddof=1) / math.sqrt(len(vals)))


D = 4


def _std_normal(m, g):
    x = torch.randn(m, D, generator=g, dtype=torch.float64)
    return x, -x


def _shifted(m, g):  # N(0.3, I) scored against N(0, I)
    x = 0.3 + torch.randn(m, D, generator=g, dtype=torch.float64)
    return x, -x


def _overdispersed(m, g):  # N(0, 1.3^2 I) scored against N(0, I)
    x = 1.3 * torch.randn(m, D, generator=g, dtype=torch.float64)
    return x, -x


@pytest.mark.parametrize("c,b", [(1.0, -0.5), (2.0, -0.5), (1.0, -0.7)])
def test_exact_draws_have_the_exact_mean_at_every_m(c, b):
    exact = _exact_mean(D, c, b, mean_sq_score=D)  # E|s|^2 = E|x|^2 = d under N(0, I)
    # the same constant at every m, so E[KSD^2] = exact / m: KSD converges to 0 like 1/sqrt(m)
    for m, reps in ((100, 200), (400, 60), (1600, 16)):
        vals = _replicated(_std_normal, m, reps, seed=m, c=c, power=b)
        assert _z(vals, exact) < Z_PASS, (m, vals.mean(), exact)


@pytest.mark.parametrize("make", [_shifted, _overdispersed], ids=["shifted_0.3", "overdispersed_1.3"])
def test_exact_draw_check_catches_draws_from_another_law(make):
    exact = _exact_mean(D, 1.0, -0.5, mean_sq_score=D)
    vals = _replicated(make, 400, 100, seed=1)
    assert _z(vals, exact) > Z_CATCH
    # and the discrepancy grows with m instead of staying put (a nonzero population KSD)
    assert _replicated(make, 1600, 20, seed=2).mean() > 2.5 * vals.mean()


P_CORR = torch.tensor([[2.0, 0.9, 0.0, 0.0, 0.3], [0.9, 1.0, 0.2, 0.0, 0.0], [0.0, 0.2, 1.5, 0.4, 0.0],
                       [0.0, 0.0, 0.4, 0.8, 0.1], [0.3, 0.0, 0.0, 0.1, 1.2]], dtype=torch.float64)


def _correlated(m, g):
    """Exact draws of N(0, P^-1) with their full scores -P x."""
    chol = torch.linalg.cholesky(torch.linalg.inv(P_CORR))
    x = torch.randn(m, 5, generator=g, dtype=torch.float64) @ chol.T
    return x, -x @ P_CORR


def _orthonormal(k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(5, k, generator=_gen(seed), dtype=torch.float64))
    return q.T  # (k, 5), orthonormal rows


@pytest.mark.parametrize("kind", ["coordinate_subset", "orthonormal_projection"])
def test_subset_and_orthonormal_projection_keep_steins_identity(kind):
    """A subset of coordinates, or w -> Q w with orthonormal rows and scores Q s(w) at the full draws:
    E[Q s(w) . f(Q w)] = -E[div f(Q w)] because Q Q^T = I, so exact draws still give E[m KSD^2] =
    E k_p(x, x), with d = 2 and E|Q s|^2 = tr(Q P Q^T)."""
    q = torch.eye(5, dtype=torch.float64)[[0, 3]] if kind == "coordinate_subset" else _orthonormal(2, 0)

    def make(m, g):
        x, s = _correlated(m, g)
        return x @ q.T, s @ q.T

    exact = _exact_mean(2, 1.0, -0.5, mean_sq_score=float(torch.trace(q @ P_CORR @ q.T)))
    for m, reps in ((200, 150), (800, 40)):
        assert _z(_replicated(make, m, reps, seed=m), exact) < Z_PASS


def test_non_orthonormal_projections_are_biased():
    """Random unit directions that are not orthogonal (as in random_projections): the divergence term
    needs U U^T = I, so the plain formula on (U w, U s) is not zero-mean: the same check fails."""
    g = _gen(5)
    u = torch.randn(2, 5, generator=g, dtype=torch.float64)
    u[1] = u[0] + 0.6 * u[1]  # two unit rows at a small angle
    u = u / u.norm(dim=1, keepdim=True)

    def make(m, g):
        x, s = _correlated(m, g)
        return x @ u.T, s @ u.T

    exact = _exact_mean(2, 1.0, -0.5, mean_sq_score=float(torch.trace(u @ P_CORR @ u.T)))
    vals = _replicated(make, 800, 40, seed=6)
    assert _z(vals, exact) > Z_CATCH


# ------------------------------------------------------------------------------ ranking step sizes
def _ula_final_states(h: float, m: int, d: int, seed: int) -> torch.Tensor:
    """m independent ULA (SGLD, full gradient) chains on N(0, I_d) to stationarity, by the library kernel."""
    kernel = build_sgld()
    x = torch.zeros(m, d, dtype=torch.float64)
    noise = GaussianNoise(_gen(seed))
    steps = int(math.ceil(40 / h))  # contraction (1 - h)^steps < e^-40
    for _ in range(steps):
        kernel.step([x], [x.clone()], {}, h, noise)
    return x


def test_ksd_ranks_ula_step_sizes_by_their_variance_bias():
    """ULA on N(0, I) has stationary variance 1/(1 - h/2) (SPEC §2): 1.05, 1.33, 2 for h = 0.1, 0.5, 1.
    m KSD^2 over independent replicates grows with h, each gap many standard errors wide, and the
    exact-draw check rejects h = 0.5. (At m = 500 the 5% excess variance of h = 0.1 is within the
    noise of exact draws: the population KSD^2 is second order in the error, so resolving it needs
    more draws.)"""
    m, d, reps = 500, 3, 12
    stats = {}
    for h in (0.1, 0.5, 1.0):
        vals = []
        for r in range(reps):
            x = _ula_final_states(h, m, d, seed=100 * r + int(10 * h))
            var = x.var().item()
            assert abs(var - 1 / (1 - h / 2)) < 5 * math.sqrt(2 / (m * d)) * var  # stationary
            vals.append(m * kernel_stein_discrepancy(x, -x) ** 2)
        stats[h] = np.array(vals)
    exact = _exact_mean(d, 1.0, -0.5, mean_sq_score=d)
    ordered = [stats[h] for h in (0.1, 0.5, 1.0)]
    for lo, hi in zip(ordered, ordered[1:], strict=False):
        se = math.sqrt(lo.var(ddof=1) / reps + hi.var(ddof=1) / reps)
        assert hi.mean() - lo.mean() > Z_PASS * se, (lo.mean(), hi.mean(), se)
    assert _z(stats[0.5], exact) > Z_PASS


# ------------------------------------------------------------------------------ ksd on a Posterior
N, SIGMA0, BETA, S_NOISE = 30, 1.5, 0.2, 0.7


def _linear_case():
    g = _gen(3)
    x = torch.randn(N, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[0.5], [-1.0], [0.2]], dtype=torch.float64) + 0.3 + S_NOISE * torch.randn(
        N, 1, generator=g, dtype=torch.float64)
    feats = torch.cat([x, torch.ones(N, 1, dtype=torch.float64)], 1)  # (weight, bias)
    lam = torch.eye(4, dtype=torch.float64) / SIGMA0**2 + feats.T @ feats / (N * BETA * S_NOISE**2)
    mu = torch.linalg.solve(lam, feats.T @ y[:, 0] / (N * BETA * S_NOISE**2))
    return x, y, lam, mu


def _linear_posterior(**kw):
    x, y, lam, mu = _linear_case()
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    prior = GaussianPrior(SIGMA0)
    post = pb.sample(model, pb.GaussianLoss(S_NOISE), (x, y), beta=BETA, prior=prior, step_size=0.01,
                     num_chains=2, num_warmup=100, num_draws=60, seed=1, **kw)
    energy = pb.Energy(model, pb.GaussianLoss(S_NOISE), prior=prior, beta=BETA)
    return post, energy, (x, y), lam, mu


def test_ksd_of_a_posterior_uses_the_exact_full_data_scores():
    post, energy, data, lam, mu = _linear_posterior()
    w = torch.cat([post.draws["weight"].reshape(2, 60, 3), post.draws["bias"].reshape(2, 60, 1)], 2)
    scores = -(w - mu) @ lam  # the Gaussian-linear Gibbs posterior's score (SPEC §2), in closed form
    want = kernel_stein_discrepancy(w, scores, c=0.5)
    assert ksd(post, energy, data, c=0.5) == pytest.approx(want, rel=1e-9)
    # data in row batches, draws in chunks, thinned: the same scores
    assert ksd(post, energy, data, c=0.5, batch_size=7, chunk_size=9) == pytest.approx(want, rel=1e-9)
    assert ksd(post, energy, data, thin=3) == pytest.approx(
        kernel_stein_discrepancy(w[:, ::3], scores[:, ::3]), rel=1e-9)
    # a parameter subset: the partial scores at the full draws
    assert ksd(post, energy, data, params=["weight"]) == pytest.approx(
        kernel_stein_discrepancy(w[..., :3], scores[..., :3]), rel=1e-9)


class _Branchy(nn.Module):
    """Data-dependent control flow: vmap cannot run it, so the scores are taken one draw at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        out = self.lin(x)
        return out if bool(out.sum() > -1e9) else -out


def test_ksd_falls_back_to_one_draw_at_a_time_when_vmap_fails():
    post, energy, data, lam, mu = _linear_posterior()
    branchy = _Branchy().double()
    draws = {f"lin.{k}": v for k, v in post.draws.items()}
    post2 = pb.Posterior(draws, dict(post.sample_stats), {**post.metadata, "sampled_params": list(draws)},
                         model=branchy)
    energy2 = pb.Energy(branchy, pb.GaussianLoss(S_NOISE), prior=GaussianPrior(SIGMA0), beta=BETA)
    assert ksd(post2, energy2, data) == pytest.approx(ksd(post, energy, data), rel=1e-9)


def test_ksd_bad_input_names_the_argument():
    post, energy, data, _, _ = _linear_posterior()
    x = torch.randn(10, 2)
    cases = [
        (lambda: kernel_stein_discrepancy(x, x[:9]), ValueError, "scores"),
        (lambda: kernel_stein_discrepancy(x[0], x[0]), ValueError, "draws"),
        (lambda: kernel_stein_discrepancy(x.tolist(), x), TypeError, "draws"),
        (lambda: kernel_stein_discrepancy(x, x * math.nan), ValueError, "scores"),
        (lambda: kernel_stein_discrepancy(x, x, c=0.0), ValueError, "c"),
        (lambda: kernel_stein_discrepancy(x, x, power=0.5), ValueError, "power"),
        (lambda: kernel_stein_discrepancy(x, x, power=-1.0), ValueError, "power"),
        (lambda: kernel_stein_discrepancy(x, x, block_size=0), ValueError, "block_size"),
        (lambda: ksd(post, "energy", data), TypeError, "energy"),
        (lambda: ksd(post, energy, data, params="weight"), ValueError, "params"),
        (lambda: ksd(post, energy, data, params=["nope"]), ValueError, "params"),
        (lambda: ksd(post, energy, data, thin=0), ValueError, "thin"),
        (lambda: ksd(post, energy, (data[0], data[1][:5])), ValueError, "data"),
    ]
    for fn, err, name in cases:
        with pytest.raises(err, match=f"^{name}: "):
            fn()
    kept = _linear_posterior(keep=["weight"])[0]
    with pytest.raises(ValueError, match=r"^posterior: .*bias.*keep=None"):
        ksd(kept, energy, data)
