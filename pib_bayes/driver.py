"""``pib_bayes.sample``: run Langevin chains on the PIB energy and return a :class:`Posterior`.

Chains are independent: chain k has its own noise generator and its own data-order generator,
both derived from ``seed`` with ``numpy.random.SeedSequence(seed).spawn``. ``num_chains`` chains
run either *vectorized* (one batched computation, ``torch.func.vmap`` over the stacked weights)
or *sequentially* (one after another); since each chain only ever touches its own streams, both
give the same draws to float tolerance, and a chain gives the same draws as when run alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ._threads import warn_if_oversubscribed
from ._validate import PrecisionWarning, check_bool, check_memory, check_path, itemsize
from ._version import __version__
from .batched import batched_forward
from .data import LoaderBatcher, TensorBatcher, as_tensors
from .energy import Energy, LossFn, loss_likelihood, require_task
from .gradients import GRADIENTS, ControlVariateGradient, full_data_gradient
from .io import FormatError, holds_lock, load_payload, save_payload
from .posterior import Posterior
from .prior import GaussianPrior, Prior, check_prior_fits
from .samplers.core import NOISES, GaussianNoise, Kernel, NoisePrefetcher, make_noise
from .samplers.kernels import build_kernel
from .samplers.schedules import Constant, Schedule, as_schedule
from .samplers.step_size import NOISE_WARN_THRESHOLD, AutoStep, GradientNoiseWarning, run_auto_step
from .subnet import Selection, select_params

__all__ = ["sample", "chain_seeds"]

StatFn = Callable[[dict[str, Tensor]], Tensor]


def chain_seeds(seed: int, num_chains: int) -> list[tuple[int, int, int]]:
    """Per chain ``(noise_seed, data_seed, init_seed)``, independent streams derived from ``seed``.

    >>> chain_seeds(0, 2) == chain_seeds(0, 2), chain_seeds(0, 2)[0] != chain_seeds(0, 2)[1]
    (True, True)
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: must be an int >= 0, got {seed!r}")
    out = []
    for child in np.random.SeedSequence(int(seed)).spawn(num_chains):
        words = child.generate_state(3, dtype=np.uint64)
        out.append(tuple(int(w) >> 1 for w in words))  # torch seeds must fit in int64
    return out  # type: ignore[return-value]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: must be an int >= {minimum}, got {value!r}")
    return int(value)


@dataclass
class _Group:
    """A set of chains advanced together (all chains when vectorized, one when sequential)."""

    chains: list[int]
    params: list[Tensor]          # each (K, *shape), requires_grad leaves
    state: dict[str, list[Tensor]]
    noise: GaussianNoise
    batcher: TensorBatcher | LoaderBatcher
    vectorized: bool
    prefetcher: NoisePrefetcher | None = None  # prefetch_noise=True: draws ahead from noise's generators
    dropout_seed: int | None = None  # train_mode_dropout=True: seeds the dropout masks' RNG stream
    dropout_state: Tensor | None = None  # that stream's state restored from a checkpoint
    centre: _CentreFinder | None = None  # gradient="cv": finds w_hat in warm-up, then swaps the estimator
    estimator: Any = None  # a pib_bayes.gradients estimator; None: the plain minibatch gradient
    direct: _Direct | None = None  # a one-chain group while it runs: the module called on its own weights

    def generator_states(self) -> list[Tensor]:
        """The noise generators' states as the synchronous sampler has them (none drawn ahead)."""
        if self.prefetcher is not None:
            return self.prefetcher.generator_states()
        return [g.get_state() for g in self.noise.generators]

    def set_generator_states(self, states: Sequence[Tensor]) -> None:
        if self.prefetcher is not None:
            self.prefetcher.set_generator_states(states)
            return
        for g, st in zip(self.noise.generators, states, strict=True):
            g.set_state(st)


def _dropout_seed(chain_seeds_: Sequence[tuple[int, int, int]]) -> int:
    """The seed of a chain group's dropout masks, derived from its chains' seeds (independent of them)."""
    words = [w for seeds in chain_seeds_ for w in seeds] + [0xD40]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]) >> 1


@contextmanager
def _sampling_mode(model: nn.Module, dropout: bool) -> Iterator[None]:
    """The forward pass sampling uses: ``eval()`` (dropout off, BatchNorm on its running statistics),
    with the ``nn.Dropout*`` modules in training mode when ``dropout``; every module's own training
    flag is restored afterwards, so the model comes back in the mode (or mix of modes) it came in."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    if dropout:
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.train()
    # nn.TransformerEncoderLayer / nn.MultiheadAttention in eval mode take a fused inference kernel that
    # has no derivative; under vmap it is taken even with gradients on (the weights do not look as if they
    # required grad), so it is switched off while sampling
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)


@contextmanager
def _dropout_rng(group: _Group, device: torch.device) -> Iterator[None]:
    """With ``train_mode_dropout``: the group's own seeded stream for the dropout masks (torch's global
    RNG, forked so the caller's global RNG is left untouched); nothing otherwise."""
    if group.dropout_seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if group.dropout_state is not None:
            torch.set_rng_state(group.dropout_state)
        else:
            torch.manual_seed(group.dropout_seed)
        yield


class _Direct:
    """A one-chain group's weights as the module sees them while the group runs: leaf tensors of the
    parameter shapes sharing memory with the group's (1, *shape) weights (the kernel's in-place moves
    show through), put into the module once, and the prior's closed form on them (None: autograd).

    With the closed form, the gradient lives in one persistent flat buffer: each step writes the prior's
    ``(w - theta_0) / sigma_0^2`` into it and the backward pass accumulates the likelihood's gradient
    into the same memory (the leaves' ``.grad`` are views of it), so the kernel gets
    ``grad(loss)/beta + (w - theta_0)/sigma_0^2`` with no per-step allocation, view or extra add.
    """

    def __init__(self, leaves: list[Tensor], params: list[Tensor],
                 prior: Any) -> None:
        self.leaves, self.prior = leaves, prior
        self.grads: tuple[Tensor, ...] = ()
        if prior is not None:
            like = params[0]
            flat = torch.zeros(sum(p.numel() for p in params), dtype=like.dtype, device=like.device)
            views, off = [], 0
            for p in params:
                views.append(flat[off:off + p.numel()].view(p.shape))
                off += p.numel()
            self.grads = tuple(views)  # (1, *shape): what the kernel takes
            self.leaf_grads = [g.view(q.shape) for g, q in zip(views, leaves, strict=True)]
            for q, g in zip(leaves, self.leaf_grads, strict=True):
                q.grad = g

    def prior_into_grads(self) -> Tensor:
        """Write ``(w - theta_0)/sigma_0^2`` into the gradient buffer; return ``log p(w)`` (the numbers of
        :meth:`~pib_bayes.GaussianPrior.closed_form`)."""
        plan, grads = self.prior, self.leaf_grads
        with torch.no_grad():
            torch._foreach_copy_(grads, self.leaves)
            torch._foreach_sub_(grads, plan.means)
            norms = torch.stack(torch._foreach_norm(grads))
            value = torch.dot(norms * plan.coef, norms) + plan.const
            if plan.scale is not None:
                torch._foreach_mul_(grads, plan.scale)
        return value


class _Sampler:
    def __init__(self, energy: Energy, names: list[str], fixed: dict[str, Tensor], kernel: Kernel,
                 schedule: Schedule, stat_fns: Mapping[str, StatFn], dropout: bool = False) -> None:
        self.energy, self.names, self.fixed = energy, names, fixed
        self.kernel, self.schedule, self.stat_fns = kernel, schedule, dict(stat_fns)
        # train_mode_dropout: vmap draws a different dropout mask for each chain
        self.randomness = "different" if dropout else "error"
        # hand-batched forward (e.g. baddbmm for MLPs) is much faster than vmap for small layers
        self.fast_forward = batched_forward(energy.model) if not fixed else None
        self.noise_report: _NoiseReport | None = None  # step_size='auto': re-evaluated after warm-up

    # ---- energies -----------------------------------------------------------------
    def _one_loss(self, p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return self.energy.functional_loss(p, x, y, self.fixed)

    def _chain_params(self, group: _Group) -> tuple[dict[str, Tensor], int]:
        """The group's parameters as the model sees them, and their number of batch dims."""
        return self._as_model_params(group.params, group.vectorized)

    def _as_model_params(self, tensors: Sequence[Tensor], vectorized: bool) -> tuple[dict[str, Tensor], int]:
        if not vectorized:
            # a view, not p[0]: ViewBackward hands the gradient through, SelectBackward allocates and copies
            return {n: p.view(p.shape[1:]) for n, p in zip(self.names, tensors)}, 0
        return dict(zip(self.names, tensors)), 1

    def energies(self, group: _Group, x: Tensor, y: Tensor, stacked: bool) -> tuple[Tensor, Tensor]:
        """(U, loss) per chain of the group, each (K,), differentiable in the group's parameters."""
        params, batch_ndim = self._chain_params(group)
        loss = self.losses(params, batch_ndim, x, y, stacked)
        return loss / self.energy.beta - self.energy.prior.log_prob(params, batch_ndim), loss

    def losses(self, params: dict[str, Tensor], batch_ndim: int, x: Tensor, y: Tensor,
               stacked: bool) -> Tensor:
        """The mean minibatch loss per chain, (K,), without the prior, at :meth:`_chain_params`."""
        if not batch_ndim:
            return self._one_loss(params, x[0] if stacked else x, y[0] if stacked else y).reshape(1)
        data_dim = 0 if stacked else None
        if self.fast_forward is not None:
            out = self.fast_forward(params, x, stacked)
            return vmap(self.energy.mean_loss, in_dims=(0, data_dim))(out, y)
        return vmap(self._one_loss, in_dims=(0, data_dim, data_dim), randomness=self.randomness)(params, x, y)

    # ---- one step -----------------------------------------------------------------
    @contextmanager
    def bound(self, group: _Group) -> Iterator[None]:
        """While a one-chain group runs: the module's sampled parameters are leaf views of the group's
        weights, its other parameters and buffers the fixed copies (``functional_call``'s substitution,
        made once instead of every step), so the step calls the module directly; nothing for a
        vectorized group. The module gets its own tensors back afterwards."""
        if group.vectorized or len(group.chains) != 1:
            yield
            return
        leaves = [p.detach().view(p.shape[1:]).requires_grad_(True) for p in group.params]
        prior = self.energy.prior
        closed = prior.closed_form(self.names, leaves) if isinstance(prior, GaussianPrior) else None
        state = {**self.fixed, **dict(zip(self.names, leaves, strict=True))}
        with torch.nn.utils.stateless._reparametrize_module(self.energy.model, state, tie_weights=True):
            group.direct = _Direct(leaves, group.params, closed)
            try:
                yield
            finally:
                group.direct = None

    def gradients(self, group: _Group) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """U and loss per chain at the current weights, and grad U on the next minibatch, from the
        group's gradient estimator (the seam of :mod:`pib_bayes.gradients`)."""
        if group.direct is not None and group.estimator is None:
            batcher = group.batcher
            x, y = batcher.next_one() if isinstance(batcher, TensorBatcher) else batcher.next()[:2]
            return self.direct_gradient(group, x, y)
        x, y, stacked = group.batcher.next()
        estimate = group.estimator if group.estimator is not None else self.minibatch_gradient
        return estimate(group.params, group.vectorized, x, y, stacked)

    def direct_gradient(self, group: _Group, x: Tensor,
                        y: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """:meth:`minibatch_gradient` of a one-chain group inside :meth:`bound`: the same numbers (the
        module's forward on the same weights, the prior's closed-form gradient added to the
        likelihood's), without the per-step parameter substitution."""
        direct = group.direct
        assert direct is not None
        energy, leaves = self.energy, direct.leaves
        if direct.prior is None:
            with torch.enable_grad():
                loss = energy.mean_loss(energy.model(x), y)
                params = dict(zip(self.names, leaves, strict=True))
                u = loss / energy.beta - energy.prior.log_prob(params, 0)
                grads = torch.autograd.grad(u, leaves)
            return (u.detach().reshape(1), loss.detach().reshape(1),
                    tuple(g.view(p.shape) for g, p in zip(grads, group.params, strict=True)))
        log_prior = direct.prior_into_grads()
        with torch.enable_grad():
            loss = energy.mean_loss(energy.model(x), y)
            scaled = loss / energy.beta
            scaled.backward(inputs=leaves)  # accumulates into the buffer that holds the prior's gradient
        for q, g in zip(leaves, direct.leaf_grads, strict=True):
            if q.grad is not g:  # autograd replaced it (out-of-place sum): keep the buffer authoritative
                g.copy_(q.grad)
                q.grad = g
        return (scaled.detach() - log_prior).reshape(1), loss.detach().reshape(1), direct.grads

    def minibatch_gradient(self, tensors: Sequence[Tensor], vectorized: bool, x: Tensor, y: Tensor,
                           stacked: bool) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """The plain estimator: (U_B, loss_B) per chain and grad U_B w.r.t. ``tensors`` (leaves)."""
        prior = self.energy.prior
        analytic = getattr(prior, "log_prob_and_grad", None)
        params, batch_ndim = self._as_model_params(tensors, vectorized)
        with torch.no_grad():
            # a Gaussian prior's value and gradient in closed form, no autograd graph: the same numbers
            # as backpropagating through log_prob (tested), a fraction of its cost
            got = analytic(params, batch_ndim) if analytic is not None else None
        with torch.enable_grad():
            if got is None:
                loss = self.losses(params, batch_ndim, x, y, stacked)
                u = loss / self.energy.beta - prior.log_prob(params, batch_ndim)
                # chains are independent, so the gradient of the sum is each chain's own gradient
                return u.detach(), loss.detach(), torch.autograd.grad(u.sum(), list(tensors))
            loss = self.losses(params, batch_ndim, x, y, stacked)
            scaled = loss / self.energy.beta
            grads = list(torch.autograd.grad(scaled.sum(), list(tensors)))
        log_prior, prior_grads = got
        torch._foreach_add_(grads, [g.view(p.shape) for g, p in zip(prior_grads, tensors, strict=True)])
        return (scaled.detach() - log_prior).reshape(loss.shape), loss.detach(), tuple(grads)

    def move(self, group: _Group, grads: Sequence[Tensor], t: int, with_stats: bool) -> dict[str, Tensor]:
        h, scale = self.schedule.step_size(t), self.schedule.noise_scale(t)
        noise: GaussianNoise | None = group.noise
        if group.prefetcher is not None:  # this step's noise was drawn during the gradient pass
            drawn = group.prefetcher.take([group.params] if scale != 0 else [])
            noise = drawn[0] if drawn else None
        with torch.no_grad():
            return self.kernel.step(group.params, list(grads), group.state, h, noise, scale, batch_ndim=1,
                                    with_stats=with_stats)


@holds_lock("checkpoint")
def sample(
    model: nn.Module,
    loss_fn: str | LossFn,
    data: tuple[Tensor, Tensor] | DataLoader | Any,
    *,
    beta: float,
    prior: Prior | float | torch.distributions.Distribution | None = None,
    sampler: str | Kernel = "sgld",
    step_size: float | Schedule | str | AutoStep = 1e-4,
    num_chains: int = 1,
    chain_ids: Sequence[int] | None = None,
    num_warmup: int = 1000,
    num_draws: int = 1000,
    thin: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    keep: Sequence[str] | None = None,
    params: Selection | None = None,
    init: str | Mapping[str, Tensor] = "model",
    chain_method: str = "auto",
    train_mode_dropout: bool = False,
    task: str | None = None,
    stat_fns: Mapping[str, StatFn] | None = None,
    sampler_kwargs: Mapping[str, Any] | None = None,
    noise: str = "gaussian",
    prefetch_noise: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: bool = False,
    gradient: str = "minibatch",
    divergence_threshold: float | None = 1e4,
) -> Posterior:
    """Sample the PIB Gibbs posterior ``q*(w|S) ∝ p(w) exp(-L_S(w)/beta)`` (SPEC §1-2).

    Each chain runs the chosen kernel on the minibatch energy
    ``U_B(w) = mean_{i in B} l_i(w)/beta - log p(w)``; e.g. SGLD:
    ``w <- w - h_t grad U_B(w) + sqrt(2 h_t) xi``. The first ``num_warmup`` steps are discarded,
    then every ``thin``-th step (only in sampling phases for a cyclical schedule) is kept until
    ``num_draws`` draws per chain are stored. A draw is the weights *before* the step taken
    from them, stored with its energy and minibatch loss.

    Args:
        model: the torch module; its trainable parameters (or those ``params`` selects) are
            sampled, buffers and the other parameters are held fixed at their current values.
            Sampling runs its ``eval()``-mode forward whatever mode it is handed in (dropout off,
            BatchNorm on its running statistics, frozen), so the mode never changes the chain method
            or the draws; the model is handed back with every module in the mode it came in.
        loss_fn: a built-in loss (:class:`~pib_bayes.CrossEntropyLoss`,
            :class:`~pib_bayes.BCEWithLogitsLoss`, :class:`~pib_bayes.GaussianLoss`,
            :class:`~pib_bayes.HeteroscedasticGaussianLoss`, or the strings ``"cross_entropy"``,
            ``"bce_with_logits"``, ``"gaussian"``, ``"heteroscedastic_gaussian"``), or a callable
            per-example loss ``(output, target) -> (B,)`` (then ``task=`` is required unless it is
            a known torch loss or has a ``task`` attribute). With the NLL as loss, ``beta = 1/n``
            is the Bayesian posterior. A 0-d result is taken as the batch mean (e.g.
            ``nn.CrossEntropyLoss()``); any other shape than ``(B,)`` (e.g. B-1 values) is a
            ``ValueError`` before the run (checked on tensor data; a DataLoader's batches are not
            inspected ahead).
        data: ``(x, y)`` tensors or a TensorDataset (minibatched here, per-chain shuffles),
            or a DataLoader (iterated as is).
        beta: PIB trade-off > 0 (beta = T/n for temperature T).
        prior: a :class:`~pib_bayes.prior.Prior`, a float sigma_0 (Gaussian centred at the
            initial weights), a torch distribution, or None (sigma_0 = 1).
        sampler: ``"sgld"``, ``"psgld"``, ``"sghmc"``, ``"sgnht"``, ``"csgld"`` (SGLD + a cyclical
            schedule) or a built :class:`~pib_bayes.samplers.Kernel`; ``sampler_kwargs`` go to its
            builder.
        step_size: a float (constant), a :class:`~pib_bayes.samplers.Schedule`, or ``"auto"``
            (an :class:`~pib_bayes.samplers.step_size.AutoStep` sets its options): a constant step
            from the energy's curvature at chain 0's initial weights, before any chain runs.
            lambda_max of the Hessian of U_B comes from power iteration with Hessian-vector
            products on ``AutoStep.num_batches`` minibatches; SGLD takes
            ``h = 2 eps / ((1 + eps) lambda_max)`` (relative variance bias <= eps = 0.05 in the
            stiffest direction, SPEC §2), pSGLD the same on the preconditioned Hessian, SGHMC
            ``eta`` and ``friction`` from it (:mod:`pib_bayes.samplers.step_size`). The choice,
            lambda_max, iterations and CPU seconds land in ``metadata["step_size_auto"]``, and the
            predicted minibatch-noise inflation in ``metadata["gradient_noise"]`` (a
            :class:`~pib_bayes.samplers.step_size.GradientNoiseWarning` past 10%).
        num_chains, num_warmup, num_draws, thin: chain layout.
        chain_ids: run only these chains out of ``num_chains`` (e.g. one rank's share); chain k
            keeps the seeds of chain k of the full run, so the draws do not depend on how the
            chains are split. The Posterior holds ``len(chain_ids)`` chains, in that order.
        batch_size: minibatch size for tensor data (None = full batch).
        seed: root seed; chains get independent streams (:func:`chain_seeds`).
        progress: show a tqdm bar per chain group (a bool).
        keep: names of the parameters whose draws are stored (default all, a non-empty list); the
            others are still sampled (``keep`` saves memory, not time; ``params`` chooses what is
            sampled).
        params: the subnetwork to sample: parameter names, glob patterns (``"head.*"``),
            submodules of ``model`` or its parameters (:func:`~pib_bayes.subnet.select_params`);
            every other parameter is held at its current value, like a frozen one. ``params``
            takes precedence over ``requires_grad``. None (default): every trainable parameter.
        init: ``"model"`` (every chain starts at the module's weights), ``"prior"`` (a draw from
            a Gaussian prior per chain), or a mapping name -> (chains run, *shape) tensors.
        chain_method: ``"vectorized"``, ``"sequential"`` or ``"auto"`` (vectorized when vmap
            can run the model, else sequential; the choice and reason land in metadata and, with
            ``progress``, in the progress output).
        train_mode_dropout: keep the ``nn.Dropout*`` modules in training mode while sampling (BatchNorm
            stays in eval mode): each chain evaluates U_B with its own dropout masks (vmap with
            ``randomness="different"`` when vectorized), a stream seeded from the chains' seeds, so
            the same seed gives the same draws; vectorized and sequential chains then draw different
            masks. The caller's global RNG is left untouched. Default False (dropout off).
        task: "classification" or "regression". Built-in and known torch losses imply it (an
            explicit ``task`` must agree); a custom callable needs it, else a ``ValueError``.
        stat_fns: name -> function of one chain's parameter dict returning a scalar (a number
            or a 1-element tensor), evaluated at every kept draw and stored in ``sample_stats``
            (e.g. an IIW tracker); a non-callable value is refused before the run, a function
            returning anything else (a string, a vector) at its first kept draw.
        noise: ``"gaussian"`` (exact; default) or the opt-in ``"rademacher"`` (random signs, cheaper
            to draw): on a Gaussian target it keeps the stationary covariance of the linear recursion
            but not the higher moments (see docs/performance.md for the measured law).
        prefetch_noise: draw each step's noise on a worker thread during the previous gradient
            pass (:class:`~pib_bayes.samplers.core.NoisePrefetcher`): the same draws as without,
            faster by wall clock on models where the noise draw costs more than a thread
            hand-off and a CPU core is free (docs/performance.md); slower on small models.
        checkpoint: a file to which the complete run state (weights, sampler state, every
            chain's RNG states, data order, draws so far, step counters) is written atomically
            every ``checkpoint_every`` steps, after each chain group and at the end. The call holds
            an exclusive lock (``fcntl.flock`` of ``.NAME.lock`` beside it, dropped by the OS
            however the process ends): a second run on the same checkpoint fails at once with
            :class:`~pib_bayes.io.LockedError`.
        resume: continue from ``checkpoint`` if it exists (a bool). It must come from the same run: the same
            settings, the same data (its length and a blake2b hash of its shapes, dtypes and of at
            most 4096 evenly spaced rows, every row of smaller data) and the same initial weights
            (a hash of them); otherwise one ``ValueError`` names what differs. A checkpoint from
            before this check is refused (it cannot be verified). With tensor data, a run killed at
            any moment and resumed gives draws bit-identical to an uninterrupted run; a DataLoader
            restarts its iteration (its data is hashed only over a TensorDataset). A finished
            run's checkpoint gives its posterior back without running the model at all.
        gradient: ``"minibatch"`` (grad U_B) or ``"cv"``, control variates (Baker et al. 2019,
            :class:`~pib_bayes.gradients.ControlVariateGradient`): each chain's centre w_hat is
            the mean of its weights over the second half of warm-up (its initial weights when
            ``num_warmup < 2``); at the end of warm-up one full-data gradient there, then
            ``grad U_cv(w) = grad U_S(w_hat) + grad U_B(w) - grad U_B(w_hat)`` for every step.
            Costs one pass over the data per chain plus a second minibatch gradient per step;
            pays when the minibatch noise dominates (``metadata["gradient_noise"]``). Needs the
            full data (tensors, or a DataLoader over a dataset with a length).
        divergence_threshold: a chain diverges at the first step t where ``|U(w_t)|`` exceeds
            ``divergence_threshold x max(|U(w_0)|, D)`` (its initial energy, floored at the number D
            of sampled coordinates, the scale of equilibrium energy fluctuations, E[U] - min U ~ D/2),
            or where U or the weights are non-finite. Default 1e4 (a step size far too large, e.g.
            h = 1 on a 2-16-2 MLP, drives U from 2.4e2 to 4.2e6 in 2 steps, and to 1e9, with no
            NaN); ``None`` flags only non-finite values.

    Before anything is allocated, a run whose draw buffers and chain state would exceed the
    available memory (``MemAvailable``) is refused with a ``ValueError`` naming ``num_draws`` or
    ``num_chains``, with the estimate. Float16/bfloat16 models raise a
    :class:`~pib_bayes.PrecisionWarning`: an update ``h grad U + sqrt(2h) xi`` smaller than half
    the format's spacing at w rounds away (bfloat16 keeps 8 significant bits), so many
    coordinates never move; sample in float32 or float64.

    Returns:
        A :class:`~pib_bayes.Posterior`. Chains whose energy or weights become non-finite, or
        whose energy explodes (``divergence_threshold``), stop, are flagged in
        ``diverged``/``divergence_step`` and hold NaN draws from then on; the others continue.
        ``sample_stats["diverging"]`` is true at every draw of a chain from its divergence on
        (exactly the NaN draws), the same for vectorized and sequential chains.

    >>> import torch
    >>> from torch import nn
    >>> from pib_bayes import sample
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> post = sample(nn.Linear(3, 1), "gaussian", (x, y), beta=1 / 64, step_size=1e-3,
    ...               num_chains=2, num_warmup=50, num_draws=20, seed=0)
    >>> post.draws["weight"].shape
    torch.Size([2, 20, 1, 3])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _check_model_storage(model)
    energy = Energy(model, loss_fn, prior, beta, task)
    require_task(energy.task, energy.loss_fn)
    auto = _as_auto(step_size)
    if auto is not None and str(sampler).lower() == "csgld":
        raise ValueError("step_size: 'auto' picks a constant step; sampler='csgld' needs a "
                         "pib_bayes.samplers.Cyclical schedule (use sampler='sgld' with 'auto')")
    schedule = as_schedule(step_size) if auto is None else Constant(1.0)  # 'auto': replaced below
    if str(sampler).lower() == "csgld" and not hasattr(schedule, "cycle_length"):
        raise ValueError("step_size: sampler='csgld' needs a pib_bayes.samplers.Cyclical schedule")
    if sampler_kwargs is not None and not isinstance(sampler_kwargs, Mapping):
        raise TypeError(f"sampler_kwargs: expected a mapping of keyword arguments for the sampler, got "
                        f"{type(sampler_kwargs).__name__}")
    kernel = build_kernel(sampler, **dict(sampler_kwargs or {}))
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient: expected one of {list(GRADIENTS)}, got {gradient!r}")
    if not isinstance(noise, str) or noise not in NOISES:
        raise ValueError(f"noise: expected one of {sorted(NOISES)}, got {noise!r}")
    if not isinstance(prefetch_noise, bool):
        raise ValueError(f"prefetch_noise: expected True or False, got {prefetch_noise!r}")
    if not isinstance(train_mode_dropout, bool):
        raise ValueError(f"train_mode_dropout: expected True or False, got {train_mode_dropout!r}")
    progress, resume = check_bool("progress", progress), check_bool("resume", resume)
    threshold = _check_threshold(divergence_threshold)
    total_chains = _positive_int("num_chains", num_chains)
    if chain_ids is not None:
        _check_chain_ids(chain_ids, total_chains)
    num_run = total_chains if chain_ids is None else len(chain_ids)  # chains run by this call
    num_draws = _positive_int("num_draws", num_draws)
    num_warmup = _positive_int("num_warmup", num_warmup, minimum=0)
    thin = _positive_int("thin", thin)
    if chain_method not in ("auto", "vectorized", "sequential"):
        raise ValueError(f"chain_method: expected 'auto', 'vectorized' or 'sequential', got {chain_method!r}")
    if checkpoint is not None:
        checkpoint = check_path("checkpoint", checkpoint)

    if params is None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model: has no trainable parameters (requires_grad=True) to sample")
    else:
        chosen = set(select_params(model, params))
        named = [(n, p) for n, p in model.named_parameters() if n in chosen]
    names = [n for n, _ in named]
    if params is not None and (prior is None or isinstance(prior, (int, float))):
        # a float sigma_0 centres the prior on the initial weights of what is sampled, frozen or not
        energy.prior = GaussianPrior(std=1.0 if prior is None else float(prior),
                                     mean={n: p.detach().clone() for n, p in named})
    if isinstance(keep, (str, bytes)):
        raise TypeError(f"keep: expected a list of parameter names, got the string {keep!r}; "
                        f"use keep=[{keep!r}]")
    if keep is not None and not isinstance(keep, (Sequence, set, frozenset)):
        raise TypeError(f"keep: expected a list of parameter names, got {type(keep).__name__} {keep!r}")
    keep_names = names if keep is None else list(keep)
    if not keep_names:
        raise ValueError(f"keep: is empty, so no draws would be stored; name at least one of {names} "
                         "(or keep=None for all)")
    unknown = [n for n in keep_names if n not in names]
    if unknown:
        raise ValueError(f"keep: unknown parameter names {unknown}; sampled parameters are {names}")
    check_prior_fits(energy.prior, {n: tuple(p.shape) for n, p in named})
    _check_run_memory(named, keep_names, num_run, num_draws)
    ids = list(range(total_chains)) if chain_ids is None else [int(c) for c in chain_ids]
    num_chains = num_run
    stat_fns = _check_stat_fns(stat_fns)
    fixed = {n: b.detach().clone() for n, b in model.named_buffers()}
    fixed.update({n: p.detach().clone() for n, p in model.named_parameters() if n not in names})

    tensors = as_tensors(data)
    all_seeds = chain_seeds(seed, total_chains)
    seeds = [all_seeds[c] for c in ids]
    init_params = _initial_params(named, init, num_chains, energy.prior, seeds)
    if gradient == "cv" and tensors is None:
        _check_loader_has_length(data)

    # what identifies this run before any model evaluation: a finished checkpoint of the same run is
    # returned from here without running the model or the loss even once
    setup = {
        "beta": energy.beta, "prior": repr(energy.prior), "sampler": kernel.name, "settings": kernel.settings,
        "step_size": schedule.to_dict() if auto is None else dataclasses.asdict(auto),
        "num_chains": total_chains, "chain_ids": ids, "num_warmup": num_warmup, "num_draws": num_draws,
        "thin": thin, "batch_size": batch_size, "seed": int(seed), "chain_method": chain_method,
        "noise": noise, "train_mode_dropout": train_mode_dropout, "gradient": gradient,
        "params": {n: list(init_params[n].shape) for n in names}, "keep": keep_names,
        "n": int(tensors[0].shape[0]) if tensors is not None else _loader_length(data),
        "data": data_fingerprint(tensors if tensors is not None else _loader_tensors(data)),
        "initial_weights": tensor_fingerprint([init_params[n] for n in names]),
    }
    setup_fingerprint = json.dumps(setup, sort_keys=True, default=str)
    if checkpoint is None and resume:
        raise ValueError("resume: needs checkpoint=PATH (the file to resume from)")
    saved = _Checkpointer.read(checkpoint, setup_fingerprint) if resume else None
    if saved is not None and saved.get("finished"):
        try:
            return Posterior(dict(saved["draws"]), dict(saved["stats"]), json.loads(saved["metadata_json"]),
                             fixed, saved["diverged"], saved["divergence_step"], model=model)
        except (KeyError, TypeError, ValueError) as err:
            raise FormatError(f"{checkpoint}: incomplete checkpoint ({err})") from None

    auto_info: dict[str, Any] | None = None
    if auto is not None:
        kernel, schedule, auto_info = _auto_step_stage(
            auto, energy, kernel, sampler, sampler_kwargs, named, init, init_params, all_seeds, fixed,
            tensors, data, batch_size, int(seed), names)
    noise_report = _NoiseReport(auto_info, num_warmup, names, gradient) if auto_info is not None else None
    _warn_low_precision(named, schedule)  # at the step size the run uses ('auto': the chosen one)

    def make_batcher(chains: list[int]) -> TensorBatcher | LoaderBatcher:
        if tensors is None:
            if batch_size is not None:
                raise ValueError("batch_size: set the batch size on the DataLoader itself")
            return LoaderBatcher(data)
        return TensorBatcher(tensors[0], tensors[1], batch_size, [_generator(seeds[c][1]) for c in chains])

    runner = _Sampler(energy, names, fixed, kernel, schedule, stat_fns, train_mode_dropout)
    runner.noise_report = noise_report
    if tensors is not None:
        _check_model_takes_data(energy, {n: init_params[n][0] for n in names}, fixed, *tensors)

    def make_group(chains: list[int], vectorized: bool) -> _Group:
        params = [init_params[n][chains].clone().requires_grad_(True) for n in names]
        gens = [_generator(seeds[c][0]) for c in chains]
        source = make_noise(noise, gens, batched=True)
        with torch.no_grad():
            state = kernel.init_state([p.detach() for p in params], batch_ndim=1)
            if auto_info is not None and auto_info.get("square_avg") is not None and "square_avg" in state:
                # pSGLD with step_size='auto': start V where the step was chosen for (V = 0 would
                # make the first steps' G = 1/eps, far larger than the one h was chosen for)
                for buf, v in zip(state["square_avg"], auto_info["square_avg"], strict=True):
                    buf.copy_(v.to(buf.dtype).expand_as(buf))
        prefetcher = NoisePrefetcher(noise, gens, batched=True) if prefetch_noise else None
        dropout_seed = _dropout_seed([seeds[c] for c in chains]) if train_mode_dropout else None
        centre = (_CentreFinder(runner, num_warmup, lambda: _full_data_chunks(tensors, data, batch_size))
                  if gradient == "cv" else None)
        return _Group(chains, params, state, source, make_batcher(chains), vectorized, prefetcher,
                      dropout_seed=dropout_seed, centre=centre)

    device = init_params[names[0]].device

    method, reason = chain_method, "requested"
    if num_chains == 1:
        method, reason = "sequential", "one chain"
    elif chain_method in ("auto", "vectorized"):
        probe = make_group(list(range(num_chains)), True)
        try:
            # in the mode sampling runs in, whatever mode the model came in (a BatchNorm in training mode
            # would make the probe fail: it updates its statistics in place)
            with _sampling_mode(model, train_mode_dropout), _dropout_rng(probe, device):
                x, y, stacked = probe.batcher.next()
                runner.energies(probe, x, y, stacked)
            how = "batched matmul (pib_bayes.batched)" if runner.fast_forward is not None else "vmap"
            method, reason = "vectorized", f"{how} runs the model" + ("" if chain_method == "auto" else
                                                                        ", requested")
        except Exception as err:  # vmap cannot run every module (data-dependent control flow, ...)
            if chain_method == "vectorized":
                raise ValueError(f"chain_method: 'vectorized' failed, vmap cannot run this model ({err}); "
                                 "use chain_method='sequential'") from err
            method, reason = "sequential", f"vmap failed: {type(err).__name__}: {err}"
            if progress:
                tqdm.write(f"pib_bayes.sample: chains run sequentially ({reason.splitlines()[0]})")

    groups = ([make_group(list(range(num_chains)), True)] if method == "vectorized"
              else [make_group([c], False) for c in range(num_chains)])

    dtype = init_params[names[0]].dtype
    out = _Buffers(
        draws={n: torch.full((num_chains, num_draws, *init_params[n].shape[1:]), math.nan, dtype=dtype)
               for n in keep_names},
        stats={
            "energy": torch.full((num_chains, num_draws), math.nan, dtype=dtype),
            "loss": torch.full((num_chains, num_draws), math.nan, dtype=dtype),
            "step_size": torch.full((num_chains, num_draws), math.nan, dtype=torch.float64),
            "diverging": torch.zeros((num_chains, num_draws), dtype=torch.bool),
        },
        diverged=torch.zeros(num_chains, dtype=torch.bool),
        divergence_step=torch.full((num_chains,), -1, dtype=torch.long),
    )
    fingerprint = json.dumps({
        "beta": energy.beta, "prior": repr(energy.prior), "sampler": kernel.name,
        "settings": kernel.settings, "schedule": schedule.to_dict(), "num_chains": total_chains,
        "chain_ids": ids, "num_warmup": num_warmup, "num_draws": num_draws, "thin": thin,
        "batch_size": batch_size, "seed": int(seed), "chain_method": method, "noise": noise,
        **({"train_mode_dropout": True} if train_mode_dropout else {}),  # old checkpoints stay resumable
        "params": {n: list(init_params[n].shape) for n in names}, "keep": keep_names,
        "n": int(tensors[0].shape[0]) if tensors is not None else None,
        **({"gradient": gradient} if gradient != "minibatch" else {}),
        **({"step_size_auto": dataclasses.asdict(auto)} if auto is not None else {}),
        **({"divergence_threshold": threshold} if threshold != 1e4 else {}),  # non-default only
        "data": setup["data"], "initial_weights": setup["initial_weights"],
    }, sort_keys=True, default=str)
    ckpt = (_Checkpointer(checkpoint, fingerprint, setup_fingerprint, out, checkpoint_every)
            if checkpoint is not None else None)
    first_group, cursor = ckpt.resume(groups, saved) if ckpt is not None and saved is not None else (0, None)
    with _sampling_mode(model, train_mode_dropout):
        for gi in range(first_group, len(groups)):
            save = ckpt.saver(gi) if ckpt is not None else None
            with _dropout_rng(groups[gi], device):
                _run_group(runner, groups[gi], names, keep_names, num_warmup, num_draws, thin, out, progress,
                           cursor if gi == first_group else None, save, checkpoint_every, threshold)
            if ckpt is not None and gi + 1 < len(groups):
                ckpt.write(gi + 1, None)
    draws, stats, diverged, divergence_step = out.draws, out.stats, out.diverged, out.divergence_step

    loss_desc = getattr(energy.loss_fn, "__name__", None) or repr(energy.loss_fn)
    metadata = {
        "library": "pib_bayes", "version": __version__, "beta": energy.beta, "prior": repr(energy.prior),
        "sampler": kernel.name, "sampler_settings": dict(kernel.settings), "schedule": schedule.to_dict(),
        "num_chains": num_chains, "chain_ids": ids, "num_warmup": num_warmup, "num_draws": num_draws,
        "thin": thin,
        "batch_size": batch_size if tensors is not None else getattr(data, "batch_size", None),
        "n": int(tensors[0].shape[0]) if tensors is not None else None,
        "seed": int(seed), "chain_method": method, "chain_method_reason": reason, "task": energy.task,
        "noise": noise, "prefetch_noise": prefetch_noise, "train_mode_dropout": train_mode_dropout,
        "divergence_threshold": None if math.isinf(threshold) else threshold,
        "loss": loss_desc, "likelihood": loss_likelihood(energy.loss_fn),
        "noise_std": getattr(energy.loss_fn, "noise_std", None), "init": init
        if isinstance(init, str) else "given", "sampled_params": names, "kept_params": keep_names,
        "gradient": gradient,
    }
    if auto_info is not None:
        metadata["step_size_auto"] = {k: v for k, v in auto_info.items()
                                      if k not in ("gradient_noise", "report", "square_avg")}
        metadata["gradient_noise"] = {**noise_report.result, "warn_threshold": NOISE_WARN_THRESHOLD}
    if gradient == "cv":
        metadata["control_variate"] = {
            "centre": (f"mean of each chain's weights over warm-up steps [{num_warmup // 2}, {num_warmup})"
                       if num_warmup >= 2 else "each chain's initial weights"),
            "full_gradient_cpu_s": sum(g.centre.cpu_s for g in groups if g.centre is not None),
        }
    if ckpt is not None:  # the finished run, with what resume=True needs to hand it back unsampled
        ckpt.write(len(groups), None, metadata)
    return Posterior(draws, stats, metadata, fixed, diverged, divergence_step, model=model)


def _as_auto(step_size: object) -> AutoStep | None:
    if isinstance(step_size, AutoStep):
        return step_size
    if isinstance(step_size, str):
        if step_size.lower() != "auto":
            raise ValueError(f"step_size: expected a float, a Schedule or 'auto', got {step_size!r}")
        return AutoStep()
    return None


def _auto_seed(seed: int) -> int:
    """The curvature stage's own stream (its minibatches and start vector): no chain's streams move."""
    words = np.random.SeedSequence(int(seed), spawn_key=(2**31 - 21,)).generate_state(1, np.uint64)
    return int(words[0]) >> 1


def _auto_step_stage(auto: AutoStep, energy: Energy, kernel: Kernel, sampler: str | Kernel,
                     sampler_kwargs: Mapping[str, Any] | None, named: list[tuple[str, Tensor]],
                     init: str | Mapping[str, Tensor], init_params: dict[str, Tensor],
                     all_seeds: list[tuple[int, int, int]], fixed: dict[str, Tensor],
                     tensors: tuple[Tensor, Tensor] | None, data: Any, batch_size: int | None, seed: int,
                     names: list[str]) -> tuple[Kernel, Schedule, dict[str, Any]]:
    """step_size='auto': lambda_max at global chain 0's initial weights -> (kernel, Constant(h), info)."""
    rule = getattr(kernel, "curvature_rule", None)
    if rule is None:
        raise ValueError(f"step_size: 'auto' needs a kernel with a curvature_rule; {kernel.name!r} has none "
                         "(pass a float step_size)")
    if isinstance(init, str):  # the same weights whichever chains this call runs (chain_ids)
        start = _initial_params(named, init, 1, energy.prior, all_seeds[:1])
        where = "chain 0's initial weights"
    else:
        start, where = init_params, "the first given initial weights"
    params = {n: start[n][0] for n in names}
    gen = _generator(_auto_seed(seed))
    if tensors is not None:
        n = int(tensors[0].shape[0])
        b = n if batch_size is None else int(batch_size)
        idx = torch.randperm(n, generator=gen)[: min(n, auto.num_batches * b)]
        x, y = tensors[0][idx], tensors[1][idx]
    else:
        got, b = [], int(getattr(data, "batch_size", None) or 0)
        for i, batch in enumerate(data):
            got.append(batch)
            if i + 1 >= auto.num_batches:
                break
        if not got:
            raise ValueError("data: the DataLoader yields no batches (empty dataset)")
        x, y = torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])
        b = b or int(got[0][0].shape[0])
        try:
            n = len(data.dataset)
        except TypeError:
            n = None
    given = dict(sampler_kwargs or {}) if not isinstance(sampler, Kernel) else dict(kernel.settings)
    with _sampling_mode(energy.model, False):  # the eval-mode forward sampling uses; modes restored
        info = run_auto_step(energy, params, x, y, rule, auto, given, batch_size=b, n=n, fixed=fixed,
                             precond_eps=float(kernel.settings.get("eps", 1e-5)), seed=_auto_seed(seed) + 1,
                             where=where)
    if info["settings"] and any(kernel.settings.get(k) != v for k, v in info["settings"].items()):
        kernel = build_kernel(sampler, **{**dict(sampler_kwargs or {}), **info["settings"]})
    return kernel, Constant(info["step_size"]), info


def _check_loader_has_length(loader: Any) -> None:
    try:
        len(loader.dataset)
        ok = not isinstance(loader.dataset, torch.utils.data.IterableDataset)
    except (TypeError, AttributeError):
        ok = False
    if not ok:
        raise ValueError("gradient: 'cv' needs one full-data gradient at its centre, and this DataLoader "
                         "streams data without a length (an iterable dataset); pass (x, y) tensors or a "
                         "DataLoader over a map-style dataset, or use gradient='minibatch'")


def _full_data_chunks(tensors: tuple[Tensor, Tensor] | None, data: Any, batch_size: int | None):
    """One pass over the whole data: tensor slices (>= 256 examples each), or one DataLoader epoch."""
    if tensors is None:
        for batch in data:
            yield batch[0], batch[1]
        return
    x, y = tensors
    step = max(batch_size or x.shape[0], 256)
    for i in range(0, x.shape[0], step):
        yield x[i:i + step], y[i:i + step]


class _NoiseReport:
    """step_size='auto': the minibatch-noise report, first at the initial weights, then re-evaluated
    once at step num_warmup at the first chain's current weights (where the chains sample; with
    gradient='cv' for the control variate there), warning past NOISE_WARN_THRESHOLD."""

    def __init__(self, auto_info: dict[str, Any], num_warmup: int, names: list[str], gradient: str) -> None:
        self.report, self.names, self.at = auto_info["report"], names, num_warmup
        self.gradient = gradient
        self.result: dict[str, Any] = {**auto_info["gradient_noise"], "estimator": "minibatch"}
        self.done = False

    def after_warmup(self, group: _Group) -> None:
        if self.done:
            return
        self.done = True
        start = time.process_time()
        params = {n: p[0].detach() for n, p in zip(self.names, group.params, strict=True)}
        if not all(bool(torch.isfinite(p).all()) for p in params.values()):
            return
        est = group.estimator
        centre = ({n: c[0].detach() for n, c in zip(self.names, est.centre, strict=True)}
                  if isinstance(est, ControlVariateGradient) else None)
        got = self.report(params, centre)
        self.result = {**got, "at": f"chain {group.chains[0]}'s weights at step {self.at} (end of warm-up)",
                       "estimator": "control variate" if centre is not None else "minibatch",
                       "cpu_s": time.process_time() - start}
        worst = max(got["top_reshuffled"], got["mean_reshuffled"])
        if worst > NOISE_WARN_THRESHOLD:
            warnings.warn(GradientNoiseWarning(
                "step_size='auto': minibatch gradient noise is predicted to inflate the posterior variance "
                f"by {100 * got['top_reshuffled']:.1f}% along the stiffest direction "
                f"({100 * got['mean_reshuffled']:.1f}% on average) at batch_size={got['batch_size']}; use a "
                "larger batch, gradient='cv', or a smaller AutoStep(eps=...)"), stacklevel=4)


class _CentreFinder:
    """gradient='cv' for one chain group: sums each chain's weights over warm-up steps
    [num_warmup // 2, num_warmup), and at step num_warmup (before its gradient) takes their mean as
    the centre w_hat, forms the full-data gradient there and makes the control variate the group's
    estimator."""

    def __init__(self, runner: _Sampler, num_warmup: int, chunks: Callable[[], Any]) -> None:
        self.runner = runner
        self.start, self.stop = (num_warmup // 2, num_warmup) if num_warmup >= 2 else (0, 0)
        self.at = num_warmup if num_warmup >= 2 else 0
        self.chunks = chunks
        self.sums: list[Tensor] | None = None
        self.count = 0
        self.cpu_s = 0.0

    def before_step(self, group: _Group, t: int) -> None:
        if group.estimator is not None:
            return
        if self.start <= t < self.stop:
            with torch.no_grad():
                w = [p.detach() for p in group.params]
                self.sums = ([v.clone() for v in w] if self.sums is None
                             else [a + b for a, b in zip(self.sums, w, strict=True)])
            self.count += 1
        if t == self.at:
            centre = ([a / self.count for a in self.sums] if self.sums is not None and self.count
                      else [p.detach().clone() for p in group.params])
            self.activate(group, centre)

    def activate(self, group: _Group, centre: list[Tensor], centre_grad: list[Tensor] | None = None) -> None:
        runner = self.runner
        if centre_grad is None:
            start = time.process_time()
            leaves = [c.detach().clone().requires_grad_(True) for c in centre]
            centre_grad = full_data_gradient(runner.minibatch_gradient, leaves, group.vectorized,
                                             self.chunks())[2]
            self.cpu_s += time.process_time() - start
        group.estimator = ControlVariateGradient(runner.minibatch_gradient, centre, centre_grad)
        self.sums = None

    def state_dict(self, group: _Group) -> dict[str, Any]:
        est = group.estimator
        cv = est.state_dict() if isinstance(est, ControlVariateGradient) else None
        return {"sums": None if self.sums is None else [a.clone() for a in self.sums], "count": self.count,
                "cpu_s": self.cpu_s, "cv": cv}

    def load_state_dict(self, group: _Group, state: dict[str, Any]) -> None:
        self.sums = None if state["sums"] is None else [a.clone() for a in state["sums"]]
        self.count, self.cpu_s = int(state["count"]), float(state["cpu_s"])
        group.estimator = None
        if state["cv"] is not None:
            self.activate(group, state["cv"]["centre"], state["cv"]["centre_grad"])

def _check_model_storage(model: nn.Module) -> None:
    """A module whose tensors have no storage (the meta device) cannot be sampled."""
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise ValueError(f"model: {n!r} is on the meta device (no values); materialise the module first, "
                             "e.g. model.to_empty(device='cpu') and load its weights")


def _check_threshold(value: object) -> float:
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or math.isnan(float(value)) or not float(value) > 1:
        raise ValueError(f"divergence_threshold: expected a number > 1 (a ratio to the initial energy) or "
                         f"None to flag only non-finite energies, got {value!r}")
    return float(value)


def _check_chain_ids(chain_ids: object, total: int) -> None:
    if isinstance(chain_ids, (str, bytes)) or not isinstance(chain_ids, (Sequence, np.ndarray, range)):
        raise TypeError(f"chain_ids: expected a sequence of chain indices, got {type(chain_ids).__name__}")
    bad = [c for c in chain_ids if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer))]
    if bad:
        raise TypeError(f"chain_ids: chain indices must be ints, got {bad[:3]!r}")
    ids = [int(c) for c in chain_ids]
    if not ids or len(set(ids)) != len(ids) or not all(0 <= c < total for c in ids):
        raise ValueError(f"chain_ids: must be distinct indices in [0, {total}), got {chain_ids!r}")


def _check_run_memory(named: list[tuple[str, Tensor]], keep_names: list[str], num_chains: int,
                      num_draws: int) -> None:
    """Refuse, before allocating, a run whose buffers would not fit in the available memory.

    Estimate: the stored draws C x N x D_kept plus the per-draw statistics C x N x (2 values + a float64
    step size + a bool), and about 6 copies of the C x D chain state (initial weights, chain weights,
    gradients, sampler state, noise, the vectorization probe)."""
    item = itemsize(named[0][1].dtype)
    d = sum(p.numel() for _, p in named)
    d_kept = sum(p.numel() for n, p in named if n in keep_names)
    draws = float(num_chains) * num_draws * (d_kept * item + 2 * item + 9)
    state = 6.0 * num_chains * d * item
    if draws >= state:
        check_memory("num_draws", draws + state,
                     f"storing {num_chains} chain(s) x {num_draws} draws of {d_kept:,} kept weights",
                     "store fewer draws (num_draws, thin), fewer parameters (keep=[...]) or fewer chains "
                     "per call (chain_ids)")
    else:
        check_memory("num_chains", draws + state, f"the state of {num_chains} chain(s) of {d:,} weights",
                     "run fewer chains per call (chain_ids, or sequential calls)")


_LOW_PRECISION = {torch.float16: 10, torch.bfloat16: 7}  # explicit mantissa bits


def _warn_low_precision(named: list[tuple[str, Tensor]], schedule: Schedule) -> None:
    low = sorted({str(p.dtype) for _, p in named if p.dtype in _LOW_PRECISION})
    if not low:
        return
    h = float(schedule.step_size(0))
    ws = [p.detach().reshape(-1) for _, p in named if p.dtype in _LOW_PRECISION]
    w = torch.cat([v.float() for v in ws])
    dtype = ws[0].dtype
    # a change of one noise standard deviation sqrt(2h) that leaves the stored number as it was
    stuck = float(((w + math.sqrt(2 * h)).to(dtype).float() == w).double().mean()) if w.numel() else 0.0
    warnings.warn(
        f"model: its weights are {', '.join(low)}: a Langevin update of size h*grad U + sqrt(2h)*xi "
        f"smaller than half the spacing of {dtype} numbers at w (|w| * 2^-{_LOW_PRECISION[dtype] + 1}) "
        f"rounds away, so those coordinates never move; at step size h={h:g}, a change of one noise "
        f"standard deviation sqrt(2h) leaves {100 * stuck:.0f}% of the initial weights unchanged. "
        "Sample in float32 or float64 (model.float() / model.double()).", PrecisionWarning, stacklevel=3)


def _check_stat_fns(stat_fns: object) -> dict[str, StatFn]:
    if stat_fns is None:
        return {}
    if not isinstance(stat_fns, Mapping):
        raise TypeError(f"stat_fns: expected a mapping name -> function(params) -> scalar, got "
                        f"{type(stat_fns).__name__}")
    for key, fn in stat_fns.items():
        if not isinstance(key, str):
            raise TypeError(f"stat_fns: keys must be str names, got {key!r}")
        if key in ("energy", "loss", "step_size", "diverging"):
            raise ValueError(f"stat_fns: {key!r} is a built-in statistic; give it another name")
        if not callable(fn):
            raise TypeError(f"stat_fns: {key!r} must be a callable params -> scalar, got {type(fn).__name__}")
    return dict(stat_fns)


def _stat_value(key: str, value: object) -> float:
    """A stat function's result as a float; a string, a vector or None is an error naming it."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"stat_fns: {key!r} must return a scalar, got a tensor of shape "
                             f"{tuple(value.shape)}")
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iuf":
        return float(value)
    raise TypeError(f"stat_fns: {key!r} must return a number or a 1-element tensor, got "
                    f"{type(value).__name__} {value!r:.60}")


def _check_model_takes_data(energy: Energy, params: dict[str, Tensor], fixed: dict[str, Tensor],
                            x: Tensor, y: Tensor) -> None:
    """Run the energy once on a slice of the data so a shape/dtype/label mistake is reported as such,
    not as a raw torch error from deep inside the first step."""
    head = slice(0, min(len(x), 256))
    try:
        # as when sampling: BatchNorm must not update its statistics here
        with _sampling_mode(energy.model, False), torch.no_grad():
            out = torch.func.functional_call(energy.model, {**fixed, **params}, (x[head],))
            losses = energy.loss_fn(out, y[head])
    except (RuntimeError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"data: the model and loss cannot consume the data ({type(err).__name__}: {err}); "
                         f"check x's shape {tuple(x.shape)} and dtype {x.dtype}, and y's shape "
                         f"{tuple(y.shape)} and dtype {y.dtype}") from err
    rows = len(x[head])
    if not isinstance(losses, Tensor) or (losses.dim() != 0 and tuple(losses.shape) != (rows,)):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"loss_fn: must return one loss per example, shape ({rows},) for {rows} examples "
                         f"(reduction='none'), or a 0-d batch mean; got {shape}")
    if loss_likelihood(energy.loss_fn) == "bernoulli":
        if bool((y < 0).any()) or bool((y > 1).any()):
            raise ValueError(f"data: binary cross-entropy needs targets in [0, 1] (labels 0/1), got values "
                             f"in [{float(y.min())}, {float(y.max())}]")
    elif energy.task == "classification" and out.dim() >= 2:
        if y.is_floating_point() and y.dim() == 1:
            raise ValueError("data: classification labels must be integers (torch.long), got floats")
        if not y.is_floating_point() and (bool((y < 0).any()) or bool((y >= out.shape[-1]).any())):
            raise ValueError(f"data: class labels must lie in [0, {out.shape[-1]}) for a model with "
                             f"{out.shape[-1]} outputs, got labels in [{int(y.min())}, {int(y.max())}]")


def _initial_params(named: list[tuple[str, Tensor]], init: str | Mapping[str, Tensor], num_chains: int,
                    prior: Prior, seeds: list[tuple[int, int, int]]) -> dict[str, Tensor]:
    if isinstance(init, str):
        if init == "model":
            return {n: p.detach().unsqueeze(0).repeat(num_chains, *[1] * p.dim()) for n, p in named}
        if init == "prior":
            if not isinstance(prior, GaussianPrior):
                raise ValueError("init: 'prior' needs a GaussianPrior; pass init as tensors instead")
            current = {n: p.detach() for n, p in named}
            per_chain = [prior.sample_like(current, _generator(seeds[c][2])) for c in range(num_chains)]
            return {n: torch.stack([d[n] for d in per_chain]) for n, _ in named}
        raise ValueError(f"init: expected 'model', 'prior' or a mapping of tensors, got {init!r}")
    if not isinstance(init, Mapping):
        raise TypeError(f"init: expected 'model', 'prior' or a mapping name -> tensor, got "
                        f"{type(init).__name__} {init!r}")
    out = {}
    for n, p in named:
        if n not in init:
            raise ValueError(f"init: missing parameter {n!r}")
        v = torch.as_tensor(init[n], dtype=p.dtype)
        if tuple(v.shape) != (num_chains, *p.shape):
            raise ValueError(f"init: {n!r} must have shape {(num_chains, *p.shape)}, got {tuple(v.shape)}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"init: {n!r} contains NaN or Inf values; start the chains at finite weights")
        out[n] = v.clone()
    extra = set(init) - {n for n, _ in named}
    if extra:
        raise ValueError(f"init: unknown parameter names {sorted(extra)}")
    return out


CHECKPOINT_VERSION = 1


class _Checkpointer:
    """Atomic checkpoints of a whole run (see :func:`sample`'s ``checkpoint``).

    A checkpoint holds two fingerprints: ``setup`` (the arguments, the data's and the initial
    weights' hashes: known before the model runs) and ``fingerprint`` (``setup``'s settings as the
    run resolved them: chain method, automatic step size). Resuming compares both; a finished run
    (``finished``, with its metadata) is handed back by :func:`sample` without sampling again."""

    def __init__(self, path: str | os.PathLike, fingerprint: str, setup: str, out: _Buffers,
                 every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint_every: must be an int >= 1 (steps), got {every!r}")
        self.path, self.fingerprint, self.setup, self.out = path, fingerprint, setup, out

    def write(self, group_index: int, group_state: dict[str, Any] | None,
              metadata: dict[str, Any] | None = None) -> None:
        save_payload(self.path, "checkpoint", CHECKPOINT_VERSION, {
            "fingerprint": self.fingerprint, "setup": self.setup, "group_index": group_index,
            "group_state": group_state, "draws": self.out.draws, "stats": self.out.stats,
            "diverged": self.out.diverged, "divergence_step": self.out.divergence_step,
            **({"finished": True, "metadata_json": json.dumps(metadata, default=str)}
               if metadata is not None else {}),
        })

    def saver(self, group_index: int) -> Callable[[dict[str, Any]], None]:
        return lambda state: self.write(group_index, state)

    @staticmethod
    def read(path: str | os.PathLike | None, setup: str) -> dict[str, Any] | None:
        """The checkpoint at ``path`` if there is one, after checking it comes from this run."""
        if path is None or not os.path.exists(path):
            return None
        saved = load_payload(path, "checkpoint", (CHECKPOINT_VERSION,))
        if not isinstance(saved.get("setup"), str):
            raise ValueError(f"resume: the checkpoint {str(path)!r} predates the check that it comes from "
                             "the same data and initial weights (written by pib_bayes <= 0.2), so it "
                             "cannot be resumed safely; use resume=False to start over")
        _check_same_run(path, saved["setup"], setup)
        return saved

    def resume(self, groups: list[_Group], saved: dict[str, Any]) -> tuple[int, _Cursor | None]:
        _check_same_run(self.path, saved.get("fingerprint", "{}"), self.fingerprint)
        try:
            self.out.draws.update(saved["draws"])
            self.out.stats.update(saved["stats"])
            self.out.diverged.copy_(saved["diverged"])
            self.out.divergence_step.copy_(saved["divergence_step"])
            gi = int(saved["group_index"])
            cursor = _restore_group(groups[gi], saved["group_state"]) if saved["group_state"] else None
        except (KeyError, IndexError, TypeError, RuntimeError) as err:
            raise FormatError(f"{self.path}: incomplete checkpoint ({err})") from None
        return gi, cursor


_FINGERPRINT_LABELS = {"initial_weights": "initial weights", "n": "data (number of examples)"}


def _check_same_run(path: str | os.PathLike, stored: str, current: str) -> None:
    if stored == current:
        return
    try:
        old = json.loads(stored)
    except (json.JSONDecodeError, TypeError, RecursionError):
        raise FormatError(f"{path}: corrupt checkpoint fingerprint") from None
    new = json.loads(current)
    if not isinstance(old, dict):
        raise FormatError(f"{path}: corrupt checkpoint fingerprint")
    diff = sorted(_FINGERPRINT_LABELS.get(k, k) for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise ValueError(f"resume: the checkpoint {str(path)!r} comes from a different run ({', '.join(diff)} "
                     "differ); use the same arguments, data and initial weights, or resume=False to start "
                     "over")


ROWS_HASHED = 4096  # data rows hashed by data_fingerprint (evenly spaced; all rows of smaller data)


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_fingerprint(tensors: Sequence[Tensor]) -> str:
    """blake2b hex digest of the shapes, dtypes and bytes of ``tensors`` (in order)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def data_fingerprint(tensors: Sequence[Tensor] | None) -> str | None:
    """blake2b digest of the data tensors' shapes and dtypes and of at most :data:`ROWS_HASHED`
    evenly spaced rows (every row of smaller data): cheap on any data size, and two data sets of one
    shape differ in the hashed rows unless they agree on every one of them. None: data that is not
    tensors (a DataLoader over another dataset) is not fingerprinted."""
    if tensors is None:
        return None
    n = int(tensors[0].shape[0])
    idx = torch.linspace(0, n - 1, ROWS_HASHED).round().long().unique() if n > ROWS_HASHED else None
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{n}|".encode())
    for t in tensors:
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(_tensor_bytes(t if idx is None else t.detach().cpu().index_select(0, idx)))
    return h.hexdigest()


def _loader_tensors(data: object) -> tuple[Tensor, ...] | None:
    ds = getattr(data, "dataset", None)
    return tuple(ds.tensors) if isinstance(ds, torch.utils.data.TensorDataset) else None


def _loader_length(data: object) -> int | None:
    try:
        return len(data.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None


@dataclass
class _Buffers:
    """Everything the run has produced so far, shared by the chain groups."""

    draws: dict[str, Tensor]
    stats: dict[str, Tensor]
    diverged: Tensor
    divergence_step: Tensor

    def stat(self, name: str) -> Tensor:
        if name not in self.stats:
            self.stats[name] = torch.full(self.stats["energy"].shape, math.nan, dtype=torch.float64)
        return self.stats[name]


@dataclass
class _Cursor:
    """Where a chain group is: global step t, draws kept, sampling-phase steps seen, live chains."""

    t: int
    kept: int
    counter: int
    alive: Tensor
    limit: Tensor | None = None  # per chain, the |U| above which the chain has diverged


def _group_state(group: _Group, cur: _Cursor) -> dict[str, Any]:
    return {
        "t": cur.t, "kept": cur.kept, "counter": cur.counter, "alive": cur.alive.clone(),
        "energy_limit": None if cur.limit is None else cur.limit.clone(),
        "params": [p.detach().clone() for p in group.params],
        "kernel_state": {k: [v.clone() for v in vs] for k, vs in group.state.items()},
        "noise_generators": group.generator_states(),
        "batcher": group.batcher.state_dict(),
        **({"dropout_rng": torch.get_rng_state()} if group.dropout_seed is not None else {}),
        **({"centre": group.centre.state_dict(group)} if group.centre is not None else {}),
    }


def _restore_group(group: _Group, saved: dict[str, Any]) -> _Cursor:
    with torch.no_grad():
        for p, v in zip(group.params, saved["params"]):
            p.copy_(v)
        for k, vs in saved["kernel_state"].items():
            for buf, v in zip(group.state[k], vs):
                buf.copy_(v)
    group.set_generator_states(saved["noise_generators"])
    group.batcher.load_state_dict(saved["batcher"])
    if group.dropout_seed is not None and "dropout_rng" in saved:
        group.dropout_state = saved["dropout_rng"]
    if group.centre is not None:
        group.centre.load_state_dict(group, saved["centre"])
    limit = saved.get("energy_limit")
    return _Cursor(int(saved["t"]), int(saved["kept"]), int(saved["counter"]), saved["alive"].clone(),
                   None if limit is None else limit.clone())


def _total_steps(schedule: Schedule, num_warmup: int, num_draws: int, thin: int) -> int | None:
    """Steps a chain takes to keep ``num_draws`` draws (None if not found within 10^7 steps).

    After warm-up, every ``thin``-th *collected* step is kept and the loop ends after the step of the
    last draw: the ``((num_draws - 1) * thin + 1)``-th collected step.
    """
    needed = (num_draws - 1) * thin + 1
    if type(schedule).collect is Schedule.collect:  # every step after warm-up is collected
        return num_warmup + needed
    t, counted = num_warmup, 0
    while counted < needed and t < num_warmup + 10**7:  # e.g. a cyclical schedule: part of each cycle
        counted += bool(schedule.collect(t))
        t += 1
    return t if counted == needed else None


def _run_group(runner: _Sampler, group: _Group, names: list[str], keep_names: list[str], num_warmup: int,
               num_draws: int, thin: int, out: _Buffers, progress: bool, cur: _Cursor | None = None,
               checkpoint: Callable[[dict[str, Any]], None] | None = None, checkpoint_every: int = 0,
               divergence_threshold: float = math.inf) -> None:
    """Advance one chain group until it holds ``num_draws`` draws (or every chain diverged).

    A draw is the weights w_t *before* step t, stored with U(w_t); ``checkpoint`` is called with the
    group's complete state at the start of every ``checkpoint_every``-th step, so a resumed run
    repeats exactly the steps an uninterrupted one takes.

    A chain diverges at the first step t whose energy U(w_t) is non-finite or exceeds
    ``divergence_threshold`` x its reference scale ``max(|U(w_0)|, D)`` (initial energy, floored at
    the number D of sampled coordinates); from then on its weights are NaN and
    ``sample_stats["diverging"]`` is true at every draw of that chain from the divergence on.
    """
    schedule = runner.schedule
    # the group's chains are consecutive (all chains, or one): basic indexing, no index_put per draw
    contiguous = group.chains == list(range(group.chains[0], group.chains[0] + len(group.chains)))
    idx: Tensor | slice = (slice(group.chains[0], group.chains[0] + len(group.chains)) if contiguous
                           else torch.tensor(group.chains))
    keep_pos = [names.index(n) for n in keep_names]
    resumed_at = cur.t if cur is not None else -1
    if cur is None:
        cur = _Cursor(0, 0, 0, torch.ones(len(group.chains), dtype=torch.bool))
    floor = float(sum(p[0].numel() for p in group.params))
    desc = f"chain {group.chains[0]}" if len(group.chains) == 1 else f"{len(group.chains)} chains"
    warn_if_oversubscribed()
    # the bar counts every step, warm-up included, so its ETA holds from the start; it stays on screen
    phase = lambda t: f"{desc} {'warm-up' if t < num_warmup else 'sampling'}"  # noqa: E731
    bar = tqdm(total=_total_steps(schedule, num_warmup, num_draws, thin), initial=cur.t, desc=phase(cur.t),
               unit="step", disable=not progress, leave=True)
    plain_collect = type(schedule).collect is Schedule.collect
    single = len(group.chains) == 1 and group.params[0].device.type == "cpu"
    try:
        with runner.bound(group):
            _steps(runner, group, names, keep_names, keep_pos, num_warmup, num_draws, thin, out, cur, idx,
                   resumed_at, checkpoint, checkpoint_every, divergence_threshold, floor,
                   bar if progress else None, phase,
                   plain_collect, single)
    finally:
        bar.close()
        if group.prefetcher is not None:
            group.prefetcher.close()  # the draw made ahead for a step that will not run is dropped


def _steps(runner: _Sampler, group: _Group, names: list[str], keep_names: list[str], keep_pos: list[int],
           num_warmup: int, num_draws: int, thin: int, out: _Buffers, cur: _Cursor, idx: Tensor | slice,
           resumed_at: int, checkpoint: Callable[[dict[str, Any]], None] | None, checkpoint_every: int,
           divergence_threshold: float, floor: float, bar: Any, phase: Callable[[int], str],
           plain_collect: bool, single: bool) -> None:
    """The step loop of :func:`_run_group`. With one chain on the CPU (``single``) the divergence test
    and the recorded scalars use Python floats (the same comparisons on the same values)."""
    schedule = runner.schedule
    limit_f: float | None = None  # single: the limit as a Python float (no tensor ops per step)
    u_f = math.nan
    while cur.kept < num_draws and (bool(cur.alive[0]) if single else bool(cur.alive.any())):
        t = cur.t
        if checkpoint is not None and checkpoint_every and t % checkpoint_every == 0 and t != resumed_at:
            checkpoint(_group_state(group, cur))
        if group.centre is not None:
            group.centre.before_step(group, t)
        if runner.noise_report is not None and t == runner.noise_report.at:
            runner.noise_report.after_warmup(group)
        u, loss, grads = runner.gradients(group)
        if cur.limit is None and math.isfinite(divergence_threshold):
            # threshold x the energy scale a relative explosion is measured against (a NaN U(w_0)
            # gives a NaN limit: every comparison fails, the chain is flagged at once, as it must be)
            scale = torch.clamp(u.detach().double().abs(), min=floor)
            # below the dtype's largest value, so that |U| = inf never passes
            cur.limit = (divergence_threshold * scale).clamp(max=torch.finfo(u.dtype).max).to(u.dtype)
        if single:
            u_f = u.item()  # exact: a float32/float64 value is a Python float
            if limit_f is None and cur.limit is not None:
                limit_f = cur.limit.item()
            # a non-finite gradient shows up as a non-finite energy one step later; |U| <= limit is
            # false for NaN and +-inf as well
            diverges = not (abs(u_f) <= limit_f if limit_f is not None else math.isfinite(u_f))
            newly = cur.alive if diverges else None
        else:
            ok = u.abs() <= cur.limit if cur.limit is not None else torch.isfinite(u)
            newly = cur.alive & ~ok
            diverges = bool(newly.any())
        if diverges:
            assert newly is not None
            newly = newly.clone()
            for j in torch.nonzero(newly).flatten().tolist():
                out.diverged[group.chains[j]] = True
                out.divergence_step[group.chains[j]] = t
                out.stats["diverging"][group.chains[j], cur.kept:] = True  # every draw from here on
            cur.alive &= ~newly
            with torch.no_grad():  # from here on a diverged chain holds NaN: never averaged in
                for p in group.params:
                    p[newly] = math.nan
        record = t >= num_warmup and (plain_collect or schedule.collect(t))
        if record:
            record = cur.counter % thin == 0
            cur.counter += 1
        if record:
            k = cur.kept
            with torch.no_grad():
                for n, pos in zip(keep_names, keep_pos):
                    out.draws[n][idx, k] = group.params[pos].detach()
                if single:  # the same values, stored without tensor conversions
                    out.stats["energy"][idx, k] = u_f
                    out.stats["loss"][idx, k] = loss.item()
                else:
                    out.stats["energy"][idx, k] = u.to(out.stats["energy"].dtype)
                    out.stats["loss"][idx, k] = loss.to(out.stats["loss"].dtype)
                out.stats["step_size"][idx, k] = schedule.step_size(t)
                for name, fn in runner.stat_fns.items():
                    vals = [_stat_value(name, fn({n: p[j].detach() for n, p in zip(names, group.params)}))
                            if bool(cur.alive[j]) else math.nan for j in range(len(group.chains))]
                    out.stat(name)[idx, k] = torch.tensor(vals, dtype=torch.float64)
            cur.kept += 1
        step_stats = runner.move(group, grads, t, record)
        if record:
            for name, val in step_stats.items():
                out.stat(name)[idx, cur.kept - 1] = val.double()
        cur.t += 1
        if bar is not None:  # None without progress: a disabled bar still costs a call per step
            bar.update(1)
            if cur.t == num_warmup:
                bar.set_description(phase(cur.t), refresh=False)
