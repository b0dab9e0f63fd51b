"""``pib_bayes.sample``: run Langevin chains on the PIB energy and return a :class:`Posterior`.

Chains are independent: chain k has its own noise generator and its own data-order generator,
both derived from ``seed`` with ``numpy.random.SeedSequence(seed).spawn``. ``num_chains`` chains
run either *vectorized* (one batched computation, ``torch.func.vmap`` over the stacked weights)
or *sequentially* (one after another); since each chain only ever touches its own streams, both
give the same draws to float tolerance, and a chain gives the same draws as when run alone.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import __version__
from ._validate import PrecisionWarning, check_bool, check_memory, check_path, itemsize
from .batched import batched_forward
from .data import LoaderBatcher, TensorBatcher, as_tensors
from .energy import Energy, LossFn
from .io import FormatError, load_payload, save_payload
from .posterior import Posterior
from .prior import GaussianPrior, Prior, check_prior_fits
from .samplers.core import NOISES, GaussianNoise, Kernel, NoisePrefetcher, make_noise
from .samplers.kernels import build_kernel
from .samplers.schedules import Schedule, as_schedule

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


class _Sampler:
    def __init__(self, energy: Energy, names: list[str], fixed: dict[str, Tensor], kernel: Kernel,
                 schedule: Schedule, stat_fns: Mapping[str, StatFn]) -> None:
        self.energy, self.names, self.fixed = energy, names, fixed
        self.kernel, self.schedule, self.stat_fns = kernel, schedule, dict(stat_fns)
        # hand-batched forward (e.g. baddbmm for MLPs) is much faster than vmap for small layers
        self.fast_forward = batched_forward(energy.model) if not fixed else None

    # ---- energies -----------------------------------------------------------------
    def _one_loss(self, p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return self.energy.functional_loss(p, x, y, self.fixed)

    def _chain_params(self, group: _Group) -> tuple[dict[str, Tensor], int]:
        """The group's parameters as the model sees them, and their number of batch dims."""
        if not group.vectorized:
            # a view, not p[0]: ViewBackward hands the gradient through, SelectBackward allocates and copies
            return {n: p.view(p.shape[1:]) for n, p in zip(self.names, group.params)}, 0
        return dict(zip(self.names, group.params)), 1

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
        return vmap(self._one_loss, in_dims=(0, data_dim, data_dim))(params, x, y)

    # ---- one step -----------------------------------------------------------------
    def gradients(self, group: _Group) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """U and loss per chain at the current weights, and grad U on the next minibatch."""
        x, y, stacked = group.batcher.next()
        prior = self.energy.prior
        analytic = getattr(prior, "log_prob_and_grad", None)
        params, batch_ndim = self._chain_params(group)
        with torch.no_grad():
            # a Gaussian prior's value and gradient in closed form, no autograd graph: the same numbers
            # as backpropagating through log_prob (tested), a fraction of its cost
            got = analytic(params, batch_ndim) if analytic is not None else None
        with torch.enable_grad():
            if got is None:
                u, loss = self.energies(group, x, y, stacked)
                # chains are independent, so the gradient of the sum is each chain's own gradient
                return u.detach(), loss.detach(), torch.autograd.grad(u.sum(), group.params)
            loss = self.losses(params, batch_ndim, x, y, stacked)
            scaled = loss / self.energy.beta
            grads = list(torch.autograd.grad(scaled.sum(), group.params))
        log_prior, prior_grads = got
        torch._foreach_add_(grads, [g.view(p.shape) for g, p in zip(prior_grads, group.params, strict=True)])
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


def sample(
    model: nn.Module,
    loss_fn: str | LossFn,
    data: tuple[Tensor, Tensor] | DataLoader | Any,
    *,
    beta: float,
    prior: Prior | float | torch.distributions.Distribution | None = None,
    sampler: str | Kernel = "sgld",
    step_size: float | Schedule = 1e-4,
    num_chains: int = 1,
    chain_ids: Sequence[int] | None = None,
    num_warmup: int = 1000,
    num_draws: int = 1000,
    thin: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    keep: Sequence[str] | None = None,
    init: str | Mapping[str, Tensor] = "model",
    chain_method: str = "auto",
    task: str | None = None,
    stat_fns: Mapping[str, StatFn] | None = None,
    sampler_kwargs: Mapping[str, Any] | None = None,
    noise: str = "gaussian",
    prefetch_noise: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: bool = False,
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
        model: the torch module; its trainable parameters are sampled, buffers and frozen
            parameters (``requires_grad=False``) are held fixed at their current values, and it is
            evaluated in ``eval()`` mode (so BatchNorm uses its running statistics).
        loss_fn: per-example loss ``(output, target) -> (B,)`` or ``"cross_entropy"`` /
            ``"gaussian"``. With the NLL as loss, ``beta = 1/n`` is the Bayesian posterior. A 0-d
            result is taken as the batch mean (e.g. ``nn.CrossEntropyLoss()``); any other shape
            than ``(B,)`` (e.g. B-1 values) is a ``ValueError`` before the run (checked on tensor
            data; a DataLoader's batches are not inspected ahead).
        data: ``(x, y)`` tensors or a TensorDataset (minibatched here, per-chain shuffles),
            or a DataLoader (iterated as is).
        beta: PIB trade-off > 0 (beta = T/n for temperature T).
        prior: a :class:`~pib_bayes.prior.Prior`, a float sigma_0 (Gaussian centred at the
            initial weights), a torch distribution, or None (sigma_0 = 1).
        sampler: ``"sgld"``, ``"psgld"``, ``"sghmc"``, ``"csgld"`` (SGLD + a cyclical schedule) or
            a built :class:`~pib_bayes.samplers.Kernel`; ``sampler_kwargs`` go to its builder.
        step_size: a float (constant) or a :class:`~pib_bayes.samplers.Schedule`.
        num_chains, num_warmup, num_draws, thin: chain layout.
        chain_ids: run only these chains out of ``num_chains`` (e.g. one rank's share); chain k
            keeps the seeds of chain k of the full run, so the draws do not depend on how the
            chains are split. The Posterior holds ``len(chain_ids)`` chains, in that order.
        batch_size: minibatch size for tensor data (None = full batch).
        seed: root seed; chains get independent streams (:func:`chain_seeds`).
        progress: show a tqdm bar per chain group (a bool).
        keep: names of the parameters whose draws are stored (default all, a non-empty list);
            the others are still sampled.
        init: ``"model"`` (every chain starts at the module's weights), ``"prior"`` (a draw from
            a Gaussian prior per chain), or a mapping name -> (chains run, *shape) tensors.
        chain_method: ``"vectorized"``, ``"sequential"`` or ``"auto"`` (vectorized when vmap
            can run the model, else sequential; the choice and reason land in metadata).
        task: "classification" or "regression" (inferred from the loss when possible).
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
            every ``checkpoint_every`` steps, after each chain group and at the end.
        resume: continue from ``checkpoint`` if it exists (it must come from a run with the same
            settings; a bool). With tensor data, a run killed at any moment and resumed gives draws
            bit-identical to an uninterrupted run; a DataLoader restarts its iteration.
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
    schedule = as_schedule(step_size)
    if str(sampler).lower() == "csgld" and not hasattr(schedule, "cycle_length"):
        raise ValueError("step_size: sampler='csgld' needs a pib_bayes.samplers.Cyclical schedule")
    if sampler_kwargs is not None and not isinstance(sampler_kwargs, Mapping):
        raise TypeError(f"sampler_kwargs: expected a mapping of keyword arguments for the sampler, got "
                        f"{type(sampler_kwargs).__name__}")
    kernel = build_kernel(sampler, **dict(sampler_kwargs or {}))
    if not isinstance(noise, str) or noise not in NOISES:
        raise ValueError(f"noise: expected one of {sorted(NOISES)}, got {noise!r}")
    if not isinstance(prefetch_noise, bool):
        raise ValueError(f"prefetch_noise: expected True or False, got {prefetch_noise!r}")
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

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model: has no trainable parameters (requires_grad=True) to sample")
    names = [n for n, _ in named]
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
        raise ValueError(f"keep: unknown parameter names {unknown}; trainable parameters are {names}")
    check_prior_fits(energy.prior, {n: tuple(p.shape) for n, p in named})
    _check_run_memory(named, keep_names, num_run, num_draws)
    _warn_low_precision(named, schedule)
    ids = list(range(total_chains)) if chain_ids is None else [int(c) for c in chain_ids]
    num_chains = num_run
    stat_fns = _check_stat_fns(stat_fns)
    fixed = {n: b.detach().clone() for n, b in model.named_buffers()}
    fixed.update({n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad})

    tensors = as_tensors(data)
    all_seeds = chain_seeds(seed, total_chains)
    seeds = [all_seeds[c] for c in ids]
    init_params = _initial_params(named, init, num_chains, energy.prior, seeds)

    def make_batcher(chains: list[int]) -> TensorBatcher | LoaderBatcher:
        if tensors is None:
            if batch_size is not None:
                raise ValueError("batch_size: set the batch size on the DataLoader itself")
            return LoaderBatcher(data)
        return TensorBatcher(tensors[0], tensors[1], batch_size, [_generator(seeds[c][1]) for c in chains])

    runner = _Sampler(energy, names, fixed, kernel, schedule, stat_fns)
    if tensors is not None:
        _check_model_takes_data(energy, {n: init_params[n][0] for n in names}, fixed, *tensors)

    def make_group(chains: list[int], vectorized: bool) -> _Group:
        params = [init_params[n][chains].clone().requires_grad_(True) for n in names]
        gens = [_generator(seeds[c][0]) for c in chains]
        source = make_noise(noise, gens, batched=True)
        with torch.no_grad():
            state = kernel.init([p.detach() for p in params])
        prefetcher = NoisePrefetcher(noise, gens, batched=True) if prefetch_noise else None
        return _Group(chains, params, state, source, make_batcher(chains), vectorized, prefetcher)

    method, reason = chain_method, "requested"
    if num_chains == 1:
        method, reason = "sequential", "one chain"
    elif chain_method in ("auto", "vectorized"):
        probe = make_group(list(range(num_chains)), True)
        try:
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
        "params": {n: list(init_params[n].shape) for n in names}, "keep": keep_names,
        "n": int(tensors[0].shape[0]) if tensors is not None else None,
        "divergence_threshold": threshold,
    }, sort_keys=True, default=str)
    ckpt = _Checkpointer(checkpoint, fingerprint, out, checkpoint_every) if checkpoint is not None else None
    if checkpoint is None and resume:
        raise ValueError("resume: needs checkpoint=PATH (the file to resume from)")
    first_group, cursor = (ckpt.resume(groups) if ckpt is not None and resume else (0, None))
    model_was_training = model.training
    model.eval()
    try:
        for gi in range(first_group, len(groups)):
            save = ckpt.saver(gi) if ckpt is not None else None
            _run_group(runner, groups[gi], names, keep_names, num_warmup, num_draws, thin, out, progress,
                       cursor if gi == first_group else None, save, checkpoint_every, threshold)
            if ckpt is not None:
                ckpt.write(gi + 1, None)
    finally:
        model.train(model_was_training)
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
        "noise": noise, "prefetch_noise": prefetch_noise,
        "divergence_threshold": None if math.isinf(threshold) else threshold,
        "loss": loss_desc, "noise_std": getattr(energy.loss_fn, "noise_std", None), "init": init
        if isinstance(init, str) else "given", "sampled_params": names, "kept_params": keep_names,
    }
    return Posterior(draws, stats, metadata, fixed, diverged, divergence_step, model=model)


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
    was_training = energy.model.training
    energy.model.eval()  # as when sampling: BatchNorm must not update its statistics here
    try:
        with torch.no_grad():
            out = torch.func.functional_call(energy.model, {**fixed, **params}, (x[head],))
            losses = energy.loss_fn(out, y[head])
    except (RuntimeError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"data: the model and loss cannot consume the data ({type(err).__name__}: {err}); "
                         f"check x's shape {tuple(x.shape)} and dtype {x.dtype}, and y's shape "
                         f"{tuple(y.shape)} and dtype {y.dtype}") from err
    finally:
        energy.model.train(was_training)
    rows = len(x[head])
    if not isinstance(losses, Tensor) or (losses.dim() != 0 and tuple(losses.shape) != (rows,)):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"loss_fn: must return one loss per example, shape ({rows},) for {rows} examples "
                         f"(reduction='none'), or a 0-d batch mean; got {shape}")
    if energy.task == "classification" and out.dim() >= 2:
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
    """Atomic checkpoints of a whole run (see :func:`sample`'s ``checkpoint``)."""

    def __init__(self, path: str | os.PathLike, fingerprint: str, out: _Buffers, every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint_every: must be an int >= 1 (steps), got {every!r}")
        self.path, self.fingerprint, self.out = path, fingerprint, out

    def write(self, group_index: int, group_state: dict[str, Any] | None) -> None:
        save_payload(self.path, "checkpoint", CHECKPOINT_VERSION, {
            "fingerprint": self.fingerprint, "group_index": group_index, "group_state": group_state,
            "draws": self.out.draws, "stats": self.out.stats, "diverged": self.out.diverged,
            "divergence_step": self.out.divergence_step,
        })

    def saver(self, group_index: int) -> Callable[[dict[str, Any]], None]:
        return lambda state: self.write(group_index, state)

    def resume(self, groups: list[_Group]) -> tuple[int, _Cursor | None]:
        if not os.path.exists(self.path):
            return 0, None
        saved = load_payload(self.path, "checkpoint", (CHECKPOINT_VERSION,))
        if saved.get("fingerprint") != self.fingerprint:
            old, new = json.loads(saved.get("fingerprint", "{}")), json.loads(self.fingerprint)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"resume: the checkpoint {str(self.path)!r} comes from a run with other "
                             f"settings ({', '.join(diff)} differ); use the same arguments, or "
                             "resume=False to start over")
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
    limit = saved.get("energy_limit")
    return _Cursor(int(saved["t"]), int(saved["kept"]), int(saved["counter"]), saved["alive"].clone(),
                   None if limit is None else limit.clone())


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
    idx = torch.tensor(group.chains)
    keep_pos = [names.index(n) for n in keep_names]
    resumed_at = cur.t if cur is not None else -1
    if cur is None:
        cur = _Cursor(0, 0, 0, torch.ones(len(group.chains), dtype=torch.bool))
    floor = float(sum(p[0].numel() for p in group.params))
    desc = f"chain {group.chains[0]}" if len(group.chains) == 1 else f"{len(group.chains)} chains"
    bar = tqdm(total=num_draws, initial=cur.kept, desc=desc, disable=not progress, leave=False)
    try:
        while cur.kept < num_draws and bool(cur.alive.any()):
            t = cur.t
            if checkpoint is not None and checkpoint_every and t % checkpoint_every == 0 and t != resumed_at:
                checkpoint(_group_state(group, cur))
            u, loss, grads = runner.gradients(group)
            if cur.limit is None and math.isfinite(divergence_threshold):
                # threshold x the energy scale a relative explosion is measured against (a NaN U(w_0)
                # gives a NaN limit: every comparison fails, the chain is flagged at once, as it must be)
                scale = torch.clamp(u.detach().double().abs(), min=floor)
                # below the dtype's largest value, so that |U| = inf never passes
                cur.limit = (divergence_threshold * scale).clamp(max=torch.finfo(u.dtype).max).to(u.dtype)
            # a non-finite gradient shows up as a non-finite energy one step later; |U| <= limit is
            # false for NaN and +-inf as well
            ok = u.abs() <= cur.limit if cur.limit is not None else torch.isfinite(u)
            newly = cur.alive & ~ok
            if bool(newly.any()):
                for j in torch.nonzero(newly).flatten().tolist():
                    out.diverged[group.chains[j]] = True
                    out.divergence_step[group.chains[j]] = t
                    out.stats["diverging"][group.chains[j], cur.kept:] = True  # every draw from here on
                cur.alive &= ~newly
                with torch.no_grad():  # from here on a diverged chain holds NaN: never averaged in
                    for p in group.params:
                        p[newly] = math.nan
            record = t >= num_warmup and schedule.collect(t)
            if record:
                record = cur.counter % thin == 0
                cur.counter += 1
            if record:
                k = cur.kept
                with torch.no_grad():
                    for n, pos in zip(keep_names, keep_pos):
                        out.draws[n][idx, k] = group.params[pos].detach()
                    out.stats["energy"][idx, k] = u.to(out.stats["energy"].dtype)
                    out.stats["loss"][idx, k] = loss.to(out.stats["loss"].dtype)
                    out.stats["step_size"][idx, k] = schedule.step_size(t)
                    for name, fn in runner.stat_fns.items():
                        vals = [_stat_value(name, fn({n: p[j].detach() for n, p in zip(names, group.params)}))
                                if bool(cur.alive[j]) else math.nan for j in range(len(group.chains))]
                        out.stat(name)[idx, k] = torch.tensor(vals, dtype=torch.float64)
                cur.kept += 1
                bar.update(1)
            step_stats = runner.move(group, grads, t, record)
            if record:
                for name, val in step_stats.items():
                    out.stat(name)[idx, cur.kept - 1] = val.double()
            cur.t += 1
    finally:
        bar.close()
        if group.prefetcher is not None:
            group.prefetcher.close()  # the draw made ahead for a step that will not run is dropped
