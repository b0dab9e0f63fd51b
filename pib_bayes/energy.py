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

import contextlib
import math
import struct
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .prior import GaussianPrior, Prior, _ClosedForm, _ClosedFormLogDensity, as_prior

__all__ = ["Energy", "BoundEnergy", "LossAt", "GaussianLoss", "CrossEntropyLoss", "BCEWithLogitsLoss",
           "HeteroscedasticGaussianLoss", "resolve_loss", "loss_task", "loss_likelihood", "require_task",
           "beta_from_temperature", "check_beta"]

LossFn = Callable[[Tensor, Tensor], Tensor]
LossAt = Callable[[Mapping[str, Tensor], Tensor, Tensor], Tensor]  # (params, x, y) -> mean loss per chain


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

    def batch_mean(self, output: Tensor, target: Tensor) -> Tensor:
        """The mean over the batch, ``(1/|B|) sum_i l_i``, in one fused op (what the energy uses: about
        a sixth of a small MLP's step less than the per-example losses and a separate mean)."""
        return F.cross_entropy(output, target, label_smoothing=self.label_smoothing)

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
        """``L_B = (1/|B|) sum_i l_i``: the loss's own ``batch_mean`` when it has one (fused), else the
        mean of its per-example losses (a 0-d result is taken as the mean already)."""
        fused = getattr(self.loss_fn, "batch_mean", None)
        if fused is not None:
            return fused(output, target)
        losses = self.loss_fn(output, target)
        return losses if losses.dim() == 0 else losses.mean()

    def per_example_loss(self, output: Tensor, target: Tensor) -> Tensor:
        losses = self.loss_fn(output, target)
        if losses.dim() == 0:
            raise ValueError("loss_fn: this needs per-example losses; pass a loss with reduction='none'")
        return losses

    def combine(self, loss: Tensor, log_prior: Tensor | float) -> Tensor:
        """``U = loss / beta - log p``: the one place the energy is put together from its parts."""
        return loss / self.beta - log_prior

    def functional(
        self,
        params: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        buffers: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(U_B(w), mean minibatch loss)`` at ``params``."""
        loss = self.functional_loss(params, x, y, buffers)
        return self.combine(loss, self.prior.log_prob(params)), loss

    def value_and_grad(
        self,
        params: Mapping[str, Tensor],
        batch: tuple[Tensor, Tensor],
        batch_ndim: int = 0,
        *,
        wrt: Sequence[Tensor] | None = None,
        loss: LossAt | None = None,
        buffers: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """``(U_B, L_B, grad U_B)`` at ``params`` on the minibatch ``batch = (x, y)``:

            U_B(w) = L_B(w) / beta - log p(w),    grad U_B(w) = grad L_B(w) / beta - grad log p(w)

        with ``L_B`` the mean minibatch loss (SPEC §1). A :class:`~pib_bayes.GaussianPrior` with scalar
        sigmas enters in closed form, ``-grad log p(w) = (w - theta_0) / sigma_0^2``, added to the
        likelihood's gradient (no autograd graph through the prior; the same numbers as
        backpropagating through :meth:`~pib_bayes.GaussianPrior.log_prob`); any other prior is
        differentiated by autograd. This is the energy every sampler of the library steps on:
        :func:`~pib_bayes.sample` (each chain group), the data-parallel runner and the control
        variates (through :mod:`pib_bayes.gradients`).

        Args:
            params: name -> tensor with ``batch_ndim`` (0 or 1) leading chain dimensions; U and L
                come back with those dimensions (chains are independent: the gradient of their sum
                is each chain's own gradient).
            batch: the minibatch ``(x, y)``.
            wrt: the leaf tensors to differentiate, one per entry of ``params`` (e.g. the stacked
                weights ``params`` are views of); default ``params``' own values (which must then
                require grad). The gradients come back shaped like ``wrt``.
            loss: ``(params, x, y) -> L_B`` per chain, to replace the default forward (the module
                called on ``params`` with :func:`torch.func.functional_call`, under
                :func:`torch.func.vmap` when ``batch_ndim == 1``), e.g. a hand-batched forward.
            buffers: the module's buffers (and frozen parameters) for the default forward.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> model = nn.Linear(2, 1)
            >>> energy = Energy(model, "gaussian", prior=1.0, beta=0.5)
            >>> params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
            >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
            >>> u, loss, grads = energy.value_and_grad(params, (x, y))
            >>> u_ref, _ = energy.functional(params, x, y)
            >>> ref = torch.autograd.grad(u_ref, list(params.values()))
            >>> bool(torch.allclose(u, u_ref)), all(torch.allclose(g, r) for g, r in zip(grads, ref))
            (True, True)
        """
        x, y = batch
        targets = list(params.values()) if wrt is None else list(wrt)
        if len(targets) != len(params):
            raise ValueError(f"wrt: {len(targets)} tensors for {len(params)} parameters; give one per "
                             "parameter")
        if loss is None:
            loss = self._default_loss(batch_ndim, buffers)
        analytic = getattr(self.prior, "log_prob_and_grad", None)
        with torch.no_grad():
            # a Gaussian prior's value and gradient in closed form, no autograd graph
            got = analytic(params, batch_ndim) if analytic is not None else None
        with torch.enable_grad():
            mean_loss = loss(params, x, y)
            if got is None:
                u = self.combine(mean_loss, self.prior.log_prob(params, batch_ndim))
                # chains are independent, so the gradient of the sum is each chain's own gradient
                return u.detach(), mean_loss.detach(), torch.autograd.grad(u.sum(), targets)
            scaled = mean_loss / self.beta
            grads = list(torch.autograd.grad(scaled.sum(), targets))
        log_prior, prior_grads = got
        torch._foreach_add_(grads, [g.view(t.shape) for g, t in zip(prior_grads, targets, strict=True)])
        return (scaled.detach() - log_prior).reshape(mean_loss.shape), mean_loss.detach(), tuple(grads)

    def _default_loss(self, batch_ndim: int, buffers: Mapping[str, Tensor] | None) -> LossAt:
        one = lambda p, x, y: self.functional_loss(p, x, y, buffers)  # noqa: E731
        if not batch_ndim:
            return one
        from torch.func import vmap

        return vmap(one, in_dims=(0, None, None))

    def bind(self, names: Sequence[str], leaves: Sequence[Tensor],
             grad_shapes: Sequence[torch.Size] | None = None) -> BoundEnergy:
        """:class:`BoundEnergy`: U_B and its gradient at ``leaves``, the tensors the module holds as its
        parameters ``names`` while they are bound (see :class:`BoundEnergy`)."""
        return BoundEnergy(self, names, leaves, grad_shapes)

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
        backward adds the closed-form ``(w - theta_0) / sigma_0^2`` (the same gradient as
        :func:`~pib_bayes.sample` computes at the same weights, bit for bit, and the same value to
        float rounding: sample sums the squares in one flat buffer).
        """
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        loss = self.mean_loss(self.model(x), y)
        plan = self._closed_form(named)
        if plan is not None:
            return self.combine(loss, _ClosedFormLogDensity.apply(plan, *[p for _, p in named]))
        return self.combine(loss, self.prior.log_prob(dict(named)))

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


def _flat_view(tensors: Sequence[Tensor]) -> Tensor | None:
    from .samplers.core import flat_view  # the samplers import this module's losses

    return flat_view(tensors)


def _flat_tensors(views: list[Tensor], flat: Tensor) -> tuple[Tensor, ...]:
    from .samplers.core import FlatTensors

    return FlatTensors(views, flat)


_F32 = struct.Struct("f")


def _to_float32(v: float) -> float:
    """``v`` rounded to the nearest float32 (ties to even), as a Python float; +-inf beyond its range."""
    try:
        return _F32.unpack(_F32.pack(v))[0]
    except OverflowError:  # rounds to +-inf in float32
        return math.copysign(math.inf, v)


class BoundEnergy:
    """:meth:`Energy.value_and_grad` at the tensors a module holds as its parameters (no substitution
    per step): the module is called directly on ``leaves``, leaf tensors that the caller has put into
    the module (e.g. with ``torch.nn.utils.stateless._reparametrize_module``) and moves in place.

    With a :class:`~pib_bayes.GaussianPrior` of scalar sigmas the gradient lives in one persistent
    flat buffer: each call writes the prior's ``(w - theta_0) / sigma_0^2`` into it and the backward
    pass accumulates ``grad L_B / beta`` into the same memory (the leaves' ``.grad`` are views of it),
    so the caller gets grad U_B with no per-call allocation; ``log p(w)`` comes from the same buffer
    (``-sum_j ||w_j - theta_0j||^2 / (2 sigma_0j^2) + const``: with one sigma_0 for every tensor, one
    dot product over the buffer, which agrees with :meth:`~pib_bayes.GaussianPrior.closed_form` to
    float rounding; the gradient is the same to the bit); when the leaves and the means each tile one
    buffer, ``w - theta_0`` is one subtraction over the whole buffer. Any other prior: autograd, as in
    :meth:`Energy.value_and_grad`.

    ``grad_shapes`` are the shapes the gradients are handed back in (default the leaves' own), e.g.
    ``(1, *shape)`` for a one-chain group's stacked weights.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1)
        >>> energy = Energy(model, "gaussian", prior=1.0, beta=0.5)
        >>> leaves = [p for _, p in model.named_parameters()]
        >>> bound = energy.bind([n for n, _ in model.named_parameters()], leaves)
        >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
        >>> u, loss, grads = bound.value_and_grad(x, y)
        >>> ref = torch.autograd.grad(energy.of_module(x, y), leaves)
        >>> all(torch.allclose(g, r) for g, r in zip(grads, ref))
        True
    """

    def __init__(self, energy: Energy, names: Sequence[str], leaves: Sequence[Tensor],
                 grad_shapes: Sequence[torch.Size] | None = None) -> None:
        self.energy, self.names, self.leaves = energy, list(names), list(leaves)
        shapes = [q.shape for q in self.leaves] if grad_shapes is None else list(grad_shapes)
        self._shapes = shapes
        prior = energy.prior
        plan = prior.closed_form(self.names, self.leaves) if isinstance(prior, GaussianPrior) else None
        self.plan: _ClosedForm | None = plan
        self.grads: tuple[Tensor, ...] = ()
        if plan is None:
            return
        like = self.leaves[0]
        flat = torch.zeros(sum(q.numel() for q in self.leaves), dtype=like.dtype, device=like.device)
        views, off = [], 0
        for q in self.leaves:
            views.append(flat[off:off + q.numel()].view(q.shape))
            off += q.numel()
        self._flat, self.leaf_grads = flat, views
        self.grads = _flat_tensors([g.view(s) for g, s in zip(views, shapes, strict=True)], flat)
        for q, g in zip(self.leaves, views, strict=True):
            q.grad = g
        self._flat_w = _flat_view([q.detach() for q in self.leaves])
        self._flat_m = _flat_view(plan.means)
        if self._flat_w is not None and self._flat_w.numel() != flat.numel():
            self._flat_w = None
        if self._flat_m is not None and self._flat_m.numel() != flat.numel():
            self._flat_m = None
        self._one_sigma = len(set(plan.inv_vars)) == 1
        # _value_and_grad_floats: the dtype's rounding of a Python float, and the prior's constants as
        # the tensor ops see them (a Python scalar is cast to the tensor's dtype first)
        self._round: Callable[[float], float] | None = {torch.float32: _to_float32,
                                                         torch.float64: float}.get(like.dtype)
        if self._round is not None:
            self._coef, self._const = plan.coef[0].item(), self._round(plan.const)
            self._beta = torch.tensor(energy.beta, dtype=like.dtype, device=like.device)

    def _prior_into_grads(self) -> Tensor:
        """Write ``(w - theta_0)/sigma_0^2`` into the gradient buffer; return ``log p(w)``."""
        self._diff_into_grads()
        return self._scale_and_value()

    def _diff_into_grads(self) -> None:
        """Write ``w - theta_0`` into the gradient buffer."""
        if self._flat_w is not None and self._flat_m is not None:
            # no tensor here requires grad (the weights' flat view is detached): nothing to record
            torch.sub(self._flat_w, self._flat_m, out=self._flat)
            return
        with torch.no_grad():
            torch._foreach_copy_(self.leaf_grads, self.leaves)
            torch._foreach_sub_(self.leaf_grads, self.plan.means)

    def _keep_buffer(self) -> None:
        """After a backward pass: the leaves' ``.grad`` are the buffer's views again."""
        for q, g in zip(self.leaves, self.leaf_grads, strict=True):
            if q.grad is not g:  # autograd replaced it (out-of-place sum): keep the buffer authoritative
                g.copy_(q.grad)
                q.grad = g

    def _scale_and_value(self) -> Tensor:
        """With ``w - theta_0`` in the buffer: scale it by 1/sigma_0^2, return ``log p(w)``."""
        plan, grads, flat = self.plan, self.leaf_grads, self._flat
        if self._one_sigma:  # -||w - m||^2 / (2 s^2) + const: one dot product over the buffer
            value = torch.dot(flat, flat) * plan.coef[0] + plan.const
        else:  # per tensor: the numbers of the prior's closed form
            norms = torch.stack(torch._foreach_norm(grads))
            value = torch.dot(norms * plan.coef, norms) + plan.const
        if plan.scale is not None:
            if isinstance(plan.scale, float):  # one sigma: one op on the whole buffer
                flat.mul_(plan.scale)
            else:
                torch._foreach_mul_(grads, plan.scale)
        return value

    def value_and_grad(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """``(U_B, L_B, grad U_B)`` at the bound leaves on the minibatch ``(x, y)`` (0-d U and L). The
        gradients are the persistent buffer's views (closed form): valid until the next call."""
        energy, leaves = self.energy, self.leaves
        if self.plan is None:
            with torch.enable_grad():
                loss = energy.mean_loss(energy.model(x), y)
                u = energy.combine(loss, energy.prior.log_prob(dict(zip(self.names, leaves, strict=True)), 0))
                grads = torch.autograd.grad(u, leaves)
            return (u.detach(), loss.detach(),
                    tuple(g.view(s) for g, s in zip(grads, self._shapes, strict=True)))
        log_prior = self._prior_into_grads()
        loss, scaled = self._loss_backward(x, y, energy.beta)
        return scaled.detach() - log_prior, loss.detach(), self.grads  # U = L_B/beta - log p

    def _loss_backward(self, x: Tensor, y: Tensor, beta: float | Tensor) -> tuple[Tensor, Tensor]:
        """``L_B`` and ``L_B / beta``, whose backward pass accumulates into the buffer that holds the
        prior's gradient (no grad-mode context switch when grad is on, as in a sampler's step loop)."""
        with contextlib.nullcontext() if torch.is_grad_enabled() else torch.enable_grad():
            loss = self.energy.mean_loss(self.energy.model(x), y)
            scaled = loss / beta
            scaled.backward(inputs=self.leaves)
        self._keep_buffer()
        return loss, scaled

    def _value_and_grad_floats(self, x: Tensor, y: Tensor) -> tuple[float, float, tuple[Tensor, ...]]:
        """:meth:`value_and_grad` with U_B and L_B as Python floats: the same numbers and the same
        gradient buffer, without the 0-d tensor ops that put U together (a sampler's one-chain step loop
        reads U as a float anyway). With one sigma_0 and float32/float64 weights, the float32/float64
        ops ``log p = dot * coef + const`` and ``U = L_B/beta - log p`` are redone on Python floats, each
        result rounded to the dtype (an exact double result rounded once to float32 is the float32
        op's result: 53 >= 2 * 24 + 2 bits); otherwise the tensors' values."""
        rnd = self._round if self.plan is not None and self._one_sigma else None
        if rnd is None:
            u, loss, grads = self.value_and_grad(x, y)
            return u.item(), loss.item(), grads
        flat, plan = self._flat, self.plan
        self._diff_into_grads()
        log_prior = rnd(rnd(torch.dot(flat, flat).item() * self._coef) + self._const)
        if plan.scale is not None:
            flat.mul_(plan.scale)
        # beta as the 0-d tensor a Python scalar is cast to: the same quotient
        loss, scaled = self._loss_backward(x, y, self._beta)
        return rnd(scaled.item() - log_prior), loss.item(), self.grads
