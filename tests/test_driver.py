"""pib_bayes.sample: Gibbs posterior recovery, determinism, optimizer equivalence, bad input, divergence."""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
import torch
from stat_helpers import mean_and_mcse
from torch import nn

import pib_bayes as pb
from pib_bayes import Energy, GaussianLoss, GaussianPrior, chain_seeds, sample
from pib_bayes.optim import PSGLD, SGHMC, SGLD, SGNHT
from pib_bayes.samplers import Cyclical


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _blr_data(n=64, d=2, s=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w_star = torch.tensor([1.0, -0.5])[:d]
    y = (x @ w_star + s * torch.randn(n, generator=g)).unsqueeze(1)
    return x, y


def _gibbs_posterior(x, y, beta, s, sigma0):
    """SPEC §2: Lambda = I/sigma0^2 + X^T X/(n beta s^2), mu = Lambda^-1 X^T y/(n beta s^2)."""
    n, d = x.shape
    lam = torch.eye(d) / sigma0**2 + x.T @ x / (n * beta * s**2)
    mu = torch.linalg.solve(lam, x.T @ y[:, 0] / (n * beta * s**2))
    return mu, lam


def _blr_sample(x, y, beta, h, batch_size=None, num_chains=64, num_draws=300, thin=4, seed=0, sampler="sgld"):
    torch.manual_seed(0)  # the chains start at the module's initial weights
    model = nn.Linear(x.shape[1], 1, bias=False)
    lam_min = float(torch.linalg.eigvalsh(_gibbs_posterior(x, y, beta, 1.0, 1.0)[1]).min())
    return sample(model, GaussianLoss(1.0), (x, y), beta=beta, prior=GaussianPrior(std=1.0), sampler=sampler,
                  # warm-up leaves a start-up bias of e^-20
                  step_size=h, num_chains=num_chains, num_warmup=int(20 / (h * lam_min)) + 10,
                  num_draws=num_draws, thin=thin, batch_size=batch_size, seed=seed)


def _moments_with_mcse(w: np.ndarray, mu: np.ndarray):
    """Mean and covariance entries of (chain, draw, d) draws, each with its MCSE (ArviZ ESS)."""
    d = w.shape[-1]
    m = np.zeros(d)
    m_se = np.zeros(d)
    for i in range(d):
        m[i], m_se[i] = mean_and_mcse(w[..., i])
    c = np.zeros((d, d))
    c_se = np.zeros((d, d))
    dev = w - mu  # deviations from the exact mean: unbiased covariance estimator given the mean
    for i in range(d):
        for j in range(d):
            c[i, j], c_se[i, j] = mean_and_mcse(dev[..., i] * dev[..., j])
    return m, m_se, c, c_se


@pytest.mark.parametrize("beta_factor", [1.0, 4.0, 0.25])
def test_blr_full_batch_matches_gibbs_posterior(beta_factor):
    x, y = _blr_data()
    n = x.shape[0]
    beta = beta_factor / n  # beta = 1/n is the Bayesian posterior
    mu, lam = _gibbs_posterior(x, y, beta, 1.0, 1.0)
    lam_max = float(torch.linalg.eigvalsh(lam).max())
    h = 0.15 / lam_max
    post = _blr_sample(x, y, beta, h)
    assert not post.diverged.any()
    w = post.draws["weight"][:, :, 0, :].numpy()
    # unadjusted Langevin's exact stationary law on this quadratic energy:
    # N(mu, Lambda^-1 (I - h Lambda/2)^-1)
    cov = torch.linalg.inv(lam) @ torch.linalg.inv(torch.eye(2) - h * lam / 2)
    m, m_se, c, c_se = _moments_with_mcse(w, mu.numpy())
    assert np.all(np.abs(m - mu.numpy()) < 4 * m_se), (m, mu, m_se)
    assert np.all(np.abs(c - cov.numpy()) < 4 * c_se), (c, cov, c_se)
    # would catch a sampler whose noise is off by sqrt(2): its covariance is half of this
    assert np.all(np.abs(0.5 * cov.numpy().diagonal() - c.diagonal()) > 8 * c_se.diagonal())


def test_blr_minibatch_matches_gibbs_posterior_within_gradient_noise_bias():
    x, y = _blr_data()
    n = x.shape[0]
    beta = 1.0 / n
    mu, lam = _gibbs_posterior(x, y, beta, 1.0, 1.0)
    h = 0.05 / float(torch.linalg.eigvalsh(lam).max())
    post = _blr_sample(x, y, beta, h, batch_size=16)
    w = post.draws["weight"][:, :, 0, :].numpy()
    m, m_se, c, c_se = _moments_with_mcse(w, mu.numpy())
    # the minibatch gradient is unbiased and independent of w: the stationary mean is exactly mu
    assert np.all(np.abs(m - mu.numpy()) < 4 * m_se), (m, mu, m_se)
    # the covariance gains the gradient-noise term; bound it with the with-replacement recursion
    #   Sigma = E[(I - h A_B) Sigma (I - h A_B)^T] + h^2 E[eps eps^T] + 2h I   (solved below)
    # (without-replacement epochs make the noise smaller), plus the step-size term.
    cov_fb = (torch.linalg.inv(lam) @ torch.linalg.inv(torch.eye(2) - h * lam / 2)).numpy()
    cov_wr = _with_replacement_cov(x.numpy(), y.numpy()[:, 0], beta, h, 16, mu.numpy())
    bias = np.abs(cov_wr - cov_fb)
    assert np.all(np.abs(c - cov_fb) < 4 * c_se + bias), (c, cov_fb, cov_wr, c_se)


def _with_replacement_cov(x, y, beta, h, b, mu, batches=20000, seed=0):
    rng = np.random.default_rng(seed)
    n, d = x.shape
    idx = rng.integers(0, n, size=(batches, b))
    xb = x[idx]  # (batches, b, d)
    a = np.einsum("kbi,kbj->kij", xb, xb) / (b * beta) + np.eye(d)
    bb = np.einsum("kbi,kb->ki", xb, y[idx]) / (b * beta)
    eps = np.einsum("kij,j->ki", a, mu) - bb
    m = np.eye(d)[None] - h * a  # (batches, d, d)
    # vec(Sigma) = E[M kron M] vec(Sigma) + vec(h^2 E[eps eps^T] + 2h I)
    kron = np.einsum("kij,kab->iajb", m, m).reshape(d * d, d * d) / batches
    rhs = (h**2 * np.einsum("ki,kj->ij", eps, eps) / batches + 2 * h * np.eye(d)).reshape(-1)
    return np.linalg.solve(np.eye(d * d) - kron, rhs).reshape(d, d)


def test_same_seed_gives_bit_identical_draws_and_chains_differ():
    x, y = _blr_data()
    a = _blr_sample(x, y, 1 / 64, 1e-3, batch_size=8, num_chains=3, num_draws=20, seed=5)
    b = _blr_sample(x, y, 1 / 64, 1e-3, batch_size=8, num_chains=3, num_draws=20, seed=5)
    c = _blr_sample(x, y, 1 / 64, 1e-3, batch_size=8, num_chains=3, num_draws=20, seed=6)
    assert torch.equal(a.draws["weight"], b.draws["weight"])
    assert torch.equal(a.sample_stats["energy"], b.sample_stats["energy"])
    assert not torch.equal(a.draws["weight"], c.draws["weight"])
    w = a.draws["weight"]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


@pytest.mark.parametrize("sampler", ["sgld", "psgld", "sghmc", "csgld", "sgnht"])
@pytest.mark.parametrize("method", ["vectorized", "sequential"])
def test_prefetched_noise_gives_the_same_draws(sampler, method):
    """prefetch_noise=True draws each step's noise during the previous gradient pass: the draws are
    bit-identical to the synchronous run, through cSGLD's noise-free exploration phases too."""
    x, y = _blr_data()
    step = Cyclical(2e-3, cycle_length=10) if sampler == "csgld" else 1e-3
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    runs = [sample(model, GaussianLoss(1.0), (x, y), beta=1 / 64, prior=GaussianPrior(std=1.0),
                   sampler=sampler, step_size=step, num_chains=2, num_warmup=5, num_draws=30, batch_size=8,
                   seed=4, chain_method=method, prefetch_noise=prefetch) for prefetch in (False, True)]
    for k in runs[0].draws:
        assert torch.equal(runs[0].draws[k], runs[1].draws[k])
    assert torch.equal(runs[0].sample_stats["energy"], runs[1].sample_stats["energy"])
    assert runs[1].metadata["prefetch_noise"] and not runs[0].metadata["prefetch_noise"]


@pytest.mark.parametrize("sampler,opt_cls,kwargs", [("sgld", SGLD, {}), ("psgld", PSGLD, {"alpha": 0.9}),
                                                     ("sghmc", SGHMC, {"friction": 0.2}),
                                                     ("sgnht", SGNHT, {"diffusion": 0.5})])
def test_optimizer_and_driver_produce_identical_trajectories(sampler, opt_cls, kwargs):
    x, y = _blr_data()
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    prior = GaussianPrior(std=1.0)
    h, steps, seed = 1e-3, 15, 11
    post = sample(model, GaussianLoss(1.0), (x, y), beta=1 / 64, prior=prior, sampler=sampler, step_size=h,
                  num_chains=1, num_warmup=0, num_draws=steps, seed=seed, sampler_kwargs=kwargs)
    model.load_state_dict(start)
    energy = Energy(model, GaussianLoss(1.0), prior, beta=1 / 64)
    noise_seed = chain_seeds(seed, 1)[0][0]
    opt = opt_cls(model.parameters(), lr=h, generator=torch.Generator().manual_seed(noise_seed), **kwargs)
    for t in range(steps):
        assert torch.equal(post.draws["weight"][0, t], model.weight.detach()), t
        assert torch.equal(post.draws["bias"][0, t], model.bias.detach()), t
        opt.zero_grad()
        u = energy.of_module(x, y)
        # the same value; sample() sums ||w - m||^2 over one flat buffer, of_module per tensor
        torch.testing.assert_close(post.sample_stats["energy"][0, t], u.detach(), rtol=1e-6, atol=0)
        u.backward()
        opt.step()


def test_predict_equals_plain_loop_and_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    x, y = pb.data.make_classification_data(n=120, num_classes=3)
    x, y = x.double(), y
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    post = sample(model, "cross_entropy", (x, y), beta=1 / 120, step_size=1e-3, num_chains=2, num_warmup=20,
                  num_draws=7, batch_size=30, seed=1)
    pred = post.predict(x[:10], chunk_size=3)
    torch.testing.assert_close(post.predict(x[:10]).per_draw, pred.per_draw, rtol=1e-12, atol=1e-12)
    loop = []
    for c in range(2):
        for d in range(7):
            model.load_state_dict({k: v[c, d] for k, v in post.draws.items()})
            with torch.no_grad():
                loop.append(torch.softmax(model(x[:10]), -1))
    loop = torch.stack(loop)
    torch.testing.assert_close(pred.per_draw, loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred.mean, loop.mean(0), rtol=1e-12, atol=1e-12)

    path = tmp_path / "post.pib"
    post.save(path)
    back = pb.Posterior.load(path, model=model)
    for k in post.draws:
        assert torch.equal(back.draws[k], post.draws[k])
    for k in post.sample_stats:
        assert torch.equal(back.sample_stats[k], post.sample_stats[k])
    assert back.metadata == post.metadata
    assert torch.equal(back.predict(x[:10]).mean, pred.mean)
    assert [p.name for p in tmp_path.iterdir()] == ["post.pib"]  # nothing half-written left behind


def test_auto_chunk_keeps_one_layer_of_activations_near_a_megabyte():
    from pib_bayes.posterior import _ACTIVATION_BUDGET, _auto_chunk

    def draws(sizes, m=100):
        return {f"{i}.weight": torch.zeros(m, b, a) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}

    # widest layer 256, 256 inputs: 4 draws of (256 x 256) activations = 2^18 elements
    assert _auto_chunk(draws((784, 256, 256, 10)), torch.zeros(256, 784)) == 1
    assert _auto_chunk(draws((100, 256, 10)), torch.zeros(256, 100)) == 4
    assert _auto_chunk(draws((20, 64, 64, 10)), torch.zeros(256, 20)) == 16
    assert _auto_chunk(draws((20, 64, 64, 10)), torch.zeros(16, 20)) == 64  # capped
    huge = torch.zeros(1, 4000).expand(10**6, 4000)
    assert _auto_chunk(draws((4000, 8, 2)), huge) == 1  # never below one draw
    k = _auto_chunk(draws((20, 64, 64, 10)), torch.zeros(256, 20))
    assert k * 256 * 64 <= _ACTIVATION_BUDGET


@pytest.mark.parametrize("classes", [1, 3, 15, 16, 40])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_softmax_into_matches_torch_softmax(classes, layout):
    """predict's softmax takes a few classes through the outer dim (torch's last-dim kernel is a
    scalar loop below 16 classes); the values must be softmax's, whatever the input's layout."""
    from pib_bayes.posterior import _softmax_into

    g = torch.Generator().manual_seed(classes)
    logits = 5 * torch.randn(4, 33, classes, generator=g, dtype=torch.float64)
    if layout == "transposed":
        logits = logits.transpose(-1, -2).contiguous().transpose(-1, -2)
    dest = torch.empty(4, 33, classes, dtype=torch.float64)
    _softmax_into(logits, dest)
    torch.testing.assert_close(dest, torch.softmax(logits, -1), rtol=1e-14, atol=1e-15)


def test_regression_predict_has_epistemic_and_aleatoric_variance():
    x, y = _blr_data()
    post = _blr_sample(x, y, 1 / 64, 1e-3, num_chains=2, num_draws=30)
    pred = post.predict(x[:5])
    w = post.draws["weight"][:, :, 0, :].reshape(-1, 2)
    outs = w @ x[:5].T
    torch.testing.assert_close(pred.mean[:, 0], outs.mean(0))
    torch.testing.assert_close(pred.epistemic_variance[:, 0], outs.var(0, unbiased=False))
    torch.testing.assert_close(pred.aleatoric_variance, torch.ones_like(pred.mean))  # GaussianLoss(1.0)
    torch.testing.assert_close(pred.variance, pred.epistemic_variance + 1.0)


@pytest.mark.parametrize("kwargs,needle", [
    ({"beta": 0.0}, "beta"), ({"beta": -1.0}, "beta"), ({"beta": math.nan}, "beta"),
    ({"step_size": 0.0}, "step_size"), ({"step_size": -1e-3}, "step_size"),
    ({"num_chains": 0}, "num_chains"), ({"num_draws": 0}, "num_draws"), ({"thin": 0}, "thin"),
    ({"num_warmup": -1}, "num_warmup"), ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 1000}, "batch_size"),
    ({"sampler": "nuts"}, "sampler"), ({"keep": ["nope"]}, "keep"), ({"chain_method": "gpu"}, "chain_method"),
    ({"seed": -3}, "seed"), ({"prior": -1.0}, "prior"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, needle):
    x, y = _blr_data()
    args = {"beta": 1 / 64, "step_size": 1e-3, "num_warmup": 1, "num_draws": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        sample(nn.Linear(2, 1), "gaussian", (x, y), **args)


@pytest.mark.parametrize("data,needle", [
    ((torch.zeros(0, 2), torch.zeros(0, 1)), "empty"),
    ((torch.zeros(5, 2), torch.zeros(4, 1)), "5 examples but y has 4"),
    ((torch.tensor([[math.nan, 0.0]]), torch.zeros(1, 1)), "NaN"),
    ((torch.zeros(3, 2), torch.tensor([[math.inf]] * 3)), "NaN or Inf"),
    ((torch.zeros(3, 2),), "length 1"),
])
def test_bad_data_raises(data, needle):
    with pytest.raises(ValueError, match=needle):
        sample(nn.Linear(2, 1), "gaussian", data, beta=0.1, num_warmup=1, num_draws=1)


def test_diverging_chain_is_flagged_and_others_keep_their_draws():
    # quartic loss: stable near 0, explosive from far away at this step size
    x = torch.ones(10, 1)
    y = torch.zeros(10, 1)
    model = nn.Linear(1, 1, bias=False)
    init = {"weight": torch.tensor([[[0.1]], [[30.0]], [[0.2]]])}

    def quartic(out, target):
        return (out - target).pow(4).squeeze(1)

    post = sample(model, quartic, (x, y), beta=1.0, prior=GaussianPrior(std=10.0), step_size=0.01,
                  task="regression", num_chains=3, num_warmup=0, num_draws=50, init=init, seed=0)
    assert post.diverged.tolist() == [False, True, False]
    step = int(post.divergence_step[1])
    assert 0 < step < 50
    assert torch.isfinite(post.draws["weight"][[0, 2]]).all()
    assert torch.isnan(post.draws["weight"][1, step:]).all()
    assert post.sample_stats["diverging"][1, step:].all() and not post.sample_stats["diverging"][[0, 2]].any()
    with pytest.warns(UserWarning, match=r"chains \[1\] diverged"):
        pred = post.predict(x[:2])
    assert pred.per_draw.shape[0] == 2 * 50 and torch.isfinite(pred.mean).all()
    assert post.predict(x[:2], include_diverged=True).per_draw.shape[0] == 150


def test_buffers_are_held_fixed_not_sampled_and_keep_limits_storage():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    model.train()
    model(x)  # give BatchNorm non-trivial running statistics
    post = sample(model, "gaussian", (x, y), beta=0.1, step_size=1e-3, num_chains=2, num_warmup=5,
                  num_draws=4, keep=["2.weight"], seed=0)
    assert list(post.draws) == ["2.weight"]
    assert "1.running_mean" in post.fixed and "0.bias" in post.fixed
    assert torch.equal(post.fixed["1.running_mean"], model[1].running_mean)
    assert "0.bias" not in post.metadata["sampled_params"]
    assert model.training  # the module's mode is restored
    with pytest.warns(UserWarning, match=r"no draws of \['0.weight'"):
        assert post.predict(x).per_draw.shape == (8, 32, 1)


def test_metadata_records_the_run():
    x, y = _blr_data()
    post = _blr_sample(x, y, 1 / 64, 1e-3, num_chains=2, num_draws=3, seed=9)
    md = post.metadata
    assert md["beta"] == 1 / 64 and md["seed"] == 9 and md["sampler"] == "sgld"
    assert md["version"] == pb.__version__ and md["schedule"]["type"] == "Constant"
    assert md["chain_method"] in ("vectorized", "sequential") and md["n"] == 64


def test_chain_ids_reproduce_the_chains_of_the_full_run():
    x, y = _blr_data()
    full = _blr_sample(x, y, 1 / 64, 1e-3, batch_size=8, num_chains=4, num_draws=10, seed=2)
    torch.manual_seed(0)
    part = sample(nn.Linear(2, 1, bias=False), GaussianLoss(1.0), (x, y), beta=1 / 64,
                  prior=GaussianPrior(std=1.0), step_size=1e-3, num_chains=4, chain_ids=[3, 1],
                  num_warmup=int(20 / (1e-3 * float(torch.linalg.eigvalsh(_gibbs_posterior(
                      x, y, 1 / 64, 1.0, 1.0)[1]).min()))) + 10,
                  num_draws=10, thin=4, batch_size=8, seed=2, chain_method="sequential")
    torch.testing.assert_close(part.draws["weight"], full.draws["weight"][[3, 1]], rtol=1e-12, atol=1e-12)
    assert part.metadata["chain_ids"] == [3, 1]
    with pytest.raises(ValueError, match="chain_ids"):
        sample(nn.Linear(2, 1), "gaussian", (x, y), beta=0.1, num_chains=2, chain_ids=[2], num_draws=1)


def test_one_chain_run_hands_the_module_back_with_its_own_parameters_even_on_error():
    # a one-chain run puts leaf views of the chain's weights into the module for the whole run (issue 17);
    # afterwards, and after an error mid-run, the module holds its own Parameter objects and values again
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    own = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in own.items()}
    x, y = torch.randn(40, 3), torch.randn(40, 2)
    sample(model, "gaussian", (x, y), beta=1 / 40, step_size=1e-3, num_warmup=3, num_draws=3, seed=0)
    calls = []

    def exploding(out, target):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("boom")
        return ((out - target) ** 2).sum(1)

    with pytest.raises(RuntimeError, match="boom"):
        sample(model, exploding, (x, y), beta=1 / 40, step_size=1e-3, num_warmup=10, num_draws=3, seed=0,
               task="regression")
    for n, p in model.named_parameters():
        assert p is own[n] and isinstance(p, nn.Parameter) and torch.equal(p, values[n])
        assert p.grad is None  # nothing accumulated into the user's parameters


def test_one_chain_direct_step_equals_the_functional_step():
    # the direct one-chain gradient (module called on its own swapped-in weights, prior gradient in a
    # persistent buffer) gives exactly the functional_call estimator's numbers
    from pib_bayes.driver.chains import _Sampler

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x, y = torch.randn(30, 3), torch.randint(0, 2, (30,))
    direct = sample(model, "cross_entropy", (x, y), beta=1 / 30, prior=0.5, step_size=1e-2, num_warmup=5,
                    num_draws=20, batch_size=10, seed=4)
    original = _Sampler.bound

    @contextlib.contextmanager
    def no_direct(self, group):
        yield

    _Sampler.bound = no_direct
    try:
        functional = sample(model, "cross_entropy", (x, y), beta=1 / 30, prior=0.5, step_size=1e-2,
                            num_warmup=5, num_draws=20, batch_size=10, seed=4)
    finally:
        _Sampler.bound = original
    for n in direct.draws:
        assert torch.equal(direct.draws[n], functional.draws[n]), n
    assert torch.equal(direct.sample_stats["loss"], functional.sample_stats["loss"])
    torch.testing.assert_close(direct.sample_stats["energy"], functional.sample_stats["energy"])


def test_sample_takes_an_energy_as_the_loss():
    # an Energy carries loss, prior and beta: the same draws as giving them one by one
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x, y = torch.randn(30, 3), torch.randint(0, 2, (30,))
    kw = {"step_size": 1e-2, "num_warmup": 5, "num_draws": 10, "batch_size": 10, "seed": 2}
    energy = Energy(model, "cross_entropy", prior=0.5, beta=1 / 30)
    a = sample(model, energy, (x, y), **kw)
    b = sample(model, "cross_entropy", (x, y), beta=1 / 30, prior=0.5, **kw)
    for n in a.draws:
        assert torch.equal(a.draws[n], b.draws[n]), n
    assert a.metadata["beta"] == b.metadata["beta"] and a.metadata["prior"] == b.metadata["prior"]
    with pytest.raises(ValueError, match="beta: the Energy"):
        sample(model, energy, (x, y), beta=0.1, **kw)
    with pytest.raises(ValueError, match="loss_fn: the Energy is built on another module"):
        sample(nn.Linear(3, 2), energy, (x, y), **kw)
    with pytest.raises(TypeError, match="beta: sample"):
        sample(model, "cross_entropy", (x, y), **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_one_chain_fast_path_records_what_the_tensor_path_records(dtype):
    """A one-chain CPU run writes its draws and scalars through numpy views, U and the loss as Python
    floats; a stat function sends it down the tensor path: the same draws and statistics, to the bit
    (bfloat16 has no numpy view: the tensor path in both)."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 3).to(dtype), torch.randint(0, 2, (40,))

    def run(**kw):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bfloat16's precision warning
            return sample(model, "cross_entropy", (x, y), beta=0.03, prior=0.6, step_size=1e-3, num_warmup=7,
                          num_draws=11, thin=2, batch_size=8, seed=5, keep=["2.bias", "0.weight"], **kw)

    fast, tensor = run(), run(stat_fns={"w": lambda p: p["2.bias"].sum()})
    for name in ["2.bias", "0.weight"]:
        assert torch.equal(fast.draws[name], tensor.draws[name])
    for name in ["energy", "loss", "step_size"]:
        a, b = torch.as_tensor(fast.sample_stats[name]), torch.as_tensor(tensor.sample_stats[name])
        assert not a.isnan().any() and torch.equal(a, b)
