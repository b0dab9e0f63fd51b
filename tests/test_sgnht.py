"""SGNHT (Ding et al. 2014; SPEC §2): the thermostat's exact identity and the stationary moments.

SGNHT is nonlinear (the friction xi is a state), so there is no Lyapunov equation for the whole
chain. What is exact or asymptotically exact, on a separable Gaussian energy
U = sum_i lam_i w_i^2 / 2 with D independent coordinates per chain (SPEC §2 "fast statistical tests"):

* the kinetic energy: the update xi' = xi + h (p.p/D - 1) telescopes, so the time average of
  p.p/D over steps t0..T-1 is exactly 1 + (xi_T - xi_t0) / (h (T - t0)); at stationarity its
  expectation is exactly 1, whatever the step size and the gradient noise;
* mean field: xi is one scalar per chain, an average over D coordinates, so its fluctuations are
  O(1/sqrt(D)). With xi frozen at a value x, every coordinate follows the linear recursion
      p' = (1 - h x) p - h lam w + n,   w' = w + h p',   n ~ N(0, 2 A h + h^2 sigma_g^2)
  (sigma_g: the sd of the gradient noise injected here, per coordinate and step), whose stationary
  covariance is a discrete Lyapunov solution; x = xi* is fixed by the thermostat's own condition
  mean_i Var(p_i) = 1. As D -> oo this gives E[xi] = xi* and Var(w_i) = Sigma_ww(lam_i, xi*),
  exactly in h (the finite-D corrections are O(1/D), far below the standard errors here).
  Var(w) differs from the target 1/lam by the discretisation bias Sigma_ww - 1/lam, which the
  target check allows for; in closed form Var(w) = Var(p) (1 - h xi*/2) / lam, a relative bias of
  -h xi*/2 + O(h^2) (test_sgnht_variance_bias_closed_form_is_first_order_in_h).

Standard errors come from independent chains (each chain's time average over the window is one
number; K chains give sd/sqrt(K)). Deliberately wrong variants (thermostat aiming at p.p/D = 2,
noise sqrt(A h) instead of sqrt(2 A h), no thermostat under injected noise) go through the same
check and must fail it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from crash_helpers import Crash, crashing_stat
from scipy.linalg import solve_discrete_lyapunov
from scipy.optimize import brentq

from pib_bayes.samplers import GaussianNoise, build_sgnht
from pib_bayes.samplers.core import langevin_move_

Z_PASS = 4.5    # a correct sampler: every |z| below this
Z_CATCH = 10.0  # a wrong sampler: some |z| above this

LAMBDAS = (0.5, 1.0, 2.0)
K, PER_LAMBDA = 16, 1000   # chains, coordinates per curvature per chain: D = 3000 per chain
H, A, SIGMA_G = 0.1, 1.0, 2.0
BURN, WINDOW = 600, 1200




def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ oracle
def _coord_cov(lam: float, xi: float, h: float, a: float, sigma_g: float, noise_var: float | None = None
               ) -> np.ndarray:
    """Stationary Cov(w, p) of one coordinate with the thermostat frozen at xi (implemented order:
    p from the old w and p, then w from the new p). ``noise_var``: the per-step variance of the
    injected Langevin noise on p (2 A h when correct)."""
    q = (2 * a * h if noise_var is None else noise_var) + h * h * sigma_g**2
    m = np.array([[1 - h * h * lam, h * (1 - h * xi)], [-h * lam, 1 - h * xi]])
    assert np.abs(np.linalg.eigvals(m)).max() < 1, "unstable recursion: not a valid oracle"
    b = np.array([h, 1.0])
    return solve_discrete_lyapunov(m, q * np.outer(b, b))


def _xi_star(h: float, a: float, sigma_g: float, noise_var: float | None = None,
             target: float = 1.0, lambdas=LAMBDAS) -> float:
    """The thermostat's mean-field fixed point: mean over the curvatures of Var(p) = ``target``."""
    def excess(xi):
        return np.mean([_coord_cov(lam, xi, h, a, sigma_g, noise_var)[1, 1] for lam in lambdas]) - target
    return brentq(excess, 1e-3, 1.0 / h)


def _oracle(h=H, a=A, sigma_g=SIGMA_G):
    xi = _xi_star(h, a, sigma_g)
    return xi, np.array([_coord_cov(lam, xi, h, a, sigma_g)[0, 0] for lam in LAMBDAS])


# ------------------------------------------------------------------------------------------ runs
def _layout(dtype=torch.float64):
    """Two tensors per chain (the multi-tensor path); the curvatures in blocks of PER_LAMBDA,
    the second block straddling both tensors."""
    lam = torch.tensor(LAMBDAS, dtype=dtype).repeat_interleave(PER_LAMBDA)  # (3000,)
    lam_a, lam_b = lam[:1200], lam[1200:].reshape(2, 900)
    params = [torch.zeros(K, 1200, dtype=dtype), torch.zeros(K, 2, 900, dtype=dtype)]
    return params, [lam_a, lam_b]


def _kernel_step(kernel):
    def step(params, grads, state, noise):
        return kernel.step(params, grads, state, H, noise, batch_ndim=1, with_stats=True)
    return step


def _run(step, state, sigma_g=SIGMA_G, h=H, seed=0):
    """Run K chains; per chain, time averages over the window of p.p/D, xi and w^2 per curvature,
    plus xi at the window's ends (for the telescoping identity)."""
    params, lams = _layout()
    noise = GaussianNoise([_gen(seed + k) for k in range(K)], batched=True)
    grad_gen = _gen(10_000 + seed)
    sums = {"ke": 0.0, "xi": 0.0, "w2": torch.zeros(K, len(LAMBDAS), dtype=torch.float64)}
    xi_start = None
    for t in range(BURN + WINDOW):
        grads = [p * lam for p, lam in zip(params, lams, strict=True)]
        if sigma_g:
            for g in grads:
                g.add_(torch.randn(g.shape, generator=grad_gen, dtype=g.dtype), alpha=sigma_g)
        if t == BURN:
            xi_start = stats_xi(state).clone()
        stats = step(params, grads, state, noise)
        if t >= BURN:
            d = sum(p[0].numel() for p in params)
            sums["ke"] = sums["ke"] + 2.0 * stats["kinetic_energy"] / d
            sums["xi"] = sums["xi"] + stats["thermostat"]
            w = torch.cat([params[0], params[1].reshape(K, -1)], 1)
            sums["w2"] += (w.reshape(K, len(LAMBDAS), PER_LAMBDA) ** 2).mean(2)
    out = {k: (v / WINDOW).numpy() for k, v in sums.items()}
    out["xi_start"], out["xi_end"] = xi_start.numpy(), stats_xi(state).numpy()
    return out


def stats_xi(state) -> torch.Tensor:
    return state["thermostat"][0]


def _z(per_chain: np.ndarray, exact: float | np.ndarray, bias=0.0) -> np.ndarray:
    """(|mean over chains - exact| - |bias|)^+ / SE, SE = sd over chains / sqrt(K): the error beyond
    the allowed bias in standard errors (inf for a nonzero error with SE 0, e.g. a frozen xi)."""
    mean = per_chain.mean(0)
    se = per_chain.std(0, ddof=1) / math.sqrt(per_chain.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.maximum(np.abs(mean - exact) - np.abs(bias), 0.0) / se
    return np.where(np.isnan(z), 0.0, z)


def _check(out, sigma_g=SIGMA_G, h=H) -> dict[str, np.ndarray]:
    """z-scores: kinetic energy vs 1, xi vs the mean-field xi*, Var(w) vs Sigma_ww and vs 1/lam."""
    xi_star, var_w = _oracle(h=h, sigma_g=sigma_g)
    target = 1.0 / np.array(LAMBDAS)
    return {"kinetic": _z(out["ke"], 1.0), "thermostat": _z(out["xi"], xi_star),
            "var_w": _z(out["w2"], var_w), "var_w_vs_target": _z(out["w2"], target, bias=var_w - target)}


def _max_z(zs: dict[str, np.ndarray]) -> float:
    return max(float(np.max(v)) for v in zs.values())


@pytest.mark.parametrize("sigma_g", [SIGMA_G, 0.0], ids=["injected_gradient_noise", "exact_gradient"])
def test_sgnht_kinetic_energy_thermostat_and_variance_match_the_oracle(sigma_g):
    kernel = build_sgnht(diffusion=A)
    params, _ = _layout()
    state = kernel.init(params, batch_ndim=1)
    assert stats_xi(state).shape == (K,) and bool((stats_xi(state) == A).all())  # xi_0 = A (Ding et al.)
    out = _run(_kernel_step(kernel), state, sigma_g=sigma_g)
    # the telescoping identity holds to rounding, chain by chain
    np.testing.assert_allclose(out["ke"] - 1, (out["xi_end"] - out["xi_start"]) / (H * WINDOW), atol=1e-9)
    zs = _check(out, sigma_g=sigma_g)
    assert _max_z(zs) < Z_PASS, zs
    # the thermostat absorbed the injected noise: xi sits at about A + h sigma_g^2 / 2, not at A
    xi_star, _ = _oracle(sigma_g=sigma_g)
    if sigma_g:
        assert _z(out["xi"], A).max() > Z_CATCH and abs(xi_star - (A + H * sigma_g**2 / 2)) < 0.1


def test_sgnht_variance_bias_closed_form_is_first_order_in_h():
    """The allowance in the target check is the Euler scheme's bias, in closed form: with xi frozen at x,
    the Lyapunov solution is Var(p) = 2 q / (h x (4 - 2 h x - h^2 lam)), q = 2 A h + h^2 sigma_g^2,
    and Var(w) = Var(p) (1 - h x / 2) / lam (solved symbolically). The thermostat holds the mean
    Var(p) at 1, so the relative bias of Var(w) is -h xi* / 2 + O(h^2), xi* ~ A + h sigma_g^2 / 2."""
    for h, sigma_g in ((H, SIGMA_G), (H, 0.0), (H / 4, SIGMA_G)):
        xi, var_w = _oracle(h=h, sigma_g=sigma_g)
        q = 2 * A * h + h * h * sigma_g**2
        lam = np.array(LAMBDAS)
        var_p = 2 * q / (h * xi * (4 - 2 * h * xi - h * h * lam))
        np.testing.assert_allclose(var_p.mean(), 1.0, rtol=1e-9)  # the thermostat's fixed point
        np.testing.assert_allclose(var_w, var_p * (1 - h * xi / 2) / lam, rtol=1e-9)  # closed form = Lyapunov
        rel_bias = var_w * lam - 1
        np.testing.assert_allclose(rel_bias, -h * xi / 2, atol=h * h * max(LAMBDAS))  # O(h), O(h^2) rest
    # as h -> 0 the relative bias per unit h tends to -A/2
    np.testing.assert_allclose((_oracle(h=H / 16)[1] * np.array(LAMBDAS) - 1) / (H / 16), -A / 2, atol=0.02)


def test_sample_sgnht_matches_the_mean_field_oracle_on_a_separable_prior():
    """Through pib_bayes.sample (vectorized chains, two tensors): a zero loss leaves U = |w|^2 / (2 s^2)
    from the Gaussian prior, one curvature 1/s^2 for all D = 61 * 20 weights of a chain; the
    per-chain time averages of xi, p.p/D (from kinetic_energy) and w^2 match the oracle."""
    from torch import nn

    import pib_bayes
    from pib_bayes import GaussianPrior

    s, h, a, chains = 0.8, 0.1, 1.5, 16
    torch.manual_seed(0)
    model = nn.Linear(60, 20)
    x, y = torch.zeros(8, 60), torch.zeros(8, 20)
    post = pib_bayes.sample(model, lambda out, target: (out * 0.0).sum(-1), (x, y), beta=1.0,
                            prior=GaussianPrior(s), task="regression", sampler="sgnht", step_size=h,
                            sampler_kwargs={"diffusion": a}, num_chains=chains, num_warmup=400, num_draws=800,
                            seed=5, chain_method="vectorized")
    d = 61 * 20
    lam = 1 / s**2
    xi_star = _xi_star(h, a, 0.0, lambdas=(lam,))
    var_w = _coord_cov(lam, xi_star, h, a, 0.0)[0, 0]
    w2 = (post.draws["weight"].square().sum((2, 3)) + post.draws["bias"].square().sum(2)) / d
    per_chain = {
        "kinetic": (2 * post.sample_stats["kinetic_energy"] / d).mean(1).double().numpy(),
        "thermostat": post.sample_stats["thermostat"].mean(1).double().numpy(),
        "var_w": w2.mean(1).double().numpy(),
    }
    zs = {"kinetic": _z(per_chain["kinetic"], 1.0), "thermostat": _z(per_chain["thermostat"], xi_star),
          "var_w": _z(per_chain["var_w"], var_w)}
    assert _max_z(zs) < Z_PASS, zs
    # the check has power: the target's own variance s^2 is off by the bias -h xi*/2 (many SEs here)
    assert _z(per_chain["var_w"], s**2) > Z_CATCH


# ------------------------------------------------------------------------------ would-catch twins
def _wrong_step(bug: str):
    """SGNHT with one deliberate bug, written out independently of the library kernel."""
    def step(params, grads, state, noise):
        p, xi = state["momentum"], state["thermostat"][0]
        for t in p:
            t.mul_((1 - H * xi).view(-1, *[1] * (t.dim() - 1)))
        diffusion = A / 2 if bug == "noise_sqrt_Ah" else A  # sqrt(2 (A/2) h) = sqrt(A h)
        langevin_move_(p, grads, H, noise, diffusion)
        torch._foreach_add_(params, p, alpha=H)
        pp = sum((t.reshape(K, -1) ** 2).sum(1) for t in p)
        d = sum(t[0].numel() for t in p)
        if bug == "thermostat_aims_at_2":
            xi.add_(H * (pp / d - 2))
        elif bug == "noise_sqrt_Ah":
            xi.add_(H * (pp / d - 1))
        # bug == "no_thermostat": xi stays at A, a fixed friction (SGHMC) blind to the gradient noise
        return {"kinetic_energy": pp / 2, "thermostat": xi.clone()}
    return step


@pytest.mark.parametrize("bug", ["thermostat_aims_at_2", "noise_sqrt_Ah", "no_thermostat"])
def test_sgnht_check_catches_wrong_variants(bug):
    params, _ = _layout()
    state = build_sgnht(diffusion=A).init(params, batch_ndim=1)
    zs = _check(_run(_wrong_step(bug), state))
    assert _max_z(zs) > Z_CATCH, zs


# ------------------------------------------------------------------------------ API and bad input
def test_sgnht_optimizer_keeps_one_thermostat_per_param_group():
    """Each group's xi follows its own p.p/D (D = the group's weights) at its own lr, written out here."""
    from pib_bayes.optim import SGNHT

    a, b, c = (torch.zeros(50, dtype=torch.float64, requires_grad=True) for _ in range(3))
    opt = SGNHT([{"params": [a, b]}, {"params": [c], "lr": 0.05, "diffusion": 2.0}], lr=0.1,
                noise_scale=0.0)
    assert opt.state_dict()["param_groups"][1]["init_thermostat"] is None
    g = _gen(0)
    grads = [torch.randn(50, generator=g, dtype=torch.float64) for _ in range(3)]
    for p, gr in zip((a, b, c), grads, strict=True):
        p.grad = gr.clone()
    opt.step()
    # group 0: p = -h g (xi = A = 1 starts the friction on p = 0), xi' = 1 + h (p.p / 100 - 1)
    pp0 = (0.1**2) * (grads[0].square().sum() + grads[1].square().sum())
    torch.testing.assert_close(opt.state[a]["thermostat"], 1 + 0.1 * (pp0 / 100 - 1))
    assert opt.state[a]["thermostat"] is opt.state[b]["thermostat"]  # one scalar for the whole group
    pp1 = (0.05**2) * grads[2].square().sum()
    torch.testing.assert_close(opt.state[c]["thermostat"], 2 + 0.05 * (pp1 / 50 - 1))
    torch.testing.assert_close(c.detach(), 0.05 * (-0.05 * grads[2]))
    # after load_state_dict the per-parameter copies of a group's xi stay equal
    opt.load_state_dict(opt.state_dict())
    opt.step()
    torch.testing.assert_close(opt.state[a]["thermostat"], opt.state[b]["thermostat"])


def test_sample_with_sgnht_records_the_thermostat_per_chain():
    from torch import nn

    import pib_bayes

    torch.manual_seed(0)
    x, y = torch.randn(40, 3), torch.randn(40, 1)
    post = pib_bayes.sample(nn.Linear(3, 1), "gaussian", (x, y), beta=1 / 40, sampler="sgnht", step_size=0.05,
                            num_chains=3, num_warmup=20, num_draws=10, seed=0,
                            sampler_kwargs={"diffusion": 2.0, "init_thermostat": 0.5})
    assert post.metadata["sampler"] == "sgnht"
    assert post.metadata["sampler_settings"] == {"diffusion": 2.0, "init_thermostat": 0.5}
    xi = post.sample_stats["thermostat"]
    assert xi.shape == (3, 10) and bool(torch.isfinite(xi).all()) and not torch.equal(xi[0], xi[1])


@pytest.mark.parametrize("kwargs,match", [
    ({"diffusion": 0.0}, "diffusion"), ({"diffusion": -1.0}, "diffusion"),
    ({"diffusion": math.nan}, "diffusion"), ({"diffusion": True}, "diffusion"),
    ({"init_thermostat": math.inf}, "init_thermostat"),
    ({"init_thermostat": "1"}, "init_thermostat"),
])
def test_sgnht_bad_settings_name_the_argument(kwargs, match):
    from pib_bayes.optim import SGNHT

    with pytest.raises(ValueError, match=f"^{match}: "):
        build_sgnht(**kwargs)
    with pytest.raises(ValueError, match=f"^{match}: "):
        SGNHT([torch.zeros(2, requires_grad=True)], lr=0.1, **kwargs)


@pytest.mark.parametrize("method", ["sequential", "vectorized"])
def test_sgnht_crash_and_resume_restores_momentum_and_thermostat(tmp_path, method):
    """The checkpoint holds each chain's momentum and xi: a resumed run equals the uninterrupted one."""
    from torch import nn

    import pib_bayes

    def run(ckpt=None, crash_after=None, resume=False):
        crash = crashing_stat(crash_after)
        torch.manual_seed(0)
        x, y = pib_bayes.data.make_classification_data(n=64, num_classes=3, seed=2)
        model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3))
        return pib_bayes.sample(model, "cross_entropy", (x, y), beta=1 / 64, step_size=0.02, sampler="sgnht",
                                num_chains=3, num_warmup=10, num_draws=12, thin=2, batch_size=16, seed=3,
                                chain_method=method, stat_fns={"w0": crash}, checkpoint=ckpt,
                                checkpoint_every=4, resume=resume)

    ref = run()
    ckpt = tmp_path / "c.ckpt"
    with pytest.raises(Crash):
        run(ckpt, crash_after=7)
    resumed = run(ckpt, resume=True)
    for k in ref.draws:
        assert torch.equal(ref.draws[k], resumed.draws[k]), k
    for k in ("thermostat", "kinetic_energy", "energy"):
        assert torch.equal(ref.sample_stats[k], resumed.sample_stats[k]), k
