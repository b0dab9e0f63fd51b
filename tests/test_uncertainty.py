"""Tests for pib_bayes.uncertainty: entropy split, calibration, intervals and coverage."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from pib_bayes.posterior import Prediction
from pib_bayes.uncertainty import (
    brier_score,
    classification_uncertainty,
    coverage,
    credible_interval,
    expected_calibration_error,
    expected_entropy,
    gaussian_interval,
    gaussian_nll,
    mutual_information,
    predictive_entropy,
    regression_uncertainty,
)

Z90 = 1.6448536269514722  # Phi^{-1}(0.95)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dirichlet(shape: tuple[int, ...], k: int, seed: int) -> torch.Tensor:
    """Uniform Dirichlet(1, ..., 1) draws: normalised Exp(1) = Gamma(1) variables, local generator."""
    e = -torch.log(torch.rand(*shape, k, generator=_gen(seed), dtype=torch.float64))
    return e / e.sum(-1, keepdim=True)


# --------------------------------------------------------------------------- entropy split
def test_entropy_split_identity_against_mean_kl():
    # total = aleatoric + epistemic, and the epistemic term equals (1/M) sum_m KL(p_m || p̄), an
    # independent route to the mutual information (torch's kl_divergence).
    probs = _dirichlet((7, 50), 5, seed=0)
    total, alea, epi = predictive_entropy(probs), expected_entropy(probs), mutual_information(probs)
    torch.testing.assert_close(total, alea + epi)
    mean = Categorical(probs=probs.mean(0))
    kl = torch.stack([kl_divergence(Categorical(probs=p), mean) for p in probs]).mean(0)
    torch.testing.assert_close(epi, kl)
    assert bool((epi > 0).all())


def test_entropy_split_edge_cases():
    same = _dirichlet((1, 20), 4, seed=1).expand(6, 20, 4)
    torch.testing.assert_close(mutual_information(same), torch.zeros(20, dtype=torch.float64))
    uniform = torch.full((3, 2, 4), 0.25)
    torch.testing.assert_close(predictive_entropy(uniform), torch.full((2,), math.log(4)))
    # confident draws that disagree: all the uncertainty is epistemic
    split = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    torch.testing.assert_close(expected_entropy(split), torch.zeros(1))
    torch.testing.assert_close(mutual_information(split), torch.tensor([math.log(2)]))


def test_prediction_and_raw_tensors_agree():
    probs = _dirichlet((5, 30), 3, seed=2)
    y = torch.randint(0, 3, (30,), generator=_gen(2))
    a = classification_uncertainty(Prediction("classification", probs.mean(0), probs), y)
    b = classification_uncertainty(probs, y)
    torch.testing.assert_close(a.mutual_information, b.mutual_information)
    assert (a.nll, a.accuracy, a.brier, a.ece) == (b.nll, b.accuracy, b.brier, b.ece)


# ------------------------------------------------------------------------------- scores
def test_nll_accuracy_brier_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    u = classification_uncertainty(probs, y)
    assert u.accuracy == 0.5
    assert u.nll == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    b0 = 0.3**2 + 0.2**2 + 0.1**2
    b1 = 0.1**2 + 0.7**2 + 0.6**2
    assert u.brier == pytest.approx((b0 + b1) / 2)
    assert brier_score(probs, y) == pytest.approx((b0 + b1) / 2)
    # the scores use the posterior-mean probabilities, not the per-draw ones
    per_draw = torch.stack([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]).double()
    assert classification_uncertainty(per_draw, torch.tensor([0])).nll == pytest.approx(math.log(2))


# ---------------------------------------------------------------------------------- ECE
def _ece_noise_bound(conf: torch.Tensor, num_bins: int) -> float:
    """Mean + 4 sd of the ECE of a *calibrated* predictor, from the binomial noise per bin.

    In bin b, acc_b - conf_b is a mean of independent Bernoulli(c_i) - c_i with sd_b =
    sqrt(sum c_i (1 - c_i)) / n_b; |N(0, sd^2)| has mean sd sqrt(2/pi) and variance sd^2 (1 - 2/pi).
    """
    idx = torch.bucketize(conf, torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)[1:-1])
    n = conf.numel()
    mean, var = 0.0, 0.0
    for b in range(num_bins):
        c = conf[idx == b]
        if c.numel() == 0:
            continue
        sd = float((c * (1 - c)).sum().sqrt()) / c.numel()
        w = c.numel() / n
        mean += w * sd * math.sqrt(2 / math.pi)
        var += (w * sd) ** 2 * (1 - 2 / math.pi)
    return mean + 4 * math.sqrt(var)


def test_ece_of_calibrated_predictor_is_within_binomial_noise():
    # labels drawn from the predicted probabilities: calibrated by construction
    n = 20000
    probs = _dirichlet((n,), 4, seed=3)
    y = torch.multinomial(probs, 1, generator=_gen(4)).squeeze(-1)
    ece, rel = expected_calibration_error(probs, y, num_bins=15)
    bound = _ece_noise_bound(probs.max(-1).values, 15)
    assert ece < bound, (ece, bound)
    assert int(rel.count.sum()) == n


def test_ece_would_catch_an_overconfident_predictor():
    # same labels, but the predictor reports sharpened probabilities p^2 / sum p^2 (overconfident)
    n = 20000
    probs = _dirichlet((n,), 4, seed=3)
    y = torch.multinomial(probs, 1, generator=_gen(4)).squeeze(-1)
    sharp = probs.square() / probs.square().sum(-1, keepdim=True)
    ece, _ = expected_calibration_error(sharp, y, num_bins=15)
    assert ece > 5 * _ece_noise_bound(sharp.max(-1).values, 15)


def test_ece_of_known_miscalibration_matches_its_gap():
    # binary predictor reporting confidence c but right with probability c - 0.1: every bin has
    # acc - conf = -0.1 + noise, so ECE = 0.1 + mean noise, sd = sqrt(sum p(1-p)) / n (p = c - 0.1).
    n = 20000
    g = _gen(5)
    c = 0.6 + 0.4 * torch.rand(n, generator=g, dtype=torch.float64)
    probs = torch.stack([c, 1 - c], -1)
    p_right = c - 0.1
    y = (torch.rand(n, generator=g, dtype=torch.float64) >= p_right).long()  # 0 (the top class) w.p. c - 0.1
    ece, rel = expected_calibration_error(probs, y, num_bins=10)
    sd = float((p_right * (1 - p_right)).sum().sqrt()) / n
    assert abs(ece - 0.1) < 4 * sd + 1e-12, (ece, sd)
    filled = rel.count > 0
    assert bool((rel.accuracy[filled] < rel.confidence[filled]).all())


def test_ece_hand_computation_with_right_closed_bins():
    # 4 bins: (0, .25], (.25, .5], (.5, .75], (.75, 1]. A confidence of exactly 0.75 belongs to bin 3.
    probs = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.9, 0.1], [0.9, 0.1], [0.6, 0.4]],
                         dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 0, 1])
    ece, rel = expected_calibration_error(probs, y, num_bins=4)
    # bin (.5, .75]: conf (0.75 + 0.75 + 0.6)/3 = 0.7, acc 1/3; bin (.75, 1]: conf 0.9, acc 1
    hand = 3 / 5 * abs(1 / 3 - 0.7) + 2 / 5 * abs(1.0 - 0.9)
    assert ece == pytest.approx(hand)
    assert rel.count.tolist() == [0, 0, 3, 2]
    # left-closed bins [.75, 1) would give a different number: the binning is what the docs say
    left = 1 / 5 * abs(0 - 0.6) + 4 / 5 * abs(3 / 4 - 0.825)
    assert ece != pytest.approx(left)


# ----------------------------------------------------------------------------- regression
def test_gaussian_interval_coverage_is_nominal():
    # exact predictive N(mu_i, v_i); coverage ~ Binomial(n, 0.9)/n, sd = sqrt(0.9 * 0.1 / n)
    n = 40000
    g = _gen(6)
    mu = torch.randn(n, generator=g, dtype=torch.float64)
    var = 0.2 + torch.rand(n, generator=g, dtype=torch.float64)
    y = mu + var.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    lo, hi = gaussian_interval(mu, var, 0.9)
    torch.testing.assert_close(hi - mu, Z90 * var.sqrt())
    se = math.sqrt(0.9 * 0.1 / n)
    assert abs(coverage(y, lo, hi) - 0.9) < 4 * se
    # would catch forgetting half the variance (e.g. the aleatoric part): coverage ~ 0.755
    lo_bad, hi_bad = gaussian_interval(mu, var / 2, 0.9)
    assert abs(coverage(y, lo_bad, hi_bad) - 0.9) > 20 * se


def _grid_draws(mu: torch.Tensor, tau: float, m: int) -> torch.Tensor:
    # draws at the M normal quantiles: (1/M) sum_m N(f_m, s^2) is then ~ N(mu, tau^2 + s^2)
    grid = Normal(0.0, 1.0).icdf((torch.arange(m, dtype=torch.float64) + 0.5) / m)
    return mu[None, :] + tau * grid[:, None]


def test_mixture_intervals_from_draws_cover_at_nominal_rate():
    n, m, tau, s = 5000, 100, 1.0, 0.8
    g = _gen(7)
    mu = 3 * torch.randn(n, generator=g, dtype=torch.float64)
    sig = math.sqrt(tau**2 + s**2)
    y = mu + sig * torch.randn(n, generator=g, dtype=torch.float64)
    u = regression_uncertainty(_grid_draws(mu, tau, m), y, noise_std=s, level=0.9)
    # the interval's exact probability under the true N(mu, sig^2): near nominal (grid discretisation only)
    true = Normal(mu, sig)
    p_in = true.cdf(u.upper) - true.cdf(u.lower)
    assert abs(float(p_in.mean()) - 0.9) < 2e-3
    # empirical coverage vs its exact expectation, binomial tolerance
    se = float((p_in * (1 - p_in)).sum().sqrt()) / n
    assert abs(u.coverage - float(p_in.mean())) < 4 * se
    assert abs(u.gaussian_coverage - 0.9) < 4 * math.sqrt(0.09 / n) + 2e-3
    torch.testing.assert_close(u.aleatoric_variance, torch.full((n,), s**2, dtype=torch.float64))
    # would catch dropping the noise: quantiles of f alone cover only ~ P(|Z| < 1.645 tau / sig) = 0.80
    lo, hi = credible_interval(_grid_draws(mu, tau, m), 0.9, None)
    assert coverage(y, lo, hi) < 0.9 - 20 * se


def test_mixture_interval_of_one_draw_is_the_gaussian_interval():
    f = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    lo, hi = credible_interval(f, 0.8, 0.5)
    z = float(Normal(0.0, 1.0).icdf(torch.tensor(0.9)))
    torch.testing.assert_close(hi, f[0] + z * 0.5, atol=1e-6, rtol=0)
    torch.testing.assert_close(lo, f[0] - z * 0.5, atol=1e-6, rtol=0)


def test_mixture_quantiles_solve_the_cdf_even_for_separated_modes():
    # two far-apart draws: the 0.45/0.55 quantiles sit in the gap where the density is ~0 and plain
    # Newton would jump out; scipy's normal CDF is the independent oracle
    from scipy.stats import norm

    f = torch.tensor([[-5.0, 0.0], [5.0, 0.1]], dtype=torch.float64)
    lo, hi = credible_interval(f, 0.1, 0.5)
    for x, q in ((lo, 0.45), (hi, 0.55)):
        cdf = 0.5 * (norm.cdf(x.numpy(), loc=f[0].numpy(), scale=0.5) + norm.cdf(x.numpy(), loc=f[1].numpy(),
                                                                                 scale=0.5))
        assert abs(cdf - q).max() < 1e-8


def test_regression_moments_nll_and_prediction_input():
    g = _gen(8)
    draws = torch.randn(50, 10, 1, generator=g, dtype=torch.float64)
    y = torch.randn(10, 1, generator=g, dtype=torch.float64)
    pred = Prediction("regression", draws.mean(0), draws, draws.var(0, unbiased=False),
                      torch.full((10, 1), 0.25, dtype=torch.float64))
    u = regression_uncertainty(pred, y)
    v = regression_uncertainty(draws, y, noise_std=0.5)
    torch.testing.assert_close(u.lower, v.lower)
    torch.testing.assert_close(u.variance, draws.var(0, unbiased=False) + 0.25)
    assert u.nll_gaussian == pytest.approx(gaussian_nll(y, u.mean, u.variance))
    expected = -Normal(u.mean, u.variance.sqrt()).log_prob(y).mean()
    assert u.nll_gaussian == pytest.approx(float(expected))
    # mixture NLL = -mean log (1/M) sum_m N(y; f_m, s^2)
    logp = Normal(draws, 0.5).log_prob(y[None]).logsumexp(0) - math.log(50)
    assert u.nll_mixture == pytest.approx(float(-logp.mean()))
    # without noise: epistemic only, empirical quantiles
    w = regression_uncertainty(draws, y)
    assert w.aleatoric_variance is None and w.nll_mixture is None
    torch.testing.assert_close(w.upper, torch.quantile(draws, 0.95, dim=0))


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="softmax"):
        classification_uncertainty(torch.randn(3, 4, 2))
    with pytest.raises(ValueError, match="y: labels"):
        classification_uncertainty(torch.full((4, 2), 0.5), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="y: has"):
        classification_uncertainty(torch.full((4, 2), 0.5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(torch.full((4, 2), 0.5), torch.zeros(4, dtype=torch.long), num_bins=0)
    with pytest.raises(ValueError, match="level"):
        regression_uncertainty(torch.zeros(3, 2), level=1.5)
    with pytest.raises(ValueError, match="noise_std"):
        regression_uncertainty(torch.zeros(3, 2), noise_std=-1.0)
    with pytest.raises(TypeError, match="pred"):
        regression_uncertainty([1.0, 2.0])
    with pytest.raises(ValueError, match="regression Prediction"):
        regression_uncertainty(Prediction("classification", torch.zeros(2, 2), torch.zeros(1, 2, 2)))


def test_per_point_noise_and_interval_inputs_are_checked():
    draws = torch.randn(20, 4, generator=_gen(11), dtype=torch.float64)
    noise = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    lo, hi = credible_interval(draws, 0.9, noise)
    for i in range(4):  # per-point noise equals one scalar-noise call per point
        lo_i, hi_i = credible_interval(draws[:, i:i + 1], 0.9, float(noise[i]))
        torch.testing.assert_close(torch.stack([lo[i], hi[i]]), torch.cat([lo_i, hi_i]))
    u = regression_uncertainty(draws, torch.zeros(4), noise_std=noise)
    torch.testing.assert_close(u.aleatoric_variance, noise.square())
    with pytest.raises(ValueError, match="noise_std: shape"):
        regression_uncertainty(draws, noise_std=noise[:3])
    with pytest.raises(TypeError, match="noise_std"):
        credible_interval(draws, noise_std=True)
    with pytest.raises(ValueError, match="variance: must be non-negative"):
        gaussian_interval(torch.zeros(2), torch.tensor([1.0, -1.0]))
    lo, hi = gaussian_interval(torch.zeros(3), torch.tensor(4.0), 0.9)  # a scalar variance broadcasts
    torch.testing.assert_close(hi, torch.full((3,), 2 * Z90))
    with pytest.raises(ValueError, match="upper: shape"):
        coverage(torch.zeros(3), torch.zeros(3), torch.ones(2))
    with pytest.raises(ValueError, match="pred: holds no draws"):
        predictive_entropy(torch.zeros(0, 2, 3))
