"""Tests of pib_bayes.bounds: the bound formulas, their ordering and monotonicity, and coverage of the
reported bound over many resamples of a classification problem whose true risk is known exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.special import gammaln, logsumexp
from scipy.stats import binom, norm
from torch import nn

import pib_bayes as pb
from pib_bayes import bounds as B

probs = st.floats(0.0, 0.999, allow_nan=False)
budgets = st.floats(1e-8, 8.0, allow_nan=False)
kls = st.floats(0.0, 500.0, allow_nan=False)
ns = st.integers(1, 10**6)
deltas = st.floats(1e-4, 0.5, allow_nan=False)


def brentq_kl_inverse(q: float, c: float) -> float:
    f = lambda p: B.binary_kl(q, p) - c  # noqa: E731
    hi = 1.0 - 1e-16
    if f(hi) <= 0:
        return 1.0
    return brentq(f, q, hi, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500)


# ------------------------------------------------------------------------------ kl inverse
@settings(max_examples=300, deadline=None)
@given(q=probs, c=budgets)
def test_kl_inverse_matches_brentq_to_1e9(q, c):
    p = B.kl_inverse(q, c)
    assert abs(p - brentq_kl_inverse(q, c)) <= 1e-9
    assert p >= q
    # conservative side: kl(q||p) >= c unless p hit 1
    assert p == 1.0 or B.binary_kl(q, p) >= c - 1e-12


def test_kl_inverse_closed_forms():
    for c in (1e-6, 0.01, 0.3, 2.0):
        assert B.kl_inverse(0.0, c) == pytest.approx(-math.expm1(-c), abs=1e-11)  # kl(0||p) = -log(1-p)
    assert B.kl_inverse(0.3, 0.0) == 0.3
    assert B.kl_inverse(1.0, 0.5) == 1.0
    assert B.kl_inverse(0.2, math.inf) == 1.0
    assert B.binary_kl(0.5, 0.25) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-15)


@settings(max_examples=300, deadline=None)
@given(q=probs, kl=kls, n=ns, delta=deltas)
def test_kl_inverse_never_looser_than_mcallester(q, kl, n, delta):
    tight = B.kl_inverse_bound(q, kl, n, delta).value
    mca = B.mcallester_bound(q, kl, n, delta).value
    assert tight <= mca + 1e-12  # Pinsker: kl(q||p) >= 2 (p - q)^2
    assert tight <= 1.0


@settings(max_examples=200, deadline=None)
@given(q=probs, kl=kls, n=ns, delta=deltas, c=st.floats(1e-3, 50.0))
def test_catoni_is_a_relaxation_of_the_kl_bound(q, kl, n, delta, c):
    # kl(q||p) = sup_C [-C q - log(1 - p (1 - e^{-C}))], so for every fixed C Catoni's bound with budget
    # (KL + log(1/delta))/n is >= the kl-inverse with the same budget (and the inf over C equals it)
    cat = B.catoni_bound(q, kl, n, delta, c=c).value
    inv = B.kl_inverse(q, (kl + math.log(1 / delta)) / n)
    assert cat >= inv - 1e-9


def test_catoni_grid_minimum_reaches_the_kl_inverse():
    for q, kl, n in [(0.1, 5.0, 1000), (0.0, 20.0, 300), (0.4, 1.0, 50)]:
        delta = 0.05
        inv = B.kl_inverse(q, (kl + math.log(1 / delta)) / n)
        # the grid only tells which C to use; compare at each C without the union-bound penalty
        best = min(B.catoni_bound(q, kl, n, delta, c=float(c)).value for c in np.geomspace(1e-3, 100, 4000))
        assert inv - 1e-9 <= best <= inv + 1e-3  # kl_inverse is at most 1e-12 above the exact value
    # a grid of k values costs log(k): the grid bound equals the single-C bound at delta/k
    grid = (0.5, 1.0, 2.0)
    b = B.catoni_bound(0.1, 5.0, 1000, 0.05, c=grid)
    single = B.catoni_bound(0.1, 5.0, 1000, 0.05 / 3, c=b.details["C"])
    assert b.value == pytest.approx(single.value, abs=1e-15)


def test_catoni_and_mcallester_exact_values():
    q, kl, n, delta = 0.1, 5.0, 1000, 0.05
    assert B.mcallester_bound(q, kl, n, delta).value == pytest.approx(
        q + math.sqrt((kl + math.log(2 * math.sqrt(n) / delta)) / (2 * n)), abs=1e-15)
    cat = (1 - math.exp(-2.0 * q - (kl + math.log(1 / delta)) / n)) / (1 - math.exp(-2.0))
    assert B.catoni_bound(q, kl, n, delta, c=2.0).value == pytest.approx(cat, abs=1e-15)
    assert B.mi_bound(2.0, 100, empirical=0.1, loss_range=(0, 1)).value == pytest.approx(0.3 - 0.1, abs=1e-15)
    assert B.mi_bound(2.0, 100, sigma=3.0).value == pytest.approx(math.sqrt(2 * 9 * 2 / 100), abs=1e-15)


def test_maurer_log_term_is_valid_for_every_n():
    # the 2 sqrt(n) in log(2 sqrt(n)/delta) bounds xi(n) = E exp(n kl(L_S||L)) at its worst case,
    # xi(n) = sum_k C(n,k) (k/n)^k (1-k/n)^(n-k) (Maurer 2004); check it for every n up to 3000
    for n in range(1, 3001):
        k = np.arange(n + 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_binom = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
            terms = (log_binom + np.where(k > 0, k * np.log(k / n), 0.0)
                     + np.where(k < n, (n - k) * np.log1p(-k / n), 0.0))
        assert math.sqrt(n) <= math.exp(logsumexp(terms)) <= 2 * math.sqrt(n)


# ---------------------------------------------------------------------------- monotonicity
BOUNDS = {
    "mcallester": lambda q, kl, n: B.mcallester_bound(q, kl, n, 0.05).value,
    "kl-inverse": lambda q, kl, n: B.kl_inverse_bound(q, kl, n, 0.05).value,
    "catoni": lambda q, kl, n: B.catoni_bound(q, kl, n, 0.05).value,
    "catoni-fixed-C": lambda q, kl, n: B.catoni_bound(q, kl, n, 0.05, c=1.5).value,
    "mutual-information": lambda q, kl, n: B.mi_bound(kl, n, empirical=q, loss_range=(0, 1)).value,
}


@pytest.mark.parametrize("name", list(BOUNDS))
@settings(max_examples=60, deadline=None)
@given(q=probs, n=st.integers(1, 100_000), kl0=st.floats(0.0, 200.0))
def test_bounds_are_monotone_in_kl_and_n(name, q, n, kl0):
    f = BOUNDS[name]
    along_kl = [f(q, kl0 + d, n) for d in np.linspace(0, 50, 26)]
    # non-decreasing in KL, non-increasing in n
    assert all(b2 >= b1 - 1e-12 for b1, b2 in zip(along_kl[:-1], along_kl[1:], strict=True))
    along_n = [f(q, kl0, m) for m in np.unique(np.geomspace(n, 10 * n, 25).astype(int))]
    assert all(b2 <= b1 + 1e-12 for b1, b2 in zip(along_n[:-1], along_n[1:], strict=True))
    if along_kl[-1] < 1.0:  # strictly, below the cap at the trivial value
        assert along_kl[-1] > along_kl[0]


def test_monotone_in_delta_and_empirical():
    for fn in (B.mcallester_bound, B.kl_inverse_bound, B.catoni_bound):
        by_delta = [fn(0.1, 5.0, 500, d).value for d in (0.5, 0.1, 0.01, 0.001)]
        assert all(b2 > b1 for b1, b2 in zip(by_delta[:-1], by_delta[1:], strict=True))
        by_emp = [fn(e, 5.0, 500, 0.05).value for e in (0.0, 0.1, 0.3, 0.6)]
        assert all(b2 > b1 for b1, b2 in zip(by_emp[:-1], by_emp[1:], strict=True))


# ------------------------------------------------------------------------ results and errors
def test_vacuous_flag_and_loss_range_rescaling():
    assert not B.kl_inverse_bound(0.05, 10.0, 10_000).vacuous
    big = B.kl_inverse_bound(0.05, 1e5, 100)
    assert big.value == 1.0 and big.vacuous and big.trivial == 1.0
    mca = B.mcallester_bound(0.5, 200.0, 100)
    assert mca.value > 1.0 and mca.vacuous
    assert B.mi_bound(1.0, 10, sigma=1.0).trivial == math.inf and not B.mi_bound(1.0, 10, sigma=1.0).vacuous
    for fn in (B.mcallester_bound, B.kl_inverse_bound, B.catoni_bound):
        unit = fn(0.25, 3.0, 200, 0.05)
        scaled = fn(2 + 4 * 0.25, 3.0, 200, 0.05, loss_range=(2.0, 6.0))
        assert scaled.value == pytest.approx(2 + 4 * unit.value, abs=1e-12)
        assert scaled.trivial == 6.0 and scaled.empirical == pytest.approx(3.0)
    d = B.kl_inverse_bound(0.1, 5.0, 1000).to_dict()
    assert json.loads(json.dumps(d))["vacuous"] is False and d["gap"] == pytest.approx(d["value"] - 0.1)
    assert "kl-inverse" in str(B.kl_inverse_bound(0.1, 5.0, 1000))


class _Est:
    total = 4.0
    method = "kl"


def test_accepts_float_or_object_with_total():
    a = B.kl_inverse_bound(0.1, 4.0, 300).value
    assert B.kl_inverse_bound(0.1, _Est(), 300).value == a
    assert B.kl_inverse_bound(0.1, torch.tensor(4.0), 300).value == a
    assert B.mi_bound(_Est(), 300, loss_range=(0, 1)).details["method"] == "kl"


@pytest.mark.parametrize("call, match", [
    (lambda: B.kl_inverse_bound(0.1, 1.0, 100, delta=1.5), "delta"),
    (lambda: B.kl_inverse_bound(0.1, 1.0, 100, delta=0.0), "delta"),
    (lambda: B.mcallester_bound(0.1, 1.0, 0), "n:"),
    (lambda: B.mcallester_bound(0.1, 1.0, 10.5), "n:"),
    (lambda: B.catoni_bound(0.1, -1.0, 100), "kl"),
    (lambda: B.catoni_bound(0.1, math.nan, 100), "kl"),
    (lambda: B.catoni_bound(0.1, 1.0, 100, c=0.0), "c:"),
    (lambda: B.catoni_bound(0.1, 1.0, 100, c=[]), "c:"),
    (lambda: B.kl_inverse_bound(1.5, 1.0, 100), "empirical"),
    (lambda: B.kl_inverse_bound(0.5, 1.0, 100, loss_range=(1, 0)), "loss_range"),
    (lambda: B.mi_bound(1.0, 100), "sigma"),
    (lambda: B.mi_bound(1.0, 100, sigma=-1.0), "sigma"),
    (lambda: B.kl_inverse(-0.1, 1.0), "q:"),
    (lambda: B.kl_inverse(0.1, -1.0), "c:"),
    (lambda: B.bounded_cross_entropy(torch.ones(1, 2) / 2, torch.tensor([0]), p_min=0.0), "p_min"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="kl"):
        B.kl_inverse_bound(0.1, "big", 100)
    with pytest.raises(TypeError, match="loss_range"):
        B.kl_inverse_bound(0.1, 1.0, 100, loss_range=3)
    with pytest.raises(TypeError, match="empirical"):
        B.kl_inverse_bound("0.1", 1.0, 100)


def test_bad_inputs_name_the_argument():
    p = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), -1)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    cases = [
        (lambda: B.bounded_cross_entropy(p, y + 5), "y: class labels must lie in"),
        (lambda: B.bounded_cross_entropy(p, y[:3]), "y: has 3 labels"),
        (lambda: B.bounded_cross_entropy(p, y.float()), "y: must be a 1-D tensor of integer"),
        (lambda: B.bounded_cross_entropy(torch.log(p), y), "probs: expected class probabilities"),
        (lambda: B.bounded_cross_entropy(torch.full((6, 3), math.nan), y), "probs: expected class"),
        (lambda: B.kl_inverse(0.1, 0.1, tol="a"), "tol: "),
        (lambda: B.catoni_bound(0.1, 1.0, 10, c="a"), "c: "),
        (lambda: B.catoni_bound(0.1, 1.0, 10, c=[1.0, "a"]), "c: "),
        (lambda: B.mi_bound(1.0, 10, sigma=1.0, empirical=math.nan), "empirical: "),
        (lambda: B.mi_bound(1.0, 10, sigma=1.0, empirical=math.inf), "empirical: "),
        (lambda: B.fit_prior(nn.Linear(3, 2), "cross_entropy", (torch.randn(8, 3), y[:1].repeat(8)), lr="a"),
         "lr: "),
        (lambda: B.fit_prior(nn.Linear(3, 2), "cross_entropy", (torch.randn(8, 4), y[:1].repeat(8)), steps=1),
         "prior_data: the model and loss cannot"),
        (lambda: B.split_data((torch.randn(3, 2),)), "data: expected \\(x, y\\)"),
        (lambda: B.fit_prior(nn.Linear(3, 2), "cross_entropy", (torch.randn(3, 2),)),
         "prior_data: expected \\(x, y\\)"),
    ]
    for call, match in cases:
        with pytest.raises((ValueError, TypeError), match="^" + match):
            call()
    assert float(B.bounded_cross_entropy(p.double(), y).mean()) > 0  # valid input still works


def test_bounded_cross_entropy():
    p = torch.tensor([[0.5, 0.5], [1e-9, 1 - 1e-9], [0.9, 0.1]])
    y = torch.tensor([0, 0, 0])
    cap = math.log(1e4)
    out = B.bounded_cross_entropy(p, y, p_min=1e-4)
    assert torch.allclose(out, torch.tensor([math.log(2) / cap, 1.0, -math.log(0.9) / cap]))
    assert B.bounded_cross_entropy(p.expand(3, 3, 2), y).shape == (3, 3)


# ------------------------------------------------------------------- data-dependent prior
def test_split_data_and_fit_prior():
    x, y = pb.data.make_classification_data(n=200, num_classes=3, seed=1)
    (xp, yp), (xb, yb) = B.split_data((x, y), prior_fraction=0.25, seed=3)
    assert len(xp) == 50 and len(xb) == 150
    rows = {tuple(r.tolist()) for r in xp}
    assert not any(tuple(r.tolist()) in rows for r in xb)  # disjoint
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prior = B.fit_prior(model, "cross_entropy", (xp, yp), std=0.3, steps=100, lr=0.05)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched
    assert isinstance(prior, pb.GaussianPrior) and prior.std_of("weight") == 0.3
    fitted = nn.Linear(2, 3)
    fitted.load_state_dict(prior.mean)
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        assert float(ce(fitted(xp), yp)) < float(ce(model(xp), yp)) - 0.05
    with pytest.raises(ValueError, match="prior_fraction"):
        B.split_data((x, y), prior_fraction=1.0)
    with pytest.raises(ValueError, match="steps"):
        B.fit_prior(model, "cross_entropy", (xp, yp), steps=0)


# --------------------------------------------------------------------- coverage over resamples
class _SignClassifier(nn.Module):
    """Binary linear classifier: logits (-z/2, z/2) with z = w.x, so class 1 iff w.x > 0."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def forward(self, x):
        z = x @ self.weight
        return torch.stack([-z / 2, z / 2], -1)


def _gibbs_resample(rng, d, n_prior, n, eta, temperature, sigma0):
    """One data set S = prior split + bound split from the known distribution: x ~ N(0, I), label
    sign(x_1) flipped with probability eta. Prior mean: ridge fit on the prior split; posterior: the exact
    Gibbs posterior (SPEC §2 oracle) of the Gaussian loss (t - w.x)^2/2 on the bound split with that prior,
    at beta = temperature / n. Returns the posterior mean/cov, the prior mean and the bound split."""
    x = rng.standard_normal((n_prior + n, d))
    t = np.sign(x[:, 0])
    t[rng.random(n_prior + n) < eta] *= -1
    xp, tp, xb, tb = x[:n_prior], t[:n_prior], x[n_prior:], t[n_prior:]
    mu_p = np.linalg.solve(xp.T @ xp + np.eye(d), xp.T @ tp)
    beta = temperature / n
    lam = np.eye(d) / sigma0**2 + xb.T @ xb / (n * beta)
    cov = np.linalg.inv(lam)
    cov = (cov + cov.T) / 2
    mu = cov @ (xb.T @ tb / (n * beta) + mu_p / sigma0**2)
    kl = 0.5 * (np.trace(cov) / sigma0**2 + (mu - mu_p) @ (mu - mu_p) / sigma0**2 - d
                + d * math.log(sigma0**2) - np.linalg.slogdet(cov)[1])
    return mu, cov, mu_p, xb, tb, kl


def test_reported_bound_holds_over_resamples_and_understated_kl_is_caught():
    # Known distribution, so the true Gibbs risk of every posterior is exact: a weight w errs with
    # probability eta + (1 - 2 eta) angle(w, e_1)/pi. An overfitting regime (d = 40, n = 200, cold beta)
    # so that a bound ignoring most of the KL is visibly wrong.
    d, n_prior, n, eta, temperature, sigma0 = 40, 200, 200, 0.1, 0.2, 1.0
    reps, m, m_true, delta = 200, 150, 2000, 0.05
    rng = np.random.default_rng(2024)
    model = _SignClassifier(d)
    rows = []
    for _ in range(reps):
        mu, cov, _, xb, tb, kl = _gibbs_resample(rng, d, n_prior, n, eta, temperature, sigma0)
        chol = np.linalg.cholesky(cov)
        draws = mu + rng.standard_normal((m, d)) @ chol.T
        post = pb.Posterior({"weight": torch.from_numpy(draws).reshape(1, m, d)}, {},
                            {"task": "classification"}, model=model)
        rep = B.report(post, (torch.from_numpy(xb), torch.from_numpy((tb > 0).astype(np.int64))), kl=kl,
                       delta=delta)
        bound = {b.name: b for b in rep.bounds["0-1 error"]}
        fresh = mu + rng.standard_normal((m_true, d)) @ chol.T
        angle = np.arccos(np.clip(fresh[:, 0] / np.linalg.norm(fresh, axis=1), -1, 1))
        true_risk = float(np.mean(eta + (1 - 2 * eta) * angle / np.pi))
        # exact Gibbs train risk of N(mu, cov): P(t w.x <= 0) = Phi(-t mu.x / sqrt(x' cov x))
        sd = np.sqrt(np.einsum("ij,jk,ik->i", xb, cov, xb))
        exact_train = float(np.mean(norm.cdf(-tb * (xb @ mu) / sd)))
        understated = B.kl_inverse_bound(rep.train["gibbs_error"], kl / 100, n, delta).value
        rows.append((true_risk, rep.train["gibbs_error"], exact_train, bound["kl-inverse"].value,
                     bound["mcallester"].value, bound["catoni"].value, understated, kl,
                     rep.train["gibbs_error_mcse"]))
    a = np.array(rows)
    true_risk, emp, exact_train, inv, mca, cat, wrong, kl, mcse = a.T
    # the report's Gibbs train risk is the exact one up to its Monte-Carlo error (m iid draws)
    z = (emp - exact_train) / np.maximum(mcse, 1e-12)
    assert abs(z.mean()) < 4 * z.std() / math.sqrt(reps) and 0.7 < z.std() < 1.4, (z.mean(), z.std())
    # violations of a valid bound are Binomial(reps, <= delta): allow its 99.9% quantile
    allowed = binom.ppf(0.999, reps, delta)
    for name, values in (("kl-inverse", inv), ("mcallester", mca), ("catoni", cat)):
        assert np.sum(true_risk > values) <= allowed, name
    assert np.mean(inv) < 0.9  # informative: not vacuous, so the check above has teeth
    assert np.all(inv <= mca + 1e-12)
    # the same bound with KL understated 100-fold is violated far more often than delta allows
    assert np.sum(true_risk > wrong) > allowed, (np.sum(true_risk > wrong), allowed)
    # Xu-Raginsky in expectation: I(w;S | prior split) <= E KL, so E[gap] <= sqrt(2 (1/2)^2 E[KL] / n)
    gap = true_risk - exact_train
    mi = B.mi_bound(float(kl.mean()), n, loss_range=(0, 1))
    assert gap.mean() - 3 * gap.std(ddof=1) / math.sqrt(reps) <= mi.gap
    assert gap.mean() > 3 * gap.std(ddof=1) / math.sqrt(reps)  # a real gap to bound


# ----------------------------------------------------------------------------- report
@pytest.fixture(scope="module")
def sampled():
    x, y = pb.data.make_classification_data(n=600, num_classes=3, seed=0)
    (xp, yp), (xr, yr) = B.split_data((x, y), prior_fraction=0.25, seed=0)
    xt, yt, xh, yh = xr[:300], yr[:300], xr[300:], yr[300:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    prior = B.fit_prior(model, "cross_entropy", (xp, yp), std=0.5, steps=300, lr=0.02)
    init = {k: v.unsqueeze(0).repeat(2, *[1] * v.dim()) for k, v in prior.mean.items()}
    post = pb.sample(model, "cross_entropy", (xt, yt), beta=1 / len(xt), prior=prior, step_size=2e-3,
                     num_chains=2, num_warmup=200, num_draws=100, init=init, seed=0)
    return post, prior, (xt, yt), (xh, yh), len(xp)


def test_report_on_a_sampled_posterior(sampled):
    post, prior, train, heldout, n_prior = sampled
    rep = B.report(post, train, heldout, prior=prior, iiw={"kl-diag": 3.0}, n_prior=n_prior)
    # the Gibbs and posterior-predictive numbers against a direct computation from the draws
    pred = post.predict(train[0])
    per = pred.per_draw.double()
    yt = train[1]
    assert rep.train["gibbs_error"] == pytest.approx(float((per.argmax(-1) != yt).double().mean()), abs=1e-12)
    bma = per.mean(0)
    assert rep.train["bma_error"] == pytest.approx(float((bma.argmax(-1) != yt).double().mean()), abs=1e-12)
    py = per.gather(-1, yt.expand(per.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    assert rep.train["gibbs_nll"] == pytest.approx(float(-py.log().mean()), rel=1e-9)
    bma_nll = float(-bma.gather(-1, yt.unsqueeze(-1)).log().mean())
    assert rep.train["bma_nll"] == pytest.approx(bma_nll, rel=1e-9)
    assert rep.n == len(yt) and rep.n_prior == n_prior
    # the KL came from pib_bayes.iiw.kl, a Gaussian fit of the draws
    from pib_bayes.iiw import kl as iiw_kl
    assert rep.kl == pytest.approx(iiw_kl(post, prior, structure="diag").total)
    assert "Gaussian fit" in rep.kl_method and any("Gaussian fit" in note for note in rep.notes)
    names = [b.name for b in rep.bounds["0-1 error"]]
    assert names == ["mcallester", "catoni", "kl-inverse", "mutual-information"]
    for b in rep.bounds["0-1 error"] + rep.bounds["bounded CE"]:
        assert b.n == len(yt) and b.value >= b.empirical and isinstance(b.vacuous, bool)
    assert rep.gap is not None and rep.gap["gibbs_error"] == pytest.approx(
        rep.heldout["gibbs_error"] - rep.train["gibbs_error"])
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["bounds"]["0-1 error"][2]["name"] == "kl-inverse"
    text = str(rep)
    assert "| predictor | metric | train | held-out | gap |" in text and "kl-inverse" in text
    assert "IIW kl-diag" in text
    # chunking the examples changes nothing
    small = B.report(post, train, kl=rep.kl, chunk_size=37)
    assert small.train["gibbs_error"] == pytest.approx(rep.train["gibbs_error"], abs=1e-12)
    assert small.train["bma_nll"] == pytest.approx(rep.train["bma_nll"], rel=1e-9)


def test_report_mc_delta_and_iiw_results(sampled):
    post, prior, train, _, _ = sampled
    from pib_bayes.iiw import IIWResult
    from pib_bayes.iiw import kl as iiw_kl
    est = iiw_kl(post, prior, structure="diag")
    plain = B.report(post, train, kl=est, iiw=[est])
    rep = B.report(post, train, kl=est, iiw=[est], mc_delta=0.01)
    assert rep.train["gibbs_error_ess"] <= post.num_chains * post.num_draws
    for loss, key in (("0-1 error", "gibbs_error"), ("bounded CE", "gibbs_bce")):
        upper = B.kl_inverse(rep.train[key], math.log(100) / rep.train[f"{key}_ess"])
        for b, b0 in zip(rep.bounds[loss][:3], plain.bounds[loss][:3], strict=True):
            assert b.empirical == pytest.approx(upper, abs=1e-12) and b.empirical > rep.train[key]
            assert b.value > b0.value and b.details["mc_delta"] == 0.01
    mi = rep.bounds["0-1 error"][3]
    assert mi.name == "mutual-information" and mi.empirical == rep.train["gibbs_error"]  # in expectation
    assert mi.details["method"] == "kl" and "mc_delta" in str(rep)
    raw = IIWResult({"a": 1.0}, 1.0, "fisher-jvp", "raw")
    with pytest.raises(ValueError, match="units"):
        B.report(post, train, kl=1.0, iiw=raw)
    with pytest.raises(ValueError, match="mc_delta"):
        B.report(post, train, kl=1.0, delta=0.5, mc_delta=0.5)
    for bad in (math.nan, -1.0, 1.0):
        with pytest.raises(ValueError, match="^mc_delta: "):
            B.report(post, train, kl=1.0, mc_delta=bad)
    with pytest.raises(ValueError, match="^n_prior: "):
        B.report(post, train, kl=1.0, n_prior=-1)
    x, y = train
    with pytest.raises(ValueError, match="^train: .*input width"):
        B.report(post, (torch.randn(len(y), x.shape[1] + 1, dtype=x.dtype), y), kl=1.0)


def test_report_leaves_out_diverged_chains(sampled):
    post, _, train, _, _ = sampled
    draws = {k: v.clone() for k, v in post.draws.items()}
    for v in draws.values():
        v[0, 50:] = math.nan  # chain 0 diverged half way
    bad = pb.Posterior(draws, post.sample_stats, post.metadata, post.fixed, torch.tensor([True, False]),
                       torch.tensor([250, -1]), model=post.model)
    only_good = pb.Posterior({k: v[1:] for k, v in post.draws.items()}, {}, post.metadata, post.fixed,
                             model=post.model)
    with pytest.warns(UserWarning, match="diverged"):
        rep = B.report(bad, train, kl=5.0)
    ref = B.report(only_good, train, kl=5.0)
    assert rep.train == ref.train
    assert [b.value for b in rep.bounds["0-1 error"]] == [b.value for b in ref.bounds["0-1 error"]]


def test_report_flags_vacuous_and_rejects_bad_input(sampled):
    post, prior, train, heldout, _ = sampled
    rep = B.report(post, train, kl=1e6)
    assert all(b.vacuous for b in rep.bounds["0-1 error"] if b.name != "mutual-information")
    assert "**yes**" in str(rep)
    no_kl = B.report(post, train)
    assert no_kl.bounds == {"0-1 error": []} and any("no KL" in note for note in no_kl.notes)
    with pytest.raises(ValueError, match="train"):
        B.report(post, (train[0], train[1].float()), kl=1.0)
    with pytest.raises(ValueError, match="delta"):
        B.report(post, train, kl=1.0, delta=2.0)
    with pytest.raises(ValueError, match="heldout: labels"):
        B.report(post, train, (heldout[0], heldout[1] + 3), kl=1.0)
    with pytest.raises(TypeError, match="posterior"):
        B.report("post", train, kl=1.0)
    x = torch.randn(32, 2)
    reg = pb.sample(nn.Linear(2, 1), "gaussian", (x, torch.randn(32, 1)), beta=1 / 32, step_size=1e-3,
                    num_warmup=5, num_draws=5)
    with pytest.raises(ValueError, match="classification"):
        B.report(reg, (x, torch.zeros(32, dtype=torch.long)), kl=1.0)


# ------------------------------------------------------------------ kl_inverse exact for every c >= 0
def _exact_kl_inverse(q: float, c: float):
    """sup{p in [q, 1]: kl(q||p) <= c} by 400 bisection steps at 60 significant digits (mpmath)."""
    import mpmath

    with mpmath.workdps(60):
        qq, cc = mpmath.mpf(q), mpmath.mpf(c)

        def kl(p):
            if p >= 1:  # the inverse lies within 1e-60 of 1
                return mpmath.inf
            return (qq * mpmath.log(qq / p) if qq > 0 else 0) + (1 - qq) * mpmath.log((1 - qq) / (1 - p))

        lo, hi = qq, mpmath.mpf(1)
        for _ in range(400):
            mid = (lo + hi) / 2
            if kl(mid) > cc:
                hi = mid
            else:
                lo = mid
        return hi


@settings(max_examples=150, deadline=None)
@given(q=st.floats(0.0, 0.999), log_c=st.floats(-40.0, 1.5))
def test_kl_inverse_is_never_below_the_exact_inverse_and_within_tol(q, log_c):
    import mpmath

    c = 10.0**log_c
    tol = 1e-12
    got, exact = B.kl_inverse(q, c, tol), _exact_kl_inverse(q, c)
    with mpmath.workdps(60):
        gap = mpmath.mpf(got) - exact
        assert gap >= 0, (q, c, got, mpmath.nstr(exact, 20))
        assert gap <= tol + 4 * math.ulp(got), (q, c, got, mpmath.nstr(exact, 20))


def test_kl_inverse_tiny_budget_from_the_issue():
    """q = 0.2, c = 1e-15: 0.2000000171 (below the exact 0.2000000179) before the cancellation-free kl."""
    import mpmath

    got = B.kl_inverse(0.2, 1e-15)
    exact = _exact_kl_inverse(0.2, 1e-15)
    assert mpmath.mpf(got) >= exact and float(mpmath.mpf(got) - exact) < 1e-12
    # the would-catch-the-bug twin: the textbook kl q log(q/p) + (1-q) log((1-q)/(1-p)) in the same
    # bisection lands below the exact inverse
    lo, hi = 0.2, 1.0
    while hi - lo > 1e-12:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if float(B.binary_kl(0.2, mid)) > 1e-15 else (mid, hi)
    assert mpmath.mpf(hi) < exact
