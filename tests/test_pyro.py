"""Tests for pib_bayes.pyro: the Langevin MCMCKernel, the conversions and the NUTS reference.

Statistical tests follow SPEC §2: on a Gaussian target the unadjusted Langevin chain has an exact
stationary law (mean mu, covariance P^{-1}(I - hP/2)^{-1}), so the draws are compared to it with
tolerances of 4 Monte-Carlo standard errors (sd/sqrt(ESS), ESS from ArviZ). The model carries R
independent replicas of the same regression (one latent site of shape (R, D)), so one short chain
gives R replicas' worth of draws; replicas share each step's minibatch, so every statistic is
first averaged over replicas and its MCSE comes from the ESS of that per-step series, which keeps
whatever dependence the shared minibatch induces. Next to each check a deliberately wrong variant
(wrong noise, missing Jacobian, missing step-size or minibatch term) is shown to fail it.
"""

from __future__ import annotations

import math
import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, Predictive
from pyro.nn import PyroModule, PyroSample
from scipy.linalg import solve_discrete_lyapunov
from torch import nn

from pib_bayes.posterior import Posterior
from pib_bayes.pyro import LangevinKernel, nuts_reference, posterior_from_mcmc, to_predictive_samples
from pib_bayes.samplers import Kernel, langevin_move_
from pib_bayes.samplers.schedules import Cyclical, PolynomialDecay

Z_MAX = 4.0  # tolerance in MCSE units: P(|z| > 4) ~ 6e-5 per check for a correct sampler

N, D, S, SIGMA0 = 40, 2, 0.5, 1.0
_gen = torch.Generator().manual_seed(1234)
X = torch.randn(N, D, generator=_gen, dtype=torch.float64)
_NOISE = torch.randn(N, generator=_gen, dtype=torch.float64)
Y = X @ torch.tensor([1.0, -0.5], dtype=torch.float64) + S * _NOISE




@pytest.fixture
def sequential_chains(monkeypatch):
    """Make pyro.infer.MCMC run several chains one after another in this process, on any machine."""
    import pyro.infer.mcmc.api as api

    monkeypatch.setattr(api.mp, "cpu_count", lambda: 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="num_chains=.*Chains will be drawn sequentially")
        yield


def regression_model(replicas: int):
    """Bayesian linear regression, ``replicas`` independent copies of the weights (site "w": (R, D))."""

    def model(subsample_size: int | None = None):
        w = pyro.sample("w", dist.Normal(torch.zeros(replicas, D, dtype=torch.float64), SIGMA0).to_event(2))
        with pyro.plate("data", N, subsample_size=subsample_size) as i:
            obs = Y[i].unsqueeze(-1).expand(-1, replicas)
            pyro.sample("obs", dist.Normal(X[i] @ w.T, S).to_event(1), obs=obs)

    return model


def closed_form(temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """SPEC §2 with T = n beta: P = I/sigma0^2 + X^T X / (T s^2), mean P^{-1} X^T y / (T s^2)."""
    x, y = X.numpy(), Y.numpy()
    p = np.eye(D) / SIGMA0**2 + x.T @ x / (temperature * S**2)
    return p, np.linalg.solve(p, x.T @ y / (temperature * S**2))


def sgld_covariance(p: np.ndarray, h: float) -> np.ndarray:
    """Stationary covariance of full-batch SGLD at step h on precision P: P^{-1} (I - hP/2)^{-1}."""
    return np.linalg.inv(p) @ np.linalg.inv(np.eye(len(p)) - h * p / 2)


def minibatch_sgld_covariance(temperature: float, h: float, b: int) -> np.ndarray:
    """Exact stationary covariance of SGLD with Pyro's subsampling (b of n without replacement, scale n/b).

    With c_i(w) = G_i w - r_i the per-example likelihood gradient (G_i = x_i x_i^T/(T s^2)), the
    step is w' - mu = (I - hP)(w - mu) - h e + sqrt(2h) xi, with e = sum_i (n/b delta_i - 1) c_i(w)
    mean-zero given w and Cov(e | w) = kappa [sum_i c_i c_i^T - (sum_i c_i)(sum_i c_i)^T / n],
    kappa = n (n - b) / (b (n - 1)) (inclusion indicators delta_i of a uniform b-subset). Taking
    expectations at stationarity gives a linear equation for Sigma, solved here in vec form.
    """
    p, mu = closed_form(temperature)
    x, y = X.numpy(), Y.numpy()
    g = np.einsum("ni,nj->nij", x, x) / (temperature * S**2)
    c = g @ mu - x * y[:, None] / (temperature * S**2)
    kappa = N * (N - b) / (b * (N - 1))
    a = np.eye(D) - h * p
    gs, cs = g.sum(0), c.sum(0)
    m = np.kron(a, a) + h * h * kappa * (sum(np.kron(gi, gi) for gi in g) - np.kron(gs, gs) / N)
    rhs = 2 * h * np.eye(D) + h * h * kappa * (c.T @ c - np.outer(cs, cs) / N)
    return np.linalg.solve(np.eye(D * D) - m, rhs.reshape(-1)).reshape(D, D)


def z_scores(draws: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> dict[str, float]:
    """z = (estimate - target) / MCSE for the mean and each covariance entry.

    ``draws``: (T, R, D). Each statistic is a replica average per step (a (T,) series); its MCSE
    is sd / sqrt(ESS) with the ESS from ArviZ.
    """
    dev = draws - mean
    series = {f"mean[{i}]": dev[..., i].mean(1) for i in range(dev.shape[-1])}
    for i in range(dev.shape[-1]):
        for j in range(i, dev.shape[-1]):
            series[f"cov[{i},{j}]"] = (dev[..., i] * dev[..., j]).mean(1) - cov[i, j]
    return {name: float(s.mean() / mcse(s)) for name, s in series.items()}


def mcse(series: np.ndarray) -> float:
    """Monte-Carlo standard error of the mean of one chain's (T,) series: sd / sqrt(ESS), ESS from ArviZ."""
    return float(series.std(ddof=1) / math.sqrt(float(az.ess(series[None, :], method="mean"))))


def run_sgld(model, *args, step_size: float, num_samples: int, warmup_steps: int, seed: int = 0,
             sampler="sgld", **kernel_kwargs) -> tuple[MCMC, np.ndarray]:
    kernel = LangevinKernel(model, sampler, step_size, seed=seed, **kernel_kwargs)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=True)
    mcmc.run(*args)
    return mcmc, mcmc.get_samples()["w"].numpy()


def wrong_noise_sgld() -> Kernel:
    """A deliberately wrong SGLD: noise sqrt(h) xi instead of sqrt(2h) xi (samples at temperature 1/2)."""

    def step(params, grads, state, step_size, noise, noise_scale=1.0, batch_ndim=0, with_stats=False):
        langevin_move_(params, grads, step_size, noise, 1.0, noise_scale / math.sqrt(2.0))
        return {}

    return Kernel("sgld_wrong_noise", (), lambda params: {}, step, {})


R, H_FULL = 400, 2e-3


@pytest.fixture(scope="module")
def full_batch_sgld():
    model = regression_model(R)
    mcmc, w = run_sgld(model, step_size=H_FULL, num_samples=500, warmup_steps=100, seed=0)
    return mcmc, w


# ------------------------------------------------------------------------------ regression oracles
def test_full_batch_sgld_matches_closed_form_with_step_size_bias(full_batch_sgld):
    _, w = full_batch_sgld
    p, mu = closed_form(1.0)  # beta = 1/n: the Bayesian posterior
    z = z_scores(w, mu, sgld_covariance(p, H_FULL))
    assert max(abs(v) for v in z.values()) < Z_MAX, z
    # would catch a sampler with no step-size bias: the test resolves the bias term
    z_unbiased = z_scores(w, mu, np.linalg.inv(p))
    assert abs(z_unbiased["cov[0,0]"]) > 5 * Z_MAX and abs(z_unbiased["cov[1,1]"]) > 5 * Z_MAX, z_unbiased


def test_wrong_noise_variant_is_caught():
    model = regression_model(R)
    _, w = run_sgld(model, step_size=H_FULL, num_samples=500, warmup_steps=100, seed=0,
                    sampler=wrong_noise_sgld())
    p, mu = closed_form(1.0)
    z = z_scores(w, mu, sgld_covariance(p, H_FULL))
    assert abs(z["cov[0,0]"]) > 5 * Z_MAX and abs(z["cov[1,1]"]) > 5 * Z_MAX, z


def test_subsampled_tempered_sgld_matches_exact_minibatch_oracle():
    temperature, h, b = 2.0, 4e-3, 10  # beta = 2/n: likelihood tempered by 1/(n beta) = 1/2
    model = regression_model(R)
    kernel = LangevinKernel(model, "sgld", h, beta=temperature / N, seed=1)  # n inferred from the plate
    mcmc = MCMC(kernel, num_samples=600, warmup_steps=100, disable_progbar=True)
    mcmc.run(b)
    assert kernel.temperature == pytest.approx(temperature)
    w = mcmc.get_samples()["w"].numpy()
    p, mu = closed_form(temperature)
    z = z_scores(w, mu, minibatch_sgld_covariance(temperature, h, b))
    assert max(abs(v) for v in z.values()) < Z_MAX, z
    # would catch a missing minibatch term (full-batch formula) and a wrong tempering (beta = 1/n)
    z_full = z_scores(w, mu, sgld_covariance(p, h))
    assert abs(z_full["cov[0,0]"]) > Z_MAX and abs(z_full["cov[1,1]"]) > Z_MAX, z_full
    # (at this h the T = 1 chain's larger minibatch noise nearly offsets its smaller posterior
    # covariance, so the untempered variant fails the check by ~8 MCSE, mostly through the mean)
    _, mu1 = closed_form(1.0)
    z_untempered = z_scores(w, mu1, minibatch_sgld_covariance(1.0, h, b))
    assert max(abs(v) for v in z_untempered.values()) > Z_MAX, z_untempered


def test_sghmc_matches_its_exact_lyapunov_covariance():
    eta, alpha = 1e-3, 0.2
    model = regression_model(R)
    _, w = run_sgld(model, step_size=eta, num_samples=500, warmup_steps=200, seed=2, sampler="sghmc",
                    sampler_kwargs={"friction": alpha})
    p, mu = closed_form(1.0)
    # state (w - mu, v): v' = (1-a) v - eta P (w - mu) + sqrt(2 a eta) xi,  w' = w + v'
    eye = np.eye(D)
    a = np.block([[eye - eta * p, (1 - alpha) * eye], [-eta * p, (1 - alpha) * eye]])
    bvec = np.vstack([eye, eye]) * math.sqrt(2 * alpha * eta)
    cov = solve_discrete_lyapunov(a, bvec @ bvec.T)[:D, :D]
    z = z_scores(w, mu, cov)
    assert max(abs(v) for v in z.values()) < Z_MAX, z
    # would catch assuming SGHMC samples the target exactly
    z_target = z_scores(w, mu, np.linalg.inv(p))
    assert max(abs(z_target["cov[0,0]"]), abs(z_target["cov[1,1]"])) > Z_MAX, z_target


def test_nuts_reference_and_sgld_agree_with_closed_form(full_batch_sgld):
    _, w_sgld = full_batch_sgld
    p, mu = closed_form(1.0)
    post = nuts_reference(regression_model(1), num_draws=400, num_warmup=200, seed=0)
    assert isinstance(post, Posterior) and post.metadata["sampler"] == "nuts"
    w_nuts = post.draws["w"][0].numpy()  # (draws, 1, D)
    z = z_scores(w_nuts, mu, np.linalg.inv(p))
    assert max(abs(v) for v in z.values()) < Z_MAX, z

    cov_nuts = np.cov(w_nuts[:, 0], rowvar=False)

    def sgld_prediction(c: np.ndarray) -> np.ndarray:  # SGLD's covariance on a target of covariance c
        return sgld_covariance(np.linalg.inv(c), H_FULL)

    def compare(w_lang: np.ndarray) -> dict[str, float]:
        # NUTS and SGLD side by side: means directly; variances with the known step-size bias put on
        # the NUTS estimate, whose MCSE is carried through that map by its slope (delta method)
        out = {}
        predicted = sgld_prediction(cov_nuts)
        for i in range(D):
            s_n, s_l = w_nuts[:, 0, i], w_lang[..., i].mean(1)
            se_n, se_l = mcse(s_n), mcse(s_l)
            out[f"mean[{i}]"] = (s_n.mean() - s_l.mean()) / math.hypot(se_n, se_l)
            v_n, v_l = (w_nuts[:, 0, i] - mu[i]) ** 2, ((w_lang[..., i] - mu[i]) ** 2).mean(1)
            se_n, se_l = mcse(v_n), mcse(v_l)
            eps = 1e-3 * cov_nuts[i, i]
            bump = cov_nuts.copy()
            bump[i, i] += eps
            slope = (sgld_prediction(bump)[i, i] - predicted[i, i]) / eps
            out[f"var[{i}]"] = (v_l.mean() - predicted[i, i]) / math.hypot(slope * se_n, se_l)
        return out

    zc = compare(w_sgld)
    assert max(abs(v) for v in zc.values()) < Z_MAX, zc
    # would catch the wrong-noise SGLD against NUTS too (its variance is half the target's)
    _, w_wrong = run_sgld(regression_model(R), step_size=H_FULL, num_samples=300, warmup_steps=100,
                          seed=0, sampler=wrong_noise_sgld())
    zw = compare(w_wrong)
    assert max(abs(zw["var[0]"]), abs(zw["var[1]"])) > Z_MAX, zw


def test_other_samplers_run_the_shared_core_on_the_chain_noise_stream():
    # pSGLD through LangevinKernel: two steps equal build_psgld(...).step on U(w) = |w|^2/2 driven by
    # the noise generator of chain_seeds(seed, 1)[0], i.e. the same core and stream as pib_bayes.sample
    from pib_bayes import chain_seeds
    from pib_bayes.samplers import GaussianNoise, build_psgld

    def model():
        pyro.sample("w", dist.Normal(torch.zeros(4, dtype=torch.float64), 1.0).to_event(1))

    w0 = torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=torch.float64)
    kernel = LangevinKernel(model, "psgld", 0.01, seed=5, sampler_kwargs={"alpha": 0.9, "eps": 1e-3})
    mcmc = MCMC(kernel, num_samples=2, warmup_steps=0, initial_params={"w": w0}, disable_progbar=True)
    mcmc.run()
    ref = build_psgld(alpha=0.9, eps=1e-3)
    w = [w0.clone()]
    state = ref.init(w)
    noise = GaussianNoise(torch.Generator().manual_seed(chain_seeds(5, 1)[0][0]))
    expected = []
    for _ in range(2):
        ref.step(w, [w[0].clone()], state, 0.01, noise)
        expected.append(w[0].clone())
    torch.testing.assert_close(mcmc.get_samples()["w"], torch.stack(expected), rtol=1e-12, atol=1e-12)
    assert posterior_from_mcmc(mcmc).metadata["sampler_settings"] == {"alpha": 0.9, "eps": 1e-3}


# ------------------------------------------------------------------------------ constrained sites
def test_constrained_site_includes_log_abs_det_jacobian():
    # LogNormal(m, tau) site: in z = log(x) the target is exactly N(m, tau^2), so SGLD's stationary
    # law is N(m, tau^2 / (1 - h / (2 tau^2))); without the Jacobian term it would be centred at m - tau^2.
    m, tau, h, reps = 0.3, 0.5, 0.05, 400

    def model():
        pyro.sample("w", dist.LogNormal(torch.full((reps, 1), m, dtype=torch.float64), tau).to_event(2))

    mcmc, w = run_sgld(model, step_size=h, num_samples=500, warmup_steps=100, seed=3)
    assert (w > 0).all()  # returned in the constrained space
    z_draws = np.log(w)
    var = tau**2 / (1 - h / (2 * tau**2))
    z = z_scores(z_draws, np.array([m]), np.array([[var]]))
    assert max(abs(v) for v in z.values()) < Z_MAX, z
    z_no_jacobian = z_scores(z_draws, np.array([m - tau**2]), np.array([[var]]))
    assert abs(z_no_jacobian["mean[0]"]) > 5 * Z_MAX, z_no_jacobian


# ------------------------------------------------------------------------------ PyroModule nets
class BayesianMLP(PyroModule):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](1, hidden)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([hidden, 1]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([hidden]).to_event(1))
        self.fc2 = PyroModule[nn.Linear](hidden, 1)
        self.fc2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, hidden]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def forward(self, x, y=None, subsample_size=None):
        mean = self.fc2(torch.tanh(self.fc1(x))).squeeze(-1)
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))  # constrained: sampled as log(sigma)
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as i:
            pyro.sample("obs", dist.Normal(mean[..., i], sigma), obs=None if y is None else y[i])
        return mean


def test_pyromodule_mlp_samples_predicts_and_converts(sequential_chains):
    g = torch.Generator().manual_seed(5)
    x = torch.linspace(-2, 2, 64).unsqueeze(-1)
    f = torch.sin(1.5 * x.squeeze(-1))
    y = f + 0.1 * torch.randn(64, generator=g)
    bnn = BayesianMLP()
    kernel = LangevinKernel(bnn, "sgld", 2e-4, seed=0)
    mcmc = MCMC(kernel, num_samples=100, warmup_steps=600, num_chains=2, disable_progbar=True)
    mcmc.run(x, y, 16)
    post = posterior_from_mcmc(mcmc)
    assert post.draws["fc1.weight"].shape == (2, 100, 16, 1) and post.draws["sigma"].shape == (2, 100)
    assert set(post.draws) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "sigma"}
    assert not bool(post.diverged.any()) and (post.draws["sigma"] > 0).all()

    samples = to_predictive_samples(post)
    x_test = torch.linspace(-1.9, 1.9, 25).unsqueeze(-1)
    pred = Predictive(bnn, posterior_samples=samples, return_sites=("obs", "_RETURN"))(x_test)
    assert pred["obs"].shape == (200, 25) and pred["_RETURN"].shape == (200, 25)
    f_test = torch.sin(1.5 * x_test.squeeze(-1))
    r2 = 1 - ((pred["_RETURN"].mean(0) - f_test) ** 2).mean() / f_test.var(unbiased=False)
    assert r2 > 0.9, float(r2)  # the posterior predictive mean fits the function it saw

    idata = az.from_pyro(mcmc, log_likelihood=False)
    assert idata.posterior["fc2.weight"].shape == (2, 100, 1, 16)
    assert idata.sample_stats["diverging"].shape == (2, 100) and not idata.sample_stats["diverging"].any()


# ------------------------------------------------------------------------------ chains and seeds
def _two_chain_run(seed, replicas=200, warmup=20, samples=30, num_chains=2):
    kernel = LangevinKernel(regression_model(replicas), "sgld", 4e-3, seed=seed)
    mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup, num_chains=num_chains, disable_progbar=True)
    mcmc.run(10)
    return mcmc.get_samples(group_by_chain=True)["w"]


def _chain_correlation(w: torch.Tensor) -> float:
    """Correlation of the two chains' last draws over the R*D coordinates, each coordinate centred on
    its replica mean (replicas of one chain share a minibatch sequence, hence a common offset)."""
    a, b = ((w[c, -1] - w[c, -1].mean(0)).reshape(-1) for c in (0, 1))
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.parametrize("seed", [None, 7])
def test_two_chains_are_independent_and_reproducible(sequential_chains, seed):
    def run():
        if seed is None:
            pyro.set_rng_seed(11)
        return _two_chain_run(seed)

    w1, w2 = run(), run()
    assert torch.equal(w1, w2)  # reproducible
    assert not torch.equal(w1[0], w1[1])
    # independent: across the R*D coordinates the two chains' deviations are uncorrelated,
    # |rho| ~ N(0, 1/(R D)); a shared noise stream would give rho ~ 1
    assert abs(_chain_correlation(w1)) < Z_MAX / math.sqrt(200 * D)


@pytest.mark.parametrize("seed", [None, 7])
def test_parallel_worker_chains_are_independent_and_reproducible(monkeypatch, seed):
    # MCMC runs chains in forked worker processes when num_chains < cpu_count
    import pyro.infer.mcmc.api as api

    monkeypatch.setattr(api.mp, "cpu_count", lambda: 3)

    def run():
        pyro.set_rng_seed(11)
        return _two_chain_run(seed)

    w1, w2 = run(), run()
    assert torch.equal(w1, w2) and not torch.equal(w1[0], w1[1])
    assert abs(_chain_correlation(w1)) < Z_MAX / math.sqrt(200 * D)
    if seed is not None:  # a worker knows its chain from its process name: same draws as sequential chains
        monkeypatch.setattr(api.mp, "cpu_count", lambda: 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.equal(_two_chain_run(seed), w1)


@pytest.mark.parametrize("cpus", [1, 3])  # sequential chains, then parallel worker processes
def test_initial_params_from_mcmc_are_used_per_chain(monkeypatch, cpus):
    import pyro.infer.mcmc.api as api

    monkeypatch.setattr(api.mp, "cpu_count", lambda: cpus)
    init = {"w": torch.stack([torch.full((5, D), 3.0), torch.full((5, D), -3.0)]).double()}
    kernel = LangevinKernel(regression_model(5), "sgld", 1e-6, seed=0)  # tiny steps: stays near the start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Chains will be drawn sequentially" when cpus == 1
        mcmc = MCMC(kernel, num_samples=2, warmup_steps=0, num_chains=2, initial_params=init,
                    disable_progbar=True)
        mcmc.run()
    w = mcmc.get_samples(group_by_chain=True)["w"]
    assert (w[0] - 3.0).abs().max() < 0.05 and (w[1] + 3.0).abs().max() < 0.05


def test_chain_k_of_seeded_run_is_the_same_chain_run_alone(sequential_chains):
    both = _two_chain_run(7)
    alone = _two_chain_run(7, num_chains=1)
    assert torch.equal(both[0], alone[0])


def test_reused_kernel_repeats_after_reset_seed(sequential_chains):
    kernel = LangevinKernel(regression_model(20), "sgld", 4e-3, seed=3)
    runs = []
    for _ in range(2):
        kernel.reset_seed()
        mcmc = MCMC(kernel, num_samples=10, warmup_steps=5, disable_progbar=True)
        mcmc.run(10)
        runs.append(mcmc.get_samples()["w"])
    assert torch.equal(runs[0], runs[1])


def test_same_stream_twice_would_fail_the_independence_check(sequential_chains):
    # the "would catch" for the independence test: two chains from one seed are perfectly correlated
    a = _two_chain_run(7, num_chains=1)
    b = _two_chain_run(7, num_chains=1)
    assert abs(_chain_correlation(torch.cat([a, b]))) > Z_MAX / math.sqrt(200 * D)


# ------------------------------------------------------------------------------ divergence
def test_divergent_chain_is_flagged_and_reported_to_arviz():
    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 0.01).to_event(1))  # precision 1e4
        return w

    kernel = LangevinKernel(model, "sgld", 1.0, seed=0)  # h * precision = 1e4 >> 2: explodes
    mcmc = MCMC(kernel, num_samples=40, warmup_steps=0, disable_progbar=True)
    mcmc.run()
    diag = kernel.diagnostics()
    step = diag["divergence_step"]
    assert 0 <= step < 40 and diag["divergences"] == list(range(step, 40))
    post = posterior_from_mcmc(mcmc)
    assert bool(post.diverged[0]) and int(post.divergence_step[0]) == step
    assert torch.isnan(post.draws["w"][0, step:]).all() and torch.isfinite(post.draws["w"][0, :step]).all()
    assert post.sample_stats["diverging"][0].tolist() == [i >= step for i in range(40)]
    idata = az.from_pyro(mcmc, log_likelihood=False)
    assert idata.sample_stats["diverging"].values[0].tolist() == [i >= step for i in range(40)]


# ------------------------------------------------------------------------------ step counter
class _CarriedCounterKernel(LangevinKernel):
    """The would-catch twin: a step counter of its own beside the sampler state's, which setup()
    does not reset (a second counter drifting from the state's)."""

    carried = 0

    @property
    def num_steps(self) -> int:
        return self.carried

    def sample(self, params):
        out = super().sample(params)
        self.carried += 1
        return out


def _step_sizes_of_two_runs(kernel_cls, schedule):
    kernel = kernel_cls(regression_model(2), "sgld", schedule, seed=0)
    runs = []
    for _ in range(2):  # a second run of the same kernel object: setup() starts the count at 0
        mcmc = MCMC(kernel, num_samples=15, warmup_steps=5, disable_progbar=True)
        mcmc.run()
        stats = posterior_from_mcmc(mcmc).sample_stats  # step_size: when one per draw was recorded
        runs.append((kernel.num_steps, kernel.diagnostics()["step_size"],
                     stats["step_size"][0].tolist() if "step_size" in stats else None))
    return runs


def test_the_chain_step_count_is_what_the_schedule_and_the_recorded_step_size_see():
    """The kernel's one step counter is its sampler state's (num_steps): every step is taken and
    recorded at h_t, warm-up included, and each run's setup() starts it at 0."""
    schedule = PolynomialDecay(1e-3, 1.0, 0.55)
    expected = [schedule.step_size(t) for t in range(5, 20)]
    assert _step_sizes_of_two_runs(LangevinKernel, schedule) == [(20, expected, expected)] * 2
    twin = _step_sizes_of_two_runs(_CarriedCounterKernel, schedule)
    assert twin[0] == (20, expected, expected) and twin[1] != (20, expected, expected)


# ------------------------------------------------------------------------------ conversions
def test_posterior_from_mcmc_records_energy_step_size_and_metadata():
    model = regression_model(3)
    kernel = LangevinKernel(model, "sgld", 1e-3, beta=2.0 / N, seed=0)  # n inferred from the plate
    mcmc = MCMC(kernel, num_samples=15, warmup_steps=5, disable_progbar=True)
    mcmc.run()  # full batch, so each draw's recorded energy is its exact U
    post = posterior_from_mcmc(mcmc)
    assert post.sample_stats["step_size"].shape == (1, 15) and (post.sample_stats["step_size"] == 1e-3).all()
    assert post.metadata["beta"] == pytest.approx(2.0 / N)
    assert post.metadata["temperature"] == pytest.approx(2.0)
    assert post.metadata["sampler"] == "sgld" and post.metadata["num_warmup"] == 5
    # energy[j] belongs to draw j: U(w) = sum_i (y_i - x_i w)^2 / (2 s^2 T) - log p(w), written out
    expected = [_full_energy(post.draws["w"][0, j], 2.0) for j in range(15)]
    assert post.sample_stats["energy"][0].tolist() == pytest.approx(expected, rel=1e-12)
    samples = to_predictive_samples(post)
    assert samples["w"].shape == (15, 3, D)
    # the same statistics through the public MCMC.diagnostics() route (an MCMC without the private list)
    class PublicOnly:
        kernel, warmup_steps = mcmc.kernel, mcmc.warmup_steps
        get_samples, diagnostics = mcmc.get_samples, mcmc.diagnostics

    again = posterior_from_mcmc(PublicOnly())
    assert all(torch.equal(again.sample_stats[k], post.sample_stats[k]) for k in post.sample_stats)


def _full_energy(w: torch.Tensor, temperature: float) -> float:
    """U(w) = sum_i (y_i - x_i w)^2 / (2 s^2 T) + |w|^2 / (2 sigma0^2) + constants, written out."""
    resid = Y.unsqueeze(-1) - X @ w.T
    nll = (resid**2 / (2 * S**2) + math.log(S) + 0.5 * math.log(2 * math.pi)).sum()
    prior = (w**2 / (2 * SIGMA0**2) + math.log(SIGMA0) + 0.5 * math.log(2 * math.pi)).sum()
    return float(nll / temperature + prior)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"num_data": 0}, "num_data"),
        ({"seed": -1}, "seed"),
        ({"sampler": "nope"}, "sampler"),
        ({"sampler": "csgld"}, "sampler"),
        ({"step_size": Cyclical(0.1, 10)}, "step_size"),
        ({"step_size": -0.1}, "step_size"),
        ({"sampler_kwargs": {"bogus": 1}}, "sampler_kwargs"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LangevinKernel(regression_model(1), **kwargs)


def test_model_errors_name_the_fix():
    def discrete():
        pyro.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="discrete"):
        MCMC(LangevinKernel(discrete), num_samples=2, warmup_steps=0, disable_progbar=True).run()

    def two_plates():
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("a", 3):
            pyro.sample("ya", dist.Normal(w, 1.0), obs=torch.zeros(3))
        with pyro.plate("b", 4):
            pyro.sample("yb", dist.Normal(w, 1.0), obs=torch.zeros(4))

    with pytest.raises(ValueError, match="num_data"):
        MCMC(LangevinKernel(two_plates, beta=0.1), num_samples=2, warmup_steps=0, disable_progbar=True).run()
    mcmc = MCMC(LangevinKernel(two_plates, beta=0.1, num_data=7, seed=0), num_samples=2, warmup_steps=0,
                disable_progbar=True)
    mcmc.run()
    assert mcmc.kernel.temperature == pytest.approx(0.7)

    with pytest.raises(ValueError, match="subsample_size=None"):
        nuts_reference(regression_model(1), 10, num_draws=5, num_warmup=5)
    with pytest.raises(ValueError, match="num_draws"):
        nuts_reference(regression_model(1), num_draws=0)
    with pytest.raises(TypeError, match="posterior"):
        to_predictive_samples({"w": torch.zeros(3)})
