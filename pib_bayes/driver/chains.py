"""Chain groups and the per-step energy/gradient evaluation of :func:`pib_bayes.sample`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

from ..batched import batched_forward
from ..data import LoaderBatcher, TensorBatcher
from ..energy import BoundEnergy, Energy
from ..gradients import GradientTransform
from ..samplers.core import GaussianNoise, Kernel, NoisePrefetcher, count_step, step_count
from ..samplers.schedules import Schedule

if TYPE_CHECKING:  # annotations only: warmup builds on this module
    from .warmup import _CentreFinder, _NoiseReport

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
    direct: BoundEnergy | None = None  # a one-chain group while it runs: the module called on its own weights

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


class _Sampler:
    def __init__(self, energy: Energy, names: list[str], fixed: dict[str, Tensor], kernel: Kernel,
                 schedule: Schedule, stat_fns: Mapping[str, StatFn], dropout: bool = False,
                 transform: GradientTransform | None = None) -> None:
        self.energy, self.names, self.fixed = energy, names, fixed
        self.transform = transform  # between the estimator and the kernel (pib_bayes.gradients)
        self.kernel, self.schedule, self.stat_fns = kernel, schedule, dict(stat_fns)
        # train_mode_dropout: vmap draws a different dropout mask for each chain
        self.randomness = "different" if dropout else "error"
        # hand-batched forward (e.g. baddbmm for MLPs) is much faster than vmap for small layers
        self.fast_forward = batched_forward(energy.model) if not fixed else None
        self.noise_report: _NoiseReport | None = None  # step_size='auto': re-evaluated after warm-up
        self._no_grad = torch.no_grad()  # one context object for every step (not reentrant: not nested)

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
        return self.energy.combine(loss, self.energy.prior.log_prob(params, batch_ndim)), loss

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
        state = {**self.fixed, **dict(zip(self.names, leaves, strict=True))}
        with torch.nn.utils.stateless._reparametrize_module(self.energy.model, state, tie_weights=True):
            group.direct = self.energy.bind(self.names, leaves, [p.shape for p in group.params])
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
        likelihood's; :class:`~pib_bayes.energy.BoundEnergy`), without the per-step substitution."""
        direct = group.direct
        assert direct is not None
        u, loss, grads = direct.value_and_grad(x, y)
        return u.reshape(1), loss.reshape(1), grads

    def minibatch_gradient(self, tensors: Sequence[Tensor], vectorized: bool, x: Tensor, y: Tensor,
                           stacked: bool) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """The plain estimator: (U_B, loss_B) per chain and grad U_B w.r.t. ``tensors`` (leaves), from
        :meth:`pib_bayes.Energy.value_and_grad` with the group's forward (vmap or hand-batched)."""
        params, batch_ndim = self._as_model_params(tensors, vectorized)
        u, loss, grads = self.energy.value_and_grad(
            params, (x, y), batch_ndim, wrt=tensors,
            loss=lambda p, xb, yb: self.losses(p, batch_ndim, xb, yb, stacked))
        return u.reshape(loss.shape), loss, grads

    def move(self, group: _Group, grads: Sequence[Tensor], with_stats: bool) -> dict[str, Tensor]:
        """The kernel's step t on ``grads`` (after the gradient transform, if any), t the group's one
        step counter (its sampler state's :func:`~pib_bayes.samplers.core.step_count`), at the
        schedule's h_t and noise scale; then t <- t + 1. Chains the transform stops get NaN weights."""
        stop = None
        if self.transform is not None:
            grads, stop = self.transform(group.params, grads)
        t = step_count(group.state)
        h, scale = self.schedule.step_size(t), self.schedule.noise_scale(t)
        noise: GaussianNoise | None = group.noise
        if group.prefetcher is not None:  # this step's noise was drawn during the gradient pass
            drawn = group.prefetcher.take([group.params] if scale != 0 else [])
            noise = drawn[0] if drawn else None
        with self._no_grad:
            if stop is None:
                stats = self.kernel.step(group.params, grads, group.state, h, noise, scale, batch_ndim=1,
                                         with_stats=with_stats)
            else:
                stats = {} if bool(stop.all()) else self.kernel.step(
                    group.params, grads, group.state, h, noise, scale, batch_ndim=1, with_stats=with_stats)
                if bool(stop.any()):
                    for p in group.params:
                        p[stop] = math.nan
        count_step(group.state)
        return stats
