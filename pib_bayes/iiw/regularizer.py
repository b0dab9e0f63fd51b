"""A differentiable IIW term for PIB-regularised training: minimise L_S(θ) + β·IIW(θ) (the paper's PIB-SGD).

On each minibatch B the penalty is the Fisher / Δθ estimate of IIW (SPEC §3a) on that batch,

    IIW_B(θ) = Σ_g (1/|B|) Σ_{i∈B} (∇_g l_i(θ)ᵀ (θ_g − θ₀,g))²,

with the directional derivatives from forward-mode JVP (no per-example gradients). Because
``torch.func.jvp`` composes with reverse mode, ``backward()`` differentiates through both Δθ and the
Fisher; pass ``detach_fisher=True`` to treat F as a constant (gradient 2 F Δθ only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..energy import check_beta, resolve_loss
from ._groups import resolve_groups
from .fisher import check_theta0, directional_derivatives

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

    def iiw(self, x: Tensor, y: Tensor) -> Tensor:
        """Σ_g (1/|B|) Σ_i (∇_g l_iᵀ Δθ_g)² on the batch, differentiable in θ (raw scale)."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        fixed = {n: b for n, b in self.model.named_buffers()}
        fixed.update({n: p.detach() for n, p in self.model.named_parameters() if not p.requires_grad})
        primal = {n: (p.detach() if self.detach_fisher else p) for n, p in params.items()}
        tangents = [{n: (params[n] - self.theta_0[n]) if n in members else torch.zeros_like(params[n])
                     for n in self.names} for members in self.groups.values()]
        d = directional_derivatives(self.model, self.loss_fn, primal, tangents, x, y, fixed)  # (G, B)
        return d.square().mean(1).sum()

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        value = self.iiw(x, y)
        return self.beta * value if self.units == "raw" else 0.5 * value
