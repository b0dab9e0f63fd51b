"""Priors p(w) over the sampled parameters (SPEC §1).

A prior maps a dict ``{name: tensor}`` of parameters to ``log p(w)``. Parameters may carry
``batch_ndim`` leading batch dimensions (the chain dimension when chains run batched); the
log-density is summed over the remaining, per-parameter dimensions, so the result has the
batch shape.

The default prior is the isotropic Gaussian ``N(theta_0, sigma_0^2 I)`` with ``theta_0`` the
initial weights (the paper's choice), or zeros, or any state dict (e.g. a data-dependent prior
mean fitted on a held-out split, never on the sample S itself).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ._validate import is_real

__all__ = ["Prior", "GaussianPrior", "DistributionPrior", "FlatPrior", "as_prior", "check_prior_fits"]


@runtime_checkable
class Prior(Protocol):
    """Anything with ``log_prob(params, batch_ndim=0) -> Tensor``."""

    def log_prob(self, params: Mapping[str, Tensor], batch_ndim: int = 0) -> Tensor: ...


def _check_std(name: str, s: object) -> float | Tensor:
    if isinstance(s, Tensor):
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise ValueError(f"{name}: every prior standard deviation must be finite and > 0")
        return s
    if not is_real(s):
        raise TypeError(f"{name}: expected a finite number > 0 or a tensor, got {type(s).__name__} {s!r}")
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"{name}: the prior std must be finite and > 0, got {s!r}")
    return float(s)


def _sum_event(t: Tensor, batch_ndim: int) -> Tensor:
    return t.sum(dim=tuple(range(batch_ndim, t.dim()))) if t.dim() > batch_ndim else t


def _isotropic_value(diffs: list[Tensor], inv_vars: tuple[float, ...], batch_ndim: int) -> Tensor:
    """``sum_j -||d_j||^2 / (2 s_j^2)`` per batch element (the only expression both paths use)."""
    sq = torch.stack([torch.linalg.vecdot(d.flatten(batch_ndim), d.flatten(batch_ndim)) for d in diffs])
    coef = torch.tensor(inv_vars, dtype=sq.dtype, device=sq.device).mul_(-0.5)
    return torch.tensordot(coef, sq, dims=1)


def _differences(ws: tuple[Tensor, ...], means: tuple[Tensor | None, ...]) -> list[Tensor]:
    return [w - m if m is not None else w for w, m in zip(ws, means, strict=True)]


class _IsotropicGaussianLogDensity(torch.autograd.Function):
    """``sum_j -||w_j - m_j||^2 / (2 s_j^2)`` per batch element for tensors with a scalar ``s_j``, as one
    autograd node with the analytic gradient ``-(w_j - m_j) / s_j^2`` (the subtract, square, sum and
    scale would otherwise record, and backpropagate through, five nodes per tensor every step).
    Works under ``torch.func.vmap`` (generated rule) and twice differentiable (the backward pass
    is made of ordinary ops on the saved inputs).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(means: tuple, inv_vars: tuple, batch_ndim: int, *ws: Tensor) -> Tensor:  # type: ignore[override]
        return _isotropic_value(_differences(ws, means), inv_vars, batch_ndim)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        means, inv_vars, batch_ndim, *ws = inputs
        ctx.means, ctx.inv_vars, ctx.batch_ndim = means, inv_vars, batch_ndim
        ctx.save_for_backward(*ws)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grads = []
        for d, iv in zip(_differences(ctx.saved_tensors, ctx.means), ctx.inv_vars, strict=True):
            g = grad.reshape(grad.shape + (1,) * (d.dim() - ctx.batch_ndim)) if ctx.batch_ndim else grad
            grads.append(d * (g * -iv))
        return (None, None, None, *grads)


class _ClosedForm:
    """``ws -> (log p(w), grad of -log p)`` of a :class:`GaussianPrior` with scalar sigmas on a fixed list of
    unbatched tensors (see :meth:`GaussianPrior.closed_form`)."""

    def __init__(self, prior: GaussianPrior, names: list[str], like: list[Tensor], stds: list[float]) -> None:
        # w - 0 is w exactly: a missing mean is a zero tensor, so that one foreach op serves every tensor
        self.means = [prior.mean[n].to(w.device) if n in prior.mean else torch.zeros_like(w)
                      for n, w in zip(names, like, strict=True)]
        self.inv_vars = [1.0 / s**2 for s in stds]
        self.const = 0.0
        for w, s in zip(like, stds, strict=True):  # the order log_prob sums its normalisers in
            self.const -= w.numel() * (math.log(s) + 0.5 * math.log(2 * math.pi))
        self.coef = torch.tensor(self.inv_vars, dtype=like[0].dtype, device=like[0].device).mul_(-0.5)
        same = len(set(self.inv_vars)) == 1
        self.scale: float | list[float] | None = (None if same and self.inv_vars[0] == 1.0
                                                  else self.inv_vars[0] if same else self.inv_vars)

    def __call__(self, ws: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        with torch.no_grad():
            diffs = torch._foreach_sub([w.detach() for w in ws], self.means)
            norms = torch.stack(torch._foreach_norm(diffs))
            value = torch.dot(norms * self.coef, norms) + self.const
            if self.scale is not None:
                torch._foreach_mul_(diffs, self.scale)  # d * (1/s^2): log_prob_and_grad's numbers
            return value, diffs


class _ClosedFormLogDensity(torch.autograd.Function):
    """``log p(w)`` of a :class:`_ClosedForm` as one autograd node: forward computes the value and the
    gradient together (:class:`_ClosedForm`'s numbers, so the sampler and the optimizer form agree to
    the bit) and backward hands out ``-grad * (w - m) / s^2``; under ``create_graph`` it recomputes
    that from the saved inputs with differentiable ops, so the node is twice differentiable. The
    old-style signature: ``apply`` does not bind its arguments through ``inspect`` on every call."""

    @staticmethod
    def forward(ctx, plan: _ClosedForm, *ws: Tensor) -> Tensor:  # type: ignore[override]
        value, grads = plan(ws)
        ctx.plan, ctx.grads = plan, grads
        ctx.save_for_backward(*ws)
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        plan = ctx.plan
        if torch.is_grad_enabled():  # create_graph=True: a differentiable expression of the inputs
            diffs = [w - m for w, m in zip(ctx.saved_tensors, plan.means, strict=True)]
            scale = plan.inv_vars if isinstance(plan.scale, list) else [plan.scale or 1.0] * len(diffs)
            return (None, *[d * (grad * -iv) for d, iv in zip(diffs, scale, strict=True)])
        grads, ctx.grads = ctx.grads, None
        return (None, *torch._foreach_mul(grads, -grad))


class GaussianPrior:
    """Diagonal Gaussian prior ``N(theta_0, diag(sigma_0^2))``.

    ``log p(w) = sum_j [ -(w_j - theta_0j)^2 / (2 sigma_0j^2) - log sigma_0j - log(2 pi)/2 ]``

    Args:
        std: ``sigma_0``: one float for all parameters, or a mapping name -> float/tensor
            (per layer or per weight). Names missing from the mapping use ``default_std``.
        mean: ``theta_0``: a mapping name -> tensor; parameters missing from it have mean 0.
        default_std: sigma for names absent from a ``std`` mapping.

    Use :meth:`from_module` to centre it on a module's current (initial) weights.

    >>> import torch
    >>> prior = GaussianPrior(std=2.0)
    >>> float(prior.log_prob({"w": torch.zeros(3)}))  # 3 * (-log 2 - log(2 pi)/2)
    -4.836...
    """

    def __init__(
        self,
        std: float | Mapping[str, float | Tensor] = 1.0,
        mean: Mapping[str, Tensor] | None = None,
        default_std: float = 1.0,
    ) -> None:
        self.std = dict(std) if isinstance(std, Mapping) else _check_std("std", std)
        self.default_std = _check_std("default_std", default_std)
        if mean is not None and not isinstance(mean, Mapping):
            raise TypeError(f"mean: expected a mapping name -> tensor (a state dict), "
                            f"got {type(mean).__name__}")
        self.mean = {}
        for k, v in (mean or {}).items():
            if not isinstance(v, Tensor):
                raise TypeError(f"mean: {k!r} must be a tensor, got {type(v).__name__}")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"mean: {k!r} contains NaN or Inf values")
            self.mean[k] = v.detach().clone()
        if isinstance(self.std, dict):
            for name, s in self.std.items():
                _check_std(f"std[{name!r}]", s)
        # the trainable parameter names of the module it was built for (set by from_module): a
        # posterior over other names would silently get a zero-mean prior for them
        self.param_names: frozenset[str] | None = None

    def std_of(self, name: str) -> float | Tensor:
        if isinstance(self.std, dict):
            return self.std.get(name, self.default_std)
        return self.std

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        std: float | Mapping[str, float | Tensor] = 1.0,
        mean: str | Mapping[str, Tensor] = "init",
    ) -> GaussianPrior:
        """Prior for ``module``'s trainable parameters.

        ``mean="init"`` centres it on the module's current weights, ``"zeros"`` on 0, or pass a
        state dict (missing names fall back to the current weights).
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        current = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        if isinstance(mean, str):
            if mean == "init":
                centre = current
            elif mean == "zeros":
                centre = {}
            else:
                raise ValueError(f"mean: expected 'init', 'zeros' or a state dict, got {mean!r}")
        else:
            unknown = set(mean) - set(current)
            if unknown:
                raise ValueError(f"mean: names {sorted(unknown)} are not trainable parameters of the module")
            centre = dict(current)
            for n, v in mean.items():
                if tuple(v.shape) != tuple(current[n].shape):
                    raise ValueError(
                        f"mean: {n!r} has shape {tuple(v.shape)}, the parameter has {tuple(current[n].shape)}"
                    )
                centre[n] = v.detach().to(current[n].dtype).clone()
        if isinstance(std, Mapping):
            unknown = set(std) - set(current)
            if unknown:
                raise ValueError(f"std: names {sorted(unknown)} are not trainable parameters of the module")
            for n, s in std.items():
                if isinstance(s, Tensor) and s.dim() > 0:
                    try:
                        torch.broadcast_shapes(s.shape, current[n].shape)
                    except RuntimeError:
                        raise ValueError(f"std: {n!r} has shape {tuple(s.shape)}, which does not broadcast "
                                         f"to the parameter's {tuple(current[n].shape)}") from None
        prior = cls(std=std, mean=centre)
        prior.param_names = frozenset(current)
        return prior

    def _isotropic(self, params: Mapping[str, Tensor], batch_ndim: int) -> tuple[list, float]:
        """``[(w, mean or None, 1/s^2)]`` for the tensors with a scalar sigma, and their log-normaliser."""
        parts, const = [], 0.0
        for name, w in params.items():
            std = self.std_of(name)
            if isinstance(std, float):
                m = self.mean.get(name)
                parts.append((w, m.to(w.device) if m is not None else None, 1.0 / std**2))
                const -= math.prod(w.shape[batch_ndim:]) * (math.log(std) + 0.5 * math.log(2 * math.pi))
        return parts, const

    def log_prob(self, params: Mapping[str, Tensor], batch_ndim: int = 0) -> Tensor:
        total: Tensor | float = 0.0
        for name, w in params.items():
            m = self.mean.get(name)
            std = self.std_of(name)
            if isinstance(std, float):  # below, all such tensors in one autograd node
                continue
            s = torch.as_tensor(std, dtype=w.dtype, device=w.device)
            z = (w - m.to(w.device)) / s if m is not None else w / s
            lp = -0.5 * z.square() - torch.log(s) - 0.5 * math.log(2 * math.pi)
            lp = lp.expand_as(w) if lp.shape != w.shape else lp
            total = total + _sum_event(lp, batch_ndim)
        parts, const = self._isotropic(params, batch_ndim)
        if parts:
            ws, means, inv_vars = zip(*parts, strict=True)
            total = total + _IsotropicGaussianLogDensity.apply(means, inv_vars, batch_ndim, *ws) + const
        return torch.as_tensor(total)

    def log_prob_and_grad(self, params: Mapping[str, Tensor],
                          batch_ndim: int = 0) -> tuple[Tensor, list[Tensor]] | None:
        """``(log p(w), [(w - theta_0) / sigma_0^2 per tensor])``, i.e. the log-density and the gradient of
        ``-log p``, with no autograd graph: the same numbers as :meth:`log_prob` and its backward pass.
        The sampler adds the gradient to the likelihood's instead of backpropagating through the
        prior. ``None`` when a sigma is a tensor (then use :meth:`log_prob`). A gradient may share
        memory with its parameter (sigma = 1, zero mean): use it before the parameters change.
        """
        if any(not isinstance(self.std_of(name), float) for name in params):
            return None
        parts, const = self._isotropic(params, batch_ndim)
        if not parts:
            return None
        ws, means, inv_vars = zip(*parts, strict=True)
        with torch.no_grad():
            diffs = _differences(tuple(w.detach() for w in ws), means)
            total: Tensor | float = 0.0
            total = total + _isotropic_value(diffs, inv_vars, batch_ndim) + const
            # in place: w - m was a fresh tensor (unless m is None: then it is w itself)
            grads = [(d.mul_(iv) if m is not None else d * iv) if iv != 1.0 else d
                     for d, m, iv in zip(diffs, means, inv_vars, strict=True)]
            return torch.as_tensor(total), grads

    def closed_form(self, names: Sequence[str], like: Sequence[Tensor]) -> _ClosedForm | None:
        """For the unbatched tensors ``like`` (one per name in ``names``), a function
        ``ws -> (log p(w), [(w_j - theta_0j) / sigma_0j^2])`` (value and gradient of ``-log p``, no
        autograd graph) with the means placed and laid out once, made of a handful of multi-tensor
        (``torch._foreach_*``) ops: what a sampler calls every step. ``None`` when a sigma is a tensor.
        The gradients are the same numbers as :meth:`log_prob_and_grad`'s; the value agrees with
        :meth:`log_prob` to float rounding (it sums squared norms).

        >>> import torch
        >>> prior = GaussianPrior(std=2.0)
        >>> value, grads = prior.closed_form(["w"], [torch.zeros(3)])([torch.ones(3)])
        >>> round(float(value), 4), grads[0].tolist()  # 3 * (-1/8 - log 2 - log(2 pi)/2), w / 4
        (-5.2113, [0.25, 0.25, 0.25])
        """
        stds = [self.std_of(n) for n in names]
        if not stds or any(not isinstance(s, float) for s in stds):
            return None
        return _ClosedForm(self, list(names), list(like), stds)  # type: ignore[arg-type]

    def sample_like(self, params: Mapping[str, Tensor], generator: torch.Generator | None = None) -> dict:
        """One draw from the prior with the shapes of ``params``, ``mean + std * N(0, I)``.

        ``generator`` (a ``torch.Generator``; None: the global stream) rather than a ``seed``:
        :func:`~pib_bayes.sample` hands each chain its own stream (``init="prior"``).

        >>> import torch
        >>> gen = torch.Generator().manual_seed(0)
        >>> draw = GaussianPrior(std=0.5).sample_like({"w": torch.zeros(2, 3)}, gen)
        >>> tuple(draw["w"].shape)
        (2, 3)
        """
        out = {}
        for name, w in params.items():
            s = torch.as_tensor(self.std_of(name), dtype=w.dtype)
            m = self.mean.get(name, torch.zeros_like(w))
            out[name] = m + s * torch.randn(w.shape, generator=generator, dtype=w.dtype)
        return out

    def __repr__(self) -> str:
        std = self.std if not isinstance(self.std, dict) else {k: float(torch.as_tensor(v).mean())
                                                                 for k, v in self.std.items()}
        centred = "zeros" if not self.mean else f"{len(self.mean)} tensors"
        return f"GaussianPrior(std={std}, mean={centred})"


class DistributionPrior:
    """Any ``torch.distributions`` / Pyro distribution, applied elementwise.

    ``dist`` is either one distribution broadcast to every weight (e.g. ``Laplace(0, 1)``), or a
    mapping name -> distribution whose ``log_prob`` accepts that parameter's tensor.

    >>> import torch
    >>> prior = DistributionPrior(torch.distributions.Laplace(0.0, 1.0))
    >>> float(prior.log_prob({"w": torch.zeros(2)}))  # 2 * log(1/2)
    -1.386...
    """

    def __init__(
        self, dist: torch.distributions.Distribution | Mapping[str, torch.distributions.Distribution]
    ) -> None:
        self.dist = dist

    def log_prob(self, params: Mapping[str, Tensor], batch_ndim: int = 0) -> Tensor:
        total: Tensor | float = 0.0
        for name, w in params.items():
            d = self.dist[name] if isinstance(self.dist, Mapping) else self.dist
            lp = d.log_prob(w)
            total = total + _sum_event(lp, batch_ndim)
        return torch.as_tensor(total)

    def __repr__(self) -> str:
        return f"DistributionPrior({self.dist!r})"


class FlatPrior:
    """Improper flat prior, ``log p(w) = 0`` (pure Gibbs measure of the loss)."""

    def log_prob(self, params: Mapping[str, Tensor], batch_ndim: int = 0) -> Tensor:
        w = next(iter(params.values()))
        return torch.zeros(w.shape[:batch_ndim], dtype=w.dtype)

    def __repr__(self) -> str:
        return "FlatPrior()"


def _fits(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return tuple(torch.broadcast_shapes(shape, target)) == tuple(target)
    except RuntimeError:
        return False


def check_prior_fits(prior: object, shapes: Mapping[str, tuple[int, ...]], what: str = "prior") -> None:
    """Raise ``ValueError`` naming ``what`` unless ``prior`` covers every parameter in ``shapes``
    (name -> shape) with tensors of fitting shapes: a :class:`GaussianPrior` built by
    :meth:`GaussianPrior.from_module` for another module, a mean or std of another shape, or a
    :class:`DistributionPrior` whose distribution's ``batch_shape + event_shape`` does not broadcast
    to a parameter's shape (it would silently expand the log-density).

    >>> import torch
    >>> try:
    ...     check_prior_fits(DistributionPrior(torch.distributions.Normal(torch.zeros(4), 1.0)), {"w": (3,)})
    ... except ValueError as err:
    ...     print(str(err)[:44])
    prior: the distribution for 'w' has shape (4
    """
    if isinstance(prior, GaussianPrior):
        if prior.param_names is not None:
            missing = sorted(set(shapes) - prior.param_names)
            if missing:
                raise ValueError(f"{what}: was built (GaussianPrior.from_module) for a module without the "
                                 f"parameters {missing}; build it from the sampled module")
        for n, shape in shapes.items():
            m = prior.mean.get(n)
            if m is not None and tuple(m.shape) != tuple(shape):
                raise ValueError(f"{what}: the mean of {n!r} has shape {tuple(m.shape)}, the parameter "
                                 f"{tuple(shape)}; build the prior from the sampled module")
            std = prior.std_of(n)
            if isinstance(std, Tensor) and not _fits(tuple(std.shape), tuple(shape)):
                raise ValueError(f"{what}: the std of {n!r} has shape {tuple(std.shape)}, which does not "
                                 f"broadcast to the parameter's {tuple(shape)}")
    elif isinstance(prior, DistributionPrior):
        for n, shape in shapes.items():
            if isinstance(prior.dist, Mapping):
                if n not in prior.dist:
                    raise ValueError(f"{what}: no distribution for the parameter {n!r}; the mapping has "
                                     f"{sorted(prior.dist)}")
                d = prior.dist[n]
            else:
                d = prior.dist
            dshape = tuple(d.batch_shape) + tuple(d.event_shape)
            if not _fits(dshape, tuple(shape)):
                raise ValueError(f"{what}: the distribution for {n!r} has shape {dshape}, which does not "
                                 f"broadcast to the parameter's {tuple(shape)}; use a scalar distribution "
                                 "(e.g. Laplace(0., 1.)) or one of that shape")


def as_prior(prior: object, module: nn.Module) -> Prior:
    """Normalise the ``prior=`` argument of the public API.

    ``None`` -> ``GaussianPrior.from_module(module, std=1.0, mean="init")``; a float -> the same with
    that sigma_0; a torch distribution -> :class:`DistributionPrior`; a :class:`Prior` as is.
    """
    if prior is None:
        return GaussianPrior.from_module(module, std=1.0, mean="init")
    if isinstance(prior, bool):
        raise TypeError("prior: expected None, a float sigma_0, a torch distribution or a Prior, got a bool")
    if isinstance(prior, (int, float)):
        if not prior > 0 or not math.isfinite(prior):
            raise ValueError(f"prior: sigma_0 must be a finite float > 0, got {prior}")
        return GaussianPrior.from_module(module, std=float(prior), mean="init")
    if isinstance(prior, torch.distributions.Distribution):
        return DistributionPrior(prior)
    if isinstance(prior, Prior):
        return prior
    raise TypeError(
        f"prior: expected None, a float sigma_0, a torch distribution or an object with log_prob(params), "
        f"got {type(prior).__name__}"
    )
