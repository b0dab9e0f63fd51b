"""A differentiable IIW term for PIB-regularised training: minimise L_S(θ) + β·IIW(θ) (the paper's PIB-SGD).

On each minibatch B the penalty is the Fisher / Δθ estimate of IIW (SPEC §3a) on that batch,

    IIW_B(θ) = Σ_g (1/|B|) Σ_{i∈B} (∇_g l_i(θ)ᵀ (θ_g − θ₀,g))²,

with the directional derivatives ∇_g l_iᵀ Δθ_g from the layerwise engine of :func:`~pib_bayes.iiw.fisher`
(Linear/Conv layers: one forward pass, one backward pass to the layer outputs built with
``create_graph``, one ΔW·a product per layer) or from forward-mode JVP (any model); neither forms a
per-example gradient. ``backward()`` differentiates through both Δθ and the Fisher; pass
``detach_fisher=True`` to treat F as a constant (gradient 2 F Δθ only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..energy import check_beta, resolve_loss
from ._groups import resolve_groups
from ._layerwise import plan_layerwise
from .fisher import ENGINES, _per_example, check_theta0, directional_derivatives, zero_padding_rows

__all__ = ["IIWRegularizer"]


class IIWRegularizer:
    """``reg(x, y) = β · IIW_B(θ)`` on the minibatch (``units="raw"``, the paper's Δθᵀ F Δθ), or
    ``½ IIW_B(θ)`` when ``units="nats"`` (= β · ½ΔθᵀFΔθ/β, the nats-scaled IIW times β).

    Works with any optimizer (SGD, Adam, :class:`pib_bayes.optim.SGLD`): add it to the data loss
    and call ``backward()``.

    Args:
        model: the network being trained (its trainable parameters are θ).
        loss_fn: per-example loss (``reduction="none"``) or ``"cross_entropy"``/``"gaussian"``.
        theta_0: the prior mean θ₀ (initial weights, or :func:`~pib_bayes.iiw.fit_prior_mean`).
        beta: the PIB trade-off β > 0.
        groups: ``{group: [names]}``; default one group per layer (block-diagonal Fisher).
        detach_fisher: hold the per-example gradients constant when differentiating.
        engine: ``"auto"`` (default): the layerwise engine when every parameter is the weight or
            bias of an nn.Linear/nn.Conv layer and no BatchNorm layer is in training mode (it
            mixes the examples of a batch, so l_i depends on the other inputs), else forward-mode
            JVP; ``"layerwise"`` or ``"jvp"`` force one (same value and gradient to float
            rounding). :attr:`last_engine` says which one the last call used.

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> theta_0 = {k: v.clone() for k, v in net.state_dict().items()}
    >>> reg = IIWRegularizer(net, "cross_entropy", theta_0, beta=0.1)
    >>> opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> for _ in range(3):
    ...     opt.zero_grad()
    ...     loss = nn.functional.cross_entropy(net(x), y) + reg(x, y)
    ...     loss.backward()
    ...     opt.step()
    >>> float(reg(x, y).detach()) > 0
    True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        theta_0: Mapping[str, Tensor] | nn.Module,
        *,
        beta: float,
        groups: Mapping[str, Sequence[str]] | None = None,
        units: str = "raw",
        detach_fisher: bool = False,
        engine: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if units not in ("raw", "nats"):
            raise ValueError(f"units: expected 'raw' (β·ΔθᵀFΔθ) or 'nats' (½ΔθᵀFΔθ), got {units!r}")
        self.model = model
        self.loss_fn, _ = resolve_loss(loss_fn)
        self.beta = check_beta(beta)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.groups = resolve_groups(names, groups)
        self.names = names
        measured = [n for g in self.groups.values() for n in g]
        self.theta_0 = check_theta0(model, theta_0, measured)
        self.units, self.detach_fisher = units, detach_fisher
        if engine not in ENGINES:
            raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
        self.engine, self._measured = engine, measured
        self._layerwise_plan()  # engine='layerwise' on a model it cannot take fails here, not mid-training
        self.last_engine: str | None = None

    def _layerwise_plan(self):
        """The layerwise plan for this call (hooks may have been added since), or None for JVP."""
        plan = None if self.engine == "jvp" else plan_layerwise(self.model, self.groups)
        if self.engine == "layerwise" and plan is None:
            raise ValueError("engine: 'layerwise' needs every trainable parameter to be the weight or bias "
                             "of an nn.Linear/nn.Conv1d/2d/3d used by that module alone and no forward hook; "
                             "use engine='jvp' or 'auto'")
        # a BatchNorm layer in training mode normalises with the batch's statistics: l_i then depends
        # on the other examples' inputs, which the layerwise identity does not allow
        if plan is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                                    for m in self.model.modules()):
            if self.engine == "layerwise":
                raise ValueError("engine: 'layerwise' needs per-example losses, but a BatchNorm layer is in "
                                 "training mode; use engine='auto' (JVP then) or model.eval()")
            return None
        return plan

    def iiw(self, x: Tensor, y: Tensor) -> Tensor:
        """Σ_g (1/|B|) Σ_i (∇_g l_iᵀ Δθ_g)² on the batch, differentiable in θ (raw scale)."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        fixed = {n: b for n, b in self.model.named_buffers()}
        fixed.update({n: p.detach() for n, p in self.model.named_parameters() if not p.requires_grad})
        primal = {n: (p.detach() if self.detach_fisher else p) for n, p in params.items()}
        plan = self._layerwise_plan()
        if plan is not None:
            self.last_engine = "layerwise"
            deltas = {n: params[n] - self.theta_0[n] for n in self._measured}
            d = plan.derivatives(self.model, partial(_per_example, self.loss_fn), primal, deltas,
                                 len(self.groups), x, y, fixed, differentiable=True)
            return d.square().mean(1).sum().to(next(iter(params.values())).dtype)
        self.last_engine = "jvp"
        # the padding row of an embedding counts zero, as in the layerwise engine
        tangents = [zero_padding_rows(self.model, {n: (params[n] - self.theta_0[n]) if n in members
                                                   else torch.zeros_like(params[n]) for n in self.names})
                    for members in self.groups.values()]
        d = directional_derivatives(self.model, self.loss_fn, primal, tangents, x, y, fixed)  # (G, B)
        return d.square().mean(1).sum()

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        value = self.iiw(x, y)
        return self.beta * value if self.units == "raw" else 0.5 * value
