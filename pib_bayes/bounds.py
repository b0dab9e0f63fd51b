"""Generalization bounds from the information in the weights (SPEC §1, §3).

Two families, both certifying the *Gibbs* risk ``L(Q) = E_{w~Q} E_{(x,y)~D} l(w; x, y)`` of the
posterior Q (a fresh draw of the weights per prediction), not the risk of the posterior-predictive
(averaged) classifier:

* **Mutual-information bound** (Xu & Raginsky 2017, Thm. 1): if ``l(w; Z)`` is sigma-sub-Gaussian under
  the data distribution for every w, then, *in expectation* over S and w ~ Q(.|S),

      E[L(w) - L_S(w)] <= sqrt(2 sigma^2 I(w; S) / n).

  A loss with values in [a, b] is (b - a)/2-sub-Gaussian (Hoeffding's lemma). ``I(w;S)`` is the IIW; for
  any data-independent prior P, ``I(w;S) <= E_S KL(Q_S || P)``, so a KL may stand in for it.

* **PAC-Bayes bounds** for a loss in [a, b] (rescaled to [0, 1] internally): with probability
  >= 1 - delta over the n examples S, simultaneously for every posterior Q, with ``KL = KL(Q || P)``
  for a prior P chosen without looking at S,

  - McAllester, in Maurer's (2004) form:  ``L(Q) <= L_S(Q) + sqrt((KL + log(2 sqrt(n)/delta)) / (2n))``;
  - kl-inverse (Langford-Seeger 2001/2002, Maurer 2004):
    ``kl(L_S(Q) || L(Q)) <= (KL + log(2 sqrt(n)/delta)) / n``, i.e.
    ``L(Q) <= kl^{-1}(L_S(Q), (KL + log(2 sqrt(n)/delta)) / n)`` with ``kl`` the binary KL divergence.
    Pinsker (``kl(q||p) >= 2 (p - q)^2``) makes it never looser than McAllester;
  - Catoni (2007, Thm. 1.2.6), for a constant C > 0 fixed in advance:
    ``L(Q) <= (1 - exp(-C L_S(Q) - (KL + log(1/delta)) / n)) / (1 - exp(-C))``; over a grid of k values of
    C the best one is taken and delta is split between them (a union bound: ``log(k/delta)``).

A data-dependent prior is allowed when it is fitted on a split of the data that is *not* part of S:
the bound then holds conditionally on that split, with n the number of examples left in S (the prior's
examples must be excluded from n and from the empirical risk). The posterior may use all the data.
:func:`split_data` and :func:`fit_prior` do the split and the fit.

Every bound returns a :class:`Bound` that flags a *vacuous* value (>= the trivial bound, the largest
value the loss can take).

>>> b = kl_inverse_bound(0.1, kl=5.0, n=1000, delta=0.05)
>>> round(b.value, 4), b.vacuous
(0.1531, False)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.special import rel_entr
from torch import Tensor, nn

from ._validate import check_count, check_fraction, check_posterior, check_tensors, is_real
from .data import as_tensors
from .energy import resolve_loss
from .iiw.prior_fit import random_split, train_copy
from .posterior import Posterior
from .prior import GaussianPrior, Prior

__all__ = [
    "Bound", "BoundsReport", "binary_kl", "kl_inverse", "mi_bound", "mcallester_bound", "kl_inverse_bound",
    "catoni_bound", "pac_bayes_bounds", "bounded_cross_entropy", "split_data", "fit_prior", "report",
    "as_nats",
]

#: Catoni's C grid when none is given: 20 values log-spaced on [0.1, 20] (delta is split over them).
DEFAULT_CATONI_GRID: tuple[float, ...] = tuple(float(c) for c in np.geomspace(0.1, 20.0, 20))


# --------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class Bound:
    """One generalization bound on the (Gibbs) risk.

    Attributes:
        name: ``"mcallester"``, ``"kl-inverse"``, ``"catoni"`` or ``"mutual-information"``.
        value: the bound on the risk, in the loss's own units.
        empirical: the empirical (train) risk it starts from.
        trivial: the bound that holds with no information at all (the largest loss value ``b``).
        complexity: the KL(Q||P) or the I(w;S) used, in nats.
        n: examples the bound is computed on (a data-dependent prior's split excluded).
        delta: the confidence parameter (holds with probability >= 1 - delta), None for the
            mutual-information bound, which holds in expectation.
        guarantee: in words, what kind of statement it is.
        details: settings (loss range, Catoni's chosen C, sigma, ...).
    """

    name: str
    value: float
    empirical: float
    trivial: float
    complexity: float
    n: int
    delta: float | None
    guarantee: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def vacuous(self) -> bool:
        """True when the bound says nothing: ``value >= trivial``."""
        return bool(self.value >= self.trivial)

    @property
    def gap(self) -> float:
        """The bound on the generalization gap, ``value - empirical``."""
        return self.value - self.empirical

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "empirical": self.empirical, "gap": self.gap,
                "trivial": self.trivial, "vacuous": self.vacuous, "complexity": self.complexity, "n": self.n,
                "delta": self.delta, "guarantee": self.guarantee, "details": dict(self.details)}

    def formatted(self, decimals: int = 4) -> str:
        """The value with ``decimals`` decimals, or more when a non-vacuous value (below ``trivial``)
        would otherwise print as the trivial bound (``0.99999`` shows as ``0.99999``, not ``1.0000``).

        >>> Bound("b", 0.99999, 0.1, 1.0, 3.0, 100, 0.05, "").formatted()
        '0.99999'
        """
        d = decimals
        while not self.vacuous and math.isfinite(self.value) and d < 15 and \
                float(f"{self.value:.{d}f}") >= self.trivial:
            d += 1
        return f"{self.value:.{d}f}"

    def __str__(self) -> str:
        flag = " (VACUOUS)" if self.vacuous else ""
        return (f"{self.name}: risk <= {self.formatted()}{flag} [empirical {self.empirical:.4f}, "
                f"complexity {self.complexity:.3f} nats, n={self.n}, {self.guarantee}]")


# ----------------------------------------------------------------------------- validation
def _check_n(n: object, name: str = "n",
             what: str = "examples used by the bound, prior split excluded") -> int:
    return check_count(name, n, 1, what)


def _check_delta(delta: object, name: str = "delta") -> float:
    return check_fraction(name, delta, "the confidence parameter", hint="e.g. 0.05")


def _check_range(loss_range: object) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in loss_range)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"loss_range: expected a pair (a, b) of floats, got {loss_range!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and a < b):
        raise ValueError(f"loss_range: needs finite a < b, got ({a}, {b})")
    return a, b


def as_nats(value: object, name: str = "kl") -> float:
    """A KL or information estimate in nats: a float, or an object with ``.total`` (e.g. the result of
    ``pib_bayes.iiw.kl``). Must be finite and >= 0.

    >>> class Est: total = 2.5
    >>> as_nats(Est()), as_nats(1)
    (2.5, 1.0)
    """
    units = getattr(value, "units", "nats")
    if units != "nats":
        raise ValueError(f"{name}: the estimate is in units {units!r}; bounds need nats (e.g. the Fisher "
                         "estimate with units='nats', or pib_bayes.iiw.kl / channel)")
    raw = getattr(value, "total", value)
    if isinstance(raw, Tensor):
        raw = raw.item() if raw.numel() == 1 else raw
    if not is_real(raw):
        raise TypeError(f"{name}: expected a float (nats) or an object with a float .total, "
                        f"got {type(value).__name__}")
    v = float(raw)
    if not math.isfinite(v) or v < -1e-12:
        raise ValueError(f"{name}: must be a finite value >= 0 nats, got {v}")
    return max(v, 0.0)


def _check_empirical(empirical: object, a: float, b: float) -> float:
    if not is_real(empirical):
        raise TypeError(f"empirical: expected a float (the empirical risk), got {type(empirical).__name__}")
    e = float(empirical)
    if not (a - 1e-12 <= e <= b + 1e-12):
        raise ValueError(f"empirical: the empirical risk {e} lies outside loss_range ({a}, {b}); "
                         "pass the loss's true range")
    return min(max(e, a), b)


# -------------------------------------------------------------------------------- binary kl
def binary_kl(q: float | np.ndarray, p: float | np.ndarray) -> float | np.ndarray:
    """``kl(q || p) = q log(q/p) + (1-q) log((1-q)/(1-p))``, the KL between Bernoulli(q) and Bernoulli(p).

    Computed with ``scipy.special.rel_entr`` (so ``0 log 0 = 0``); ``inf`` when p is 0 or 1 and q is not.

    >>> round(float(binary_kl(0.5, 0.25)), 6)
    0.143841
    """
    q, p = np.asarray(q, dtype=float), np.asarray(p, dtype=float)
    out = rel_entr(q, p) + rel_entr(1.0 - q, 1.0 - p)
    return float(out) if out.ndim == 0 else out


def _log1p_minus_x(x: float) -> float:
    """``log(1 + x) - x`` without cancellation: the series ``-x^2/2 + x^3/3 - ...`` for |x| < 0.1 (to
    full double precision), ``log1p(x) - x`` otherwise (where the two terms differ by >= 5%)."""
    if abs(x) >= 0.1:
        return math.log1p(x) - x
    total, power, k = 0.0, x, 1
    while True:
        k += 1
        power *= -x
        term = power / k  # (-1)^(k+1) x^k / k with the sign folded in: -x^2/2, +x^3/3, ...
        total += term
        if abs(term) <= 1e-17 * abs(total):
            return total


def _binary_kl_accurate(q: float, p: float) -> float:
    """``kl(q || p)`` for ``0 <= q < 1``, ``q <= p <= 1``, accurate to a few ulps also where p ~ q.

    With d = p - q: kl = -q g(d/q) - (1-q) g(-d/(1-q)), g(x) = log(1+x) - x; the linear terms of the two
    logarithms cancel exactly in this form, and both parts are >= 0, so nothing cancels numerically."""
    if p >= 1.0:
        return math.inf
    d = p - q
    if q == 0.0:
        return -math.log1p(-p)
    if d > 0.5 * min(q, 1.0 - q):  # p far from q: the direct form does not cancel (and d/q may overflow)
        return q * math.log(q / p) + (1.0 - q) * math.log1p(-d / (1.0 - q)) * -1.0
    return -q * _log1p_minus_x(d / q) - (1.0 - q) * _log1p_minus_x(-d / (1.0 - q))


def kl_inverse(q: float, c: float, tol: float = 1e-12) -> float:
    """Upper kl-inverse ``kl^{-1}(q, c) = sup{p in [q, 1] : kl(q || p) <= c}`` (Seeger 2002, Maurer 2004).

    ``p -> kl(q||p)`` increases on [q, 1], so bisection on that interval converges; it stops when the
    bracket is narrower than ``tol`` and returns its upper end plus 2 ulps, so the result is never below
    the exact inverse (a conservative bound) and at most ``tol`` (+ 2 ulps) above it, for every c >= 0.
    ``kl(q||p)`` is evaluated in the cancellation-free form
    ``-q g(d/q) - (1-q) g(-d/(1-q))``, d = p - q, g(x) = log(1+x) - x (series for small |x|), so a
    tiny budget (c = 1e-15: p - q ~ 1e-8, where ``q log(q/p) + (1-q) log((1-q)/(1-p))`` loses every
    digit) is still inverted exactly.

    Args:
        q: the empirical risk, in [0, 1].
        c: the budget, >= 0 (for PAC-Bayes, ``(KL + log(2 sqrt(n)/delta)) / n``).
        tol: absolute accuracy of the result, in (0, 1e-6].

    >>> round(kl_inverse(0.0, math.log(2)), 9)  # kl(0||p) = -log(1-p)  ->  p = 1 - e^{-c} = 0.5
    0.5
    >>> round(kl_inverse(0.2, 1e-15), 12)  # q + sqrt(2 q (1-q) c) to first order
    0.200000017889
    """
    if not is_real(q) or not 0.0 <= float(q) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"q: the empirical risk must be a float in [0, 1], got {q!r}")
    if not is_real(c) or not float(c) >= 0.0:  # type: ignore[arg-type]
        raise ValueError(f"c: the kl budget must be a float >= 0, got {c!r}")
    if not is_real(tol) or not 0.0 < float(tol) <= 1e-6:
        raise ValueError(f"tol: the bisection accuracy must be a float in (0, 1e-6], e.g. 1e-12, got {tol!r}")
    q, c = float(q), float(c)
    if q >= 1.0 or math.isinf(c):
        return 1.0
    lo, hi = q, 1.0
    if c == 0.0:
        return q
    # invariant: kl(q||hi) > c >= kl(q||lo); 200 halvings take any bracket below 1e-60, the loop ends
    # much earlier on tol
    for _ in range(200):
        if hi - lo <= tol:
            break
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:  # the bracket is one ulp wide
            break
        if _binary_kl_accurate(q, mid) > c:
            hi = mid
        else:
            lo = mid
    # the kl is accurate to a few ulps, so a comparison near the exact inverse can misclassify a point
    # by at most ~1 ulp of p; 2 ulps keep the result above the exact inverse
    return min(1.0, hi + 2 * math.ulp(hi))


# ---------------------------------------------------------------------------- the bounds
def mi_bound(info: object, n: int, *, empirical: float = 0.0, sigma: float | None = None,
             loss_range: tuple[float, float] | None = None, method: str | None = None) -> Bound:
    """Xu & Raginsky (2017) mutual-information bound, in expectation over S and w ~ Q(.|S):

        ``E[L(w)] <= E[L_S(w)] + sqrt(2 sigma^2 I(w; S) / n)``.

    Args:
        info: ``I(w;S)`` in nats (a float, or an IIW estimate with ``.total``). An upper bound such as
            ``E_S KL(Q_S||P)`` gives a (looser) valid bound.
        n: number of examples in S.
        empirical: the empirical risk ``L_S`` to add the gap bound to (0 gives the bare gap bound).
        sigma: the sub-Gaussian parameter of the loss. If None, ``loss_range=(a, b)`` must be given
            and ``sigma = (b - a)/2`` (Hoeffding's lemma).
        loss_range: the range of a bounded loss; sets ``trivial = b`` and the default sigma. Without it
            the trivial value is ``inf`` (an unbounded loss has no trivial bound).
        method: how ``info`` was estimated (recorded in ``details``; taken from ``info.method`` if any).

    >>> mi_bound(2.0, 100, empirical=0.1, loss_range=(0, 1)).value  # 0.1 + sqrt(2 * 0.25 * 2 / 100)
    0.2
    """
    n = _check_n(n)
    i = as_nats(info, "info")
    if loss_range is not None:
        a, b = _check_range(loss_range)
        e = _check_empirical(empirical, a, b)
        trivial = b
    else:
        a, b, trivial = -math.inf, math.inf, math.inf
        if not is_real(empirical):
            raise TypeError(f"empirical: expected a float, got {type(empirical).__name__}")
        e = float(empirical)
        if not math.isfinite(e):
            raise ValueError(f"empirical: the empirical risk must be a finite float, got {e}; evaluate the "
                             "loss on finite predictions (or pass loss_range for a bounded loss)")
    if sigma is None:
        if loss_range is None:
            raise ValueError("sigma: give the loss's sub-Gaussian parameter sigma, or loss_range=(a, b) "
                             "for a bounded loss (then sigma = (b - a)/2)")
        sigma = (b - a) / 2
    if not is_real(sigma) or not (0 < sigma < math.inf):
        raise ValueError(f"sigma: must be a finite float > 0, got {sigma!r}")
    gap = math.sqrt(2.0 * sigma**2 * i / n)
    details: dict[str, Any] = {"sigma": float(sigma), "loss_range": None if loss_range is None else (a, b),
                               "method": method or getattr(info, "method", None)}
    return Bound("mutual-information", e + gap, e, trivial, i, n, None,
                 "in expectation over S and w~Q (Xu & Raginsky 2017)", details)


def _unit(empirical: float, loss_range: tuple[float, float]) -> tuple[float, float, float]:
    a, b = _check_range(loss_range)
    e = _check_empirical(empirical, a, b)
    return (e - a) / (b - a), a, b


def _log_term(n: int, delta: float) -> float:
    return math.log(2.0 * math.sqrt(n) / delta)


def mcallester_bound(empirical: float, kl: object, n: int, delta: float = 0.05,
                     loss_range: tuple[float, float] = (0.0, 1.0)) -> Bound:
    """McAllester's PAC-Bayes bound (McAllester 1999) in Maurer's (2004) form, for a loss in [a, b]:

        ``L(Q) <= L_S(Q) + (b - a) sqrt((KL(Q||P) + log(2 sqrt(n)/delta)) / (2n))``,

    with probability >= 1 - delta over S, for all Q at once; capped at nothing (it may exceed b, and
    is then flagged vacuous).

    >>> round(mcallester_bound(0.1, kl=5.0, n=1000).value, 4)
    0.1779
    """
    n, delta = _check_n(n), _check_delta(delta)
    k = as_nats(kl)
    q, a, b = _unit(empirical, loss_range)
    value = q + math.sqrt((k + _log_term(n, delta)) / (2.0 * n))
    return Bound("mcallester", a + (b - a) * value, a + (b - a) * q, b, k, n, delta,
                 f"with probability >= {1 - delta:g} over S (McAllester 1999; Maurer 2004)",
                 {"loss_range": (a, b), "log_term": "log(2 sqrt(n)/delta)"})


def kl_inverse_bound(empirical: float, kl: object, n: int, delta: float = 0.05,
                     loss_range: tuple[float, float] = (0.0, 1.0), tol: float = 1e-12) -> Bound:
    """Seeger/Maurer kl-inverse PAC-Bayes bound (Seeger 2002; Maurer 2004), for a loss in [a, b]:

        ``L(Q) <= kl^{-1}(L_S(Q), (KL(Q||P) + log(2 sqrt(n)/delta)) / n)``   (in [0, 1] units),

    with probability >= 1 - delta over S, for all Q at once. Never looser than
    :func:`mcallester_bound` on the same inputs (Pinsker's inequality), and never above b.

    >>> round(kl_inverse_bound(0.0, kl=0.0, n=100).value, 4)
    0.0582
    """
    n, delta = _check_n(n), _check_delta(delta)
    k = as_nats(kl)
    q, a, b = _unit(empirical, loss_range)
    c = (k + _log_term(n, delta)) / n
    value = kl_inverse(q, c, tol)
    return Bound("kl-inverse", a + (b - a) * value, a + (b - a) * q, b, k, n, delta,
                 f"with probability >= {1 - delta:g} over S (Seeger 2002; Maurer 2004)",
                 {"loss_range": (a, b), "kl_budget": c, "tol": tol, "log_term": "log(2 sqrt(n)/delta)"})


def catoni_bound(empirical: float, kl: object, n: int, delta: float = 0.05,
                 loss_range: tuple[float, float] = (0.0, 1.0),
                 c: float | Sequence[float] | None = None) -> Bound:
    """Catoni's PAC-Bayes bound (Catoni 2007, Thm. 1.2.6), for a loss in [a, b] and C > 0:

        ``L(Q) <= (1 - exp(-C L_S(Q) - (KL(Q||P) + log(k/delta)) / n)) / (1 - exp(-C))``  (in [0, 1] units),

    with probability >= 1 - delta over S. ``c`` is one C (then k = 1) or a grid of k values fixed before
    seeing the data, of which the smallest bound is kept (a union bound over the grid costs
    ``log k``). Default: :data:`DEFAULT_CATONI_GRID`.

    >>> round(catoni_bound(0.1, kl=5.0, n=1000, c=1.0).value, 4)
    0.1619
    """
    n, delta = _check_n(n), _check_delta(delta)
    k = as_nats(kl)
    q, a, b = _unit(empirical, loss_range)
    bad_c = ValueError(f"c: Catoni's constant must be a float > 0 or a non-empty sequence of them "
                       f"(or None for the default grid), got {c!r}")
    if c is None:
        grid: tuple = DEFAULT_CATONI_GRID
    elif is_real(c):
        grid = (c,)
    elif isinstance(c, (str, bytes)) or not isinstance(c, (Sequence, np.ndarray)):
        raise bad_c
    else:
        grid = tuple(c)
    if not grid or any(not is_real(v) or not (float(v) > 0 and math.isfinite(float(v))) for v in grid):
        raise bad_c
    penalty = (k + math.log(len(grid) / delta)) / n
    values = [-math.expm1(-float(cc) * q - penalty) / -math.expm1(-float(cc)) for cc in grid]
    best = int(np.argmin(values))
    value = min(values[best], 1.0)
    return Bound("catoni", a + (b - a) * value, a + (b - a) * q, b, k, n, delta,
                 f"with probability >= {1 - delta:g} over S (Catoni 2007)",
                 {"loss_range": (a, b), "C": float(grid[best]), "grid_size": len(grid),
                  "log_term": f"log({len(grid)}/delta)"})


def pac_bayes_bounds(empirical: float, kl: object, n: int, delta: float = 0.05,
                     loss_range: tuple[float, float] = (0.0, 1.0)) -> list[Bound]:
    """McAllester, Catoni and kl-inverse bounds on the same inputs (each at confidence 1 - delta).

    >>> [b.name for b in pac_bayes_bounds(0.1, 5.0, 1000)]
    ['mcallester', 'catoni', 'kl-inverse']
    """
    return [mcallester_bound(empirical, kl, n, delta, loss_range),
            catoni_bound(empirical, kl, n, delta, loss_range),
            kl_inverse_bound(empirical, kl, n, delta, loss_range)]


# ---------------------------------------------------------------------------- losses
def bounded_cross_entropy(probs: Tensor, y: Tensor, p_min: float = 1e-4) -> Tensor:
    """Cross-entropy clipped at ``log(1/p_min)`` and rescaled to [0, 1]:

        ``l(x, y) = min(-log p_y(x), log(1/p_min)) / log(1/p_min)``

    i.e. the cross-entropy of the class probabilities floored at p_min (Dziugaite & Roy 2018;
    Perez-Ortiz et al. 2021 bound the same quantity), divided by its maximum. A PAC-Bayes bound on
    it, times ``log(1/p_min)``, bounds the clipped cross-entropy in nats. ``probs`` is (..., B, K),
    ``y`` (B,) class indices; returns (..., B).

    >>> import torch
    >>> float(bounded_cross_entropy(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), p_min=0.25))
    0.5
    """
    if not is_real(p_min) or not 0.0 < p_min < 1.0:
        raise ValueError(f"p_min: the probability floor must be in (0, 1), e.g. 1e-4, got {p_min!r}")
    _check_probs_labels(probs, y)
    py = probs.gather(-1, y.expand(*probs.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    cap = math.log(1.0 / p_min)
    return torch.clamp(-torch.log(py.clamp_min(p_min)), max=cap) / cap


def _check_probs_labels(probs: object, y: object) -> None:
    """``probs`` (..., B, K) class probabilities and ``y`` (B,) integer labels in [0, K-1]."""
    if not isinstance(probs, Tensor) or not probs.is_floating_point() or probs.dim() < 2:
        raise TypeError("probs: expected a floating tensor of class probabilities (..., B, K), got "
                        + (f"dtype {probs.dtype}, shape {tuple(probs.shape)}" if isinstance(probs, Tensor)
                           else type(probs).__name__))
    k = probs.shape[-1]
    if probs.numel():
        tol = max(1e-4, 4 * k * torch.finfo(probs.dtype).eps)
        lo, hi = float(probs.min()), float(probs.max())
        sums = probs.sum(-1)
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6 or \
                float((sums - 1).abs().max()) > tol:
            raise ValueError(f"probs: expected class probabilities (finite, in [0, 1], summing to 1 over the "
                             f"last axis), got values in [{lo:.3g}, {hi:.3g}]; pass softmax(logits), not "
                             "logits")
    if not isinstance(y, Tensor):
        raise TypeError(f"y: expected a 1-D tensor of integer class labels, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) or y.dim() != 1:
        raise ValueError(f"y: must be a 1-D tensor of integer class labels, got dtype {y.dtype}, shape "
                         f"{tuple(y.shape)}; convert with y.long()")
    if y.shape[0] != probs.shape[-2]:
        raise ValueError(f"y: has {y.shape[0]} labels but probs has {probs.shape[-2]} examples (shape "
                         f"{tuple(probs.shape)}, (..., B, K)); give one label per example")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(f"y: class labels must lie in [0, {k - 1}] for {k} classes, got "
                         f"[{int(y.min())}, {int(y.max())}]")


# ------------------------------------------------------------------------ data-dependent prior
def split_data(data: tuple[Tensor, Tensor], prior_fraction: float = 0.5, seed: int = 0
               ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Randomly split ``(x, y)`` into ``(prior_data, bound_data)``.

    Fit the prior on ``prior_data`` only (see :func:`fit_prior`); evaluate the bound on ``bound_data``:
    its size is the n of the bound, and the prior's examples are not part of it.

    >>> import torch
    >>> (xp, yp), (xb, yb) = split_data((torch.randn(10, 2), torch.arange(10)), prior_fraction=0.3)
    >>> len(xp), len(xb)
    (3, 7)
    """
    x, y = _pair(data, "data")
    return random_split(x, y, prior_fraction, seed, "prior_fraction")


def fit_prior(model: nn.Module, loss_fn: str | Callable[[Tensor, Tensor], Tensor],
              prior_data: tuple[Tensor, Tensor], *, std: float | Mapping[str, float] = 0.1, steps: int = 500,
              lr: float = 1e-2, batch_size: int | None = None, seed: int = 0) -> GaussianPrior:
    """Data-dependent Gaussian prior ``N(theta_P, std^2 I)``: ``theta_P`` minimises the mean loss on
    ``prior_data`` (Adam, ``steps`` steps from ``model``'s current weights, on a copy of the model).

    ``prior_data`` must be disjoint from the examples the bound is evaluated on (:func:`split_data`);
    ``model`` is not modified.
    """
    x, y = _pair(prior_data, "prior_data")
    check_count("steps", steps, 1)
    if not is_real(lr) or not (0 < lr < math.inf):
        raise ValueError(f"lr: the Adam learning rate must be a finite float > 0, e.g. 1e-2, got {lr!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    loss, _ = resolve_loss(loss_fn)
    gen = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    bs = n if batch_size is None else int(batch_size)
    if not 1 <= bs <= n:
        raise ValueError(f"batch_size: must be in [1, {n}], got {batch_size!r}")
    batches = (torch.randperm(n, generator=gen)[:bs] if bs < n else slice(None) for _ in range(steps))
    fitted = train_copy(model, loss, x, y, batches, lr=lr)
    return GaussianPrior.from_module(model, std=std, mean=fitted)


def _pair(data: object, name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(data, (tuple, list)):
        raise TypeError(f"{name}: expected a pair (x, y) of tensors, got {type(data).__name__}")
    try:
        pair = as_tensors(data)
    except (TypeError, ValueError) as err:
        msg = str(err)
        msg = msg[len("data: "):] if msg.startswith("data: ") else msg  # as_tensors names 'data' itself
        raise type(err)(f"{name}: {msg}") from None
    assert pair is not None
    check_tensors(*pair, name=name)
    return pair


# ----------------------------------------------------------------------------------- report
@dataclass
class _Split:
    """Metrics of one data split."""

    n: int
    bma_error: float
    bma_nll: float
    gibbs_error: float
    gibbs_nll: float
    gibbs_bce: float
    gibbs_error_mcse: float
    gibbs_bce_mcse: float
    gibbs_error_ess: float
    gibbs_bce_ess: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class BoundsReport:
    """Measured risks, information estimates and generalization bounds for one sampled posterior.

    ``train`` / ``heldout`` hold, per split, the posterior-predictive ("bma") and Gibbs error and NLL
    (the Gibbs numbers are averages over the draws, i.e. the expected risk of one random draw), the
    Gibbs bounded cross-entropy in [0, 1] units, and the Monte-Carlo standard errors (ArviZ) of the
    Gibbs estimates. ``bounds`` are on the Gibbs risks; ``vacuous`` ones are flagged.
    """

    train: dict[str, float]
    heldout: dict[str, float] | None
    kl: float | None
    kl_method: str | None
    iiw: list[dict[str, Any]]
    bounds: dict[str, list[Bound]]
    delta: float
    n: int
    n_prior: int | None
    p_min: float
    notes: list[str]
    mc_delta: float | None = None

    @property
    def gap(self) -> dict[str, float] | None:
        """Measured generalization gap, heldout minus train, per metric."""
        if self.heldout is None:
            return None
        return {k: self.heldout[k] - self.train[k] for k in _METRICS}

    def to_dict(self) -> dict[str, Any]:
        return {"train": dict(self.train), "heldout": None if self.heldout is None else dict(self.heldout),
                "gap": self.gap, "kl": self.kl, "kl_method": self.kl_method,
                "iiw": [dict(d) for d in self.iiw],
                "bounds": {k: [b.to_dict() for b in v] for k, v in self.bounds.items()},
                "delta": self.delta, "mc_delta": self.mc_delta, "n": self.n, "n_prior": self.n_prior,
                "p_min": self.p_min,
                "notes": list(self.notes)}

    def __str__(self) -> str:
        bma, gibbs = "posterior predictive", "Gibbs (one draw)"
        rows = [(bma, "error", "bma_error"), (bma, "NLL (nats)", "bma_nll"), (gibbs, "error", "gibbs_error"),
                (gibbs, "NLL (nats)", "gibbs_nll"), (gibbs, "bounded CE [0,1]", "gibbs_bce")]
        gap = self.gap
        out = [f"n = {self.n} (bound examples)" + (f", prior fitted on {self.n_prior} other examples"
                                                   if self.n_prior else ""), "",
               "| predictor | metric | train | held-out | gap |", "|---|---|---|---|---|"]
        for pred, metric, key in rows:
            ho = "—" if self.heldout is None else f"{self.heldout[key]:.4f}"
            g = "—" if gap is None else f"{gap[key]:+.4f}"
            out.append(f"| {pred} | {metric} | {self.train[key]:.4f} | {ho} | {g} |")
        out += ["", "| information | nats | method |", "|---|---|---|"]
        if self.kl is not None:
            out.append(f"| KL(q‖p) | {self.kl:.3f} | {self.kl_method or 'given'} |")
        for est in self.iiw:
            out.append(f"| IIW {est['label']} | {est['value']:.3f} | {est['method'] or 'given'} |")
        out += ["", f"Bounds on the Gibbs risk (delta = {self.delta:g}):", "",
                "| loss | bound | empirical | bound value | trivial | held-out | vacuous |",
                "|---|---|---|---|---|---|---|"]
        held = {"0-1 error": "gibbs_error", "bounded CE": "gibbs_bce"}
        for loss, bounds in self.bounds.items():
            for b in bounds:
                key = held.get(loss)
                ho = "—" if self.heldout is None or key is None else f"{self.heldout[key]:.4f}"
                label = b.name + (f" ({b.details['label']})" if b.details.get("label") else "")
                out.append(f"| {loss} | {label} | {b.empirical:.4f} | {b.formatted()} | {b.trivial:g} | "
                           f"{ho} | {'**yes**' if b.vacuous else 'no'} |")
        if self.notes:
            out += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(out)


_METRICS = ("bma_error", "bma_nll", "gibbs_error", "gibbs_nll", "gibbs_bce")


def _mcse_ess(per_draw: np.ndarray) -> tuple[float, float]:
    """MCSE and bulk ESS of the mean of a (chain, draw) series, from ArviZ (capped at the draw count)."""
    import arviz as az

    m = per_draw.size
    if per_draw.shape[1] < 4:
        return float("nan"), float(m)
    if np.ptp(per_draw) == 0:
        return 0.0, float(m)
    ess = float(az.ess(per_draw, method="bulk"))
    return float(az.mcse(per_draw, method="mean")), min(ess, float(m))


@torch.no_grad()
def _evaluate(post: Posterior, x: Tensor, y: Tensor, p_min: float, chunk: int, include_diverged: bool,
              name: str) -> _Split:
    n = x.shape[0]
    m = None
    sums = {"bma_error": 0.0, "bma_nll": 0.0}
    draw_err = draw_nll = draw_bce = None
    for start in range(0, n, chunk):
        xb, yb = x[start:start + chunk], y[start:start + chunk]
        try:
            pred = post.predict(xb, include_diverged=include_diverged)
        except ValueError as err:
            if not str(err).startswith("x: "):
                raise
            # name the argument of report, not predict's
            raise ValueError(f"{name}: {str(err)[3:]}; x must have the model's input width and "
                             "dtype") from err
        except (RuntimeError, IndexError, TypeError) as err:
            raise ValueError(f"{name}: the posterior's model cannot be evaluated on x of shape "
                             f"{tuple(x.shape)}, dtype {x.dtype} ({type(err).__name__}: {err}); x must have "
                             "the model's input width and dtype") from err
        per = pred.per_draw.double()  # (M, B, K)
        if m is None:
            m, k = per.shape[0], per.shape[-1]
            if int(y.min()) < 0 or int(y.max()) >= k:
                raise ValueError(f"{name}: labels must lie in [0, {k - 1}] for a model with {k} classes, got "
                                 f"[{int(y.min())}, {int(y.max())}]")
            draw_err = torch.zeros(m, dtype=torch.float64)
            draw_nll = torch.zeros(m, dtype=torch.float64)
            draw_bce = torch.zeros(m, dtype=torch.float64)
        mean = per.mean(0)
        sums["bma_error"] += float((mean.argmax(-1) != yb).sum())
        sums["bma_nll"] += float(-torch.log(mean.gather(-1, yb.unsqueeze(-1)).clamp_min(1e-300)).sum())
        draw_err += (per.argmax(-1) != yb).double().sum(1)
        py = per.gather(-1, yb.expand(m, -1).unsqueeze(-1)).squeeze(-1)
        draw_nll += (-torch.log(py.clamp_min(1e-300))).sum(1)
        draw_bce += bounded_cross_entropy(per, yb, p_min).sum(1)
    assert draw_err is not None and draw_nll is not None and draw_bce is not None
    chains = post.num_chains if include_diverged else len(post.good_chains)
    err = (draw_err / n).numpy().reshape(chains, -1)
    bce = (draw_bce / n).numpy().reshape(chains, -1)
    (err_se, err_ess), (bce_se, bce_ess) = _mcse_ess(err), _mcse_ess(bce)
    return _Split(n, sums["bma_error"] / n, sums["bma_nll"] / n, float(err.mean()),
                  float(draw_nll.mean() / n), float(bce.mean()), err_se, bce_se, err_ess, bce_ess)


def _labels(data: object, name: str) -> tuple[Tensor, Tensor]:
    x, y = _pair(data, name)
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) or y.dim() != 1:
        raise ValueError(f"{name}: y must be a 1-D tensor of integer class labels, got dtype {y.dtype}, "
                         f"shape {tuple(y.shape)}")
    return x, y.long()


def _iiw_list(iiw: object) -> list[dict[str, Any]]:
    if iiw is None:
        return []
    if isinstance(iiw, Mapping):
        items = list(iiw.items())
    elif isinstance(iiw, (list, tuple)):
        items = [(getattr(v, "method", None) or f"#{i}", v) for i, v in enumerate(iiw)]
    else:
        items = [(getattr(iiw, "method", None) or "estimate", iiw)]
    return [{"label": str(label), "value": as_nats(v, "iiw"), "method": getattr(v, "method", None)}
            for label, v in items]


def report(posterior: Posterior, train: tuple[Tensor, Tensor], heldout: tuple[Tensor, Tensor] | None = None,
           *,
           prior: Prior | None = None, kl: object = None, iiw: object = None, delta: float = 0.05,
           n_prior: int | None = None, p_min: float = 1e-4, mc_delta: float | None = None,
           structure: str = "diag", chunk_size: int = 1024,
           include_diverged: bool = False) -> BoundsReport:
    """Measured risks next to the generalization bounds for a sampled (classification) posterior.

    Computes, on ``train`` and ``heldout``, the error and NLL of the posterior predictive
    ``p(y|x,S) = (1/M) sum_m softmax(f(x; w_m))`` and of the Gibbs predictor (a random draw w_m per
    prediction; its risk, the average over the draws, is what PAC-Bayes bounds), the measured gap, and:

    * PAC-Bayes bounds (McAllester, Catoni, kl-inverse; see the module docstring) on the Gibbs 0-1
      error and on the Gibbs bounded cross-entropy (:func:`bounded_cross_entropy`, in [0, 1] units), from
      the Gibbs train risk, ``KL(q||p)`` and ``n = len(train)``;
    * the Xu-Raginsky bound ``error_S + sqrt(2 (1/2)^2 I / n)`` on the expected 0-1 error for every
      IIW estimate given (or, if none, for the KL, which upper-bounds I(w;S) in expectation).

    Args:
        posterior: a classification :class:`~pib_bayes.Posterior` with its model attached.
        train: ``(x, y)``: the examples the bound is about. With a data-dependent prior these must NOT
            include the prior's examples: pass the bound split only (:func:`split_data`); n = len(train).
        heldout: ``(x, y)`` never used for the posterior or the prior, for the measured gap.
        prior: the prior P of the bound (data-independent, or fitted on a split disjoint from ``train``);
            used to estimate ``KL(q||p)`` with ``pib_bayes.iiw.kl(posterior, prior, structure=...)`` when
            ``kl`` is not given.
        kl: ``KL(q||p)`` in nats: a float or an estimate with ``.total`` (and ``.method``).
        iiw: IIW estimates: a float, an estimate with ``.total``/``.method``, a list of them, or a mapping
            label -> estimate.
        delta: confidence of each PAC-Bayes bound (each holds with probability >= 1 - delta; they are not
            simultaneous).
        n_prior: size of the prior's split, only recorded.
        p_min: probability floor of the bounded cross-entropy.
        mc_delta: if set, account for the Monte-Carlo error of the Gibbs train risk ``hat L_S`` estimated from
            the draws (Langford & Caruana 2002): the bounds start from ``kl^{-1}(hat L_S, log(1/mc_delta)/m)``
            with m the draws' effective sample size (ArviZ), and hold with probability >= 1 - delta - mc_delta
            (exactly for independent draws). Default: the plug-in estimate, its MCSE reported in ``notes``.
        structure: covariance structure for the KL estimate (passed to ``pib_bayes.iiw.kl``).
        chunk_size: examples evaluated at once (memory ~ draws x chunk_size x classes).

    Assumptions, stated in ``notes``: the Gibbs train risk is a Monte-Carlo average over the kept draws
    (its ArviZ MCSE is reported; ``mc_delta`` adds it to the bound); a KL estimated from the draws by a
    Gaussian fit is exact only if q is Gaussian, and for a Gaussian prior it *understates* KL(q||p) for a
    non-Gaussian q (the Gaussian has the largest entropy for its covariance).

    >>> import torch
    >>> from torch import nn
    >>> from pib_bayes import Posterior
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(200, 2, generator=g)
    >>> y = (x[:, 0] > 0).long()
    >>> w = torch.tensor([[-1.0, 0.0], [1.0, 0.0]]) + 0.3 * torch.randn(1, 100, 2, 2, generator=g)
    >>> post = Posterior({"weight": w}, {}, {"task": "classification"}, model=nn.Linear(2, 2, bias=False))
    >>> rep = report(post, (x, y), kl=3.0, delta=0.05)
    >>> [b.name for b in rep.bounds["0-1 error"]]
    ['mcallester', 'catoni', 'kl-inverse', 'mutual-information']
    >>> rep.bounds["0-1 error"][2].vacuous
    False
    """
    check_posterior("posterior", posterior)
    if posterior.task != "classification":
        raise ValueError(f"posterior: report() needs a classification posterior (0-1 error, cross-entropy), "
                         f"got task {posterior.task!r}; use mi_bound/pac_bayes_bounds with your loss's range")
    delta = _check_delta(delta)
    if mc_delta is not None:
        mc_delta = _check_delta(mc_delta, "mc_delta")
        if delta + mc_delta >= 1:
            raise ValueError(f"mc_delta: delta + mc_delta must be < 1, got {delta} + {mc_delta}")
    if not 0.0 < p_min < 1.0:
        raise ValueError(f"p_min: the probability floor must be in (0, 1), e.g. 1e-4, got {p_min!r}")
    check_count("chunk_size", chunk_size, 1)
    if n_prior is not None:
        _check_n(n_prior, "n_prior", "size of the prior's split, recorded only")
    xt, yt = _labels(train, "train")
    n = xt.shape[0]
    tr = _evaluate(posterior, xt, yt, p_min, chunk_size, include_diverged, "train")
    ho = None
    if heldout is not None:
        xh, yh = _labels(heldout, "heldout")
        ho = _evaluate(posterior, xh, yh, p_min, chunk_size, include_diverged, "heldout")

    kl_method = None
    if kl is None and prior is not None:
        try:
            from .iiw import kl as iiw_kl  # type: ignore[attr-defined]
        except ImportError as err:
            raise ValueError("kl: pib_bayes.iiw.kl is not available to estimate KL(q||p) from the prior; "
                             "pass kl= (nats) instead") from err
        kl = iiw_kl(posterior, prior, structure=structure)
    kl_value = None if kl is None else as_nats(kl)
    gaussian_fit = False
    if kl is not None:
        kl_method = getattr(kl, "method", None) or ("given" if isinstance(kl, (int, float))
                                                    else type(kl).__name__)
        structure_used = (getattr(kl, "settings", None) or {}).get("structure")
        if kl_method == "kl" and structure_used:  # pib_bayes.iiw.kl: a Gaussian fitted to the draws
            gaussian_fit = True
            kl_method = f"Gaussian fit of the draws ({structure_used} covariance) vs prior"
    estimates = _iiw_list(iiw)

    bounds: dict[str, list[Bound]] = {"0-1 error": [], "bounded CE": []}
    if kl_value is not None:
        for loss, (estimate, ess) in {"0-1 error": (tr.gibbs_error, tr.gibbs_error_ess),
                                      "bounded CE": (tr.gibbs_bce, tr.gibbs_bce_ess)}.items():
            emp = estimate
            # sample convergence (Langford & Caruana 2002): kl(hat L_S || L_S(Q)) <= log(1/mc_delta) / m
            if mc_delta is not None:
                emp = kl_inverse(min(max(estimate, 0.0), 1.0), math.log(1.0 / mc_delta) / ess)
            bounds[loss] = pac_bayes_bounds(emp, kl_value, n, delta)
            if mc_delta is not None:
                for b in bounds[loss]:
                    b.details.update(mc_delta=mc_delta, empirical_estimate=estimate, draws_ess=ess)
    for est in estimates:
        b = mi_bound(est["value"], n, empirical=tr.gibbs_error, loss_range=(0.0, 1.0), method=est["method"])
        b.details["label"] = f"IIW {est['label']}"
        bounds["0-1 error"].append(b)
    if not estimates and kl_value is not None:
        b = mi_bound(kl_value, n, empirical=tr.gibbs_error, loss_range=(0.0, 1.0),
                     method="KL(q||p) >= I in mean")
        b.details["label"] = "I <= KL"
        bounds["0-1 error"].append(b)
    if not bounds["bounded CE"]:
        del bounds["bounded CE"]

    kept = posterior.num_chains if include_diverged else len(posterior.good_chains)
    notes = [f"Gibbs train risks average {posterior.num_draws * kept} draws; MCSE (ArviZ) of the 0-1 error "
             f"{tr.gibbs_error_mcse:.2g}, of the bounded CE {tr.gibbs_bce_mcse:.2g} ("
             + ("accounted for through mc_delta)." if mc_delta is not None else "not added to the bounds; "
                "set mc_delta to add it)."),
             f"bounded CE = min(-log p_y, log(1/p_min)) / log(1/p_min) with p_min = {p_min:g}; multiply by "
             f"{math.log(1 / p_min):.3f} for nats.",
             "PAC-Bayes bounds need a prior chosen without the train examples and n = len(train); the "
             "mutual-information bound holds in expectation over S, not for this S."]
    if kl_value is None:
        notes.append("no KL given: PAC-Bayes bounds skipped (pass kl= or prior=).")
    elif gaussian_fit:
        notes.append("KL from a Gaussian fit of the draws: exact only if q is Gaussian; for a Gaussian prior "
                     "it understates KL(q||p) otherwise.")
    if mc_delta is not None and kl_value is not None:
        notes.append(f"mc_delta = {mc_delta:g}: the PAC-Bayes bounds start from an upper confidence bound on "
                     "the Gibbs train risk (kl-inverse over the draws' ESS); each holds with probability >= "
                     f"{1 - delta - mc_delta:g}, exactly for independent draws, approximately (ESS) for "
                     "MCMC.")
    return BoundsReport(tr.as_dict(), None if ho is None else ho.as_dict(), kl_value, kl_method, estimates,
                        bounds, delta, n, n_prior, p_min, notes, mc_delta)
