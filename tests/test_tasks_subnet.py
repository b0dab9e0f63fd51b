"""Issue #16 (part B): explicit tasks and the built-in likelihoods, per-draw noise in the regression
summaries, subnetwork sampling (``params=``) and posteriors from your own loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

import pib_bayes as pb
from pib_bayes import (
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    DrawCollector,
    GaussianLoss,
    GaussianPrior,
    HeteroscedasticGaussianLoss,
    Posterior,
)
from pib_bayes.optim import SGLD
from pib_bayes.subnet import select_params
from pib_bayes.uncertainty import (
    classification_uncertainty,
    coverage,
    credible_interval,
    mixture_nll,
    regression_uncertainty,
)
from tests.stat_helpers import mcse_of_mean

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cls_data(n: int = 32, k: int = 3):
    g = _gen(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, k, (n,), generator=g)


def _short(**kw):
    return dict(beta=1 / 32, step_size=1e-3, num_warmup=5, num_draws=4, seed=0, **kw)


# ------------------------------------------------------------------------------------------- tasks
def test_custom_callable_without_task_is_an_error_naming_task():
    x, y = _cls_data()

    def my_loss(out, target):
        return F.cross_entropy(out, target, reduction="none", label_smoothing=0.1)

    with pytest.raises(ValueError, match="task='classification'"):
        pb.sample(nn.Linear(4, 3), my_loss, (x, y), **_short())
    post = pb.sample(nn.Linear(4, 3), my_loss, (x, y), task="classification", **_short())
    probs = post.predict(x).mean
    assert post.task == "classification" and torch.allclose(probs.sum(-1), torch.ones(len(x)))


def test_loss_with_a_task_attribute_and_known_torch_losses_need_no_task():
    x, y = _cls_data()

    class Tagged:
        task = "classification"

        def __call__(self, out, target):
            return F.cross_entropy(out, target, reduction="none")

    assert pb.sample(nn.Linear(4, 3), Tagged(), (x, y), **_short()).task == "classification"
    assert pb.sample(nn.Linear(4, 3), nn.CrossEntropyLoss(reduction="none"), (x, y), **_short()).task \
        == "classification"


@pytest.mark.parametrize("loss", ["cross_entropy", CrossEntropyLoss(label_smoothing=0.1), "bce_with_logits"])
def test_regression_task_with_a_classification_loss_is_rejected(loss):
    x, y = _cls_data()
    with pytest.raises(ValueError, match="contradicts"):
        pb.sample(nn.Linear(4, 3), loss, (x, y), task="regression", **_short())


def test_classification_task_with_a_gaussian_loss_is_rejected():
    with pytest.raises(ValueError, match="contradicts"):
        pb.Energy(nn.Linear(2, 1), GaussianLoss(0.5), task="classification")


def test_label_smoothing_matches_torch_and_rejects_bad_values():
    g = _gen(1)
    out, y = torch.randn(7, 5, generator=g), torch.randint(0, 5, (7,), generator=g)
    ref = F.cross_entropy(out, y, reduction="none", label_smoothing=0.2)
    assert torch.allclose(CrossEntropyLoss(label_smoothing=0.2)(out, y), ref)
    assert torch.allclose(pb.energy.resolve_loss("cross_entropy")[0](out, y),
                          F.cross_entropy(out, y, reduction="none"))
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing"):
            CrossEntropyLoss(label_smoothing=bad)


def test_posterior_constructor_task():
    model = nn.Linear(2, 3)
    draws = {n: p.detach().expand(1, 2, *p.shape).clone() for n, p in model.named_parameters()}
    x = torch.randn(5, 2)
    with pytest.raises(ValueError, match="task="):
        Posterior(draws, {}, {}, model=model).predict(x)  # no silent regression default
    post = Posterior(draws, {}, {}, model=model, task="classification")
    assert post.metadata["task"] == "classification"
    assert torch.allclose(post.predict(x).mean, torch.softmax(model(x), -1), atol=1e-6)
    assert Posterior(draws, {}, {"task": "regression"}).task == "regression"
    with pytest.raises(ValueError, match="contradicts"):
        Posterior(draws, {}, {"task": "regression"}, task="classification")
    with pytest.raises(ValueError, match="task"):
        Posterior(draws, {}, {}, task="clf")


def test_bce_with_logits_predicts_sigmoid_probabilities():
    g = _gen(2)
    x = torch.randn(40, 2, generator=g)
    y = (x[:, 0] > 0).float()
    model = nn.Linear(2, 1)
    post = pb.sample(model, "bce_with_logits", (x, y), beta=1 / 40, step_size=1e-2, num_chains=2,
                     num_warmup=20, num_draws=10, seed=0)
    assert post.task == "classification" and post.metadata["likelihood"] == "bernoulli"
    pred = post.predict(x)
    assert pred.per_draw.shape == (20, 40, 2)
    w, b = post.draws_for_prediction()["weight"], post.draws_for_prediction()["bias"]
    p1 = torch.sigmoid(torch.einsum("mij,nj->mn", w, x) + b)  # loop-free reference
    assert torch.allclose(pred.per_draw[..., 1], p1, atol=1e-6)
    assert torch.allclose(pred.per_draw.sum(-1), torch.ones(20, 40))
    with pytest.raises(ValueError, match=r"targets in \[0, 1\]"):
        pb.sample(model, "bce_with_logits", (x, 2 * y), **_short())
    u = classification_uncertainty(pred, y.long())
    assert 0 <= u.accuracy <= 1 and u.nll > 0
    # the loss itself: the Bernoulli NLL, one value per example
    assert torch.allclose(BCEWithLogitsLoss()(torch.zeros(3, 1), torch.tensor([0, 1, 1])),
                          torch.full((3,), math.log(2)))


# --------------------------------------------------------------------------- heteroscedastic
def test_heteroscedastic_loss_is_the_gaussian_nll_in_mean_and_log_std():
    g = _gen(3)
    out, y = torch.randn(6, 4, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64)
    mu, log_s = out[:, :2], out[:, 2:]
    loss = HeteroscedasticGaussianLoss()
    ref = -torch.distributions.Normal(mu, log_s.exp()).log_prob(y).sum(1)
    assert torch.allclose(loss.nll(out, y), ref)
    assert torch.allclose(loss(out, y), ref - 2 * 0.5 * math.log(2 * math.pi))
    with pytest.raises(ValueError, match="even last dimension"):
        loss(torch.zeros(3, 3), torch.zeros(3, 1))


def test_heteroscedastic_predict_is_the_mixture_over_draws():
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 2))
    g = _gen(4)
    x = torch.randn(30, 1, generator=g)
    y = torch.randn(30, 1, generator=g)
    post = pb.sample(model, "heteroscedastic_gaussian", (x, y), beta=1 / 30, step_size=1e-3, num_chains=2,
                     num_warmup=10, num_draws=5, seed=0)
    pred = post.predict(x)
    outs = torch.stack([torch.func.functional_call(model, {k: v[m] for k, v in
                                                           post.draws_for_prediction().items()}, (x,))
                        for m in range(10)])
    mu, sd = outs[..., 0], outs[..., 1].exp()
    assert torch.allclose(pred.mean, mu.mean(0), atol=1e-6)
    assert torch.allclose(pred.per_draw_noise_std, sd, atol=1e-6)
    mixture_var = (sd.square() + mu.square()).mean(0) - mu.mean(0).square()
    assert torch.allclose(pred.variance, mixture_var, atol=1e-5)
    u = regression_uncertainty(pred, y)
    assert torch.allclose(u.variance, mixture_var, atol=1e-5)
    assert u.nll_mixture == pytest.approx(mixture_nll(y, mu, sd), rel=1e-6)


def test_credible_interval_with_per_draw_noise_hits_the_mixture_quantiles():
    g = _gen(5)
    f = torch.randn(7, 4, generator=g, dtype=F64)
    s = torch.rand(7, 4, generator=g, dtype=F64) + 0.1
    lo, hi = credible_interval(f, 0.8, noise_std=s)
    cdf = lambda v: norm.cdf((v.numpy()[None] - f.numpy()) / s.numpy()).mean(0)  # noqa: E731
    assert np.allclose(cdf(lo), 0.1, atol=1e-8) and np.allclose(cdf(hi), 0.9, atol=1e-8)
    # one noise per point, spelled per draw, gives the same interval as spelled per point
    same = credible_interval(f, 0.8, noise_std=s[0].expand(7, 4))
    assert torch.allclose(same[0], credible_interval(f, 0.8, noise_std=s[0])[0])
    with pytest.raises(ValueError, match="one per draw"):
        credible_interval(f, 0.8, noise_std=torch.ones(6, 4))
    expected = -np.log(norm.pdf((0.0 - f.numpy()) / s.numpy()).__truediv__(s.numpy()).mean(0)).mean()
    assert mixture_nll(torch.zeros(4), f, s) == pytest.approx(expected, rel=1e-10)


class _RegionFeatures(nn.Module):
    """Fixed features of x in [-1, 1]: an intercept and a standardised slope per half."""

    def forward(self, x):
        x = x[:, :1]
        r = (x > 0).to(x.dtype)
        z = (x - (r - 0.5)) * math.sqrt(12.0)
        return torch.cat([1 - r, r, z * (1 - r), z * r], dim=1)


def _two_noise_data(n: int, g: torch.Generator, low: float = 0.1, high: float = 1.0):
    x = torch.rand(n, 1, generator=g, dtype=F64) * 2 - 1
    return x, 2 * x + torch.where(x > 0, high, low) * torch.randn(n, 1, generator=g, dtype=F64)


def test_heteroscedastic_intervals_cover_in_low_and_high_noise_regions():
    """A heteroscedastic model (mean and log-std linear in fixed features) fitted by SGLD at beta = 1/n:
    its 90% intervals cover within 4 binomial SE, sqrt(0.9 * 0.1 / n_region), on fresh points in the
    low-noise (s = 0.1) and the high-noise (s = 1) half. The posterior's own spread (sd of log s about
    1/sqrt(2 * 4000)) moves the conditional coverage by ~0.004, well inside that. Wrong-variant twin:
    the same draws with one pooled s for all points must fail the check (over- and under-cover)."""
    g = _gen(0)
    x, y = _two_noise_data(8000, g)
    xt, yt = _two_noise_data(4000, g)
    model = nn.Sequential(_RegionFeatures(), nn.Linear(4, 2, bias=False)).double()
    nn.init.zeros_(model[1].weight)
    post = pb.sample(model, "heteroscedastic_gaussian", (x, y), beta=1 / len(x),
                     prior=GaussianPrior(std=10.0), step_size=1e-6, num_chains=2, num_warmup=3000,
                     num_draws=200, thin=5, seed=0)
    pred = post.predict(xt)
    u = regression_uncertainty(pred, yt, level=0.9)
    pooled = credible_interval(pred.per_draw, 0.9, noise_std=float(pred.aleatoric_variance.mean().sqrt()))
    low = xt[:, 0] <= 0
    for mask in (low, ~low):
        tol = 4 * math.sqrt(0.9 * 0.1 / int(mask.sum()))
        assert abs(coverage(yt[mask], u.lower[mask], u.upper[mask]) - 0.9) < tol
    pooled_ok = [abs(coverage(yt[m], pooled[0][m], pooled[1][m]) - 0.9) < 4 * math.sqrt(0.09 / int(m.sum()))
                 for m in (low, ~low)]
    assert not all(pooled_ok)


# ------------------------------------------------------------------------------------- subnetworks
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def test_select_params_names_globs_modules_and_errors():
    net = _net()
    assert select_params(net, "2.*") == ["2.weight", "2.bias"]
    assert select_params(net, ["0.weight", net[2].bias]) == ["0.weight", "2.bias"]
    assert select_params(net, net[2]) == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match="matches no parameter"):
        select_params(net, "head.*")
    with pytest.raises(ValueError, match="empty"):
        select_params(net, [])
    with pytest.raises(ValueError, match="not a submodule"):
        select_params(net, nn.Linear(8, 1))
    with pytest.raises(ValueError, match="no parameters"):
        select_params(net, net[1])
    with pytest.raises(ValueError, match="not a parameter"):
        select_params(net, torch.zeros(3))
    with pytest.raises(TypeError, match="params"):
        select_params(net, [3])


def test_tied_parameters_are_selected_once_by_identity():
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.Tanh(), shared)
    assert select_params(net, net[2]) == ["0.weight", "0.bias"]


def test_sample_params_samples_only_the_selection_and_holds_the_rest():
    net = _net()
    body = {k: v.detach().clone() for k, v in net[0].state_dict().items()}
    g = _gen(6)
    x, y = torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)
    post = pb.sample(net, "gaussian", (x, y), params=net[2], **_short(num_chains=2))
    assert post.param_names == ["2.weight", "2.bias"] and post.metadata["sampled_params"] == post.param_names
    assert torch.equal(post.fixed["0.weight"], body["weight"]) and torch.equal(net[0].weight, body["weight"])
    assert post.predict(x).mean.shape == (32, 1)
    net[2].requires_grad_(False)  # params= takes precedence over requires_grad
    frozen = pb.sample(net, "gaussian", (x, y), params="2.*", **_short(num_chains=2))
    assert frozen.param_names == ["2.weight", "2.bias"] and not torch.equal(frozen.draws["2.bias"][0, 0],
                                                                             frozen.draws["2.bias"][0, -1])
    # a float prior is centred on the selection's initial weights, frozen or not: at the first draw (the
    # initial weights, no warm-up) U - loss/beta = -log p(w0) = D (log 1 + log(2 pi)/2)
    first = pb.sample(net, "gaussian", (x, y), params="2.*", prior=1.0, step_size=1e-3, beta=1 / 32,
                      num_warmup=0, num_draws=2, seed=0)
    neg_log_prior = float(first.sample_stats["energy"][0, 0] - first.sample_stats["loss"][0, 0] * 32)
    assert neg_log_prior == pytest.approx(9 * 0.5 * math.log(2 * math.pi), rel=1e-5)
    with pytest.raises(ValueError, match="keep: unknown"):
        pb.sample(net, "gaussian", (x, y), params="2.*", keep=["0.weight"], **_short())
    with pytest.raises(ValueError, match="matches no parameter"):
        pb.sample(net, "gaussian", (x, y), params="head.weight", **_short())


def _blr_setup(n: int = 64, width: int = 8, s: float = 0.5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 1, bias=False)).double()
    g = _gen(0)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    with torch.no_grad():
        phi = model[1](model[0](x))
        y = (phi @ torch.randn(width, generator=g, dtype=F64) + s * torch.randn(n, generator=g, dtype=F64))
    return model, x, y.unsqueeze(1), phi


def _blr_oracle(phi, y, beta, s, s0, h):
    """SPEC §2: Lambda = I/s0^2 + Phi^T Phi/(n beta s^2), mu = Lambda^-1 Phi^T y/(n beta s^2); full-batch
    SGLD's exact stationary covariance at step h is Lambda^-1 (I - h Lambda/2)^-1 (same mean)."""
    n, d = phi.shape
    eye = torch.eye(d, dtype=F64)
    lam = eye / s0**2 + phi.T @ phi / (n * beta * s**2)
    mu = torch.linalg.solve(lam, phi.T @ y[:, 0] / (n * beta * s**2))
    return mu, torch.linalg.inv(lam) @ torch.linalg.inv(eye - h * lam / 2), lam


def _max_z(w: np.ndarray, mu, cov) -> tuple[float, float]:
    """Largest |z| over coordinates of the mean and of the variance, z = error / MCSE (ESS from ArviZ)."""
    zm, zv = [], []
    for j in range(w.shape[-1]):
        a = w[..., j]
        zm.append((a.mean() - float(mu[j])) / mcse_of_mean(a))
        sq = (a - float(mu[j])) ** 2
        zv.append((sq.mean() - float(cov[j, j])) / mcse_of_mean(sq))
    return float(np.abs(zm).max()), float(np.abs(zv).max())


def test_last_layer_posterior_matches_bayesian_linear_regression_on_the_features():
    """Last-layer Bayesian: a fixed random tanh body, a linear Gaussian head sampled with params=; the head's
    draws match the closed-form posterior on the body's features (means and variances within 4 MCSE
    over 8 coordinates). Twin: the oracle at beta doubled must fail the same check on the same draws."""
    s, s0 = 0.5, 0.3
    model, x, y, phi = _blr_setup(s=s)
    beta = 1 / len(x)
    lam_max = float(torch.linalg.eigvalsh(_blr_oracle(phi, y, beta, s, s0, 0.0)[2]).max())
    h = 0.2 / lam_max
    post = pb.sample(model, GaussianLoss(s), (x, y), beta=beta, prior=GaussianPrior(std=s0), params=model[2],
                     step_size=h, num_chains=32, num_warmup=1000, num_draws=2000, seed=1)
    assert post.param_names == ["2.weight"]
    w = post.draws["2.weight"][:, :, 0, :].numpy()
    mu, cov, _ = _blr_oracle(phi, y, beta, s, s0, h)
    zm, zv = _max_z(w, mu, cov)
    assert zm < 4 and zv < 4
    mu2, cov2, _ = _blr_oracle(phi, y, 2 * beta, s, s0, h)
    assert max(_max_z(w, mu2, cov2)) > 4


# ------------------------------------------------------------------------------------ own loop
def test_from_draws_accepts_every_form_with_warmup_and_thinning():
    net = nn.Linear(2, 1)
    shapes = {n: p.shape for n, p in net.named_parameters()}
    trail = [[{n: torch.full(shapes[n], float(100 * c + i)) for n in shapes} for i in range(10)]
             for c in range(2)]
    a = Posterior.from_draws(net, trail, loss="gaussian", num_warmup=3, thin=3)
    assert a.draws["weight"].shape == (2, 3, 1, 2)
    assert a.draws["bias"][:, :, 0].tolist() == [[3.0, 6.0, 9.0], [103.0, 106.0, 109.0]]
    stacked = {n: torch.stack([torch.stack([d[n] for d in ch]) for ch in trail]) for n in shapes}
    b = Posterior.from_draws(net, stacked, task="regression", num_warmup=3, thin=3)
    assert torch.equal(a.draws["weight"], b.draws["weight"])
    one = Posterior.from_draws(net, {n: v[0] for n, v in stacked.items()}, task="regression")
    assert one.num_chains == 1 and one.num_draws == 10
    single = Posterior.from_draws(net, trail[0], task="regression")
    assert torch.equal(single.draws["bias"], one.draws["bias"])
    assert a.metadata["thin"] == 3 and a.metadata["num_warmup"] == 3 and a.metadata["noise_std"] == 1.0


def test_from_draws_errors():
    net = nn.Linear(2, 1)
    live = [net.state_dict() for _ in range(3)]  # views of the live weights, not copies
    with pytest.raises(ValueError, match="share the memory"):
        Posterior.from_draws(net, live, task="regression")
    copies = [{k: v.clone() for k, v in net.state_dict().items()} for _ in range(3)]
    with pytest.raises(ValueError, match="task="):
        Posterior.from_draws(net, copies)
    with pytest.raises(ValueError, match="task="):
        Posterior.from_draws(net, copies, loss=lambda o, t: (o - t).square().squeeze(1))
    with pytest.raises(ValueError, match="different numbers"):
        Posterior.from_draws(net, [copies, copies[:2]], task="regression")
    with pytest.raises(ValueError, match="num_warmup"):
        Posterior.from_draws(net, copies, task="regression", num_warmup=3)
    with pytest.raises(ValueError, match="not a parameter"):
        Posterior.from_draws(net, {"w": torch.zeros(3, 1, 2)}, task="regression")
    with pytest.raises(ValueError, match="shape"):
        Posterior.from_draws(net, {"weight": torch.zeros(3, 2)}, task="regression")


def test_draw_collector_matches_the_optimizer_loop_and_predicts_with_the_loss_noise():
    g = _gen(7)
    x, y = torch.randn(32, 2, generator=g), torch.randn(32, 1, generator=g)
    net = nn.Linear(2, 1)
    energy = pb.Energy(net, GaussianLoss(0.5), prior=1.0, beta=1 / 32)
    collectors = [DrawCollector(net, num_warmup=5, thin=2) for _ in range(2)]
    manual: list[list[dict]] = [[], []]
    for chain in range(2):
        opt = SGLD(net.parameters(), lr=1e-3, generator=_gen(10 + chain))
        for _ in range(15):
            opt.zero_grad()
            u = energy.of_module(x, y)
            u.backward()
            opt.step()
            manual[chain].append({k: v.detach().clone() for k, v in net.named_parameters()})
            for col in collectors:
                col.add(net, chain=chain, energy=float(u.detach()))
    post = collectors[0].posterior(loss=energy)  # the Energy: task, loss, beta and prior
    assert post.metadata["beta"] == 1 / 32 and post.task == "regression"
    ref = Posterior.from_draws(net, manual, loss=energy.loss_fn, num_warmup=5, thin=2)
    assert post.num_chains == 2 and post.num_draws == 5
    assert torch.equal(post.draws["weight"], ref.draws["weight"])
    assert post.sample_stats["energy"].shape == (2, 5)
    pred = post.predict(x)
    assert torch.allclose(pred.aleatoric_variance, torch.full_like(pred.mean, 0.25))
    with pytest.raises(ValueError, match="task="):
        collectors[1].posterior()
    with pytest.raises(ValueError, match="no draw"):
        DrawCollector(net, num_warmup=5).posterior(task="regression")


def test_log_likelihood_uses_the_bernoulli_and_heteroscedastic_likelihoods():
    from pib_bayes.diagnostics import log_likelihood

    g = _gen(8)
    x = torch.randn(20, 2, generator=g)
    yb = (x[:, 0] > 0).float()
    post = pb.sample(nn.Linear(2, 1), "bce_with_logits", (x, yb), **_short(num_chains=2))
    w = post.draws["weight"]
    logits = torch.einsum("cnij,bj->cnb", w, x) + post.draws["bias"]
    ref = torch.distributions.Bernoulli(logits=logits).log_prob(yb)
    assert torch.allclose(log_likelihood(post, x, yb), ref, atol=1e-5)
    yr = torch.randn(20, 1, generator=g)
    post = pb.sample(nn.Linear(2, 2), "heteroscedastic_gaussian", (x, yr), **_short(num_chains=2))
    out = torch.einsum("cnij,bj->cnbi", post.draws["weight"], x) + post.draws["bias"][:, :, None]
    ref = torch.distributions.Normal(out[..., 0], out[..., 1].exp()).log_prob(yr[:, 0])
    assert torch.allclose(log_likelihood(post, x, yr), ref, atol=1e-5)
