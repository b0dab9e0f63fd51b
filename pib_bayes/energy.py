"""The PIB energy U(w) = L_S(w)/beta - log p(w) (SPEC §1) and the losses it is built from.

Minibatch estimate with batch B:  U_B(w) = (1/|B|) sum_{i in B} l_i(w) / beta - log p(w).

The temperature table (loss = negative log-likelihood per example, n examples):

=================  ===========================================
beta = 1/n         the ordinary Bayesian posterior
beta -> 0          concentrates on the empirical-risk minimisers
beta large         pulls toward the prior
beta = T/n         cold/warm posterior at temperature T
=================  ===========================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .prior import Prior, as_prior

__all__ = ["Energy", "GaussianLoss", "resolve_loss", "beta_from_temperature", "check_beta"]

LossFn = Callable[[Tensor, Tensor], Tensor]


class GaussianLoss:
    """Gaussian negative log-likelihood per example, ``l = ||y - f(x)||^2 / (2 s^2)``.

    The constant ``log s + log(2 pi)/2`` per output dimension is left out of the energy (it does
    not move the posterior) but :meth:`nll` includes it. ``noise_std`` is the aleatoric noise
    that :meth:`pib_bayes.Posterior.predict` adds to the predictive variance.

    >>> import torch
    >>> GaussianLoss(noise_std=2.0)(torch.tensor([[1.0]]), torch.tensor([[3.0]]))
    tensor([0.5000])
    """

    task = "regression"

    def __init__(self, noise_std: float = 1.0) -> None:
        self.noise_std = check_positive_finite("noise_std", noise_std)

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        if target.numel() != output.numel():
            raise ValueError(f"y: the targets have shape {tuple(target.shape)} but the model outputs "
                             f"{tuple(output.shape)}; give one target per output")
        target = target.reshape(output.shape)
        sq = (output - target).square() / (2 * self.noise_std**2)
        return sq.reshape(sq.shape[0], -1).sum(1) if sq.dim() > 1 else sq

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        d = output[0].numel() if output.dim() > 1 else 1
        return self(output, target) + d * (math.log(self.noise_std) + 0.5 * math.log(2 * math.pi))

    def __repr__(self) -> str:
        return f"GaussianLoss(noise_std={self.noise_std})"


def _cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target, reduction="none")


def resolve_loss(loss_fn: str | LossFn, task: str | None = None) -> tuple[LossFn, str]:
    """Turn the ``loss_fn`` argument into a per-example loss and a task name.

    Strings: ``"cross_entropy"`` (classification), ``"mse"``/``"gaussian"`` (regression,
    ``GaussianLoss(1.0)``). A callable ``(output, target) -> losses`` should return one loss per
    example; a 0-d result is taken as the batch mean (e.g. ``nn.CrossEntropyLoss()``).
    """
    if task not in ("classification", "regression", None):
        raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")
    if isinstance(loss_fn, str):
        key = loss_fn.lower()
        if key in ("cross_entropy", "ce", "nll"):
            return _cross_entropy, task or "classification"
        if key in ("mse", "gaussian"):
            return GaussianLoss(1.0), task or "regression"
        raise ValueError(f"loss_fn: unknown loss {loss_fn!r}; use 'cross_entropy', 'gaussian' or a callable")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable (output, target) -> per-example loss, got {loss_fn!r}")
    if task is None:
        task = getattr(loss_fn, "task", None)
        if task is None and isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
            task = "classification"
        if task is None and isinstance(loss_fn, (nn.MSELoss, nn.GaussianNLLLoss)):
            task = "regression"
        if task is None and loss_fn is F.cross_entropy:
            task = "classification"
    if task not in ("classification", "regression", None):
        raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")
    return loss_fn, task or "regression"


def check_positive_finite(name: str, value: object) -> float:
    """``float(value)`` if it is a finite number > 0, else one error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a finite number > 0, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
    return float(value)


def check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta: must be a finite number > 0 (beta = 1/n is the Bayesian posterior), "
                         f"got {beta!r}")
    return float(beta)


def beta_from_temperature(temperature: float, n: int) -> float:
    """``beta = T / n``: the cold-posterior temperature T on n examples as a PIB beta."""
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    return float(temperature) / n


class Energy:
    """``U_B(w) = mean_{i in B} l_i(w) / beta - log p(w)`` for a torch module (SPEC §1).

    Call :meth:`functional` with an explicit parameter dict (what the driver and the batched
    chains use) or :meth:`of_module` on the module's own parameters (what a hand-written loop
    with :class:`pib_bayes.optim.SGLD` uses).

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Linear(2, 1)
    >>> energy = Energy(model, "gaussian", prior=1.0, beta=0.1)
    >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
    >>> u = energy.of_module(x, y)
    >>> u.backward()  # gradients of U land in model.weight.grad, ready for SGLD.step()
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: str | LossFn,
        prior: Prior | float | torch.distributions.Distribution | None = None,
        beta: float = 1.0,
        task: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._param_names = frozenset(n for n, _ in model.named_parameters())
        self.loss_fn, self.task = resolve_loss(loss_fn, task)
        self.prior = as_prior(prior, model)
        self.beta = check_beta(beta)

    def mean_loss(self, output: Tensor, target: Tensor) -> Tensor:
        losses = self.loss_fn(output, target)
        return losses if losses.dim() == 0 else losses.mean()

    def per_example_loss(self, output: Tensor, target: Tensor) -> Tensor:
        losses = self.loss_fn(output, target)
        if losses.dim() == 0:
            raise ValueError("loss_fn: this needs per-example losses; pass a loss with reduction='none'")
        return losses

    def functional(
        self,
        params: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        buffers: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(U_B(w), mean minibatch loss)`` at ``params``."""
        loss = self.functional_loss(params, x, y, buffers)
        return loss / self.beta - self.prior.log_prob(params), loss

    def functional_loss(
        self,
        params: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        buffers: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """The mean minibatch loss at ``params`` (no prior term)."""
        if not self._param_names.issuperset(params.keys()):
            unknown = sorted(set(params) - self._param_names)
            raise KeyError(f"params: {unknown} are not parameters of the model (a misspelt name would be "
                           "silently ignored by the module)")
        state = dict(params) if not buffers else {**buffers, **params}
        return self.mean_loss(functional_call(self.model, state, (x,)), y)

    def of_module(self, x: Tensor, y: Tensor) -> Tensor:
        """``U_B`` at the module's own trainable parameters (for ``loss.backward()`` loops)."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        loss = self.mean_loss(self.model(x), y)
        return loss / self.beta - self.prior.log_prob(params)
