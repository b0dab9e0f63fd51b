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

from .prior import GaussianPrior, Prior, _ClosedFormLogDensity, as_prior

__all__ = ["Energy", "GaussianLoss", "CrossEntropyLoss", "BCEWithLogitsLoss", "HeteroscedasticGaussianLoss",
           "resolve_loss", "loss_task", "loss_likelihood", "require_task", "beta_from_temperature",
           "check_beta"]

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
    likelihood = "gaussian"

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


class CrossEntropyLoss:
    """Categorical negative log-likelihood of logits, optionally label-smoothed (classification).

    ``l = -sum_k q_k log softmax(f(x))_k`` with ``q = (1 - eps) onehot(y) + eps / K``
    (Szegedy et al. 2016, "label smoothing"); ``eps = 0`` is the plain cross-entropy. The string
    ``"cross_entropy"`` is ``CrossEntropyLoss()``. :meth:`pib_bayes.Posterior.predict` turns the
    outputs into probabilities with a softmax.

    >>> import torch
    >>> CrossEntropyLoss(label_smoothing=0.1)(torch.zeros(1, 2), torch.tensor([0]))
    tensor([0.6931])
    """

    task = "classification"
    likelihood = "categorical"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float))
                or not 0 <= label_smoothing < 1):
            raise ValueError(f"label_smoothing: must be a number in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target, reduction="none", label_smoothing=self.label_smoothing)

    def __repr__(self) -> str:
        return f"CrossEntropyLoss(label_smoothing={self.label_smoothing})"


class BCEWithLogitsLoss:
    """Bernoulli negative log-likelihood of logits (binary classification, one output per example).

    ``l = -[y log sigmoid(f) + (1 - y) log(1 - sigmoid(f))]`` summed over the output's entries, with
    targets y in {0, 1} (any dtype). :meth:`pib_bayes.Posterior.predict` reports the two class
    probabilities ``(1 - sigmoid(f), sigmoid(f))`` per draw, so every classification summary applies.

    >>> import torch
    >>> BCEWithLogitsLoss()(torch.zeros(2, 1), torch.tensor([0, 1]))
    tensor([0.6931, 0.6931])
    """

    task = "classification"
    likelihood = "bernoulli"

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        if target.numel() != output.numel():
            raise ValueError(f"y: the targets have shape {tuple(target.shape)} but the model outputs "
                             f"{tuple(output.shape)}; give one 0/1 target per output")
        target = target.reshape(output.shape).to(output.dtype)
        losses = F.binary_cross_entropy_with_logits(output, target, reduction="none")
        return losses.reshape(losses.shape[0], -1).sum(1) if losses.dim() > 1 else losses

    def __repr__(self) -> str:
        return "BCEWithLogitsLoss()"


class HeteroscedasticGaussianLoss:
    """Gaussian negative log-likelihood with a learnt, input-dependent noise (SPEC §4).

    The model's last dimension holds ``2 d`` values: the means ``mu`` (first d) and the log-stds
    ``log sigma`` (last d); per example ``l = sum_j (y_j - mu_j)^2 / (2 sigma_j^2) + log sigma_j``.
    The constant ``d log(2 pi)/2`` is left out of the energy and included in :meth:`nll`. The
    predictive is the mixture over draws (1/M) sum_m N(mu_m(x), sigma_m(x)^2)
    (:meth:`pib_bayes.Posterior.predict`). String shortcut: ``"heteroscedastic_gaussian"``.

    >>> import torch
    >>> HeteroscedasticGaussianLoss()(torch.tensor([[1.0, 0.0]]), torch.tensor([3.0]))  # mu 1, sigma 1
    tensor([2.])
    """

    task = "regression"
    likelihood = "heteroscedastic_gaussian"

    @staticmethod
    def split(output: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, log sigma)``: the first and second half of the last dimension of ``output``."""
        if output.dim() < 1 or output.shape[-1] % 2:
            raise ValueError(f"model: a heteroscedastic Gaussian needs an even last dimension (mean and "
                             f"log-std halves), the model outputs shape {tuple(output.shape)}")
        return output.chunk(2, dim=-1)

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        mu, log_std = self.split(output)
        if target.numel() != mu.numel():
            raise ValueError(f"y: the targets have shape {tuple(target.shape)} but the model's means have "
                             f"{tuple(mu.shape)} (outputs {tuple(output.shape)}: means, then log-stds)")
        target = target.reshape(mu.shape)
        losses = (target - mu).square() * torch.exp(-2 * log_std) / 2 + log_std
        return losses.reshape(losses.shape[0], -1).sum(1) if losses.dim() > 1 else losses

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        d = self.split(output)[0][0].numel() if output.dim() > 1 else 1
        return self(output, target) + d * 0.5 * math.log(2 * math.pi)

    def __repr__(self) -> str:
        return "HeteroscedasticGaussianLoss()"


TASKS = ("classification", "regression")

_BUILTIN: dict[str, Callable[[], LossFn]] = {
    "cross_entropy": CrossEntropyLoss, "ce": CrossEntropyLoss, "nll": CrossEntropyLoss,
    "bce_with_logits": BCEWithLogitsLoss, "bce": BCEWithLogitsLoss,
    "gaussian": GaussianLoss, "mse": GaussianLoss,
    "heteroscedastic_gaussian": HeteroscedasticGaussianLoss,
}


def _check_task(task: object) -> None:
    if task is not None and task not in TASKS:
        raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")


def loss_task(loss_fn: object) -> str | None:
    """The task a loss implies: its ``task`` attribute, or that of a known torch loss; else None."""
    task = getattr(loss_fn, "task", None)
    if task is None and isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss, nn.BCEWithLogitsLoss,
                                             nn.BCELoss)):
        task = "classification"
    if task is None and isinstance(loss_fn, (nn.MSELoss, nn.GaussianNLLLoss, nn.L1Loss, nn.HuberLoss)):
        task = "regression"
    if task is None and loss_fn in (F.cross_entropy, F.nll_loss, F.binary_cross_entropy_with_logits):
        task = "classification"
    if task is None and loss_fn in (F.mse_loss, F.l1_loss):
        task = "regression"
    return task


def loss_likelihood(loss_fn: object) -> str | None:
    """How predict turns outputs into a predictive: ``"categorical"`` (softmax), ``"bernoulli"``
    (sigmoid), ``"gaussian"``, ``"heteroscedastic_gaussian"``, or None (the task's default)."""
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) or loss_fn is F.binary_cross_entropy_with_logits:
        return "bernoulli"
    return getattr(loss_fn, "likelihood", None)


def resolve_loss(loss_fn: str | LossFn, task: str | None = None) -> tuple[LossFn, str | None]:
    """Turn the ``loss_fn`` argument into a per-example loss and its task.

    Strings: ``"cross_entropy"`` (:class:`CrossEntropyLoss`), ``"bce_with_logits"``
    (:class:`BCEWithLogitsLoss`), ``"gaussian"``/``"mse"`` (``GaussianLoss(1.0)``) and
    ``"heteroscedastic_gaussian"`` (:class:`HeteroscedasticGaussianLoss`). A callable
    ``(output, target) -> losses`` should return one loss per example; a 0-d result is taken as the
    batch mean (e.g. ``nn.CrossEntropyLoss()``). The task is ``task`` if given (it must agree with
    the loss's own), else the loss's (built-in losses, a ``.task`` attribute, known torch losses),
    else None: the caller that needs one (:func:`pib_bayes.sample`, :class:`~pib_bayes.Posterior`)
    asks for ``task=``.

    >>> resolve_loss("cross_entropy")
    (CrossEntropyLoss(label_smoothing=0.0), 'classification')
    """
    _check_task(task)
    if isinstance(loss_fn, str):
        make = _BUILTIN.get(loss_fn.lower())
        if make is None:
            raise ValueError(f"loss_fn: unknown loss {loss_fn!r}; use one of {sorted(set(_BUILTIN))} "
                             "or a callable")
        loss_fn = make()
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable (output, target) -> per-example loss, got {loss_fn!r}")
    own = loss_task(loss_fn)
    _check_task(own)
    if task is not None and own is not None and task != own:
        raise ValueError(f"task: {task!r} contradicts the loss {loss_fn!r}, which is a {own} loss; "
                         f"drop task= or pass a {task} loss")
    return loss_fn, task or own


def require_task(task: str | None, loss_fn: object) -> str:
    """``task``, or one error asking for ``task=`` when the loss does not say which task it is."""
    _check_task(task)
    if task is None:
        raise ValueError(f"task: cannot tell whether the custom loss {loss_fn!r} is for classification or "
                         "regression; pass task='classification' (predict applies a softmax) or "
                         "task='regression' (predict returns the raw outputs), or use a built-in loss "
                         "(pib_bayes.CrossEntropyLoss, BCEWithLogitsLoss, GaussianLoss, "
                         "HeteroscedasticGaussianLoss, or their strings)")
    return task


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
    with :class:`pib_bayes.optim.SGLD` uses). ``task`` is the loss's task (:func:`resolve_loss`),
    None for a custom loss given without one; :func:`~pib_bayes.sample` and
    :meth:`~pib_bayes.Posterior.from_draws` then ask for it.

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
        """``U_B`` at the module's own trainable parameters (for ``loss.backward()`` loops).

        A :class:`~pib_bayes.GaussianPrior` with scalar sigmas enters as one autograd node whose
        backward adds the closed-form ``(w - theta_0) / sigma_0^2`` (the same value and gradient as
        :func:`~pib_bayes.sample` computes at the same weights, bit for bit).
        """
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        loss = self.mean_loss(self.model(x), y)
        plan = self._closed_form(named)
        if plan is not None:
            return loss / self.beta - _ClosedFormLogDensity.apply(plan, *[p for _, p in named])
        return loss / self.beta - self.prior.log_prob(dict(named))

    def _closed_form(self, named: list[tuple[str, Tensor]]) -> Callable | None:
        """The prior's closed form for these tensors, made once per (prior, tensors) and cached."""
        if not named or not isinstance(self.prior, GaussianPrior):
            return None
        key = (id(self.prior), tuple((n, id(p), p.shape, p.device, p.dtype) for n, p in named))
        cached = getattr(self, "_plan", None)
        if cached is None or cached[0] != key:
            cached = (key, self.prior.closed_form([n for n, _ in named], [p.detach() for _, p in named]))
            self._plan = cached
        return cached[1]
