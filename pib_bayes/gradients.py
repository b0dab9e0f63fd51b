"""Gradient estimators: the seam between a minibatch and the kernel's ``grad U`` (BlackJAX style).

A gradient estimator maps ``(params, batched, x, y, stacked)`` to ``(U_B, loss_B, grad U_B)`` per
chain: ``params`` is the list of a chain group's weight tensors (each ``(K, *shape)``, leaves that
require grad), ``batched`` says whether the K chains run vectorized, ``stacked`` whether the
minibatch has a leading chain dimension. The driver's plain estimator is the minibatch gradient
``grad U_B(w) = (1/beta) mean_{i in B} grad l_i(w) - grad log p(w)``; other estimators wrap it
(control variates here). A :class:`GradientTransform` then acts on the estimate before the kernel
steps (the data-parallel all-reduce).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["GradientEstimator", "GradientTransform", "ControlVariateGradient", "full_data_gradient",
           "GRADIENTS"]

GRADIENTS = ("minibatch", "cv")


class GradientEstimator(Protocol):
    def __call__(self, params: Sequence[Tensor], batched: bool, x: Tensor, y: Tensor,
                 stacked: bool) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]: ...


class GradientTransform(Protocol):
    """What the driver applies to a chain group's gradient between the estimator and the kernel
    (``pib_bayes.sample(gradient_transform=...)``): ``(params, grads) -> (grads', stop)``.

    ``params`` and ``grads`` are the group's tensors, each ``(K, *shape)``; ``grads'`` is the gradient
    the kernel steps on (e.g. the size-weighted all-reduce over data shards, grad U_S = sum_r (n_r/n)
    grad U_{S_r}, :func:`pib_bayes.distributed.sample_distributed`), and ``stop`` a ``(K,)`` bool
    mask of chains to stop now (None: none), which the driver handles as it handles a diverged chain:
    their weights become NaN (every chain stopped: no step at all). It runs after the driver's
    divergence test of the step, so a chain this process found diverging is already NaN in
    ``params`` (a transform can pass that on, as the all-reduce does).
    """

    def __call__(self, params: Sequence[Tensor],
                 grads: Sequence[Tensor]) -> tuple[Sequence[Tensor], Tensor | None]: ...


def full_data_gradient(base: GradientEstimator, params: Sequence[Tensor], batched: bool,
                       chunks: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``(U_S, L_S, grad U_S)`` at ``params`` over the whole data, as the size-weighted mean of
    ``base`` over ``chunks`` (every chain sees every chunk):

        grad U_S(w) = sum_c (|c|/n) [grad L_c(w)/beta - grad log p(w)] = grad L_S(w)/beta - grad log p(w)
    """
    sums: list[Tensor] | None = None
    u_sum = loss_sum = None
    total = 0
    for x, y in chunks:
        m = int(x.shape[0])
        u, loss, grads = base(params, batched, x, y, False)
        g = [t.detach() * m for t in grads]
        sums = g if sums is None else [a + b for a, b in zip(sums, g, strict=True)]
        u_sum = u * m if u_sum is None else u_sum + u * m
        loss_sum = loss * m if loss_sum is None else loss_sum + loss * m
        total += m
    if sums is None or total == 0:
        raise ValueError("gradient: 'cv' needs the full data, and the data yield no examples")
    return u_sum / total, loss_sum / total, [t / total for t in sums]


class ControlVariateGradient:
    """Control-variate gradient (Baker et al. 2019, "SGLD-CV"; SPEC §2) around a centre w_hat:

        grad U_cv(w) = grad U_S(w_hat) + grad U_B(w) - grad U_B(w_hat)
                     = grad L_S(w_hat)/beta + (1/beta) mean_{i in B} [grad l_i(w) - grad l_i(w_hat)]
                       - grad log p(w)

    (the prior terms at w_hat cancel). Unbiased for any centre; its variance is that of the
    per-example gradient *differences*, which vanishes as w -> w_hat. Cost: one full-data gradient
    at w_hat (given here as ``centre_grad``), then two minibatch gradients per step.

    Args:
        base: the plain minibatch estimator it wraps.
        centre: w_hat, tensors shaped like the chain group's parameters (one centre per chain).
        centre_grad: ``grad U_S(w_hat)`` per tensor (:func:`full_data_gradient`).

    Examples:
        >>> import torch
        >>> def base(params, batched, x, y, stacked):  # U = mean_i (w - x_i)^2 / 2, no prior
        ...     w = params[0]
        ...     return (w - x).square().mean() / 2, torch.zeros(()), ((w - x).mean(0),)
        >>> data = torch.arange(6.0).reshape(6, 1)
        >>> centre = [torch.tensor([1.0])]
        >>> full = full_data_gradient(base, centre, False, [(data, data)])[2]  # grad U_S(w_hat)
        >>> cv = ControlVariateGradient(base, centre, full)
        >>> w = torch.tensor([4.0])
        >>> cv([w], False, data[:2], data[:2], False)[2][0]  # = grad U_S(w) = w - mean(x), for every batch
        tensor([1.5000])
    """

    def __init__(self, base: GradientEstimator, centre: Sequence[Tensor],
                 centre_grad: Sequence[Tensor]) -> None:
        self.base = base
        self.centre = [c.detach().clone().requires_grad_(True) for c in centre]
        self.centre_grad = [g.detach().clone() for g in centre_grad]

    def __call__(self, params: Sequence[Tensor], batched: bool, x: Tensor, y: Tensor,
                 stacked: bool) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        u, loss, grads = self.base(params, batched, x, y, stacked)
        _, _, at_centre = self.base(self.centre, batched, x, y, stacked)
        with torch.no_grad():
            out = tuple(g - gc + full for g, gc, full in zip(grads, at_centre, self.centre_grad, strict=True))
        return u, loss, out

    def state_dict(self) -> dict:
        return {"centre": [c.detach().clone() for c in self.centre],
                "centre_grad": [g.clone() for g in self.centre_grad]}
