"""Exactness tests for the sampler family (SPEC §2) and the batched multi-chain machinery (issue 3).

Every statistical check compares an estimate with an *exact* oracle and sets its tolerance from the
Monte-Carlo standard error:

* kernel level: the kernels are driven directly on a big tensor of independent coordinates with a
  Gaussian gradient (SPEC §2: 10^5 coordinates = 10^5 independent chains), so the final states are
  i.i.d. draws from the chain's stationary law and the standard error is sd/sqrt(N);
* driver level: ``pib_bayes.sample`` on the Gaussian-linear model, whose Gibbs posterior is known in
  closed form; the MCSE comes from ArviZ (``az.mcse``) or, for non-stationary cyclical chains,
  from independent (chain, cycle) blocks.

Next to each check, a deliberately wrong variant (noise off by sqrt(2), wrong update order,
unpreconditioned noise, noise in the exploration phase, ...) is run through the same check and
must be rejected, so the tolerances are shown to have power.
"""

from __future__ import annotations

import math
import warnings

import arviz as az
import numpy as np
import pytest
import torch
from scipy.linalg import solve_discrete_lyapunov
from torch import nn
from torch.func import functional_call, vmap

import pib_bayes
import pib_bayes.driver as driver_mod
from pib_bayes import GaussianPrior
from pib_bayes.batched import batched_forward
from pib_bayes.samplers import Cyclical, GaussianNoise, Kernel, build_psgld, build_sghmc, build_sgld
from pib_bayes.samplers.core import langevin_move_

Z_PASS = 4.5   # a correct sampler: every |z| below this (few comparisons per test, P(fail) < 1e-4)
Z_CATCH = 10.0  # a wrong sampler: some |z| above this (the bugs below sit at 15-100 standard errors)




def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Kernel level: exact stationary laws on separable Gaussian energies
# ------------------------------------------------------------------------------------------------

def _zscores_cov(x: torch.Tensor, exact: np.ndarray) -> np.ndarray:
    """z-scores of the sample second moments E[x_i x_j] of N i.i.d. zero-mean rows vs ``exact``."""
    x = x.double()
    n = x.shape[0]
    prods = x.unsqueeze(2) * x.unsqueeze(1)  # (N, d, d)
    est = prods.mean(0).numpy()
    se = (prods.std(0) / math.sqrt(n)).numpy()
    return (est - exact) / se


def _sgld_cov_exact(p: np.ndarray, h: float) -> np.ndarray:
    """SPEC §2: stationary covariance of unadjusted Langevin with precision P: P^{-1}(I - hP/2)^{-1}."""
    return np.linalg.inv(p) @ np.linalg.inv(np.eye(len(p)) - h * p / 2)


P2 = np.array([[1.0, 0.6], [0.6, 2.0]])
H_SGLD = 0.3


def _run_sgld_2d(step, n: int = 100_000, steps: int = 120, seed: int = 0):
    """Drive ``step(x, grad, noise)`` on n independent 2-D chains with U = x^T P x / 2; last two states."""
    p = torch.tensor(P2, dtype=torch.float64)
    x = torch.zeros(n, 2, dtype=torch.float64)
    noise = GaussianNoise(_gen(seed))
    prev = x.clone()
    for _ in range(steps):  # contraction (1 - h lambda_min)^steps ~ 1e-13: stationary at the end
        prev = x.clone()
        step(x, x @ p, noise)
    return prev, x


def _sgld_step(x, g, noise):
    kernel = build_sgld()
    kernel.step([x], [g], {}, H_SGLD, noise)


def test_sgld_exact_stationary_covariance_and_lag1():
    prev, x = _run_sgld_2d(_sgld_step)
    exact = _sgld_cov_exact(P2, H_SGLD)
    z = _zscores_cov(x, exact)
    assert np.abs(z).max() < Z_PASS, z
    # lag-1 cross moment E[x_{t+1} x_t^T] = (I - hP) Sigma
    lag = (x.double().unsqueeze(2) * prev.double().unsqueeze(1))
    est, se = lag.mean(0).numpy(), (lag.std(0) / math.sqrt(x.shape[0])).numpy()
    z_lag = (est - (np.eye(2) - H_SGLD * P2) @ exact) / se
    assert np.abs(z_lag).max() < Z_PASS, z_lag
    # the oracle is not the target's own covariance: that is many standard errors away
    assert np.abs(_zscores_cov(x, np.linalg.inv(P2))).max() > Z_CATCH


@pytest.mark.parametrize("bug", ["noise_sqrt_h", "noise_before_gradient"])
def test_sgld_check_catches_wrong_noise(bug):
    p = torch.tensor(P2, dtype=torch.float64)

    def wrong(x, g, noise):
        xi = noise.draw([x])[0]
        if bug == "noise_sqrt_h":  # w - h g + sqrt(h) xi
            x.add_(g, alpha=-H_SGLD).add_(xi, alpha=math.sqrt(H_SGLD))
        else:  # wrong order: noise first, gradient at the noised point, (I - hP)(w + sqrt(2h) xi)
            x.add_(xi, alpha=math.sqrt(2 * H_SGLD))
            x.sub_(H_SGLD * (x @ p))

    _, x = _run_sgld_2d(wrong)
    assert np.abs(_zscores_cov(x, _sgld_cov_exact(P2, H_SGLD))).max() > Z_CATCH


# pSGLD with a frozen preconditioner: coordinates with every combination of s and G
S_VALUES = (0.7, 1.0, 1.4)
G_VALUES = (0.5, 1.0, 2.0)
H_PSGLD = 0.3
PSGLD_STEPS = 150
PSGLD_EPS = 1e-5


def _psgld_grid(n_per: int = 20_000):
    s = torch.tensor(S_VALUES, dtype=torch.float64).repeat_interleave(len(G_VALUES)).repeat(n_per)
    g = torch.tensor(G_VALUES, dtype=torch.float64).repeat(len(S_VALUES)).repeat(n_per)
    return s, g


def _psgld_var_exact(s, g, h):
    """Stationary variance for U = x^2/(2 s^2) with G fixed: s^2 / (1 - h G / (2 s^2))."""
    return s**2 / (1 - h * g / (2 * s**2))


def _run_psgld(step, steps: int = 200, seed: int = 1):
    s, g = _psgld_grid()
    x = torch.zeros_like(s)
    noise = GaussianNoise(_gen(seed))
    for _ in range(steps):
        step(x, x / s**2, noise, g)
    return s, g, x


def _group_z(s, g, x, exact):
    """Per (s, G) group: z-score of mean(x^2) against the exact variance (mean is exactly 0)."""
    zs = []
    for sv in S_VALUES:
        for gv in G_VALUES:
            m = (s == sv) & (g == gv)
            sq = x[m] ** 2
            zs.append((sq.mean() - exact[m][0]) / (sq.std() / math.sqrt(m.sum())))
    return torch.stack(zs).numpy()


def _psgld_frozen_step(x, grad, noise, g):
    kernel = build_psgld(alpha=1.0, eps=PSGLD_EPS)
    state = {"square_avg": [(1.0 / g - PSGLD_EPS) ** 2]}  # G = 1/(eps + sqrt(V)) exactly g
    kernel.step([x], [grad], state, H_PSGLD, noise)


def test_psgld_frozen_preconditioner_exact_variance():
    s, g, x = _run_psgld(_psgld_frozen_step, steps=PSGLD_STEPS)
    # burn-in check: the variance of the slowest coordinate converges like (1 - h G/s^2)^(2 steps)
    assert (1 - H_PSGLD * min(G_VALUES) / max(S_VALUES) ** 2) ** (2 * PSGLD_STEPS) < 1e-8
    z = _group_z(s, g, x, _psgld_var_exact(s, g, H_PSGLD))
    assert np.abs(z).max() < Z_PASS, z
    # and the preconditioner really acts: the unpreconditioned SGLD variance is rejected
    assert np.abs(_group_z(s, g, x, _psgld_var_exact(s, torch.ones_like(g), H_PSGLD))).max() > Z_CATCH


def test_psgld_frozen_state_is_not_updated_and_precond_mean_reported():
    kernel = build_psgld(alpha=1.0, eps=PSGLD_EPS)
    x = torch.zeros(2, 5)
    v = torch.rand(2, 5)
    state = {"square_avg": [v.clone()]}
    stats = kernel.step([x], [torch.randn(2, 5)], state, 0.1, GaussianNoise([_gen(0), _gen(1)], batched=True),
                        batch_ndim=1, with_stats=True)
    torch.testing.assert_close(state["square_avg"][0], v)
    torch.testing.assert_close(stats["precond_mean"], (1 / (PSGLD_EPS + v.sqrt())).mean(1))


def test_psgld_optimizer_uses_state_the_user_replaced():
    """The optimizer reuses the kernel's flat state between steps only while the state tensors are
    the ones the kernel made: a user-set square_avg (a frozen preconditioner) or a reloaded state
    must be the one used, and the move is w - h g / (eps + sqrt(V)) exactly."""
    from pib_bayes.optim import PSGLD

    torch.manual_seed(0)
    a, b = torch.zeros(3, 4, requires_grad=True), torch.zeros(5, requires_grad=True)
    opt = PSGLD([a, b], lr=0.1, alpha=1.0, eps=1e-3, noise_scale=0.0)
    grads = [torch.randn(3, 4), torch.randn(5)]
    a.grad, b.grad = grads[0].clone(), grads[1].clone()
    opt.step()  # the kernel's own (flat) state, V = 0: a step of -h g / eps
    torch.testing.assert_close(b.detach(), -0.1 * grads[1] / 1e-3)
    v = [torch.rand(3, 4) + 0.5, torch.rand(5) + 0.5]
    for p, v_ in zip((a, b), v, strict=True):
        opt.state[p]["square_avg"] = v_.clone()
    before = [a.detach().clone(), b.detach().clone()]
    opt.step()
    for p, w0, g, v_ in zip((a, b), before, grads, v, strict=True):
        torch.testing.assert_close(p.detach(), w0 - 0.1 * g / (1e-3 + v_.sqrt()))
    # and after load_state_dict (fresh tensors): a third step uses the loaded V
    opt.load_state_dict(opt.state_dict())
    before = [a.detach().clone(), b.detach().clone()]
    opt.step()
    for p, w0, g, v_ in zip((a, b), before, grads, v, strict=True):
        torch.testing.assert_close(p.detach(), w0 - 0.1 * g / (1e-3 + v_.sqrt()))


@pytest.mark.parametrize("bug", ["unpreconditioned_noise", "noise_missing_factor_2"])
def test_psgld_check_catches_wrong_variant(bug):
    def wrong(x, grad, noise, g):
        x.addcmul_(g, grad, value=-H_PSGLD)
        xi = noise.draw([x])[0]
        if bug == "unpreconditioned_noise":
            std = math.sqrt(2 * H_PSGLD) * torch.ones_like(g)
        else:
            std = (H_PSGLD * g).sqrt()
        x.addcmul_(std, xi)

    s, g, x = _run_psgld(wrong, steps=PSGLD_STEPS)
    assert np.abs(_group_z(s, g, x, _psgld_var_exact(s, g, H_PSGLD))).max() > Z_CATCH


# SGHMC: exact stationary covariance of the implemented linear recursion (discrete Lyapunov)
ETA, FRICTION = 0.1, 0.2
LAMBDAS = (0.25, 0.5, 1.0)


def _sghmc_lyapunov(lam: float, eta: float = ETA, a: float = FRICTION, order: str = "v_then_w") -> np.ndarray:
    """Stationary Cov(w, v) of the SGHMC recursion on U = lam w^2 / 2.

    Implemented order:  v' = (1-a) v - eta lam w + n,  w' = w + v'  with n ~ N(0, 2 a eta), i.e.
    z' = A z + (1, 1)^T n with A = [[1 - eta lam, 1 - a], [-eta lam, 1 - a]].
    The wrong order "w_then_v" (w' = w + v, then v' from the old w) has A = [[1, 1], [-eta lam, 1 - a]]
    and noise on v only.
    """
    if order == "v_then_w":
        A = np.array([[1 - eta * lam, 1 - a], [-eta * lam, 1 - a]])
        b = np.array([1.0, 1.0])
    else:
        A = np.array([[1.0, 1.0], [-eta * lam, 1 - a]])
        b = np.array([0.0, 1.0])
    assert np.abs(np.linalg.eigvals(A)).max() < 1, "unstable recursion: not a valid oracle"
    return solve_discrete_lyapunov(A, 2 * a * eta * np.outer(b, b))


def _run_sghmc(step, n_per: int = 60_000, steps: int = 500, seed: int = 2):
    lam = torch.tensor(LAMBDAS, dtype=torch.float64).repeat(n_per)
    w, v = torch.zeros_like(lam), torch.zeros_like(lam)
    noise = GaussianNoise(_gen(seed))
    for _ in range(steps):  # spectral radius <= 0.95 -> 0.95^500 ~ 1e-11
        step(w, v, lam * w, noise)
    return lam, w, v


def _sghmc_kernel_step(w, v, grad, noise):
    kernel = build_sghmc(friction=FRICTION)
    kernel.step([w], [grad], {"momentum": [v]}, ETA, noise)


def _sghmc_z(lam, w, v, order="v_then_w"):
    zs = []
    for lv in LAMBDAS:
        m = lam == lv
        exact = _sghmc_lyapunov(lv, order=order)
        z = torch.stack([w[m], v[m]], 1)
        zs.append(_zscores_cov(z, exact).ravel())
    return np.concatenate(zs)


def test_sghmc_exact_stationary_covariance_lyapunov():
    lam, w, v = _run_sghmc(_sghmc_kernel_step)
    z = _sghmc_z(lam, w, v)
    assert np.abs(z).max() < Z_PASS, z
    # the kinetic energy the kernel reports has mean sum E[v^2] / (2 eta) per coordinate
    kernel = build_sghmc(friction=FRICTION)
    vv = v.reshape(-1, len(LAMBDAS)).float().clone()
    ww = w.reshape(-1, len(LAMBDAS)).float().clone()
    stats = kernel.step([ww], [torch.zeros_like(ww)], {"momentum": [vv]}, ETA, None, batch_ndim=1,
                        with_stats=True)
    ke = stats["kinetic_energy"].double()
    exact_ke = sum(_sghmc_lyapunov(lv)[1, 1] * (1 - FRICTION) ** 2 for lv in LAMBDAS) / (2 * ETA)
    assert abs(ke.mean().item() - exact_ke) < Z_PASS * ke.std().item() / math.sqrt(len(ke))


def _sghmc_w_then_v(w, v, grad, noise):
    w_old_grad = grad.clone()
    w.add_(v)
    v.mul_(1 - FRICTION).add_(w_old_grad, alpha=-ETA)
    v.add_(noise.draw([v])[0], alpha=math.sqrt(2 * FRICTION * ETA))


def _sghmc_half_noise(w, v, grad, noise):
    v.mul_(1 - FRICTION)
    langevin_move_([v], [grad], ETA, noise, FRICTION / 2)  # sqrt(a eta) instead of sqrt(2 a eta)
    w.add_(v)


@pytest.mark.parametrize("variant", [_sghmc_w_then_v, _sghmc_half_noise],
                         ids=["w_before_v", "noise_sqrt_a_eta"])
def test_sghmc_check_catches_wrong_variant(variant):
    lam, w, v = _run_sghmc(variant)
    assert np.abs(_sghmc_z(lam, w, v)).max() > Z_CATCH
    if variant is _sghmc_w_then_v:  # ... while it does match the Lyapunov solution of its own recursion
        assert np.abs(_sghmc_z(lam, w, v, order="w_then_v")).max() < Z_PASS


# ------------------------------------------------------------------------------------------------
# Driver level: each sampler recovers the Gaussian-linear Gibbs posterior (SPEC §2)
# ------------------------------------------------------------------------------------------------

D_LIN, N_LIN, SIGMA0, BETA_LIN = 3, 40, 1.5, 0.5


def _linear_problem():
    g = _gen(123)
    x = torch.randn(N_LIN, D_LIN, generator=g, dtype=torch.float64)
    x[:, 1] = 0.6 * x[:, 0] + 0.8 * x[:, 1]  # correlated posterior
    y = x @ torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64) + 0.5 * torch.randn(N_LIN, generator=g,
                                                                                     dtype=torch.float64)
    xn, yn = x.numpy(), y.numpy()
    lam = np.eye(D_LIN) / SIGMA0**2 + xn.T @ xn / (N_LIN * BETA_LIN)  # s = 1 (GaussianLoss(1.0))
    mu = np.linalg.solve(lam, xn.T @ yn / (N_LIN * BETA_LIN))
    return x, y.unsqueeze(1), lam, mu


def _linear_model() -> nn.Module:
    # a Sequential, so vectorized chains take the batched-matmul path of pib_bayes.batched
    return nn.Sequential(nn.Linear(D_LIN, 1, bias=False)).double()


def _sample_linear(sampler, step_size, num_draws, num_warmup=300, **kw):
    x, y, lam, mu = _linear_problem()
    post = pib_bayes.sample(_linear_model(), "gaussian", (x, y), beta=BETA_LIN, prior=GaussianPrior(SIGMA0),
                            sampler=sampler, step_size=step_size, num_chains=4, num_warmup=num_warmup,
                            num_draws=num_draws, seed=7, **kw)
    return post, lam, mu


def _moment_z(draws: np.ndarray, mu: np.ndarray, cov: np.ndarray, bias_cov=0.0) -> np.ndarray:
    """|estimate - exact| / (MCSE + bias), MCSE from ArviZ, for the mean and every covariance entry.

    ``draws`` is (chain, draw, d). Covariance entries are estimated as means of the products of the
    draws centred at the exact mean, so each is a plain posterior expectation with an ArviZ MCSE.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = []
        d = draws.shape[-1]
        for i in range(d):
            out.append(abs(draws[..., i].mean() - mu[i]) / (Z_PASS * az.mcse(draws[..., i])))
        c = draws - mu
        for i in range(d):
            for j in range(i, d):
                prod = c[..., i] * c[..., j]
                b = bias_cov[i, j] if np.ndim(bias_cov) else bias_cov
                out.append(abs(prod.mean() - cov[i, j]) / (Z_PASS * az.mcse(prod) + b))
    return np.array(out)  # a ratio: < 1 passes (|err| < 4.5 MCSE + bias)


def _weights(post) -> np.ndarray:
    return post.draws["0.weight"][:, :, 0, :].numpy()


def test_sgld_sample_recovers_gaussian_linear_posterior():
    h = 0.05
    post, lam, mu = _sample_linear("sgld", h, num_draws=3000)
    w = _weights(post)
    ratio = _moment_z(w, mu, _sgld_cov_exact(lam, h))  # exact for full-batch SGLD, so bias 0
    assert ratio.max() < 1, ratio
    # its deviation from the continuous-time posterior is the known O(h) bias, within MCSE + that bias
    bias = np.abs(_sgld_cov_exact(lam, h) - np.linalg.inv(lam))
    assert _moment_z(w, mu, np.linalg.inv(lam), bias_cov=bias).max() < 1


def test_sgld_sample_check_catches_a_wrong_kernel():
    """A kernel whose noise is sqrt(h) instead of sqrt(2h), run through pib_bayes.sample, is rejected."""

    def step(params, grads, state, step_size, noise, noise_scale=1.0, batch_ndim=0, with_stats=False):
        langevin_move_(params, grads, step_size, noise, 0.5, noise_scale)
        return {}

    wrong = Kernel("sgld_wrong_noise", (), lambda p: {}, step)
    h = 0.05
    post, lam, mu = _sample_linear(wrong, h, num_draws=3000)
    assert _moment_z(_weights(post), mu, _sgld_cov_exact(lam, h)).max() > 2


def test_sghmc_sample_recovers_gaussian_linear_posterior_and_reports_kinetic_energy():
    eta, a = 0.02, 0.3
    post, lam, mu = _sample_linear("sghmc", eta, num_draws=3000, sampler_kwargs={"friction": a})
    # the recursion decouples in the eigenbasis of Lambda: exact covariance from one Lyapunov per eigenvalue
    evals, q = np.linalg.eigh(lam)
    sols = [_sghmc_lyapunov(ev, eta=eta, a=a) for ev in evals]
    cov = q @ np.diag([s[0, 0] for s in sols]) @ q.T
    ratio = _moment_z(_weights(post), mu, cov)
    assert ratio.max() < 1, ratio
    ke = post.sample_stats["kinetic_energy"]
    assert ke.shape == (4, 3000) and bool(torch.isfinite(ke).all())
    # momentum stored after the step: E[v'^2] = Cov(v) diagonal of the Lyapunov solution
    exact_ke = sum(s[1, 1] for s in sols) / (2 * eta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert abs(ke.mean().item() - exact_ke) < Z_PASS * az.mcse(ke.numpy()), (ke.mean(), exact_ke)


def test_psgld_sample_recovers_gaussian_linear_posterior_and_reports_preconditioner():
    h = 0.01
    post, lam, mu = _sample_linear("psgld", h, num_draws=4000, num_warmup=500)
    pm = post.sample_stats["precond_mean"]
    assert pm.shape == (4, 4000) and bool(torch.isfinite(pm).all()) and bool((pm > 0).all())
    # Bias: with a frozen diagonal G the chain is exact preconditioned Langevin, whose covariance
    # differs from Lambda^{-1} by O(h G Lambda); bound it with the SGLD formula at step h * max G.
    # The dropped Gamma (dG/dw) term is not in this bound; at alpha = 0.99 G varies slowly and
    # its effect is below the MCSE here.
    g_max = float(pm.max())
    bias = np.abs(_sgld_cov_exact(lam, h * g_max) - np.linalg.inv(lam))
    ratio = _moment_z(_weights(post), mu, np.linalg.inv(lam), bias_cov=bias)
    assert ratio.max() < 1, ratio


@pytest.mark.parametrize("sampler,stat", [("psgld", "precond_mean"), ("sghmc", "kinetic_energy"),
                                          ("sgnht", "thermostat")])
def test_sampler_stats_at_the_last_draw(sampler, stat):
    post, _, _ = _sample_linear(sampler, 0.01, num_draws=3, num_warmup=0)
    assert bool(torch.isfinite(post.sample_stats[stat]).all()), post.sample_stats[stat]


# cyclical SGLD: exact time-marginal oracle of the full-batch linear recursion

def _csgld_oracle(schedule, lam, mu, w0, kept_steps):
    """Exact E[w_t] and E[(w_t - mu)(w_t - mu)^T] at every kept step t, shapes (T, d) and (T, d, d).

    Full batch: w_{t+1} = w_t - h_t Lambda (w_t - mu) + nu_t sqrt(2 h_t) xi, a linear recursion, so
    w_t ~ N(m_t, S_t) with m_{t+1} = (I - h_t Lambda) m_t + h_t Lambda mu and
    S_{t+1} = (I - h_t Lambda) S_t (I - h_t Lambda)^T + 2 h_t nu_t^2 I. Draw t is w_t (before step t).
    """
    d = len(mu)
    m, s = w0.copy(), np.zeros((d, d))
    kept = set(kept_steps)
    means, moms = [], []
    for t in range(max(kept_steps) + 1):
        if t in kept:
            means.append(m.copy())
            moms.append(s + np.outer(m - mu, m - mu))
        h, nu = schedule.step_size(t), schedule.noise_scale(t)
        a = np.eye(d) - h * lam
        m = a @ m + h * lam @ mu
        s = a @ s @ a.T + 2 * h * nu**2 * np.eye(d)
    return np.array(means), np.array(moms)


def _kept_steps(schedule, num_warmup, num_draws):
    out, t = [], 0
    while len(out) < num_draws:
        if t >= num_warmup and schedule.collect(t):
            out.append(t)
        t += 1
    return out


def _block_z(w, mu, means, moms, blocks: int):
    """z-scores of block statistics against the oracle, SE = sd(block values)/sqrt(#blocks).

    A block is one (chain, cycle): the noise-free exploration phase between cycles forgets the past
    (its contraction is asserted below), so blocks are independent. Statistics per block: the mean
    and the centred second moments of its draws, and ||w - mu||^2 at its first draw (just after the
    exploration phase, where the exact law is nearly a point mass at mu).
    """
    c, n, d = w.shape
    per = n // blocks
    wb = w.reshape(c, blocks, per, d)
    cen = wb - mu
    pairs = [(i, j) for i in range(d) for j in range(i, d)]
    stats = ([wb.mean(2)] + [(cen[..., i] * cen[..., j]).mean(2)[..., None] for i, j in pairs]
             + [(cen[:, :, 0] ** 2).sum(-1)[..., None]])
    st = np.concatenate(stats, -1).reshape(c * blocks, -1)
    mb, sb = means.reshape(blocks, per, d), moms.reshape(blocks, per, d, d)
    exact = np.concatenate([mb.mean((0, 1))] + [[sb[..., i, j].mean()] for i, j in pairs]
                           + [[np.trace(sb[:, 0], axis1=1, axis2=2).mean()]])
    return (st.mean(0) - exact) / (st.std(0, ddof=1) / math.sqrt(st.shape[0]))


CYCLE, EXPLORE, H0_CYC, CYCLES, CHAINS_CYC = 40, 0.5, 0.25, 30, 8


def _run_csgld(schedule):
    x, y, lam, mu = _linear_problem()
    model = _linear_model()
    w0 = model[0].weight.detach()[0].numpy().copy()
    per_cycle = int(CYCLE * (1 - EXPLORE))
    post = pib_bayes.sample(model, "gaussian", (x, y), beta=BETA_LIN, prior=GaussianPrior(SIGMA0),
                            sampler="csgld", step_size=schedule, num_chains=CHAINS_CYC, num_warmup=0,
                            num_draws=CYCLES * per_cycle, seed=3)
    return post, lam, mu, w0, CYCLES


def test_csgld_draws_only_from_sampling_phases_and_step_size_follows_cosine():
    sched = Cyclical(H0_CYC, cycle_length=CYCLE, exploration_fraction=EXPLORE)
    post, lam, mu, w0, cycles = _run_csgld(sched)
    num_draws = post.draws["0.weight"].shape[1]
    kept = _kept_steps(sched, 0, num_draws)
    # the schedule keeps exactly the sampling-phase steps, and the recorded step sizes are the cosine
    # formula h_t = h0/2 (cos(pi (t mod L)/L) + 1) at those steps (written out here independently)
    for t in kept:
        assert (t % CYCLE) / CYCLE >= EXPLORE
    assert len(kept) == num_draws and kept[-1] == (cycles - 1) * CYCLE + CYCLE - 1
    expected = torch.tensor([H0_CYC / 2 * (math.cos(math.pi * (t % CYCLE) / CYCLE) + 1) for t in kept],
                            dtype=torch.float64)
    for c in range(CHAINS_CYC):
        torch.testing.assert_close(post.sample_stats["step_size"][c], expected, rtol=1e-12, atol=0)
    # the schedule curve itself over a whole cycle, exploration part included
    curve = [sched(t) for t in range(2 * CYCLE)]
    formula = [H0_CYC / 2 * (math.cos(math.pi * (t % CYCLE) / CYCLE) + 1) for t in range(2 * CYCLE)]
    np.testing.assert_allclose(curve, formula, rtol=1e-12)
    n_explore = int(CYCLE * EXPLORE)
    assert [sched.noise_scale(t) for t in range(CYCLE)] == [0.0] * n_explore + [1.0] * (CYCLE - n_explore)

    # and the draws have exactly the moments of the kept time-marginals
    means, moms = _csgld_oracle(sched, lam, mu, w0, kept)
    # blocks are independent: the noise-free exploration phase contracts memory by this much
    explore_steps = range(int(CYCLE * EXPLORE))
    contraction = np.prod([1 - sched(t) * np.linalg.eigvalsh(lam).min() for t in explore_steps])
    assert contraction < 1e-2
    z = _block_z(_weights(post), mu, means, moms, blocks=cycles)
    assert np.abs(z).max() < Z_PASS, z


def test_csgld_check_catches_noise_in_exploration_phase():
    class NoisyExploration(Cyclical):  # bug: noise on during the exploration phase
        def noise_scale(self, t):
            return 1.0

    right = Cyclical(H0_CYC, cycle_length=CYCLE, exploration_fraction=EXPLORE)
    post, lam, mu, w0, cycles = _run_csgld(NoisyExploration(H0_CYC, CYCLE, EXPLORE))
    kept = _kept_steps(right, 0, post.draws["0.weight"].shape[1])
    means, moms = _csgld_oracle(right, lam, mu, w0, kept)
    z = _block_z(_weights(post), mu, means, moms, blocks=cycles)
    assert np.abs(z).max() > Z_CATCH


def test_csgld_requires_cyclical_schedule():
    x, y, *_ = _linear_problem()
    with pytest.raises(ValueError, match="Cyclical"):
        pib_bayes.sample(_linear_model(), "gaussian", (x, y), beta=1.0, sampler="csgld", step_size=0.01,
                         num_warmup=0, num_draws=2)


def test_csgld_is_sgld_on_its_cyclical_schedule_and_says_so():
    # the shorthand runs the SGLD kernel on the schedule: the same draws as spelling both out, and the
    # metadata names the kernel and the schedule (it named no cyclical schedule as "csgld" before)
    x, y, *_ = _linear_problem()
    sched = Cyclical(0.01, cycle_length=6, exploration_fraction=0.5)
    model = _linear_model()
    runs = [pib_bayes.sample(model, "gaussian", (x, y), beta=1.0, sampler=name, step_size=sched,
                             num_warmup=0, num_draws=6, seed=3) for name in ("csgld", "sgld")]
    for n in runs[1].draws:
        assert torch.equal(runs[0].draws[n], runs[1].draws[n]), n
    meta = runs[0].metadata
    assert meta["sampler"] == "sgld" and meta["schedule"]["type"] == "Cyclical"
    with pytest.raises(ValueError, match="not a kernel"):
        pib_bayes.samplers.build_kernel("csgld")


@pytest.mark.parametrize("schedule", [pib_bayes.samplers.Constant(0.01),
                                      pib_bayes.samplers.PolynomialDecay(1.0, 2.0, 0.6),
                                      pib_bayes.samplers.Cosine(0.1, 100, 0.01), Cyclical(0.1, 10, 0.3)])
def test_schedule_repr_is_its_constructor_call(schedule):
    from pib_bayes.samplers import Constant, Cosine, PolynomialDecay  # noqa: F401  (names for eval)

    rebuilt = eval(repr(schedule))
    assert rebuilt == schedule and repr(rebuilt) == repr(schedule)
    assert [rebuilt(t) for t in range(20)] == [schedule(t) for t in range(20)]
    # twin: a schedule with another setting is not equal, so equality is not vacuous
    other = eval(repr(schedule).replace("0.1", "0.2").replace("0.01", "0.02").replace("1.0", "1.5"))
    assert other != schedule


def test_collects_is_none_for_every_step_and_the_predicate_for_a_cycle():
    assert pib_bayes.samplers.Constant(0.1).collects is None
    cyc = Cyclical(1.0, cycle_length=4, exploration_fraction=0.5)
    assert [cyc.collects(t) for t in range(4)] == [False, False, True, True]


# ------------------------------------------------------------------------------------------------
# Batched chains equal per-chain runs
# ------------------------------------------------------------------------------------------------

class CustomMLP(nn.Module):
    """The same layers as ``_mlp`` but not a Sequential: batched chains go through vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _class_data():
    g = _gen(5)
    return torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g)


SAMPLER_CASES = [
    ("sgld", 1e-3, {}),
    ("psgld", 1e-4, {"alpha": 0.95}),
    ("sghmc", 1e-3, {"friction": 0.2}),
    ("csgld", Cyclical(1e-3, cycle_length=6, exploration_fraction=0.5), {}),
    ("sgnht", 3e-2, {"diffusion": 0.5}),
]


@pytest.mark.parametrize("path", ["baddbmm", "vmap"])
@pytest.mark.parametrize("batch_size", [16, None], ids=["minibatch", "fullbatch"])
@pytest.mark.parametrize("sampler,step,kwargs", SAMPLER_CASES, ids=[c[0] for c in SAMPLER_CASES])
def test_vectorized_chains_equal_sequential_chains(path, batch_size, sampler, step, kwargs):
    torch.manual_seed(0)
    model = _mlp() if path == "baddbmm" else CustomMLP()
    assert (batched_forward(model) is not None) == (path == "baddbmm")
    x, y = _class_data()
    runs = {}
    for method in ("vectorized", "sequential"):
        runs[method] = pib_bayes.sample(model, "cross_entropy", (x, y), beta=1 / 48, prior=1.0,
                                        sampler=sampler, step_size=step, num_chains=3, num_warmup=10,
                                        num_draws=12, batch_size=batch_size, seed=11, chain_method=method,
                                        sampler_kwargs=kwargs)
        assert runs[method].metadata["chain_method"] == method
    vec, seq = runs["vectorized"], runs["sequential"]
    for name in seq.draws:
        torch.testing.assert_close(vec.draws[name], seq.draws[name], rtol=1e-4, atol=1e-5)
    assert set(vec.sample_stats) == set(seq.sample_stats)
    for name in seq.sample_stats:
        torch.testing.assert_close(vec.sample_stats[name], seq.sample_stats[name], rtol=1e-4, atol=1e-5)
    extra = {"psgld": ["precond_mean"], "sghmc": ["kinetic_energy"],
             "sgnht": ["kinetic_energy", "thermostat"]}.get(sampler, [])
    for stat in extra:  # per chain (sgnht: one thermostat per chain, D = that chain's weights)
        assert vec.sample_stats[stat].shape == (3, 12)
    # chains are really different (independent streams), so the equality above is not trivial
    assert not torch.allclose(vec.draws["0.weight" if path == "baddbmm" else "a.weight"][0, -1],
                              vec.draws["0.weight" if path == "baddbmm" else "a.weight"][1, -1])


def test_chain_zero_of_many_equals_a_single_chain_run():
    """Chain seeds are spawned (SeedSequence.spawn), so chain 0 of a K-chain run is the 1-chain run."""
    x, y = _class_data()
    torch.manual_seed(0)
    model = _mlp()
    kw = dict(beta=1 / 48, prior=1.0, sampler="sghmc", step_size=1e-3, num_warmup=5, num_draws=10,
              batch_size=16, seed=4)
    many = pib_bayes.sample(model, "cross_entropy", (x, y), num_chains=4, chain_method="vectorized", **kw)
    one = pib_bayes.sample(model, "cross_entropy", (x, y), num_chains=1, **kw)
    for name in one.draws:
        torch.testing.assert_close(many.draws[name][:1], one.draws[name], rtol=1e-4, atol=1e-5)


def test_fast_path_and_vmap_path_give_the_same_chains(monkeypatch):
    x, y = _class_data()
    torch.manual_seed(0)
    model = _mlp()
    kw = dict(beta=1 / 48, prior=1.0, sampler="sgld", step_size=1e-3, num_chains=3, num_warmup=5,
              num_draws=10, batch_size=16, seed=9, chain_method="vectorized")
    fast = pib_bayes.sample(model, "cross_entropy", (x, y), **kw)
    monkeypatch.setattr(driver_mod.chains, "batched_forward", lambda m: None)
    slow = pib_bayes.sample(model, "cross_entropy", (x, y), **kw)
    for name in fast.draws:
        torch.testing.assert_close(fast.draws[name], slow.draws[name], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# batched_forward: equal to per-chain functional_call, differentiable, None when unsupported
# ------------------------------------------------------------------------------------------------

ACTIVATIONS = [nn.ReLU(), nn.Tanh(), nn.Sigmoid(), nn.GELU(), nn.GELU(approximate="tanh"), nn.Identity(),
               nn.LeakyReLU(0.2), nn.ELU(0.7), nn.SiLU(), nn.Softplus(beta=2.0, threshold=5.0)]


def _stacked(model, k, seed=0):
    g = _gen(seed)
    return {n: (p.detach() + 0.3 * torch.randn(k, *p.shape, generator=g)).requires_grad_()
            for n, p in model.named_parameters()}


def _reference(model, params, x, stacked):
    def one(p, xx):
        return functional_call(model, p, (xx,))
    return vmap(one, in_dims=(0, 0 if stacked else None))(params, x)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: repr(a))
@pytest.mark.parametrize("stacked", [True, False])
def test_batched_forward_matches_functional_call_and_gradients(act, stacked):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), act, nn.Linear(7, 7, bias=False),
                          nn.Sequential(act, nn.Linear(7, 2)))
    f = batched_forward(model)
    assert f is not None
    k = 3
    params = _stacked(model, k)
    x = torch.randn(k, 4, 6) if stacked else torch.randn(4, 6)
    out, ref = f(params, x, stacked), _reference(model, params, x, stacked)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(ref)
    g1 = torch.autograd.grad((out * w).sum(), list(params.values()))
    g2 = torch.autograd.grad((ref * w).sum(), list(params.values()))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def test_batched_forward_flatten_and_extra_dims():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2))
    f = batched_forward(model)
    params = _stacked(model, 2)
    for stacked, x in ((True, torch.randn(2, 5, 3, 4)), (False, torch.randn(5, 3, 4))):
        torch.testing.assert_close(f(params, x, stacked), _reference(model, params, x, stacked))
    # a Linear on inputs with extra middle dims acts on the last one, like nn.Linear
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    params = _stacked(model, 2)
    x = torch.randn(2, 5, 6, 4)
    torch.testing.assert_close(batched_forward(model)(params, x, True), _reference(model, params, x, True))


class _MySeq(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2


class _MyLinear(nn.Linear):
    pass


def _hooked():
    m = nn.Sequential(nn.Linear(3, 2))
    m[0].register_forward_hook(lambda mod, inp, out: out * 2)
    return m


def _frozen():
    m = nn.Sequential(nn.Linear(3, 2))
    m[0].bias.requires_grad_(False)
    return m


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(3, 2),
    lambda: nn.Sequential(nn.Conv1d(1, 1, 3)),
    lambda: nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)),
    lambda: nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)),
    lambda: nn.Sequential(nn.Linear(3, 2), nn.Flatten()),
    lambda: nn.Sequential(nn.Flatten(0), nn.Linear(3, 2)),
    lambda: nn.Sequential(nn.ReLU()),
    lambda: _MySeq(nn.Linear(3, 2)),
    lambda: nn.Sequential(_MyLinear(3, 2)),
    _hooked,
    _frozen,
], ids=["bare_linear", "conv", "batchnorm", "dropout", "flatten_not_first", "flatten_dim0", "no_linear",
        "custom_sequential", "linear_subclass", "forward_hook", "frozen_param"])
def test_batched_forward_declines_unsupported_models(make):
    assert batched_forward(make()) is None
