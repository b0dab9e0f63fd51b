"""Predictive uncertainty from posterior draws (SPEC §4).

Classification, with p_m = softmax(f(x; w_m)) for M draws and p̄ = (1/M) sum_m p_m:

- total (predictive entropy)      H[p̄]
- aleatoric (expected entropy)    (1/M) sum_m H[p_m]
- epistemic (mutual information)  I(y; w | x) = H[p̄] - (1/M) sum_m H[p_m] = (1/M) sum_m KL(p_m || p̄)
  (Houlsby et al. 2011, "BALD"; Depeweg et al. 2018). Entropies in nats.
- NLL -mean_i log p̄(y_i), accuracy, multi-class Brier score mean_i sum_k (p̄_ik - 1[y_i = k])^2
  (Brier 1950), and the expected calibration error (Naeini et al. 2015; Guo et al. 2017) with
  **equal-width binning of the max-probability confidence**: bins B_b = ((b-1)/nb, b/nb],
  b = 1..nb, ECE = sum_b (|B_b|/n) |acc(B_b) - conf(B_b)|.

Regression, with draws f_m = f(x; w_m) and observation noise s (``GaussianLoss``):

- predictive mean (1/M) sum_m f_m, epistemic variance Var_m f_m, aleatoric variance s^2;
- central credible intervals at ``level``: from the draws (the exact quantiles of the predictive
  mixture (1/M) sum_m N(f_m, s^2), or the empirical quantiles of f_m when s is unknown) and
  Gaussian (mean ± z sqrt(epistemic + aleatoric), z = Phi^{-1}((1 + level)/2));
- empirical coverage of each interval, the Gaussian NLL and the mixture NLL.

Heteroscedastic regression (SPEC §4): each draw has its own noise, s_m(x) (``noise_std`` of
shape (M, B, ...), as in a Prediction's ``per_draw_noise_std``); the predictive is the mixture
(1/M) sum_m N(f_m, s_m^2), its variance Var_m f_m + (1/M) sum_m s_m^2, and its quantiles and log
density give the intervals and the NLL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Categorical, MixtureSameFamily, Normal

from ._validate import check_count, check_fraction, check_int, check_real, is_real, real_tensor
from .posterior import Prediction

__all__ = [
    "ReliabilityData", "ClassificationUncertainty", "RegressionUncertainty", "classification_uncertainty",
    "regression_uncertainty", "predictive_entropy", "expected_entropy", "mutual_information",
    "expected_calibration_error", "brier_score", "credible_interval", "gaussian_interval", "coverage",
    "gaussian_nll", "mixture_nll",
]


# ------------------------------------------------------------------------------ classification
def _per_draw_probs(pred: Prediction | Tensor) -> Tensor:
    """(M, B, K) probabilities from a Prediction or a tensor of (M, B, K) or (B, K) probabilities."""
    if isinstance(pred, Prediction):
        if pred.task != "classification":
            raise ValueError(f"pred: expected a classification Prediction, got task {pred.task!r}")
        probs = pred.per_draw
    elif isinstance(pred, Tensor):
        probs = pred
    else:
        raise TypeError(f"pred: expected a Prediction or a tensor of probabilities, "
                        f"got {type(pred).__name__}")
    if probs.dim() == 2:
        probs = probs.unsqueeze(0)
    if probs.dim() != 3:
        raise ValueError(f"pred: probabilities need shape (draws, points, classes) or (points, classes), "
                         f"got {tuple(probs.shape)}")
    if not torch.is_floating_point(probs):
        raise TypeError(f"pred: probabilities must be floating point, got {probs.dtype}")
    if probs.shape[0] == 0:
        raise ValueError("pred: holds no draws (shape (0, points, classes)); pass at least one draw")
    sums = probs.sum(-1)
    if bool((probs < 0).any()) or not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        raise ValueError("pred: rows must be probabilities (non-negative, summing to 1); "
                         "apply torch.softmax to logits first")
    return probs


def _labels(y: Tensor, probs: Tensor) -> Tensor:
    if probs.shape[-2] == 0:
        raise ValueError("pred: holds no points (shape (draws, 0, classes)); scores on labels need at least "
                         "one prediction")
    if not isinstance(y, Tensor):
        raise TypeError(f"y: expected a tensor of class labels, got {type(y).__name__}")
    y = y.reshape(-1)
    if y.shape[0] != probs.shape[-2]:
        raise ValueError(f"y: has {y.shape[0]} labels for {probs.shape[-2]} predictions")
    if torch.is_floating_point(y) and not bool((y == y.round()).all()):
        raise ValueError("y: class labels must be integers")
    y = y.long()
    if bool((y < 0).any()) or bool((y >= probs.shape[-1]).any()):
        raise ValueError(f"y: labels must lie in [0, {probs.shape[-1] - 1}]")
    return y


def predictive_entropy(pred: Prediction | Tensor) -> Tensor:
    """Total uncertainty H[p̄] per point (nats), p̄ the mean of the per-draw probabilities.

    >>> predictive_entropy(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))  # two confident, disagreeing draws
    tensor([0.6931])
    """
    return Categorical(probs=_per_draw_probs(pred).mean(0)).entropy()


def expected_entropy(pred: Prediction | Tensor) -> Tensor:
    """Aleatoric uncertainty (1/M) sum_m H[p_m] per point (nats)."""
    return Categorical(probs=_per_draw_probs(pred)).entropy().mean(0)


def mutual_information(pred: Prediction | Tensor) -> Tensor:
    """Epistemic uncertainty I(y; w | x) = H[p̄] - (1/M) sum_m H[p_m] >= 0 per point (nats).

    Clamped at 0 against rounding (the exact value is non-negative by concavity of H).
    """
    probs = _per_draw_probs(pred)
    total = Categorical(probs=probs.mean(0)).entropy()
    return (total - Categorical(probs=probs).entropy().mean(0)).clamp_min(0)


@dataclass
class ReliabilityData:
    """Per-bin calibration data on equal-width confidence bins ((b-1)/nb, b/nb].

    ``confidence`` and ``accuracy`` are the bin means (NaN for empty bins), ``count`` the bin sizes.
    """

    bin_edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor


def expected_calibration_error(pred: Prediction | Tensor, y: Tensor, *,
                               num_bins: int = 15) -> tuple[float, ReliabilityData]:
    """ECE = sum_b (|B_b|/n) |acc(B_b) - conf(B_b)| on ``num_bins`` equal-width bins of max p̄.

    Bins are right-closed, B_b = ((b-1)/nb, b/nb] (Guo et al. 2017), so a confidence of exactly
    b/nb falls in bin b. Returns the ECE and the :class:`ReliabilityData`.

    >>> p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    >>> ece, rel = expected_calibration_error(p, torch.tensor([0, 1, 0, 0]), num_bins=10)
    >>> round(ece, 4)  # bins (0.8, 0.9]: |0.5 - 0.9|, (0.5, 0.6]: |1 - 0.6|, each half the points
    0.4
    """
    check_count("num_bins", num_bins, 1)
    probs = _per_draw_probs(pred)
    y = _labels(y, probs)
    mean = probs.mean(0).double()
    conf, guess = mean.max(-1)
    correct = (guess == y).double()
    edges = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)
    # bucketize(right=False) gives i with edges[i-1] < conf <= edges[i]: right-closed bins
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    count = torch.bincount(idx, minlength=num_bins)
    conf_sum = torch.bincount(idx, weights=conf, minlength=num_bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=num_bins)
    nonempty = count > 0
    denom = count.clamp_min(1).double()
    bin_conf = torch.where(nonempty, conf_sum / denom, torch.nan)
    bin_acc = torch.where(nonempty, acc_sum / denom, torch.nan)
    ece = float(((acc_sum - conf_sum).abs() / y.shape[0]).sum())  # = sum_b (n_b/n) |acc_b - conf_b|
    return ece, ReliabilityData(edges, bin_conf, bin_acc, count)


def brier_score(pred: Prediction | Tensor, y: Tensor) -> float:
    """Multi-class Brier score mean_i sum_k (p̄_ik - 1[y_i = k])^2 (0 perfect, 2 worst)."""
    probs = _per_draw_probs(pred)
    y = _labels(y, probs)
    mean = probs.mean(0).double()
    onehot = torch.nn.functional.one_hot(y, mean.shape[-1]).double()
    return float((mean - onehot).square().sum(-1).mean())


@dataclass
class ClassificationUncertainty:
    """Per-point uncertainties (nats) and, when labels were given, scores on them."""

    mean_probs: Tensor
    predictive_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    nll: float | None = None
    accuracy: float | None = None
    brier: float | None = None
    ece: float | None = None
    reliability: ReliabilityData | None = None


def classification_uncertainty(pred: Prediction | Tensor, y: Tensor | None = None, *,
                               num_bins: int = 15) -> ClassificationUncertainty:
    """Entropy decomposition and, with labels ``y``, NLL, accuracy, Brier and ECE.

    ``pred`` is a classification :class:`~pib_bayes.Prediction` or per-draw probabilities
    (M, B, K) (a (B, K) tensor counts as one draw, so its epistemic part is 0). The identity
    total = aleatoric + epistemic holds per point. NLL = -mean_i log p̄(y_i).

    >>> probs = torch.tensor([[[0.8, 0.2]], [[0.4, 0.6]]])
    >>> u = classification_uncertainty(probs, torch.tensor([0]))
    >>> bool(torch.allclose(u.predictive_entropy, u.expected_entropy + u.mutual_information)), u.accuracy
    (True, 1.0)
    """
    probs = _per_draw_probs(pred)
    total = Categorical(probs=probs.mean(0)).entropy()
    aleatoric = Categorical(probs=probs).entropy().mean(0)
    out = ClassificationUncertainty(probs.mean(0), total, aleatoric, (total - aleatoric).clamp_min(0))
    if y is not None:
        labels = _labels(y, probs)
        out.nll = float(-Categorical(probs=probs.mean(0).double()).log_prob(labels).mean())
        out.accuracy = float((probs.mean(0).argmax(-1) == labels).double().mean())
        out.brier = brier_score(probs, labels)
        out.ece, out.reliability = expected_calibration_error(probs, labels, num_bins=num_bins)
    return out


# ---------------------------------------------------------------------------------- regression
def _check_level(level: float) -> float:
    return check_fraction("level", level, "the credible level")


def _check_variance(variance: Any, mean: Tensor, strict: bool) -> Tensor:
    variance = real_tensor("variance", variance)
    try:
        shape = torch.broadcast_shapes(variance.shape, mean.shape)
    except RuntimeError:
        shape = None
    if shape != mean.shape:
        raise ValueError(f"variance: shape {tuple(variance.shape)} does not match the mean's "
                         f"{tuple(mean.shape)}; pass one variance per value (or a scalar)")
    if bool((variance <= 0).any()) if strict else bool((variance < 0).any()):
        raise ValueError(f"variance: must be {'> 0' if strict else 'non-negative'} everywhere"
                         + (" for a Gaussian NLL" if strict else ""))
    return variance


def _check_targets(y: Any, like: Tensor, other: str) -> Tensor:
    """Observed values ``y``: a finite tensor with one value per entry of ``like`` (reshaped to it)."""
    y = real_tensor("y", y, "a tensor of observed values")
    if y.numel() != like.numel():
        raise ValueError(f"y: has {y.numel()} values but {other} has {like.numel()} "
                         f"(shape {tuple(like.shape)}); pass one observed value per prediction")
    if y.numel() == 0:
        raise ValueError("y: holds no values; scores need at least one observation")
    return y.reshape(like.shape)


def _check_noise(noise_std: Any, point_shape: torch.Size, draws: int | None = None) -> Tensor:
    """The observation noise s as a float64 tensor broadcastable to ``point_shape``, or (with ``draws``)
    one per draw, of shape ``(draws, *point_shape)``; finite and > 0."""
    if not (is_real(noise_std) or isinstance(noise_std, Tensor)):
        raise TypeError(f"noise_std: expected a positive number or a tensor of them, "
                        f"got {type(noise_std).__name__}")
    if isinstance(noise_std, Tensor) and (noise_std.dtype == torch.bool or noise_std.is_complex()):
        raise TypeError(f"noise_std: expected real numbers, got dtype {noise_std.dtype}")
    s = torch.as_tensor(noise_std, dtype=torch.float64)
    if not bool((torch.isfinite(s) & (s > 0)).all()):
        shown = noise_std if not isinstance(noise_std, Tensor) or noise_std.numel() <= 4 else "a tensor"
        raise ValueError(f"noise_std: must be finite and > 0 everywhere, got {shown}")
    if draws is not None and tuple(s.shape) == (draws, *point_shape):
        return s  # one noise per draw and point (heteroscedastic)
    try:
        shape = torch.broadcast_shapes(s.shape, point_shape)
    except RuntimeError:
        shape = None
    if shape != point_shape:
        per_draw = f", or one per draw {(draws, *point_shape)}" if draws is not None else ""
        raise ValueError(f"noise_std: shape {tuple(s.shape)} does not fit the predictions' "
                         f"{tuple(point_shape)}; pass a scalar or one value per prediction{per_draw}")
    return s


def gaussian_interval(mean: Tensor, variance: Tensor, level: float = 0.9) -> tuple[Tensor, Tensor]:
    """Central interval mean ± z sqrt(variance), z = Phi^{-1}((1 + level)/2).

    >>> lo, hi = gaussian_interval(torch.zeros(1), torch.ones(1), 0.95)
    >>> round(float(hi), 3)
    1.96
    """
    level = _check_level(level)
    mean = real_tensor("mean", mean)
    variance = _check_variance(variance, mean, strict=False)
    z = Normal(0.0, 1.0).icdf(torch.tensor(0.5 + level / 2, dtype=torch.float64))
    half = z.to(mean.dtype) * variance.sqrt()
    return mean - half, mean + half


def _mixture(f: Tensor, s: Tensor) -> MixtureSameFamily:
    """(1/M) sum_m N(f_m, s_m^2) per point; f (M, B, ...), s a scalar, one value per point, or one per
    draw and point (same shape as f)."""
    loc = f.movedim(0, -1)  # mixture components last
    scale = s.movedim(0, -1) if s.shape == f.shape else s.unsqueeze(-1).expand_as(loc)
    return MixtureSameFamily(Categorical(logits=torch.zeros_like(loc)), Normal(loc, scale))


def credible_interval(per_draw: Tensor, level: float = 0.9, noise_std: float | Tensor | None = None,
                      *, tol: float = 1e-10, max_iter: int = 100) -> tuple[Tensor, Tensor]:
    """Central credible interval of the posterior predictive, from the draws f_m (M, B, ...).

    With ``noise_std`` s (a scalar, one per point, or one per draw and point, (M, B, ...), for a
    heteroscedastic model): the (1 ∓ level)/2 quantiles of the mixture (1/M) sum_m N(f_m, s_m^2),
    solved to |CDF - q| < ``tol`` (> 0) in at most ``max_iter`` (>= 1) steps of safeguarded Newton
    on the mixture CDF
    (``torch.distributions.MixtureSameFamily``: ``cdf`` and ``log_prob``), falling back to
    bisection of the bracket [min f - 10 s, max f + 10 s] whenever a Newton step leaves it.
    Without: the empirical quantiles of f_m (``torch.quantile``, linear interpolation), an
    interval for f(x) alone.
    """
    level = _check_level(level)
    tol = check_real("tol", tol, positive=True)
    max_iter = check_int("max_iter", max_iter, minimum=1)
    if not isinstance(per_draw, Tensor) or per_draw.dim() < 2:
        raise ValueError("per_draw: expected a tensor (draws, points, ...)")
    if per_draw.shape[0] == 0:
        raise ValueError("per_draw: holds no draws; pass at least one")
    per_draw = real_tensor("per_draw", per_draw)
    qs = (0.5 - level / 2, 0.5 + level / 2)
    f = per_draw.double()
    if noise_std is None:
        q = torch.quantile(f, torch.tensor(qs, dtype=torch.float64), dim=0)
        return q[0].to(per_draw.dtype), q[1].to(per_draw.dtype)
    s = _check_noise(noise_std, per_draw.shape[1:], per_draw.shape[0])
    mix = _mixture(f, s)
    scale = mix.component_distribution.scale
    sd = (f.var(0, unbiased=False) + scale.square().mean(-1)).sqrt()  # moment-matched start
    out = []
    for q in qs:
        lo, hi = f.amin(0) - 10 * scale.amax(-1), f.amax(0) + 10 * scale.amax(-1)
        z = float(Normal(0.0, 1.0).icdf(torch.tensor(q, dtype=torch.float64)))
        x = torch.minimum(torch.maximum(f.mean(0) + z * sd, lo), hi)
        for _ in range(max_iter):
            err = mix.cdf(x) - q
            if float(err.abs().max()) < tol:
                break
            below = err < 0
            lo, hi = torch.where(below, x, lo), torch.where(below, hi, x)
            step = x - err / mix.log_prob(x).exp()
            inside = (step > lo) & (step < hi)  # also False for NaN/inf steps
            x = torch.where(inside, step, (lo + hi) / 2)
        out.append(x.to(per_draw.dtype))
    return out[0], out[1]


def coverage(y: Tensor, lower: Tensor, upper: Tensor) -> float:
    """Fraction of observed values inside [lower, upper] (``lower <= upper`` everywhere, else a
    ``ValueError``)."""
    lower = real_tensor("lower", lower)
    upper = real_tensor("upper", upper)
    if upper.shape != lower.shape:
        raise ValueError(f"upper: shape {tuple(upper.shape)} differs from lower's {tuple(lower.shape)}")
    if bool((lower > upper).any()):
        k = int((lower > upper).sum())
        raise ValueError(f"lower: exceeds upper at {k} of {lower.numel()} points; pass (lower, upper) of an "
                         "interval, in that order")
    y = _check_targets(y, lower, "lower").to(lower.dtype)
    return float(((y >= lower) & (y <= upper)).double().mean())


def gaussian_nll(y: Tensor, mean: Tensor, variance: Tensor) -> float:
    """-mean log N(y; mean, variance) over every output value (nats)."""
    mean = real_tensor("mean", mean)
    variance = _check_variance(variance, mean, strict=True)
    y = _check_targets(y, mean, "mean")
    dist = Normal(mean.double(), variance.double().sqrt())
    return float(-dist.log_prob(y.double()).mean())


def mixture_nll(y: Tensor, per_draw: Tensor, noise_std: float | Tensor) -> float:
    """-mean log (1/M) sum_m N(y; f_m, s_m^2) over every output value (nats): the NLL of the sampled
    predictive. ``noise_std``: a scalar, one per point, or one per draw and point (M, B, ...).

    >>> round(mixture_nll(torch.zeros(1), torch.zeros(2, 1), torch.ones(2, 1)), 4)  # log(2 pi)/2
    0.9189
    """
    if not isinstance(per_draw, Tensor) or per_draw.dim() < 2 or per_draw.shape[0] == 0:
        raise ValueError("per_draw: expected a tensor (draws, points, ...) with at least one draw")
    per_draw = real_tensor("per_draw", per_draw)
    s = _check_noise(noise_std, per_draw.shape[1:], per_draw.shape[0])
    y = _check_targets(y, per_draw[0], "per_draw (per draw)")
    return float(-_mixture(per_draw.double(), s).log_prob(y.double()).mean())


@dataclass
class RegressionUncertainty:
    """Predictive moments, credible intervals at ``level`` and, with targets, their scores.

    ``lower``/``upper``: from the draws (mixture quantiles when the noise is known);
    ``gaussian_lower``/``gaussian_upper``: mean ± z sqrt(variance). ``nll_mixture`` is
    -mean log (1/M) sum_m N(y; f_m, s^2), the NLL of the sampled predictive itself.
    """

    mean: Tensor
    epistemic_variance: Tensor
    aleatoric_variance: Tensor | None
    variance: Tensor
    level: float
    lower: Tensor
    upper: Tensor
    gaussian_lower: Tensor
    gaussian_upper: Tensor
    coverage: float | None = None
    gaussian_coverage: float | None = None
    nll_gaussian: float | None = None
    nll_mixture: float | None = None


def regression_uncertainty(pred: Prediction | Tensor, y: Tensor | None = None, *,
                           noise_std: float | Tensor | None = None,
                           level: float = 0.9) -> RegressionUncertainty:
    """Predictive mean, epistemic/aleatoric variance, intervals, coverage and NLL.

    ``pred``: a regression :class:`~pib_bayes.Prediction` (its ``per_draw_noise_std`` or else its
    ``aleatoric_variance`` gives s) or the draws f_m as a tensor (M, B, ...) with ``noise_std`` s:
    a scalar, one per point, or one per draw and point (M, B, ...) for a heteroscedastic model
    (None: epistemic only). The epistemic variance is the population variance over draws, as in
    ``Posterior.predict``; the aleatoric one is (1/M) sum_m s_m^2, so their sum is the variance of
    the mixture (1/M) sum_m N(f_m, s_m^2), whose quantiles and log density give ``lower``/``upper``
    and ``nll_mixture``.

    >>> f = torch.tensor([[0.0], [2.0]])  # two draws at one point
    >>> u = regression_uncertainty(f, torch.tensor([1.0]), noise_std=1.0)
    >>> float(u.mean[0]), float(u.epistemic_variance[0]), float(u.variance[0])
    (1.0, 1.0, 2.0)
    """
    level = _check_level(level)
    if isinstance(pred, Prediction):
        if pred.task != "regression":
            raise ValueError(f"pred: expected a regression Prediction, got task {pred.task!r}")
        per_draw = pred.per_draw
        if noise_std is None and pred.per_draw_noise_std is not None:
            noise: float | Tensor | None = pred.per_draw_noise_std
        elif noise_std is None and pred.aleatoric_variance is not None:
            noise = pred.aleatoric_variance.sqrt()
        else:
            noise = noise_std
    elif isinstance(pred, Tensor):
        per_draw, noise = pred, noise_std
    else:
        raise TypeError(f"pred: expected a Prediction or a tensor of draws, got {type(pred).__name__}")
    if per_draw.dim() < 2:
        raise ValueError(f"pred: draws need shape (draws, points, ...), got {tuple(per_draw.shape)}")
    if per_draw.shape[0] == 0:
        raise ValueError("pred: holds no draws; pass at least one")
    per_draw = real_tensor("pred", per_draw, "a tensor of draws")
    if noise is not None:
        noise = _check_noise(noise, per_draw.shape[1:], per_draw.shape[0]).to(per_draw.dtype)
    if y is not None:
        y = _check_targets(y, per_draw[0], "pred (per draw)")
    mean = per_draw.mean(0)
    epistemic = per_draw.var(0, unbiased=False)
    if noise is None:
        aleatoric = None
    elif noise.shape == per_draw.shape:  # one noise per draw: the mixture's mean noise variance
        aleatoric = noise.square().mean(0)
    else:
        aleatoric = noise.square().expand_as(mean)
    variance = epistemic + (aleatoric if aleatoric is not None else 0.0)
    lower, upper = credible_interval(per_draw, level, noise)
    g_lower, g_upper = gaussian_interval(mean, variance, level)
    out = RegressionUncertainty(mean, epistemic, aleatoric, variance, level, lower, upper, g_lower, g_upper)
    if y is not None:
        out.coverage = coverage(y, lower, upper)
        out.gaussian_coverage = coverage(y, g_lower, g_upper)
        if bool((variance > 0).all()):
            out.nll_gaussian = gaussian_nll(y, mean, variance)
        if noise is not None:
            mix = _mixture(per_draw.double(), noise.double())
            out.nll_mixture = float(-mix.log_prob(y.double()).mean())
    return out
