"""Automatic step size from curvature, and the minibatch-noise report (SPEC §2).

On a quadratic energy with Hessian eigenvalues lambda, unadjusted Langevin (SGLD) with step h has
stationary variance ``(1/lambda) / (1 - h lambda / 2)`` along each eigendirection. Bounding the
relative variance bias by ``eps`` in the stiffest direction gives

    h = 2 eps / ((1 + eps) lambda_max)                                           (SGLD, cSGLD)

``lambda_max`` comes from power iteration on Hessian-vector products of the minibatch energy
``U_B(w) = mean_B l_i(w)/beta - log p(w)`` (double backward), at given weights, on a few
minibatches concatenated into one. Each kernel carries a :class:`CurvatureRule` that maps
``lambda_max`` to its own settings:

* pSGLD: the same bound on the *preconditioned* Hessian ``G^(1/2) H G^(1/2)`` (its move is SGLD
  in the coordinates ``G^(-1/2) w``), with G = 1/(eps + sqrt(V)) at the value V settles to at
  stationarity, V = diag(H) (E[g g^T] = H Sigma H = H for g = H (w - mu), w ~ N(mu, H^-1)), from
  Hessian-vector products (:func:`hessian_diagonal`).
* SGHMC (``v <- (1 - alpha) v - eta g + sqrt(2 alpha eta) xi; w <- w + v``) is the Euler scheme of
  underdamped Langevin ``dw = p dt, dp = -grad U dt - gamma p dt + sqrt(2 gamma) dW`` with time step
  ``e``: ``eta = e^2``, ``alpha = gamma e``. Its exact stationary variance on a harmonic direction
  (discrete Lyapunov equation of the 2x2 recursion) is ``(1/lambda) / (1 - eta lambda / (2 (2 - alpha)))``,
  so the bias bound gives ``eta lambda_max = 2 (2 - alpha) eps / (1 + eps)``. The friction is
  ``gamma = sqrt(lambda_max)`` (damping ratio 1/2 in the stiffest direction), i.e.
  ``alpha = sqrt(eta lambda_max)``, unless ``friction`` is given; both equations together are a
  quadratic in ``s = sqrt(eta lambda_max)``: ``s^2 + 2 k s - 4 k = 0`` with ``k = eps / (1 + eps)``.
  *Wide spectra* (``lambda_max`` above about ``3.2 lambda_low`` at eps = 0.05): the friction is
  capped at critical damping of the slowest direction,
  ``alpha = min(sqrt(eta lambda_max), 2 omega_min - omega_min^2)``, ``omega_min = sqrt(eta lambda_low)``.
  Per step a harmonic direction of curvature lambda oscillates at ``omega = sqrt(eta lambda)``; the
  2x2 recursion's eigenvalues have modulus ``sqrt(1 - alpha)`` when underdamped (second moments
  relax in about ``1 / alpha`` steps) and the slower one is about ``1 - omega^2 / alpha`` when
  overdamped (about ``alpha / (2 omega^2)`` steps), so over ``[lambda_low, lambda_max]`` the slowest
  relaxation is shortest where the slowest direction is critically damped: a double eigenvalue
  ``1 - omega_min`` at ``alpha = 2 omega_min - omega_min^2`` (``2 sqrt(eta lambda_low)`` to first
  order), about ``1 / (2 omega_min)`` steps for second moments, against ``alpha / (2 eta lambda_low)``
  at the stiffest-direction friction and ``1 / (2 h lambda_low)`` for SGLD.
  ``lambda_low = max(lambda_prior, theta_min)``: the prior precision ``lambda_prior = min_j 1 /
  sigma_0j^2`` of a :class:`~pib_bayes.GaussianPrior` (the curvature of the directions the data do not
  constrain, known exactly) and ``theta_min``, the smallest Ritz value of a Lanczos run on the same
  Hessian-vector products (:func:`lanczos_extremes`; ``theta_min >= lambda_min``, so a short run errs
  towards more friction). With ``r = sqrt(eta)`` the capped branch solves
  ``(lambda_max - 2 k lambda_low) r^2 + 4 k sqrt(lambda_low) r - 4 k = 0``; eta still meets the bias
  bound ``eta lambda_max = 2 (2 - alpha) eps / (1 + eps)`` exactly (the stiff directions are then
  underdamped, and the 2x2 Lyapunov variance above holds for any alpha). The harmonic picture is a
  prediction for the prior-dominated directions; on a network's non-convex energy the energy's
  autocorrelation time is measured longer (docs/samplers.md).
* SGNHT (time step h, diffusion A): the thermostat holds the mean of Var(p) at 1, so the relative
  variance bias is ``-h x / 2`` (x ~ A, under-dispersion) plus about ``h^2 lambda_max / 4`` in the
  stiffest direction; ``h = min(eps / A, sqrt(2 eps / lambda_max))`` holds each to eps / 2.

Minibatch noise (SPEC §2): if ``grad U_B = grad U + zeta`` with noise covariance C, the excess
stationary covariance Sigma_1 of SGLD solves ``H Sigma_1 + Sigma_1 H = h C`` to first order in h.
In the eigenbasis of H this is ``(Sigma_1)_jj = h C_jj / (2 lambda_j)``: the *relative* variance
inflation along an eigendirection u is ``h u^T C u / 2``, whatever its curvature. The report gives it
along the top eigenvector v (from the power iteration) and averaged over all directions,
``h tr(C) / (2 D)``. ``u^T C u = Var_i(u . grad l_i) / (|B| beta^2)`` (times the finite-population
factor ``(n - |B|)/(n - 1)`` of batches drawn without replacement) needs only directional
derivatives of the per-example losses (one forward-mode pass per direction); ``tr(C)`` is
estimated with Rademacher probes (Hutchinson). For SGHMC the injected momentum noise is
``2 alpha eta`` and the gradient noise adds ``eta^2 C``, so h becomes ``eta / alpha``.

In the eigenbasis, ``h u^T C u / 2`` is in fact the *exact* relative inflation of the discrete
recursion ``Sigma = A Sigma A^T + 2h I + h^2 C`` (both terms are divided by ``1 - a^2``,
``a = 1 - h lambda``) when C is diagonal there, for batches drawn independently. The driver draws
them by reshuffled epochs (each epoch a permutation, ``E = n // |B|`` disjoint batches), so the
noise of one epoch nearly sums to zero: batch means of one epoch have covariance ``-rho c`` with
``rho = |B| / (n - |B|)``. Treating the noise as independent of w (exact on a linear model up to
O(|w - w_hat|)), the excess along u is
``h^2 c [(1 + rho) sum_k a^(2k) - rho sum_S (sum_{k in S} a^k)^2]`` over the lags k grouped by
epoch S, averaged over the position p in the current epoch, i.e. the independent-batch figure times

    f(a, E, rho) = (1 + rho) - rho (1 - a^2) mean_p [((1 - a^(p+1))^2
                   + a^(2p+2) (1 - a^E)^2 / (1 - a^(2E))) / (1 - a)^2]

(:func:`reshuffling_factor`; f -> 1 when a chain forgets faster than an epoch, f << 1 when it
averages over many epochs). On SPEC's Gaussian-linear case (d = 5, n = 2000, batch 200,
h lambda_max = 0.1, the data of tests/test_tuning.py) f is about 0.29: 44.8% with independent
batches, 12.9% reshuffled, against 12.8% +- 0.6% measured.
``a = 1 - h_eff lambda_max`` is used for every direction (f grows with h lambda, so this bounds the
flatter directions from above); the AR(1) form holds for SGLD and pSGLD, SGHMC reports f = 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["AutoStep", "CurvatureRule", "PowerIteration", "GradientNoiseWarning", "estimate_lambda_max",
           "energy_hvp", "minibatch_noise", "auto_step_size", "reshuffling_factor", "SGLD_RULE", "PSGLD_RULE",
           "SGHMC_RULE", "SGNHT_RULE", "NOISE_WARN_THRESHOLD", "hessian_diagonal", "Lanczos",
           "lanczos_extremes", "prior_precision_floor"]

NOISE_WARN_THRESHOLD = 0.1  # warn when the predicted relative variance inflation exceeds 10%


class GradientNoiseWarning(UserWarning):
    """The minibatch gradient noise is predicted to inflate the posterior covariance noticeably."""


def _bias_fraction(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"step_size: eps (the allowed relative variance bias) must lie in (0, 1), "
                         f"got {eps!r}")
    return float(eps) / (1.0 + float(eps))


def _sgld_choose(lam_max: float, eps: float, given: Mapping[str, Any]) -> dict[str, float]:
    return {"step_size": 2.0 * _bias_fraction(eps) / lam_max}


def _sghmc_choose(lam_max: float, eps: float, given: Mapping[str, Any],
                  lambda_low: float | None = None) -> dict[str, float]:
    k = _bias_fraction(eps)
    if "friction" in given:  # the user's friction: eta from the bias bound alone
        alpha = float(given["friction"])
        return {"step_size": 2.0 * (2.0 - alpha) * k / lam_max, "friction": alpha}
    s = -k + math.sqrt(k * k + 4.0 * k)  # s = sqrt(eta lambda_max) = alpha
    if lambda_low is not None and 0.0 < lambda_low < lam_max:
        # critical damping of the slowest direction: alpha = 2 w - w^2, w = r sqrt(lambda_low), r = sqrt(eta),
        # with eta lambda_max = 2 (2 - alpha) k: (lambda_max - 2 k lambda_low) r^2 + 4 k sqrt(lambda_low) r
        # - 4 k = 0
        a2, c = lam_max - 2.0 * k * lambda_low, 2.0 * k * math.sqrt(lambda_low)
        r = (-c + math.sqrt(c * c + 4.0 * k * a2)) / a2
        w = r * math.sqrt(lambda_low)
        alpha = 2.0 * w - w * w
        if alpha < s:
            return {"step_size": r * r, "friction": min(alpha, 1.0)}
    return {"step_size": s * s / lam_max, "friction": min(s, 1.0)}


def _sgnht_choose(lam_max: float, eps: float, given: Mapping[str, Any]) -> dict[str, float]:
    _bias_fraction(eps)
    a = float(given.get("diffusion", 1.0))
    # SGNHT's variance bias (docs/samplers.md, SGNHT): the thermostat holds the mean Var(p) at 1, so
    # Var(w_j) lambda_j = Var(p_j) (1 - h x / 2) with x ~ A, and the stiffest direction's Var(p_j)
    # exceeds the mean by about h^2 lambda_max / 4: each term held to eps / 2 (first order in h)
    return {"step_size": min(eps / a, math.sqrt(2.0 * eps / lam_max))}


@dataclass(frozen=True)
class CurvatureRule:
    """How a kernel turns ``lambda_max`` into its settings (see the module docstring).

    Attributes:
        choose: ``(lambda_max, eps, given_settings) -> {"step_size": h, **kernel settings}``;
            with ``uses_bottom`` it also takes ``lambda_low=`` (the bottom of the spectrum, or None
            when it is unknown).
        uses_bottom: the rule needs ``lambda_low`` (SGHMC: its friction, module docstring).
        noise_gain: ``settings -> h_eff``; the predicted relative variance inflation along a
            direction u is ``h_eff * u^T C u / 2`` (SGLD: h; SGHMC: eta / alpha).
        preconditioned: estimate ``lambda_max`` of ``G^(1/2) H G^(1/2)`` (pSGLD).

    Examples:
        >>> round(SGLD_RULE.choose(100.0, 0.05, {})["step_size"] * 100.0, 6)  # 2 eps / (1 + eps)
        0.095238
    """

    choose: Callable[..., dict[str, float]]
    noise_gain: Callable[[Mapping[str, float]], float] = field(default=lambda s: s["step_size"])
    preconditioned: bool = False
    first_order_ar1: bool = True  # the move is AR(1) per eigendirection (SGLD, pSGLD), not SGHMC's AR(2)
    # the rule also takes lambda_low = max(prior precision, Lanczos theta_min), as choose(..., lambda_low=)
    # (SGHMC's friction); estimated only when the settings it would set are not all given
    uses_bottom: bool = False


SGLD_RULE = CurvatureRule(_sgld_choose)
PSGLD_RULE = CurvatureRule(_sgld_choose, preconditioned=True)
SGHMC_RULE = CurvatureRule(_sghmc_choose, noise_gain=lambda s: s["step_size"] / s["friction"],
                           first_order_ar1=False, uses_bottom=True)
# SGNHT: the thermostat absorbs the gradient noise (xi -> A + B, B = h u^T C u / 2); the weights then
# under-disperse by a further h B / 2 = -(h^2 / 2) u^T C u / 2: a negative "inflation"
SGNHT_RULE = CurvatureRule(_sgnht_choose, noise_gain=lambda s: -s["step_size"] ** 2 / 2,
                           first_order_ar1=False)


@dataclass(frozen=True)
class AutoStep:
    """``step_size="auto"`` with its options: h from ``lambda_max`` at the chains' initial weights.

    Args:
        eps: allowed relative bias of the stationary variance in the stiffest direction
            (default 0.05: 5%, i.e. about 2.5% in the standard deviation); SGLD takes
            ``h = 2 eps / ((1 + eps) lambda_max)``.
        num_batches: minibatches (of the run's batch size; the full data when it has none)
            concatenated into the one batch whose Hessian is power-iterated.
        max_iters, tol, min_iters: power iteration stops when the Rayleigh quotient changes by
            less than ``tol`` relatively (after at least ``min_iters`` products: with a clustered
            spectrum it creeps up slowly), or after ``max_iters`` Hessian-vector products.
        noise_probes: Rademacher probes for ``tr(C)`` in the minibatch-noise report.
        adapt: warm-up adaptation. At warm-up step ``t_a = max(1, int(adapt_at * num_warmup))``
            (before its gradient) ``lambda_max`` is estimated again, on the same examples, at the
            weights of the first chain the call runs that has not diverged (global chain 0 in a
            full run), and the step
            from then on is the rule's step for that estimate: SGLD ``h1 = 2 eps / ((1 + eps)
            lambda_max(w_ta))``; pSGLD also re-estimates its preconditioner (V = |diag H| at
            w_ta) and resets every chain's RMSprop average there; SGHMC keeps its friction alpha
            and takes ``eta1 = 2 (2 - alpha) eps / ((1 + eps) lambda_max(w_ta))``, rescaling the
            momentum form v = sqrt(eta) p by ``sqrt(eta1 / eta0)``; SGNHT takes ``h1 = min(eps / A,
            sqrt(2 eps / lambda_max(w_ta)))``. Both estimates land in
            ``metadata["step_size_auto"]`` (the initial one at the top, the second under
            ``"adapted"``). It pays when the chains start far from where they sample (curvature at
            the start differs from curvature in the bulk of the posterior, e.g. a network started
            at its initialisation). Needs ``num_warmup >= 2``; with ``checkpoint=`` the checkpoint
            keeps the weights ``w_ta`` and a resumed run estimates again from them (the same step).
        adapt_at: the fraction of warm-up after which ``adapt`` re-estimates, in (0, 1).

    Examples:
        >>> AutoStep(eps=0.1).eps
        0.1
        >>> AutoStep(adapt=True).adapt_at
        0.5
    """

    eps: float = 0.05
    num_batches: int = 4
    max_iters: int = 50
    tol: float = 1e-3
    noise_probes: int = 8
    min_iters: int = 10
    adapt: bool = False
    adapt_at: float = 0.5

    def __post_init__(self) -> None:
        _bias_fraction(self.eps)
        if not isinstance(self.adapt, bool):
            raise ValueError(f"step_size: AutoStep.adapt must be True or False, got {self.adapt!r}")
        if (isinstance(self.adapt_at, bool) or not isinstance(self.adapt_at, (int, float))
                or not 0 < self.adapt_at < 1):
            raise ValueError(f"step_size: AutoStep.adapt_at (the fraction of warm-up after which "
                             f"'adapt' re-estimates) must lie in (0, 1), got {self.adapt_at!r}")
        for name in ("num_batches", "max_iters", "noise_probes", "min_iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"step_size: AutoStep.{name} must be an int >= 1, got {v!r}")
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 1):
            raise ValueError(f"step_size: AutoStep.tol must lie in (0, 1), got {self.tol!r}")


@dataclass
class PowerIteration:
    """Result of :func:`estimate_lambda_max`: the top eigenvalue, its unit eigenvector (a list
    shaped like the parameters), the Hessian-vector products spent, and whether it converged."""

    value: float
    vector: list[Tensor]
    iterations: int
    converged: bool
    shift: float = 0.0


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b, strict=True)))


def _power(hvp: Callable[[list[Tensor]], list[Tensor]], v: list[Tensor], shift: float, max_iters: int,
           tol: float, min_iters: int = 1) -> tuple[float, list[Tensor], int, bool]:
    norm = math.sqrt(_dot(v, v))
    v = [t / norm for t in v]
    value, it = math.nan, 0
    for it in range(1, max_iters + 1):
        hv = hvp(v)
        if shift:
            hv = [a - shift * b for a, b in zip(hv, v, strict=True)]
        new = _dot(v, hv)  # Rayleigh quotient of the unit vector v
        norm = math.sqrt(_dot(hv, hv))
        if not math.isfinite(new) or not math.isfinite(norm) or norm == 0.0:
            return new if math.isfinite(new) else math.nan, v, it, False
        v = [t / norm for t in hv]
        if it >= min_iters and math.isfinite(value) and abs(new - value) <= tol * abs(new):
            return new, v, it, True
        value = new
    return value, v, it, False


def estimate_lambda_max(hvp: Callable[[list[Tensor]], list[Tensor]], like: Sequence[Tensor], *,
                        max_iters: int = 50, tol: float = 1e-3, min_iters: int = 1,
                        generator: torch.Generator | None = None) -> PowerIteration:
    """Largest eigenvalue of a symmetric operator given by Hessian-vector products (power iteration).

        v <- H v / |H v|,    lambda = v^T H v    (Rayleigh quotient)

    Power iteration finds the eigenvalue of largest *magnitude*; if that one is negative (a
    saddle or a concave direction dominates), it is repeated on ``H - lambda_neg I``, whose top
    eigenvalue is ``lambda_max - lambda_neg >= 0`` (``shift`` records lambda_neg). The result is
    non-finite or non-positive when the curvature estimate fails; callers decide what to do.

    Args:
        hvp: ``v -> H v`` on lists of tensors shaped like ``like``.
        like: tensors giving the shapes, dtype and device of v.
        max_iters, tol, min_iters: stop when the Rayleigh quotient changes by less than ``tol``
            relatively, after at least ``min_iters`` products.
        generator: for the random start vector.

    Examples:
        >>> import torch
        >>> h = torch.diag(torch.tensor([3.0, 1.0, -0.5]))
        >>> res = estimate_lambda_max(lambda v: [h @ v[0]], [torch.zeros(3)], tol=1e-8, max_iters=500)
        >>> round(res.value, 4)
        3.0
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    v0 = [torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in like]
    value, v, iters, ok = _power(hvp, v0, 0.0, max_iters, tol, min_iters)
    shift = 0.0
    if math.isfinite(value) and value < 0:
        shift = value
        v1 = [torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in like]
        top, v, more, ok = _power(hvp, v1, shift, max_iters, tol, min_iters)
        value, iters = top + shift, iters + more
    return PowerIteration(float(value), v, iters, ok, shift)


@dataclass
class Lanczos:
    """Result of :func:`lanczos_extremes`: the extreme Ritz values, the residual bound of the bottom
    one, the Hessian-vector products spent, and why it stopped."""

    lambda_min: float
    lambda_max: float
    residual: float
    iterations: int
    converged: bool
    stopped: str


def lanczos_extremes(hvp: Callable[[list[Tensor]], list[Tensor]], like: Sequence[Tensor], *,
                     max_iters: int = 50, tol: float = 1e-3, min_iters: int = 1, floor: float | None = None,
                     generator: torch.Generator | None = None) -> Lanczos:
    """The extreme eigenvalues of a symmetric operator by the Lanczos iteration (Lanczos 1950; Golub &
    Van Loan, Matrix Computations, §10.1), plain three-term recurrence (Paige 1976: in floating point
    the Ritz values stay inside the spectrum; lost orthogonality only repeats converged ones):

        beta_(j+1) q_(j+1) = H q_j - alpha_j q_j - beta_j q_(j-1),   alpha_j = q_j^T H q_j

    The Ritz values, the eigenvalues theta of the tridiagonal T_k = tridiag(beta, alpha, beta), lie in
    [lambda_min, lambda_max] and the smallest one decreases with k (Cauchy interlacing), so
    ``lambda_min`` here is an *upper* bound of the true bottom that tightens with more products; the
    bottom Ritz pair's residual ``|beta_(k+1) s_k|`` is the distance within which some eigenvalue lies.
    Both ends come from one run (power iteration on ``c I - H`` would need its own run for the bottom).

    Stops after ``max_iters`` products; when the bottom Ritz value moves by less than ``tol``
    relatively (after ``min_iters``); at an invariant subspace (``beta ~ 0``: exact); or, with
    ``floor``, once it is at or below ``floor`` (it can only fall further, so ``max(floor, theta_min)``
    is final).

    Examples:
        >>> import torch
        >>> h = torch.diag(torch.tensor([1000.0, 3.0, 1.0, 1.0], dtype=torch.float64))
        >>> got = lanczos_extremes(lambda v: [h @ v[0]], [torch.zeros(4, dtype=torch.float64)])
        >>> round(got.lambda_min, 3), round(got.lambda_max, 1), got.stopped
        (1.0, 1000.0, 'invariant subspace')
    """
    import numpy as np

    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    q = [torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in like]
    norm = math.sqrt(_dot(q, q))
    q = [t / norm for t in q]
    prev: list[Tensor] | None = None
    alphas: list[float] = []
    betas: list[float] = []
    low, high, resid, stopped, beta = math.nan, math.nan, math.nan, "max_iters", 0.0
    for it in range(1, max_iters + 1):
        w = hvp(q)
        a = _dot(q, w)
        if not math.isfinite(a):
            return Lanczos(math.nan, math.nan, math.nan, it, False, "non-finite product")
        w = [x - a * y for x, y in zip(w, q, strict=True)]
        if prev is not None:
            w = [x - beta * y for x, y in zip(w, prev, strict=True)]
        alphas.append(a)
        beta_next = math.sqrt(_dot(w, w))
        theta, vecs = np.linalg.eigh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
        new_low, high = float(theta[0]), float(theta[-1])
        resid = abs(beta_next * float(vecs[-1, 0]))
        scale = max(abs(float(theta[0])), abs(float(theta[-1])))
        if not math.isfinite(beta_next) or beta_next <= 1e-6 * scale:
            low, stopped = new_low, "invariant subspace"
            break
        if floor is not None and new_low <= floor:
            low, stopped = new_low, "at or below the floor"
            break
        if it >= min_iters and math.isfinite(low) and abs(new_low - low) <= tol * abs(new_low):
            low, stopped = new_low, "converged"
            break
        low = new_low
        prev, q = q, [x / beta_next for x in w]
        betas.append(beta_next)
        beta = beta_next
    return Lanczos(low, high, resid, len(alphas), stopped != "max_iters", stopped)


def prior_precision_floor(prior: Any, names: Sequence[str]) -> float | None:
    """The smallest prior precision ``min_j 1 / sigma_0j^2`` over the parameters ``names`` of a
    :class:`~pib_bayes.GaussianPrior`: the curvature of every direction the data do not constrain.
    ``None`` for any other prior (its curvature is not known in closed form).

    Examples:
        >>> from pib_bayes import GaussianPrior
        >>> prior_precision_floor(GaussianPrior(std={"a": 2.0}, default_std=1.0), ["a", "b"])
        0.25
        >>> prior_precision_floor(object(), ["a"]) is None
        True
    """
    from ..prior import GaussianPrior

    if not isinstance(prior, GaussianPrior) or not names:
        return None
    worst = 0.0
    for name in names:
        sd = prior.std_of(name)
        worst = max(worst, float(sd.max()) if isinstance(sd, Tensor) else float(sd))
    return 1.0 / (worst * worst)


def _with_names(names: Sequence[str], tensors: Sequence[Tensor]) -> dict[str, Tensor]:
    return dict(zip(names, tensors, strict=True))


def energy_hvp(energy: Any, params: Mapping[str, Tensor], x: Tensor, y: Tensor,
               fixed: Mapping[str, Tensor] | None = None,
               precond: Sequence[Tensor] | None = None) -> Callable[[list[Tensor]], list[Tensor]]:
    """``v -> H v`` for the minibatch energy ``U_B(w) = mean_B l_i(w)/beta - log p(w)`` at ``params``
    (one chain's weights, unbatched), by double backward; with ``precond`` (G per tensor),
    ``v -> G^(1/2) H G^(1/2) v``. The graph of the gradient is built once and reused.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from pib_bayes import Energy
        >>> e = Energy(nn.Linear(2, 1, bias=False), "gaussian", prior=1.0, beta=1.0)
        >>> x, y = torch.eye(2), torch.zeros(2, 1)
        >>> hvp = energy_hvp(e, {"weight": torch.zeros(1, 2)}, x, y)
        >>> hvp([torch.tensor([[1.0, 0.0]])])[0]  # H = X^T X / 2 + I
        tensor([[1.5000, 0.0000]])
    """
    names = list(params)
    leaves = [params[n].detach().clone().requires_grad_(True) for n in names]
    named = _with_names(names, leaves)
    prior = energy.prior
    analytic = getattr(prior, "log_prob_and_grad", None)
    with torch.no_grad():
        got = analytic({n: t.detach() for n, t in named.items()}) if analytic is not None else None
    with torch.enable_grad():
        u = energy.functional_loss(named, x, y, fixed) / energy.beta
        if got is None:
            u = u - prior.log_prob(named)
        grads = torch.autograd.grad(u, leaves, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]  # others: zero curvature
    root = [g.sqrt() for g in precond] if precond is not None else None

    def prior_hv(v: list[Tensor]) -> list[Tensor]:
        # a Gaussian prior's gradient (w - theta0)/sigma^2 is affine: H_p v = grad(w + v) - grad(w)
        with torch.no_grad():
            moved = analytic({n: t.detach() + dv for n, t, dv in zip(names, leaves, v, strict=True)})
        return [a.reshape(t.shape) - b.reshape(t.shape)
                for a, b, t in zip(moved[1], got[1], leaves, strict=True)]

    def hvp(v: list[Tensor]) -> list[Tensor]:
        w = [a * b for a, b in zip(root, v, strict=True)] if root is not None else v
        out: list[Tensor | None] = [None] * len(leaves)
        if live:
            with torch.enable_grad():
                got_hv = torch.autograd.grad([grads[i] for i in live], leaves,
                                             grad_outputs=[w[i] for i in live], retain_graph=True,
                                             allow_unused=True)
            out = list(got_hv)
        hv = [torch.zeros_like(t) if o is None else o.detach() for o, t in zip(out, leaves, strict=True)]
        if got is not None:
            hv = [a + b for a, b in zip(hv, prior_hv(w), strict=True)]
        return [a * b for a, b in zip(root, hv, strict=True)] if root is not None else hv

    return hvp


def _directional_losses(energy: Any, params: Mapping[str, Tensor], x: Tensor, y: Tensor,
                        fixed: Mapping[str, Tensor] | None, direction: Sequence[Tensor]) -> Tensor:
    """``u . grad l_i(w)`` for every example i (one forward-mode pass)."""
    names = list(params)
    state = dict(fixed or {})

    def per_example(*ws: Tensor) -> Tensor:
        out = torch.func.functional_call(energy.model, {**state, **_with_names(names, ws)}, (x,))
        return energy.per_example_loss(out, y)

    primals = tuple(params[n].detach() for n in names)
    tangents = tuple(t.to(p.dtype) for t, p in zip(direction, primals, strict=True))
    _, tangent = torch.func.jvp(per_example, primals, tangents)
    return tangent.detach()


def reshuffling_factor(a: float, batch_size: int, n: int | None) -> float:
    """How much less an AR(1) direction ``w <- a w + noise`` inflates with reshuffled epochs than with
    independent batches (module docstring): ``f(a, E = n // |B|, rho = |B| / (n - |B|))``.

    Examples:
        >>> round(reshuffling_factor(0.9, 200, 2000), 4)
        0.3026
        >>> reshuffling_factor(0.0, 200, 2000)  # no memory: as independent batches
        1.0
    """
    if n is None or batch_size >= n:
        return 1.0
    epochs = n // batch_size
    if epochs < 2 or not 0.0 <= a < 1.0:
        return 1.0
    rho = batch_size / (n - batch_size)
    p = torch.arange(epochs, dtype=torch.float64)
    tail = a ** (2 * p + 2) * (1 - a**epochs) ** 2 / (1 - a ** (2 * epochs))
    sq = ((1 - a ** (p + 1)) ** 2 + tail) / (1 - a) ** 2
    return float((1 + rho) - rho * (1 - a * a) * sq.mean())


def minibatch_noise(energy: Any, params: Mapping[str, Tensor], x: Tensor, y: Tensor, *, batch_size: int,
                    n: int | None, h_eff: float, top: Sequence[Tensor] | None = None,
                    fixed: Mapping[str, Tensor] | None = None, precond: Sequence[Tensor] | None = None,
                    centre: Mapping[str, Tensor] | None = None, lambda_max: float | None = None,
                    ar1: bool = True, num_probes: int = 8,
                    generator: torch.Generator | None = None) -> dict[str, float]:
    """Predicted relative covariance inflation from minibatch gradient noise (SPEC §2).

        C = Cov_i(grad l_i(w)) / (|B| beta^2) * (n - |B|) / (n - 1)     (population Cov_i over the n)
        inflation along u = h_eff * u^T C u / 2,      mean over directions = h_eff * tr(C) / (2 D)

    for independently drawn batches ("top", "mean"), and times :func:`reshuffling_factor` at
    ``a = 1 - h_eff lambda_max`` for the driver's reshuffled epochs ("top_reshuffled",
    "mean_reshuffled"; ``ar1=False`` or no ``lambda_max``: factor 1). ``u^T C u`` is estimated from
    the per-example directional derivatives ``u . grad l_i`` on ``x, y`` (one forward-mode pass
    each); ``tr(C) = E_z[z^T C z]`` with ``num_probes`` Rademacher z. With ``centre`` (w_hat of
    :class:`~pib_bayes.gradients.ControlVariateGradient`) the per-example gradients are the
    differences ``grad l_i(w) - grad l_i(w_hat)``. With ``precond`` (pSGLD's G) the directions are
    taken in the coordinates ``G^(-1/2) w``, where the move is plain SGLD (u -> G^(1/2) u).
    Full batches (``batch_size >= n``) give zero.
    """
    m = int(x.shape[0])
    out = {"top": math.nan, "mean": 0.0, "top_reshuffled": math.nan, "mean_reshuffled": 0.0,
           "trace_C": 0.0, "top_C": math.nan, "reshuffling_factor": 1.0, "examples": m,
           "batch_size": int(batch_size), "h_eff": float(h_eff)}
    if n is not None and batch_size >= n:
        out.update(top=0.0, top_C=0.0, top_reshuffled=0.0)
        return out
    # the unbiased sample variance s^2 of m of the n examples estimates n/(n-1) times their population
    # variance sigma^2; a batch mean drawn without replacement has variance sigma^2 (n - B)/((n - 1) B),
    # i.e. s^2 (n - B)/(n B)
    fpc = (n - batch_size) / n if n is not None else 1.0
    scale = fpc / (batch_size * energy.beta**2)
    root = [g.sqrt() for g in precond] if precond is not None else None
    names = list(params)
    dim = sum(params[k].numel() for k in names)

    def quad(u: Sequence[Tensor]) -> float:
        if root is not None:
            u = [a * b for a, b in zip(root, u, strict=True)]
        d = _directional_losses(energy, params, x, y, fixed, u)
        if centre is not None:
            d = d - _directional_losses(energy, centre, x, y, fixed, u)
        return float(d.var(unbiased=True)) * scale if m > 1 else math.nan

    factor = 1.0
    if ar1 and lambda_max is not None and math.isfinite(lambda_max):
        factor = reshuffling_factor(max(0.0, 1.0 - h_eff * lambda_max), batch_size, n)
    out["reshuffling_factor"] = factor
    if top is not None:
        out["top_C"] = quad(top)
        out["top"] = h_eff * out["top_C"] / 2.0
        out["top_reshuffled"] = out["top"] * factor
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    probes = []
    for _ in range(num_probes):
        z = [torch.randint(0, 2, params[k].shape, generator=gen).to(params[k].dtype) * 2 - 1 for k in names]
        probes.append(quad(z))
    out["trace_C"] = float(sum(probes) / len(probes))
    out["mean"] = h_eff * out["trace_C"] / (2.0 * dim)
    out["mean_reshuffled"] = out["mean"] * factor
    return out


def hessian_diagonal(hvp: Callable[[list[Tensor]], list[Tensor]], like: Sequence[Tensor], *,
                     num_probes: int = 16, generator: torch.Generator | None = None) -> list[Tensor]:
    """diag(H) from Hessian-vector products: exact with one unit vector per weight when there are at
    most ``num_probes`` weights, else Hutchinson's ``mean_z z * (H z)`` over ``num_probes``
    Rademacher probes (Bekas et al. 2007).

    Examples:
        >>> import torch
        >>> h = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> hessian_diagonal(lambda v: [h @ v[0]], [torch.zeros(2)])[0]
        tensor([2., 3.])
    """
    sizes = [t.numel() for t in like]
    total = sum(sizes)
    out = [torch.zeros_like(t) for t in like]
    if total <= num_probes:
        for j in range(total):
            e = torch.zeros(total, dtype=like[0].dtype)
            e[j] = 1.0
            v = [c.view(t.shape).to(t.device) for c, t in zip(e.split(sizes), like, strict=True)]
            hv = torch.cat([t.flatten() for t in hvp(v)])
            flat = torch.cat([t.flatten() for t in out])
            flat[j] = hv[j]
            out = [c.view(t.shape) for c, t in zip(flat.split(sizes), like, strict=True)]
        return out
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    for _ in range(num_probes):
        z = [(torch.randint(0, 2, t.shape, generator=gen).to(t.dtype) * 2 - 1).to(t.device) for t in like]
        out = [o + a * b / num_probes for o, a, b in zip(out, z, hvp(z), strict=True)]
    return out


def _rms_preconditioner(energy: Any, params: Mapping[str, Tensor], x: Tensor, y: Tensor,
                        fixed: Mapping[str, Tensor] | None, probes: int, eps: float,
                        square_avg: Sequence[Tensor] | None = None,
                        generator: torch.Generator | None = None) -> list[Tensor]:
    """pSGLD's G = 1/(eps + sqrt(V)); V = the given RMSprop average, else the value it settles to at
    stationarity: with g = H (w - mu) and w ~ N(mu, H^-1), E[g g^T] = H, so V = diag(H) (its absolute
    value where the curvature is negative; minibatch noise only adds to V, i.e. makes the true G
    smaller and the chosen h conservative).
    Not the squared gradient at the initial weights, which is far larger away from the mode."""
    if square_avg is None:
        hvp = energy_hvp(energy, params, x, y, fixed)
        diag = hessian_diagonal(hvp, [params[k] for k in params], num_probes=probes, generator=generator)
        square_avg = [d.abs() for d in diag]
    return [1.0 / (eps + v.sqrt()) for v in square_avg]

def run_auto_step(energy: Any, params: Mapping[str, Tensor], x: Tensor, y: Tensor, rule: CurvatureRule,
                  spec: AutoStep, given: Mapping[str, Any], *, batch_size: int, n: int | None,
                  fixed: Mapping[str, Tensor] | None = None, precond_eps: float = 1e-5,
                  square_avg: Sequence[Tensor] | None = None, seed: int = 0,
                  where: str = "the given weights") -> dict[str, Any]:
    """The driver's curvature stage: lambda_max at ``params`` on ``(x, y)``, the rule's settings,
    and the minibatch-noise report; everything (cost included) in one dict for the metadata.
    For a preconditioned rule, ``"square_avg"`` is the stationary RMSprop average V = diag(H) the
    step was chosen for (the driver starts pSGLD's state there).
    Its ``"report"`` entry is ``(params, centre=None) -> noise report`` on the same examples and
    top direction, for re-evaluating the noise where the chains are after warm-up."""
    start = time.process_time()
    gen = torch.Generator().manual_seed(int(seed))
    stationary_v: list[Tensor] | None = None
    precond = None
    if rule.preconditioned:
        if square_avg is None:
            diag = hessian_diagonal(energy_hvp(energy, params, x, y, fixed), [params[k] for k in params],
                                    generator=gen)
            square_avg = [d.abs() for d in diag]
        stationary_v = list(square_avg)
        precond = _rms_preconditioner(energy, params, x, y, fixed, 16, precond_eps, stationary_v)
    hvp = energy_hvp(energy, params, x, y, fixed, precond)
    res = estimate_lambda_max(hvp, [params[k] for k in params], max_iters=spec.max_iters, tol=spec.tol,
                              min_iters=spec.min_iters, generator=gen)
    if not math.isfinite(res.value) or res.value <= 0:
        raise ValueError(f"step_size: 'auto' needs a positive, finite curvature estimate, got lambda_max = "
                         f"{res.value!r} at {where} (the energy is flat, concave or non-finite there); "
                         "pass a float step_size instead")
    bottom: dict[str, Any] = {}
    if rule.uses_bottom:
        settings = rule.choose(res.value, spec.eps, given, lambda_low=None)
        if any(k not in given for k in settings if k != "step_size"):  # a setting the bottom decides
            floor = prior_precision_floor(energy.prior, list(params))
            lz = lanczos_extremes(hvp, [params[k] for k in params], max_iters=spec.max_iters, tol=spec.tol,
                                  min_iters=spec.min_iters, floor=floor,
                                  generator=torch.Generator().manual_seed(int(seed) + 7919))
            theta = lz.lambda_min if math.isfinite(lz.lambda_min) else None
            if floor is not None:
                low = floor if theta is None else max(floor, theta)
            else:
                low = theta if theta is not None and theta > 0 else None
            came = ("unknown" if low is None else "prior precision" if floor is not None and low == floor
                    else "Lanczos")
            bottom = {"lambda_low": low, "spectrum_bottom": {
                "from": came, "prior_precision": floor, "theta_min": lz.lambda_min,
                "theta_max": lz.lambda_max, "residual": lz.residual, "iterations": lz.iterations,
                "stopped": lz.stopped}}
            settings = rule.choose(res.value, spec.eps, given, lambda_low=low)
            if "friction" in settings:  # SGHMC: zeta = alpha / (2 sqrt(eta lambda)) at both ends
                eta, alpha = settings["step_size"], settings["friction"]
                bottom["damping_ratio"] = {
                    "stiffest": alpha / (2.0 * math.sqrt(eta * res.value)),
                    "slowest": alpha / (2.0 * math.sqrt(eta * low)) if low is not None else None}
    else:
        settings = rule.choose(res.value, spec.eps, given)
    h_eff = rule.noise_gain(settings)
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=gen))

    def report(at: Mapping[str, Tensor], centre: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        return minibatch_noise(energy, at, x, y, batch_size=batch_size, n=n, h_eff=h_eff, top=res.vector,
                               fixed=fixed, precond=precond, centre=centre, lambda_max=res.value,
                               ar1=rule.first_order_ar1, num_probes=spec.noise_probes,
                               generator=torch.Generator().manual_seed(noise_seed))

    noise = {**report(params), "at": where}
    return {
        "step_size": settings["step_size"],
        "settings": {k: v for k, v in settings.items() if k != "step_size"},
        "lambda_max": res.value, "iterations": res.iterations, "converged": res.converged,
        "shift": res.shift, "eps": spec.eps, "preconditioned": rule.preconditioned, "at": where,
        "examples": int(x.shape[0]), "gradient_noise": noise, **bottom, "cpu_s": time.process_time() - start,
        "report": report, "square_avg": stationary_v,
    }


def auto_step_size(model: torch.nn.Module, loss_fn: Any, data: tuple[Tensor, Tensor], *, beta: float,
                   prior: Any = None, sampler: str = "sgld", eps: float = 0.05, batch_size: int | None = None,
                   num_batches: int = 4, sampler_kwargs: Mapping[str, Any] | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """The step size (and kernel settings) ``sample(step_size="auto")`` would choose at the model's
    current weights, with ``lambda_max``, its cost and the minibatch-noise report.

    SGLD: ``h = 2 eps / ((1 + eps) lambda_max)``; see :class:`CurvatureRule` for pSGLD and SGHMC.
    The batch is ``num_batches * batch_size`` examples drawn (without replacement) with ``seed``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> x = torch.randn(200, 3)
        >>> got = auto_step_size(nn.Linear(3, 1), "gaussian", (x, x[:, :1]), beta=1 / 200)
        >>> abs(got["step_size"] * got["lambda_max"] - 2 * 0.05 / 1.05) < 1e-12
        True
    """
    from ..energy import Energy
    from .kernels import build_kernel

    energy = Energy(model, loss_fn, prior, beta)
    kernel = build_kernel(sampler, **dict(sampler_kwargs or {}))
    rule = getattr(kernel, "curvature_rule", None)
    if rule is None:
        raise ValueError(f"step_size: sampler {kernel.name!r} has no curvature rule for 'auto'")
    x, y = data
    n = int(x.shape[0])
    b = n if batch_size is None else int(batch_size)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[: min(n, num_batches * b)]
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    fixed = {k: t.detach() for k, t in model.named_buffers()}
    fixed.update({k: p.detach() for k, p in model.named_parameters() if not p.requires_grad})
    was = model.training
    model.eval()
    try:
        got = run_auto_step(energy, params, x[idx], y[idx], rule, AutoStep(eps=eps, num_batches=num_batches),
                            dict(sampler_kwargs or {}), batch_size=b, n=n, fixed=fixed,
                            precond_eps=float(kernel.settings.get("eps", 1e-5)), seed=seed,
                            where="the model's weights")
        got.pop("report")
        got.pop("square_avg")
        return got
    finally:
        model.train(was)
