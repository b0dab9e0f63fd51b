"""Sampling without tuning (issue 21 B): step_size="auto", gradient="cv", the minibatch-noise report."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg as sl
import torch
from crash_helpers import Crash, crashing_stat
from stat_helpers import mean_and_mcse
from torch import nn

import pib_bayes as pb
from pib_bayes.gradients import ControlVariateGradient, full_data_gradient
from pib_bayes.samplers.step_size import (
    SGHMC_RULE,
    AutoStep,
    GradientNoiseWarning,
    auto_step_size,
    energy_hvp,
    estimate_lambda_max,
    minibatch_noise,
    reshuffling_factor,
)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _linear_data(n=2000, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, generator=g) + torch.randn(n, generator=g)).unsqueeze(1)
    return x, y


def _posterior(x, y, beta):
    """SPEC §2: precision Lambda = I + X^T X/(n beta), mean Lambda^-1 X^T y/(n beta) (s = sigma0 = 1)."""
    n, d = x.shape
    lam = torch.eye(d) + x.T @ x / (n * beta)
    return torch.linalg.solve(lam, x.T @ y[:, 0] / (n * beta)), lam


def _model(d):
    torch.manual_seed(0)
    return nn.Linear(d, 1, bias=False)


# ---- lambda_max and the step-size rules ------------------------------------------------------------


def test_lambda_max_of_the_energy_is_the_top_eigenvalue_of_the_posterior_precision():
    x, y = _linear_data(n=500, d=4)
    beta = 1 / 500
    _, lam = _posterior(x, y, beta)
    energy = pb.Energy(_model(4), pb.GaussianLoss(1.0), prior=pb.GaussianPrior(std=1.0), beta=beta)
    hvp = energy_hvp(energy, {"weight": torch.zeros(1, 4)}, x, y)
    res = estimate_lambda_max(hvp, [torch.zeros(1, 4)], tol=1e-10, max_iters=500)
    exact = float(torch.linalg.eigvalsh(lam).max())
    assert res.converged and abs(res.value - exact) < 1e-6 * exact
    # the eigenvector too: H v = lambda v
    hv = hvp(res.vector)[0]
    assert torch.allclose(hv, exact * res.vector[0], atol=1e-3 * exact)


def test_power_iteration_finds_the_top_eigenvalue_when_a_negative_one_dominates():
    h = torch.diag(torch.tensor([2.0, 0.5, -7.0]))
    res = estimate_lambda_max(lambda v: [h @ v[0]], [torch.zeros(3)], tol=1e-12, max_iters=2000)
    assert abs(res.value - 2.0) < 1e-6 and res.shift < 0


def test_sample_auto_sgld_step_bounds_the_variance_bias_by_eps_and_lands_in_metadata():
    x, y = _linear_data(n=400, d=3)
    beta = 1 / 400
    _, lam = _posterior(x, y, beta)
    exact = float(torch.linalg.eigvalsh(lam).max())
    post = pb.sample(_model(3), pb.GaussianLoss(1.0), (x, y), beta=beta, prior=pb.GaussianPrior(std=1.0),
                     step_size=AutoStep(eps=0.05, tol=1e-8, max_iters=200), num_chains=2, num_warmup=5,
                     num_draws=5)
    info = post.metadata["step_size_auto"]
    h = info["step_size"]
    assert abs(info["lambda_max"] - exact) < 1e-5 * exact  # full batch: the exact Hessian
    assert h == post.metadata["schedule"]["h"]
    assert info["cpu_s"] > 0 and info["iterations"] >= 10 and info["converged"]
    # SPEC §2: ULA's variance in the stiffest direction is (1/lambda)/(1 - h lambda/2): bias = eps
    assert abs(1 / (1 - h * exact / 2) - 1 - 0.05) < 1e-5
    assert post.metadata["gradient_noise"]["top"] == 0.0  # full batch: no minibatch noise


def test_sghmc_rule_bounds_the_exact_discrete_variance_bias_by_eps():
    """SGHMC's exact stationary variance on a harmonic direction, from the 2x2 discrete Lyapunov
    equation, is eps above 1/lambda at the rule's (eta, alpha); a rule with SGLD's h = 2 eps/(1+eps)/lambda
    at that alpha (the would-be bug) is not."""
    lam, eps = 50.0, 0.05

    def bias(eta, alpha):
        m = np.array([[1 - eta * lam, 1 - alpha], [-eta * lam, 1 - alpha]])  # (w, v), w <- w + v'
        q = 2 * alpha * eta * np.ones((2, 2))
        return sl.solve_discrete_lyapunov(m, q)[0, 0] * lam - 1

    for given in ({}, {"friction": 0.1}, {"friction": 1.0}):
        s = SGHMC_RULE.choose(lam, eps, given)
        assert abs(bias(s["step_size"], s["friction"]) - eps) < 1e-9, (given, s)
    s = SGHMC_RULE.choose(lam, eps, {})
    assert abs(s["friction"] - math.sqrt(s["step_size"] * lam)) < 1e-12  # gamma = sqrt(lambda_max)
    assert abs(bias(2 * eps / (1 + eps) / lam, s["friction"]) - eps) > 0.01  # exact: 3.05% vs 5%


def test_sample_auto_sghmc_rebuilds_the_kernel_with_the_chosen_friction_and_keeps_a_given_one():
    x, y = _linear_data(n=300, d=3)
    kw = dict(beta=1 / 300, prior=pb.GaussianPrior(std=1.0), step_size="auto", sampler="sghmc", num_chains=2,
              num_warmup=5, num_draws=5)
    post = pb.sample(_model(3), pb.GaussianLoss(1.0), (x, y), **kw)
    chosen = post.metadata["step_size_auto"]["settings"]["friction"]
    assert post.metadata["sampler_settings"]["friction"] == chosen != 0.1
    post = pb.sample(_model(3), pb.GaussianLoss(1.0), (x, y), sampler_kwargs={"friction": 0.2}, **kw)
    assert post.metadata["sampler_settings"]["friction"] == 0.2


def test_sample_auto_sgnht_takes_the_smaller_of_its_two_bias_bounds():
    """SGNHT (h21a): bias -h A/2 from the thermostat and +h^2 lambda_max/4 in the stiffest direction,
    each held to eps/2: h = min(eps/A, sqrt(2 eps/lambda_max)); the diffusion A is kept."""
    x, y = _linear_data(n=300, d=3)
    _, lam = _posterior(x, y, 1 / 300)
    exact = float(torch.linalg.eigvalsh(lam).max())
    for diffusion, expect in ((1.0, math.sqrt(2 * 0.05 / exact)), (100.0, 0.05 / 100.0)):
        post = pb.sample(_model(3), pb.GaussianLoss(1.0), (x, y), beta=1 / 300,
                         prior=pb.GaussianPrior(std=1.0), sampler="sgnht",
                         sampler_kwargs={"diffusion": diffusion}, step_size=AutoStep(tol=1e-8, max_iters=200),
                         num_chains=2, num_warmup=5, num_draws=5)
        assert abs(post.metadata["step_size_auto"]["step_size"] - expect) < 1e-6 * expect
        assert post.metadata["sampler_settings"]["diffusion"] == diffusion and not post.diverged.any()


def test_psgld_auto_uses_the_preconditioned_hessian_at_the_stationary_preconditioner():
    x, y = _linear_data(n=300, d=3)
    x = x * torch.tensor([1.0, 3.0, 0.3])  # anisotropic: G matters
    beta = 1 / 300
    got = auto_step_size(_model(3), pb.GaussianLoss(1.0), (x, y), beta=beta, prior=pb.GaussianPrior(std=1.0),
                         sampler="psgld", eps=0.05)
    # dense check: V = diag(H) (what RMSprop settles to at stationarity), G = 1/(1e-5 + sqrt(V))
    hess = torch.eye(3) + x.T @ x / (300 * beta)
    g = 1 / (1e-5 + hess.diagonal().sqrt())
    exact = float(torch.linalg.eigvalsh(torch.diag(g.sqrt()) @ hess @ torch.diag(g.sqrt())).max())
    assert abs(got["lambda_max"] - exact) < 2e-3 * exact
    assert abs(got["lambda_max"] - float(torch.linalg.eigvalsh(hess).max())) > 0.5 * exact  # not H itself


def test_psgld_auto_starts_the_rmsprop_average_at_the_stationary_value_the_step_was_chosen_for():
    """The first step's preconditioner is G = 1/(1e-5 + sqrt(0.99 V0 + 0.01 g0^2)) with V0 = diag(H);
    with the kernel's own start V0 = 0 (the would-be bug) it is G = 1/(1e-5 + 0.1 |g0|)."""
    x, y = _linear_data(n=300, d=3)
    x = x * torch.tensor([1.0, 3.0, 0.3])
    beta = 1 / 300
    model = _model(3)
    w0 = model.weight.detach()[0]
    post = pb.sample(model, pb.GaussianLoss(1.0), (x, y), beta=beta, prior=pb.GaussianPrior(std=1.0),
                     sampler="psgld", step_size="auto", num_chains=2, num_warmup=0, num_draws=1)
    hess = torch.eye(3) + x.T @ x / (300 * beta)
    g0 = ((x @ w0 - y[:, 0])[:, None] * x).mean(0) / beta + w0
    right = float((1 / (1e-5 + (0.99 * hess.diagonal() + 0.01 * g0.square()).sqrt())).mean())
    wrong = float((1 / (1e-5 + (0.01 * g0.square()).sqrt())).mean())
    got = post.sample_stats["precond_mean"][:, 0]
    assert torch.allclose(got, torch.full_like(got, right), rtol=1e-6), (got, right)
    assert abs(wrong - right) > 0.1 * right


def test_auto_rejects_a_curvature_estimate_that_is_not_positive():
    x, y = _linear_data(n=100, d=3)

    def concave(out, target):  # -(f - y)^2: every curvature of U is negative
        return -(out[:, 0] - target[:, 0]).square()

    with pytest.raises(ValueError, match=r"^step_size: 'auto' needs a positive, finite curvature"):
        pb.sample(_model(3), concave, (x, y), beta=1.0, prior=pb.FlatPrior(), step_size="auto", num_draws=2,
                  task="regression",
                  num_warmup=0)

    def linear(out, target):  # flat: H = 0
        return out[:, 0]

    with pytest.raises(ValueError, match=r"^step_size: 'auto' needs a positive, finite curvature"):
        pb.sample(_model(3), linear, (x, y), beta=1.0, prior=pb.FlatPrior(), step_size="auto", num_draws=2,
                  task="regression",
                  num_warmup=0)


@pytest.mark.parametrize("kwargs, needle", [
    ({"step_size": "fast"}, "step_size: expected a float"),
    ({"step_size": "auto", "sampler": "csgld"}, "step_size: 'auto' picks a constant step"),
    ({"gradient": "svrg"}, "gradient: expected one of"),
    ({"step_size": AutoStep(adapt=True), "num_warmup": 1},
     r"step_size: AutoStep\(adapt=True\) .* num_warmup >= 2"),
])
def test_bad_arguments_name_themselves(kwargs, needle):
    x, y = _linear_data(n=50, d=2)
    with pytest.raises(ValueError, match=needle):
        pb.sample(_model(2), "gaussian", (x, y), beta=0.1, num_draws=2, **kwargs)
    with pytest.raises(ValueError, match="step_size: eps"):
        AutoStep(eps=1.5)
    with pytest.raises(ValueError, match="step_size: AutoStep.adapt_at"):
        AutoStep(adapt=True, adapt_at=1.0)
    with pytest.raises(ValueError, match="step_size: AutoStep.adapt must be True or False"):
        AutoStep(adapt=1)


# ---- control variates ------------------------------------------------------------------------------


def _mlp_base():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))
    energy = pb.Energy(model, pb.GaussianLoss(0.5), prior=pb.GaussianPrior(std=1.0), beta=1 / 300)
    names = [n for n, _ in model.named_parameters()]

    def base(params, batched, x, y, stacked):
        with torch.enable_grad():
            u, loss = energy.functional(dict(zip(names, params)), x, y)
            return u.detach(), loss.detach(), torch.autograd.grad(u, list(params))

    w0 = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 3, generator=g)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.5 * torch.randn(300, 1, generator=g)
    return base, w0, x, y


def _leaves(ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def test_control_variate_gradient_is_unbiased_and_a_wrong_centre_gradient_is_caught():
    base, centre, x, y = _mlp_base()
    g = torch.Generator().manual_seed(0)
    w = [c + 0.3 * torch.randn(c.shape, generator=g) for c in centre]  # far from the centre: a real test
    full = torch.cat([t.flatten() for t in full_data_gradient(base, _leaves(w), False, [(x, y)])[2]])
    right = ControlVariateGradient(base, _leaves(centre), full_data_gradient(base, _leaves(centre), False,
                                                                             [(x, y)])[2])
    other = [c + 0.05 for c in centre]  # the full gradient taken at another point than the batch term's
    wrong = ControlVariateGradient(base, _leaves(centre), full_data_gradient(base, _leaves(other), False,
                                                                             [(x, y)])[2])
    draws = {"right": [], "wrong": []}
    for _ in range(400):
        idx = torch.randperm(300, generator=g)[:20]
        for key, est in (("right", right), ("wrong", wrong)):
            gr = est(_leaves(w), False, x[idx], y[idx], False)[2]
            draws[key].append(torch.cat([t.flatten() for t in gr]))
    for key in draws:
        d = torch.stack(draws[key])
        se = d.std(0) / math.sqrt(len(d))  # independent batches
        z = ((d.mean(0) - full) / se).abs()
        if key == "right":
            assert bool((z < 4.5).all()), z.max()
        else:
            assert bool((z > 8).any()), z.max()


def test_control_variate_variance_vanishes_at_the_centre_and_is_small_near_it():
    base, centre, x, y = _mlp_base()
    cv = ControlVariateGradient(base, _leaves(centre), full_data_gradient(base, _leaves(centre), False,
                                                                          [(x, y)])[2])
    g = torch.Generator().manual_seed(1)
    step = [0.01 * torch.randn(c.shape, generator=g) for c in centre]
    batches = [torch.randperm(300, generator=g)[:20] for _ in range(50)]

    def spread(est, scale):
        w = [c + scale * s for c, s in zip(centre, step)]
        out = [torch.cat([t.flatten() for t in est(_leaves(w), False, x[i], y[i], False)[2]])
               for i in batches]
        return float(torch.stack(out).var(0).sum())

    assert spread(cv, 0.0) < 1e-18 * spread(base, 0.0)
    assert spread(cv, 1.0) < 1e-2 * spread(base, 1.0)
    # the variance of the per-example gradient differences grows like |w - w_hat|^2
    assert 3.5 < spread(cv, 2.0) / spread(cv, 1.0) < 4.5


def _inflation(post, mu, cov_fb):
    """tr(Cov)/tr(Cov_full_batch) - 1 from the draws, with its MCSE (ESS of the per-draw statistic)."""
    w = post.draws["weight"][:, :, 0, :].numpy()
    q = ((w - mu.numpy()) ** 2).sum(-1) / float(torch.trace(cov_fb)) - 1
    return mean_and_mcse(q)


def test_cv_removes_the_minibatch_covariance_inflation_at_batch_200():
    """Issue 21 target (SPEC §2 case: d = 5, n = 2000, beta = 1/n, h lambda_max = 0.1, batch 200): the
    covariance over full-batch SGLD's exact law is inflated ~13% by minibatch noise (the reshuffled-epoch
    prediction of the noise report, which this also checks) and <= 3% with gradient="cv"."""
    x, y = _linear_data()
    n, d = x.shape
    beta = 1 / n
    mu, lam = _posterior(x, y, beta)
    evals, evecs = torch.linalg.eigh(lam)
    h = 0.1 / float(evals.max())
    cov_fb = torch.linalg.inv(lam) @ torch.linalg.inv(torch.eye(d) - h * lam / 2)
    got = {}
    for gradient in ("minibatch", "cv"):
        post = pb.sample(_model(d), pb.GaussianLoss(1.0), (x, y), beta=beta, prior=pb.GaussianPrior(std=1.0),
                         step_size=h, num_chains=128, num_warmup=200, num_draws=1000, batch_size=200, seed=1,
                         gradient=gradient)
        got[gradient] = _inflation(post, mu, cov_fb)
    (cv, cv_se), (mb, mb_se) = got["cv"], got["minibatch"]
    assert cv + 4 * cv_se <= 0.03, got
    assert mb - 4 * mb_se > 0.03, got  # would catch a cv that does nothing
    # the first-order prediction per eigendirection j, with the reshuffling factor: relative inflation
    # r_j = h c_j f(1 - h lambda_j) / 2, so tr-inflation = sum_j r_j / lambda_j / sum_j 1 / lambda_j
    resid = (x @ mu - y[:, 0])[:, None] * x / beta  # grad l_i / beta at the mode
    c = torch.cov(resid.T, correction=0) * (n - 200) / ((n - 1) * 200)
    cj = torch.einsum("ij,ik,kj->j", evecs, c, evecs)
    r = torch.tensor([h * float(cj[j]) / 2 * reshuffling_factor(1 - h * float(evals[j]), 200, n)
                      for j in range(d)])
    pred = float((r / evals).sum() / (1 / evals).sum())
    iid = float((h * cj / 2 / evals).sum() / (1 / evals).sum())
    assert abs(mb - pred) < 4 * mb_se + 0.1 * pred, (mb, pred)  # first order in h and in |w - mu|
    assert abs(mb - iid) > 4 * mb_se + 0.1 * iid, (mb, iid)  # independent batches: a different figure


def test_cv_needs_the_full_data_a_streaming_loader_is_refused():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            while True:
                yield torch.randn(2, generator=g), torch.randn(1, generator=g)

    loader = torch.utils.data.DataLoader(Stream(), batch_size=8)
    with pytest.raises(ValueError, match=r"^gradient: 'cv' needs one full-data gradient"):
        pb.sample(nn.Linear(2, 1), "gaussian", loader, beta=0.1, gradient="cv", num_draws=2, num_warmup=2)


def test_cv_with_a_map_style_loader_matches_tensor_data_full_gradient():
    x, y = _linear_data(n=64, d=2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    post = pb.sample(_model(2), "gaussian", loader, beta=1 / 64, step_size=1e-3, gradient="cv", num_draws=5,
                     num_warmup=4, num_chains=2)
    assert post.metadata["gradient"] == "cv" and not post.diverged.any()
    assert torch.isfinite(post.draws["weight"]).all()


def _cv_run(ckpt=None, crash_after=None, resume=False, method="vectorized"):
    stat = crashing_stat(crash_after)
    torch.manual_seed(0)
    x, y = pb.data.make_classification_data(n=128, num_classes=3, seed=2)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    return pb.sample(model, "cross_entropy", (x.double(), y), beta=1 / 128, step_size=1e-3, gradient="cv",
                     num_chains=2, num_warmup=22, num_draws=20, batch_size=16, seed=3, chain_method=method,
                     stat_fns={"s": stat}, checkpoint=ckpt, checkpoint_every=4, resume=resume)


@pytest.mark.parametrize("method", ["sequential", "vectorized"])
@pytest.mark.parametrize("crash_after", [0, 9])
def test_cv_run_crashed_and_resumed_gives_identical_draws(tmp_path, method, crash_after):
    """crash_after=0: the last checkpoint is inside warm-up (the centre's running sum is restored);
    9: after the centre was taken (the control variate is restored)."""
    ref = _cv_run(method=method)
    ckpt = tmp_path / "c.ckpt"
    with pytest.raises(Crash):
        _cv_run(ckpt, crash_after=crash_after * (2 if method == "vectorized" else 1), method=method)
    resumed = _cv_run(ckpt, resume=True, method=method)
    for k in ref.draws:
        assert torch.equal(ref.draws[k], resumed.draws[k]), k


# ---- the minibatch-noise report --------------------------------------------------------------------


def test_noise_report_equals_the_exact_discrete_lyapunov_inflation():
    """Batches drawn independently (without replacement within a batch): the exact stationary
    covariance solves Sigma = A Sigma A^T + 2h I + h^2 C (SPEC §2); along the top eigenvector the
    report's h u^T C u / 2 is its exact relative inflation. A report without the finite-population
    factor (the would-be bug) is off by (n - B)/n."""
    n, d, b = 300, 3, 30
    x, y = _linear_data(n=n, d=d, seed=3)
    beta = 1 / n
    mu, lam = _posterior(x, y, beta)
    evals, evecs = torch.linalg.eigh(lam)
    h = 0.1 / float(evals.max())
    resid = (x @ mu - y[:, 0])[:, None] * x / beta
    c = (torch.cov(resid.T, correction=0) * (n - b) / ((n - 1) * b)).numpy()
    a = np.eye(d) - h * lam.numpy()
    s0 = sl.solve_discrete_lyapunov(a, 2 * h * np.eye(d))
    s1 = sl.solve_discrete_lyapunov(a, 2 * h * np.eye(d) + h * h * c)
    u = evecs[:, -1].numpy()
    exact_top = (u @ s1 @ u) / (u @ s0 @ u) - 1
    exact_mean = h * np.trace(c) / (2 * d)
    energy = pb.Energy(_model(d), pb.GaussianLoss(1.0), prior=pb.GaussianPrior(std=1.0), beta=beta)
    got = minibatch_noise(energy, {"weight": mu[None]}, x, y, batch_size=b, n=n, h_eff=h,
                          top=[evecs[:, -1][None]], num_probes=500)
    assert abs(got["top"] - exact_top) < 1e-9 * exact_top
    assert abs(got["top"] * n / (n - b) - exact_top) > 0.05 * exact_top
    # Hutchinson's tr(C) with Rademacher probes: variance 2 sum_{j != k} C_jk^2 per probe
    se = h / (2 * d) * math.sqrt(2 * (np.square(c).sum() - np.square(np.diag(c)).sum()) / 500)
    assert abs(got["mean"] - exact_mean) < 4 * se + 1e-12


def test_noise_report_after_warmup_predicts_the_inflation_and_warns():
    x, y = _linear_data()
    with pytest.warns(GradientNoiseWarning, match="batch_size=200"):
        post = pb.sample(_model(5), pb.GaussianLoss(1.0), (x, y), beta=1 / 2000,
                         prior=pb.GaussianPrior(std=1.0), step_size="auto", num_chains=2, num_warmup=100,
                         num_draws=5, batch_size=200, seed=1)
    rep = post.metadata["gradient_noise"]
    assert "end of warm-up" in rep["at"] and rep["estimator"] == "minibatch"
    assert 0.1 < rep["top_reshuffled"] < 0.2 and 0.2 < rep["reshuffling_factor"] < 0.4
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientNoiseWarning)
        post = pb.sample(_model(5), pb.GaussianLoss(1.0), (x, y), beta=1 / 2000,
                         prior=pb.GaussianPrior(std=1.0), step_size="auto", num_chains=2, num_warmup=100,
                         num_draws=5, batch_size=200, seed=1,
                         gradient="cv")
    rep = post.metadata["gradient_noise"]
    assert rep["estimator"] == "control variate" and rep["top_reshuffled"] < 0.01


# ---- "auto" keeps the driver's invariants -----------------------------------------------------------


def _auto_run(**kw):
    torch.manual_seed(0)
    x, y = pb.data.make_classification_data(n=128, num_classes=3, seed=2)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    base = dict(beta=1 / 128, step_size="auto", num_chains=3, num_warmup=10, num_draws=8, batch_size=16,
                seed=3, init="prior", prior=pb.GaussianPrior(std=1.0))
    return pb.sample(model, "cross_entropy", (x.double(), y), **{**base, **kw})


def test_auto_gives_the_same_draws_sequential_vectorized_and_per_chain_subset():
    """The curvature stage uses global chain 0's initial weights and a stream of its own, so the
    draws do not depend on the chain method or on which chains a call runs."""
    ref = _auto_run(chain_method="vectorized")
    seq = _auto_run(chain_method="sequential")
    sub = _auto_run(chain_ids=[2])
    assert seq.metadata["step_size_auto"]["step_size"] == ref.metadata["step_size_auto"]["step_size"]
    assert sub.metadata["step_size_auto"]["step_size"] == ref.metadata["step_size_auto"]["step_size"]
    for k in ref.draws:
        assert torch.allclose(ref.draws[k], seq.draws[k], atol=1e-10), k
        assert torch.allclose(ref.draws[k][2:], sub.draws[k], atol=1e-10), k
    # and a fixed step of the same value gives the same draws: "auto" moves no random stream
    fixed = _auto_run(chain_method="vectorized", step_size=ref.metadata["step_size_auto"]["step_size"])
    for k in ref.draws:
        assert torch.equal(ref.draws[k], fixed.draws[k]), k


def test_auto_with_a_dataloader_and_resume_from_checkpoint(tmp_path):
    x, y = _linear_data(n=64, d=2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    post = pb.sample(_model(2), "gaussian", loader, beta=1 / 64, step_size="auto", num_draws=5, num_warmup=3)
    info = post.metadata["step_size_auto"]
    assert info["examples"] == 64 and info["step_size"] > 0
    assert post.metadata["gradient_noise"]["batch_size"] == 16
    ckpt = tmp_path / "a.ckpt"
    first = _auto_run(checkpoint=ckpt, checkpoint_every=3)
    again = _auto_run(checkpoint=ckpt, checkpoint_every=3, resume=True)  # finished run: same posterior
    for k in first.draws:
        assert torch.equal(first.draws[k], again.draws[k]), k


# ---- AutoStep(adapt=True): the warm-up re-estimate ---------------------------------------------------


def _far_logistic():
    """Two-class logistic regression started far from its mode: the softmax saturates at the start, so
    the curvature there (lambda_max ~ 19) is ~5x smaller than where the chains sample (~100)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(400, generator=g) > 0).long()
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[8.0, -8.0], [-8.0, 8.0]]))
        model.bias.zero_()
    return model, x, y


def _far_run(sampler, step_size, num_warmup, num_draws=20, **kw):
    model, x, y = _far_logistic()
    post = pb.sample(model, "cross_entropy", (x, y), beta=1 / 400, prior=pb.GaussianPrior(std=1.0),
                     sampler=sampler, step_size=step_size, num_chains=3, num_warmup=num_warmup,
                     num_draws=num_draws, seed=1, **kw)
    return post, model, x, y


@pytest.mark.parametrize("sampler", ["sgld", "psgld", "sghmc"])
def test_adapt_reestimates_the_step_at_the_chains_weights_mid_warmup(sampler):
    """AutoStep(adapt=True) at step t_a = num_warmup / 2 = 200 takes the rule's step for lambda_max at
    chain 0's weights w_200. Oracle: w_200 from the non-adapting run (its first 200 steps are the same
    steps), then auto_step_size there (full batch, the same examples; pSGLD: V = |diag H| exact for 6
    weights; SGHMC: the friction kept). Twin: the step at the initial weights -- what a run that does
    not adapt (or re-estimates at the wrong weights) uses -- fails the same 1% check."""
    post, model, x, y = _far_run(sampler, AutoStep(adapt=True), 400)
    info = post.metadata["step_size_auto"]
    adapted = info["adapted"]
    assert adapted["at_step"] == 200 and adapted["at"] == "chain 0's weights at warm-up step 200"
    first, *_ = _far_run(sampler, AutoStep(), 200, num_draws=1)  # the same 200 warm-up steps, no adapt
    settings = dict(post.metadata["sampler_settings"])
    with torch.no_grad():
        model.weight.copy_(first.draws["weight"][0, 0])
        model.bias.copy_(first.draws["bias"][0, 0])
    oracle = auto_step_size(model, "cross_entropy", (x, y), beta=1 / 400, prior=pb.GaussianPrior(std=1.0),
                            sampler=sampler, sampler_kwargs=settings)
    assert abs(adapted["step_size"] / oracle["step_size"] - 1) < 0.01, (adapted, oracle["step_size"])
    assert adapted["initial_step_size"] == info["step_size"]
    # the twin: the step chosen at the initial weights misses the same check by >= 10x its tolerance
    # (SGLD, SGHMC: ~5x too large; pSGLD, whose preconditioner absorbs part of the change: 29%)
    assert abs(info["step_size"] / oracle["step_size"] - 1) > 0.1, (info["step_size"], oracle["step_size"])
    # every draw (after warm-up) was taken with the new step; the schedule records both
    assert torch.all(post.sample_stats["step_size"] == adapted["step_size"])
    assert post.metadata["schedule"] == {"type": "AdaptedConstant", "h": info["step_size"], "at": 200,
                                         "adapted": adapted["step_size"]}
    assert not bool(post.diverged.any())


@pytest.mark.parametrize("sampler", ["psgld", "sghmc"])
def test_adapt_gives_the_same_draws_sequential_and_vectorized(sampler):
    """The first chain group to reach t_a estimates; the later sequential groups reuse that step and
    reset their own kernel state (pSGLD's V, SGHMC's momentum scale) at t_a as the vectorized group."""
    vec, *_ = _far_run(sampler, AutoStep(adapt=True), 40, num_draws=10, chain_method="vectorized")
    seq, *_ = _far_run(sampler, AutoStep(adapt=True), 40, num_draws=10, chain_method="sequential")
    assert vec.metadata["step_size_auto"]["adapted"] == seq.metadata["step_size_auto"]["adapted"] | {
        "cpu_s": vec.metadata["step_size_auto"]["adapted"]["cpu_s"]}
    for k in vec.draws:
        assert torch.allclose(vec.draws[k], seq.draws[k], atol=1e-10), k
    # and the reset matters: without it (adapt=False) the draws differ
    plain, *_ = _far_run(sampler, AutoStep(), 40, num_draws=10, chain_method="vectorized")
    assert not torch.allclose(plain.draws["weight"], vec.draws["weight"], atol=1e-6)


class _CrashAt:
    """A gradient transform that passes gradients through and raises Crash at its call number
    ``at`` (one call per step of the group), or never (``at=None``): one object for the
    interrupted, the resumed and the uninterrupted run alike."""

    def __init__(self) -> None:
        self.at, self.calls = None, 0

    def __call__(self, params, grads):
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            raise Crash
        return grads, None


@pytest.mark.parametrize("sampler", ["psgld", "sghmc"])
@pytest.mark.parametrize("chain_method, crash_at", [
    ("vectorized", 12), ("vectorized", 31), ("vectorized", 47),  # before t_a = 20, before 40, drawing
    ("sequential", 81),  # the second chain's step 31: the first chain re-estimated the step, then the kill
])
def test_adapt_resumes_from_a_checkpoint_with_the_same_step_and_the_same_draws(tmp_path, sampler,
                                                                               chain_method, crash_at):
    """AutoStep(adapt=True) with checkpoint=: the checkpoint keeps the weights the step was
    re-estimated at, the resumed run estimates again from them (seeded: the same step, closures
    included) and restores the noise report; killed before, between and after, the resumed run's
    draws, step and reports equal an uninterrupted run's, bit for bit."""
    transform = _CrashAt()
    kw = {"checkpoint_every": 3, "gradient_transform": transform, "num_draws": 10,
          "chain_method": chain_method}
    full, *_ = _far_run(sampler, AutoStep(adapt=True), 40, **kw)
    ckpt = tmp_path / "run.ckpt"
    transform.at, transform.calls = crash_at, 0
    with pytest.raises(Crash):
        _far_run(sampler, AutoStep(adapt=True), 40, checkpoint=ckpt, **kw)
    transform.at = None
    resumed, *_ = _far_run(sampler, AutoStep(adapt=True), 40, checkpoint=ckpt, resume=True, **kw)
    for k in full.draws:
        assert torch.equal(full.draws[k], resumed.draws[k]), k
    assert torch.equal(full.sample_stats["step_size"], resumed.sample_stats["step_size"])
    a, b = full.metadata, resumed.metadata
    assert a["schedule"] == b["schedule"] and a["schedule"]["adapted"] is not None
    drop = ("cpu_s",)
    assert ({k: v for k, v in a["step_size_auto"]["adapted"].items() if k not in drop}
            == {k: v for k, v in b["step_size_auto"]["adapted"].items() if k not in drop})
    assert ({k: v for k, v in a["gradient_noise"].items() if k not in drop}
            == {k: v for k, v in b["gradient_noise"].items() if k not in drop})


def test_a_resume_that_forgets_the_adapted_step_is_caught(tmp_path, monkeypatch):
    """The twin: a checkpoint whose adapter state is not restored (the step re-estimated before the
    kill forgotten) resumes between t_a and the end of warm-up with the initial step: the draws
    differ from the uninterrupted run's, so the test above would catch it."""
    from pib_bayes.driver.warmup import _AutoAdapter

    transform = _CrashAt()
    kw = {"checkpoint_every": 3, "gradient_transform": transform, "num_draws": 10}
    full, *_ = _far_run("sghmc", AutoStep(adapt=True), 40, **kw)
    ckpt = tmp_path / "run.ckpt"
    transform.at, transform.calls = 31, 0
    with pytest.raises(Crash):
        _far_run("sghmc", AutoStep(adapt=True), 40, checkpoint=ckpt, **kw)
    transform.at = None
    monkeypatch.setattr(_AutoAdapter, "load_state_dict", lambda self, state: None)
    resumed, *_ = _far_run("sghmc", AutoStep(adapt=True), 40, checkpoint=ckpt, resume=True, **kw)
    assert not torch.equal(full.draws["weight"], resumed.draws["weight"])


# ---- sampler="auto" --------------------------------------------------------------------------------


def test_sampler_auto_runs_sghmc_with_its_auto_settings_and_says_so():
    """sampler='auto' is SGHMC with eta and friction from lambda_max: the same draws as naming it;
    the default sampler stays SGLD (a different chain)."""
    x, y = _linear_data(n=200, d=3)
    base = dict(beta=1 / 200, step_size="auto", num_chains=2, num_warmup=20, num_draws=10, seed=4)
    auto = pb.sample(_model(3), "gaussian", (x, y), sampler="auto", **base)
    named = pb.sample(_model(3), "gaussian", (x, y), sampler="sghmc", **base)
    default = pb.sample(_model(3), "gaussian", (x, y), **base)
    assert auto.metadata["sampler"] == "sghmc" and auto.metadata["sampler_auto"]["chosen"] == "sghmc"
    assert "sampler_auto" not in named.metadata and default.metadata["sampler"] == "sgld"
    assert "gradient_noise" in auto.metadata and "gradient_noise" in default.metadata
    assert auto.metadata["sampler_settings"] == named.metadata["sampler_settings"]
    assert torch.equal(auto.draws["weight"], named.draws["weight"])
    assert not torch.equal(auto.draws["weight"], default.draws["weight"])
    with pytest.raises(ValueError, match=r"^sampler: 'auto' chooses the kernel together with its step size"):
        pb.sample(_model(3), "gaussian", (x, y), beta=1 / 200, sampler="auto", step_size=1e-4, num_draws=2)


def _sghmc_thermal_kinetic(eta_lam, alpha):
    """Exact stationary E[v^2] / (2 eta) of SGHMC on a harmonic direction (2x2 discrete Lyapunov of
    w' = (1 - eta lam) w + (1 - alpha) v + n, v' = -eta lam w + (1 - alpha) v + n, Var n = 2 alpha eta);
    1 / (2 (1 - alpha/2)) as eta lam -> 0, not 1/2: the discretisation's own thermal value."""
    a = np.array([[1 - eta_lam, 1 - alpha], [-eta_lam, 1 - alpha]])
    b = np.full((2, 1), math.sqrt(2 * alpha))
    return float(sl.solve_discrete_lyapunov(a, b @ b.T)[1, 1] / 2)


def test_adapt_sghmc_rescales_the_momentum_so_the_kinetic_energy_stays_thermal(monkeypatch):
    """SGHMC's v = sqrt(eta) p: at t_a the adapter multiplies v by sqrt(eta1/eta0), so the kinetic
    energy sum v^2/(2 eta1) per weight stays at its thermal value, which the exact Lyapunov oracle
    brackets between eta lam = 0 and eta1 lambda_max (within 4 Monte-Carlo s.e.). Measured at the
    first draw, two steps after t_a, over 512 chains x 6 weights. Twin: without the rescale v keeps
    eta0's scale (eta0/eta1 > 3) and two steps of friction ((1 - alpha)^4 ~ 0.14) do not forget it."""
    def run():
        model, x, y = _far_logistic()
        return pb.sample(model, "cross_entropy", (x, y), beta=1 / 400, prior=pb.GaussianPrior(std=1.0),
                         sampler="sghmc", step_size=AutoStep(adapt=True, adapt_at=200 / 201), num_chains=512,
                         num_warmup=201, num_draws=1, seed=1)

    def kinetic_per_weight(post):
        ke = post.sample_stats["kinetic_energy"][:, 0].double() / 6
        return float(ke.mean()), float(ke.std() / math.sqrt(ke.numel()))

    post = run()
    adapted = post.metadata["step_size_auto"]["adapted"]
    assert adapted["at_step"] == 200
    assert adapted["initial_step_size"] / adapted["step_size"] > 3  # the step did change a lot
    alpha = post.metadata["sampler_settings"]["friction"]
    grid = np.linspace(1e-9, adapted["step_size"] * adapted["lambda_max"], 50)
    oracle = [_sghmc_thermal_kinetic(g, alpha) for g in grid]
    lo, hi = min(oracle), max(oracle)
    mean, se = kinetic_per_weight(post)
    assert lo - 4 * se <= mean <= hi + 4 * se, (mean, se, lo, hi)
    from pib_bayes.driver.warmup import _AutoAdapter

    monkeypatch.setattr(_AutoAdapter, "momentum_ratio", lambda self: 1.0)  # the wrong variant
    wrong, wrong_se = kinetic_per_weight(run())
    assert not lo - 4 * wrong_se <= wrong <= hi + 4 * wrong_se, (wrong, wrong_se, lo, hi)


# ---- SGHMC's friction on a wide spectrum (issue 21 (c)) --------------------------------------------


def _sghmc_matrix(eta_lam, alpha):
    """SGHMC on a harmonic direction, (w, v) -> M (w, v) + (1, 1) sqrt(2 alpha eta) xi (w <- w + v')."""
    return np.array([[1 - eta_lam, 1 - alpha], [-eta_lam, 1 - alpha]])


def test_sghmc_rule_caps_the_friction_at_critical_damping_of_the_slowest_direction():
    """A wide spectrum: alpha = 2 w - w^2, w = sqrt(eta lambda_low), is a double eigenvalue 1 - w of the
    slowest direction's 2x2 recursion (critical damping) while eta still meets the exact bias bound in
    the stiffest direction; continuous-time critical damping alpha = 2 w (the would-be bug) leaves two
    eigenvalues. A narrow spectrum (lambda_max / lambda_low below about 3.2 at eps = 0.05) or no
    lambda_low: the stiffest-direction rule as before."""
    lam, eps = 1000.0, 0.05
    s = SGHMC_RULE.choose(lam, eps, {}, lambda_low=1.0)
    eta, alpha = s["step_size"], s["friction"]
    w = math.sqrt(eta * 1.0)
    assert alpha == pytest.approx(2 * w - w * w, rel=1e-12)
    q = 2 * alpha * eta * np.ones((2, 2))
    bias = sl.solve_discrete_lyapunov(_sghmc_matrix(eta * lam, alpha), q)[0, 0] * lam - 1
    assert bias == pytest.approx(eps)
    ev = np.linalg.eigvals(_sghmc_matrix(eta * 1.0, alpha))
    assert abs(ev[0] - ev[1]) < 1e-6 and abs(ev[0] - (1 - w)) < 1e-6
    ev = np.linalg.eigvals(_sghmc_matrix(eta * 1.0, 2 * w))  # the twin: a split of about 2 w^1.5
    assert abs(ev[0] - ev[1]) > 1e-3
    old = SGHMC_RULE.choose(lam, eps, {})
    assert SGHMC_RULE.choose(lam, eps, {}, lambda_low=400.0) == old  # kappa = 2.5: the cap does not bind
    assert SGHMC_RULE.choose(lam, eps, {}, lambda_low=300.0)["friction"] < old["friction"]  # 3.3: it does
    assert SGHMC_RULE.choose(lam, eps, {}, lambda_low=None) == old
    assert SGHMC_RULE.choose(lam, eps, {"friction": 0.3}, lambda_low=1.0)["friction"] == 0.3
    assert alpha < old["friction"] / 10


def _wide_spectrum_linear(d_flat=2000, n=50, lam_max=1000.0):
    """Gaussian-linear posterior with precision diag(1, ..., 1, lam_max): d_flat coordinates the data
    do not touch (curvature = the prior precision 1) and one the data pin (beta = 1/n, s = 1, y = 0)."""
    x = torch.zeros(n, d_flat + 1)
    x[:, -1] = math.sqrt((lam_max - 1.0) / n)
    model = nn.Linear(d_flat + 1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    return model, x, torch.zeros(n, 1)


def _exact_variance(eta_lam, alpha, eta, steps):
    """Var(w_t) from w_0 = v_0 = 0 for steps 1..steps, and the stationary variance (exact recursion)."""
    m, q = _sghmc_matrix(eta_lam, alpha), 2 * alpha * eta * np.ones((2, 2))
    cov, out = np.zeros((2, 2)), []
    for _ in range(steps):
        cov = m @ cov @ m.T + q
        out.append(cov[0, 0])
    return np.array(out), sl.solve_discrete_lyapunov(m, q)[0, 0]


def test_sampler_auto_relaxes_the_prior_directions_in_the_predicted_few_over_omega_steps():
    """Precision spectrum {1 (x 2000), 1000}: the rule's friction (lambda_low = the prior precision 1
    from the Lanczos bottom) relaxes the flat directions from w = 0 in about 1/omega_min steps,
    omega_min = sqrt(eta): after T = 4/omega_min steps Var(w) over 2000 coordinates x 4 chains matches
    the exact recursion within 5 Monte-Carlo s.e. (s.e. = sigma_t^2 sqrt(2/N)) and is >= 95% of its
    stationary value. Twin: the stiffest-direction friction (the rule before the cap) matches its own
    exact recursion too, but is overdamped on the flat directions (relaxation alpha/(2 eta) steps) and
    still far from stationary at T."""
    model, x, y = _wide_spectrum_linear()
    kw = dict(beta=1 / x.shape[0], prior=pb.GaussianPrior(std=1.0), step_size="auto", num_chains=4,
              num_warmup=0, seed=3)
    got = auto_step_size(model, "gaussian", (x, y), beta=1 / x.shape[0], prior=pb.GaussianPrior(std=1.0),
                         sampler="sghmc")
    eta = got["step_size"]
    steps = int(math.ceil(4 / math.sqrt(eta)))
    post = pb.sample(model, "gaussian", (x, y), sampler="auto", num_draws=steps, **kw)
    info = post.metadata["step_size_auto"]
    assert abs(info["lambda_max"] - 1000.0) < 1e-6 and abs(info["lambda_low"] - 1.0) < 1e-6
    alpha = post.metadata["sampler_settings"]["friction"]
    assert info["step_size"] == eta and alpha == pytest.approx(2 * math.sqrt(eta) - eta, rel=1e-9)
    assert info["damping_ratio"]["slowest"] == pytest.approx(1 - math.sqrt(eta) / 2, rel=1e-9)
    stiff = SGHMC_RULE.choose(1000.0, 0.05, {})  # the twin: friction from the stiffest direction only
    twin = pb.sample(model, "gaussian", (x, y), sampler="sghmc", num_draws=steps,
                     sampler_kwargs={"friction": stiff["friction"]},
                     **{**kw, "step_size": stiff["step_size"]})
    cases = ((post, eta, alpha, True), (twin, stiff["step_size"], stiff["friction"], False))
    for p, e, a, must_relax in cases:
        flat = p.draws["weight"][:, :, 0, :-1].numpy()  # (chain, draw, coordinate)
        pred, stationary = _exact_variance(e * 1.0, a, e, steps)
        for t in (steps // 4, steps // 2, steps - 1):
            measured = float((flat[:, t] ** 2).mean())
            se = pred[t] * math.sqrt(2 / flat[:, t].size)
            assert abs(measured - pred[t]) < 5 * se, (must_relax, t, measured, pred[t], se)
        relaxed = float((flat[:, -1] ** 2).mean()) >= 0.95 * stationary
        assert relaxed == must_relax, (must_relax, float((flat[:, -1] ** 2).mean()), stationary)


def test_sampler_auto_keeps_the_stiffest_direction_friction_on_a_narrow_spectrum():
    """The Gaussian-linear benchmark's regime (lambda_max / lambda_min ~ 1.3 < 4): the cap does not bind,
    the friction is sqrt(eta lambda_max) (damping ratio 1/2 at the top) as before, and the metadata say
    where lambda_low came from (the Lanczos bottom, above the prior precision 1)."""
    x, y = _linear_data(n=300, d=3)
    post = pb.sample(_model(3), pb.GaussianLoss(1.0), (x, y), beta=1 / 300, prior=pb.GaussianPrior(std=1.0),
                     step_size="auto", sampler="auto", num_chains=2, num_warmup=5, num_draws=5)
    info = post.metadata["step_size_auto"]
    _, prec = _posterior(x, y, 1 / 300)
    lam = torch.linalg.eigvalsh(prec)
    assert info["spectrum_bottom"]["from"] == "Lanczos" and info["spectrum_bottom"]["prior_precision"] == 1.0
    assert abs(info["lambda_low"] - float(lam[0])) < 1e-6 * float(lam[-1])  # 3 dims: Lanczos is exact
    assert info["damping_ratio"]["stiffest"] == pytest.approx(0.5, rel=1e-9)
    before = SGHMC_RULE.choose(info["lambda_max"], 0.05, {})  # the rule without lambda_low
    assert info["step_size"] == before["step_size"]
    assert post.metadata["sampler_settings"] == info["settings"] == {"friction": before["friction"]}


def test_lanczos_bottom_is_an_upper_bound_of_lambda_min_within_its_residual():
    """Ritz values lie inside the spectrum: theta_min >= lambda_min, and some eigenvalue lies within the
    residual of theta_min; 40 products put theta_min inside the bottom cluster; a spectrum with a
    negative eigenvalue is found below a floor of 1 and stops there."""
    from pib_bayes.samplers.step_size import lanczos_extremes

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g))
    lam = torch.cat([torch.linspace(1.0, 5.0, 200), torch.linspace(50.0, 3000.0, 100)])
    h = q @ torch.diag(lam) @ q.T
    got = lanczos_extremes(lambda v: [h @ v[0]], [torch.zeros(300)], max_iters=40, min_iters=10)
    assert got.lambda_min >= 1.0 - 1e-9 and got.lambda_max <= 3000.0 + 1e-6
    assert float((lam - got.lambda_min).abs().min()) <= got.residual + 1e-9
    assert got.lambda_min < 5.0 and abs(got.lambda_max - 3000.0) < 1e-3  # inside the bottom cluster [1, 5]
    neg = q @ torch.diag(torch.cat([torch.tensor([-20.0]), lam[1:]])) @ q.T
    got = lanczos_extremes(lambda v: [neg @ v[0]], [torch.zeros(300)], floor=1.0)
    assert got.lambda_min <= 1.0 and got.stopped == "at or below the floor"


def test_sghmc_friction_without_a_known_floor_keeps_the_stiffest_direction_rule_on_negative_curvature():
    """A prior that is not a GaussianPrior has no known precision floor; at a tanh MLP's initial weights
    the Lanczos bottom is negative, so lambda_low is unknown and the friction stays sqrt(eta lambda_max)
    (said in the metadata); the same net under GaussianPrior(1) takes the floor 1 and the capped friction."""

    class PlainNormal:  # N(0, 1) through log_prob only (the autograd path, no closed form)
        def log_prob(self, params):
            return sum(-(w * w).sum() / 2 for w in params.values())

    x, y = pb.data.make_classification_data(n=200, num_classes=3, seed=0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    kw = dict(beta=1 / 200, sampler="sghmc")
    plain = auto_step_size(mlp, "cross_entropy", (x.double(), y), prior=PlainNormal(), **kw)
    assert plain["lambda_low"] is None and plain["spectrum_bottom"]["from"] == "unknown"
    assert plain["spectrum_bottom"]["theta_min"] < 0 and plain["spectrum_bottom"]["prior_precision"] is None
    assert plain["settings"] == {"friction": SGHMC_RULE.choose(plain["lambda_max"], 0.05, {})["friction"]}
    gauss = auto_step_size(mlp, "cross_entropy", (x.double(), y), prior=pb.GaussianPrior(std=1.0), **kw)
    assert gauss["lambda_low"] == 1.0 and gauss["spectrum_bottom"]["from"] == "prior precision"
    assert gauss["settings"]["friction"] < plain["settings"]["friction"] / 5
