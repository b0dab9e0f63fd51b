"""Track IIW during training or sampling, and find the fitting -> compression peak (SPEC §5).

:class:`IIWTracker` records the per-layer Fisher IIW (:func:`~pib_bayes.iiw.fisher`) every ``every``
steps (or epochs: call it once per epoch) in any loop, by hand or as an optimizer step hook.
:func:`iiw_stat_fns` gives ``stat_fns`` for :func:`pib_bayes.sample` so that IIW lands in the
posterior's ``sample_stats``. :func:`peak` locates the maximum of the smoothed curve and the
relative fall after it (the paper observes IIW rising while a net fits, then falling while it
compresses).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.ndimage import uniform_filter1d
from torch import Tensor, nn

from .._validate import is_int
from .fisher import fisher
from .result import IIWResult

__all__ = ["IIWTracker", "Peak", "peak", "iiw_stat_fns", "iiw_stat_fn"]


@dataclass(frozen=True)
class Peak:
    """Maximum of a smoothed IIW curve.

    Attributes:
        step: step (or epoch) of the maximum of the smoothed curve.
        value: the smoothed value there.
        relative_fall: ``(value − min of the smoothed curve after the peak) / value``, in [0, 1].
        final_relative_fall: ``(value − last smoothed value) / value``.
        interior: False when the maximum is at the last point (no fall seen yet: still fitting).
        window: the moving-average window (points) used for smoothing.
    """

    step: float
    value: float
    relative_fall: float
    final_relative_fall: float
    interior: bool
    window: int


def peak(steps: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray, window: int = 5) -> Peak:
    """Peak of ``values`` after a centred moving average over ``window`` points (edges repeat the end values).

    >>> t = np.arange(100.0)
    >>> p = peak(t, t * np.exp(-t / 20), window=5)
    >>> p.step, round(p.relative_fall, 2)
    (20.0, 0.9)
    """
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    if s.ndim != 1 or v.shape != s.shape:
        raise ValueError(f"values: need one value per step, got shapes {s.shape} and {v.shape}")
    if len(v) < 2:
        raise ValueError(f"values: need at least 2 recorded points to locate a peak, got {len(v)}")
    if not np.all(np.isfinite(v)):
        raise ValueError("values: contain NaN/Inf (a diverged run?); drop those points first")
    if not is_int(window) or window < 1:
        raise ValueError(f"window: must be an int >= 1, got {window!r}")
    smooth = uniform_filter1d(v, size=min(int(window), len(v)), mode="nearest")
    i = int(np.argmax(smooth))
    top = float(smooth[i])
    low = float(smooth[i:].min())
    scale = abs(top) if top != 0 else 1.0
    return Peak(float(s[i]), top, (top - low) / scale, (top - float(smooth[-1])) / scale, i < len(v) - 1,
                int(window))


class IIWTracker:
    """Record per-layer IIW (Fisher / Δθ estimator) every ``every`` steps of any training loop.

    ``IIW_g(t) = Δθ_g(t)ᵀ F_g(t) Δθ_g(t)`` (``½ ·/β`` nats when ``beta`` is given; see
    :func:`~pib_bayes.iiw.fisher`), with Δθ(t) = θ_t − θ₀ and F the per-example empirical Fisher on
    ``data`` (pass a fixed probe subset, e.g. 1000 training examples, to keep it cheap).

    Use it by hand (``tracker.step()`` after each optimizer step, or once per epoch) or hook it
    on an optimizer (``tracker.attach(opt)``). ``theta_0`` defaults to the weights at creation.

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    >>> x, y = torch.randn(32, 2), torch.randn(32, 1)
    >>> tracker = IIWTracker(net, "gaussian", (x, y), every=5)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> handle = tracker.attach(opt)
    >>> for _ in range(20):
    ...     opt.zero_grad()
    ...     nn.functional.mse_loss(net(x), y).backward()
    ...     opt.step()
    >>> tracker.steps
    [5, 10, 15, 20]
    >>> sorted(tracker.curves())
    ['0', '2', 'total']
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        theta_0: Mapping[str, Tensor] | nn.Module | None = None,
        *,
        every: int = 1,
        groups: Mapping[str, Sequence[str]] | None = None,
        beta: float | None = None,
        **fisher_kwargs: Any,
    ) -> None:
        if not is_int(every) or every < 1:
            raise ValueError(f"every: must be an int >= 1 (record every k steps/epochs), got {every!r}")
        self.model, self.loss_fn, self.data, self.every = model, loss_fn, data, every
        self.theta_0 = ({n: p.detach().clone() for n, p in model.named_parameters()} if theta_0 is None
                        else theta_0)
        self.groups, self.beta, self.fisher_kwargs = groups, beta, fisher_kwargs
        self.count = 0
        self.steps: list[int] = []
        self.results: list[IIWResult] = []
        self.record(step=None, dry_run=True)  # validate the arguments now rather than mid-training

    def record(self, step: int | None = None, dry_run: bool = False) -> IIWResult:
        """Measure IIW now (at the model's current weights) and store it under ``step``."""
        r = fisher(self.model, self.loss_fn, self.data, self.theta_0, groups=self.groups, beta=self.beta,
                   **self.fisher_kwargs)
        if not dry_run:
            self.steps.append(self.count if step is None else int(step))
            self.results.append(r)
        return r

    def step(self, step: int | None = None) -> IIWResult | None:
        """Count one step (or epoch); record every ``every``-th call. Returns the result when recorded."""
        self.count += 1
        if self.count % self.every == 0:
            return self.record(step)
        return None

    __call__ = step

    def attach(self, optimizer: torch.optim.Optimizer):
        """Call :meth:`step` after every ``optimizer.step()``; returns the removable hook handle."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())

    def curve(self, group: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one group, or of the total when ``group`` is None."""
        if group is not None and self.results and group not in self.results[0].per_group:
            raise KeyError(f"group: {group!r} is not tracked; groups are {self.results[0].groups}")
        vals = [r.total if group is None else r.per_group[group] for r in self.results]
        return np.asarray(self.steps, dtype=float), np.asarray(vals, dtype=float)

    def curves(self) -> dict[str, np.ndarray]:
        """Group -> values (and ``"total"``), aligned with :attr:`steps`."""
        if not self.results:
            return {}
        out = {g: self.curve(g)[1] for g in self.results[0].per_group}
        out["total"] = self.curve()[1]
        return out

    def peak(self, group: str | None = None, window: int = 5) -> Peak:
        """The fitting -> compression transition of the recorded curve (see :func:`peak`)."""
        return peak(*self.curve(group), window=window)


def iiw_stat_fns(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    theta_0: Mapping[str, Tensor] | nn.Module,
    *,
    groups: Mapping[str, Sequence[str]] | None = None,
    beta: float | None = None,
    per_group: bool = True,
    prefix: str = "iiw",
    **fisher_kwargs: Any,
) -> dict[str, Callable[[dict[str, Tensor]], Tensor]]:
    """``stat_fns`` for :func:`pib_bayes.sample`: Fisher IIW of each kept draw in ``sample_stats``.

    Returns ``{"iiw": total, "iiw/<group>": per group ...}``; the Fisher IIW of a draw is computed once
    and shared by all its keys. ``data`` should be a fixed probe subset (it is evaluated at every
    kept draw of every chain).

    >>> import torch, pib_bayes
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 1)
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> theta_0 = {k: v.clone() for k, v in net.state_dict().items()}
    >>> fns = iiw_stat_fns(net, "gaussian", (x, y), theta_0, beta=1 / 64)
    >>> post = pib_bayes.sample(net, "gaussian", (x, y), beta=1 / 64, step_size=1e-3, num_chains=2,
    ...                         num_warmup=10, num_draws=5, stat_fns=fns)
    >>> post.sample_stats["iiw"].shape
    torch.Size([2, 5])
    """
    probe = fisher(model, loss_fn, data, theta_0, groups=groups, beta=beta, **fisher_kwargs)  # validates
    cache: dict[str, Any] = {"key": None, "result": None}

    def compute(params: dict[str, Tensor]) -> IIWResult:
        # the driver passes fresh views of the same chain tensors for each key: reuse the result
        key = tuple((n, t.data_ptr(), t._version, tuple(t.shape)) for n, t in sorted(params.items()))
        if cache["key"] != key:
            cache["result"] = fisher(model, loss_fn, data, theta_0, groups=groups, beta=beta, params=params,
                                     **fisher_kwargs)
            cache["key"] = key
        return cache["result"]

    fns: dict[str, Callable[[dict[str, Tensor]], Tensor]] = {
        prefix: lambda p: torch.tensor(compute(p).total, dtype=torch.float64)}
    if per_group:
        for g in probe.per_group:
            fns[f"{prefix}/{g}"] = (lambda name: lambda p: torch.tensor(compute(p).per_group[name],
                                                                        dtype=torch.float64))(g)
    return fns


def iiw_stat_fn(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    theta_0: Mapping[str, Tensor] | nn.Module,
    *,
    group: str | None = None,
    **kwargs: Any,
) -> Callable[[dict[str, Tensor]], Tensor]:
    """One ``stat_fn`` (the total, or one group's value) for ``pib_bayes.sample(..., stat_fns={"iiw": ...})``.

    Keyword arguments go to :func:`iiw_stat_fns` (``groups``, ``beta``, Fisher options).
    """
    fns = iiw_stat_fns(model, loss_fn, data, theta_0, per_group=group is not None, **kwargs)
    key = "iiw" if group is None else f"iiw/{group}"
    if key not in fns:
        raise ValueError(f"group: {group!r} is not a group; groups are {[k[4:] for k in fns if k != 'iiw']}")
    return fns[key]
