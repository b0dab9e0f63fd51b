"""``pib_bayes.sample``: the runner that validates the arguments, plans the chain groups, runs them and
returns a :class:`~pib_bayes.Posterior`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .._validate import check_bool, check_path
from .._version import __version__
from ..data import LoaderBatcher, TensorBatcher, as_tensors
from ..energy import Energy, LossFn, loss_likelihood, require_task
from ..gradients import GRADIENTS, GradientTransform
from ..io import FormatError, holds_lock
from ..posterior import Posterior
from ..prior import GaussianPrior, Prior, check_prior_fits
from ..samplers.core import (
    NOISES,
    FlatTensors,
    Kernel,
    NoisePrefetcher,
    flat_view,
    flat_zeros_like,
    make_noise,
)
from ..samplers.kernels import build_kernel
from ..samplers.schedules import Constant, Schedule, as_schedule, expand_shorthand
from ..samplers.step_size import NOISE_WARN_THRESHOLD, AutoStep
from ..subnet import Selection, select_params
from .chains import (
    _dropout_rng,
    _dropout_seed,
    _generator,
    _Group,
    _Sampler,
    _sampling_mode,
    chain_seeds,
)
from .checkpoint import (
    _Checkpointer,
    _loader_length,
    _loader_tensors,
    data_fingerprint,
    run_fingerprint,
    tensor_fingerprint,
)
from .checks import (
    StatFn,
    _check_chain_ids,
    _check_model_storage,
    _check_model_takes_data,
    _check_run_disk,
    _check_run_memory,
    _check_stat_fns,
    _check_threshold,
    _initial_params,
    _positive_int,
    _warn_low_precision,
)
from .recorder import _Buffers, _run_group
from .stream import _Segments, consolidate, segments_dir, window_rows
from .warmup import (
    _as_auto,
    _auto_step_stage,
    _CentreFinder,
    _check_loader_has_length,
    _full_data_chunks,
    _make_adapter,
    _NoiseReport,
    _resolve_sampler,
    _with_adapter,
)


def _flat_copy(tensors: Sequence[Tensor]) -> FlatTensors:
    """Copies of ``tensors`` as views tiling one contiguous buffer (whole-buffer ops in the kernels)."""
    with torch.no_grad():  # plain copies (leaves), whatever the sources require
        out = flat_zeros_like(tensors)
        if not isinstance(out, FlatTensors):  # mixed dtypes or devices: one tensor each
            out = [t.detach().clone(memory_format=torch.contiguous_format) for t in tensors]
        else:
            torch._foreach_copy_(list(out), [t.detach() for t in tensors])
    return out


def _chain_weights(init_params: Mapping[str, Tensor], names: Sequence[str], chains: list[int],
                   num_chains: int) -> Sequence[Tensor]:
    """The weights a chain group moves in place (leaves that require grad), from the initial weights.

    A group of every chain (vectorized, or the one chain of a one-chain run) takes ``init_params``
    themselves, which nothing else moves (no copy: one fewer copy of the weights at peak); a group
    of one chain out of several gets its own copy, as one flat buffer.
    """
    if chains == list(range(num_chains)):
        tensors: Sequence[Tensor] = [init_params[n] for n in names]
        flat = flat_view(tensors) if len(chains) == 1 else None
        if flat is not None:
            tensors = FlatTensors(tensors, flat)
    else:
        tensors = _flat_copy([init_params[n][chains] for n in names])
    for t in tensors:
        t.requires_grad_(True)
    return tensors


def _as_energy(model: nn.Module, loss_fn: str | LossFn | Energy, beta: float | None, prior: Any,
               task: str | None) -> tuple[Energy, bool]:
    """The run's :class:`~pib_bayes.Energy` and whether ``sample`` built its prior (None or a float)."""
    if isinstance(loss_fn, Energy):
        if loss_fn.model is not model:
            raise ValueError("loss_fn: the Energy is built on another module than model; pass "
                             "Energy(model, ...) for this model")
        for name, value in (("beta", beta), ("prior", prior), ("task", task)):
            if value is not None:
                raise ValueError(f"{name}: the Energy given as loss_fn already holds its {name} "
                                 f"({getattr(loss_fn, name)!r}); drop {name}=")
        return loss_fn, False
    if beta is None:
        raise TypeError("beta: sample() needs beta= (the PIB trade-off > 0; 1/n is the Bayesian posterior), "
                        "or an Energy as loss_fn")
    own = prior is None or (isinstance(prior, (int, float)) and not isinstance(prior, bool))
    return Energy(model, loss_fn, prior, beta, task), own


@dataclass(frozen=True)
class _RunSpec:
    """Every argument of one :func:`sample` call that needs no model evaluation, checked once
    (:func:`_run_spec`): what the run does, before it does anything."""

    sampler: str | Kernel
    sampler_auto: dict[str, Any] | None  # sampler='auto': what was chosen and why
    kernel: Kernel
    schedule: Schedule  # Constant(1.0) with step_size='auto' until the auto stage replaces it
    auto: AutoStep | None
    gradient: str
    noise: str
    prefetch_noise: bool
    train_mode_dropout: bool
    progress: bool
    resume: bool
    threshold: float
    total_chains: int  # num_chains of the whole run
    ids: tuple[int, ...]  # the chains this call runs
    num_chains: int  # len(ids)
    num_draws: int
    num_warmup: int
    thin: int
    chain_method: str
    checkpoint: str | os.PathLike | None
    store: str | os.PathLike | None
    named: tuple[tuple[str, Tensor], ...]  # the sampled parameters, in the module's order
    names: tuple[str, ...]
    keep_names: tuple[str, ...]
    stat_fns: Mapping[str, StatFn]


def _run_spec(model: nn.Module, sampler: str | Kernel, step_size: Any, sampler_kwargs: Any, gradient: Any,
              noise: Any, prefetch_noise: Any, train_mode_dropout: Any, progress: Any, resume: Any,
              divergence_threshold: Any, num_chains: Any, chain_ids: Any, num_draws: Any, num_warmup: Any,
              thin: Any, chain_method: Any, checkpoint: Any, store: Any, params: Any, keep: Any,
              stat_fns: Any) -> _RunSpec:
    """The checks of :func:`sample`'s arguments, in the order it has always made them (the first bad
    argument is the one named), into one :class:`_RunSpec`."""
    auto = _as_auto(step_size)
    sampler, sampler_auto = _resolve_sampler(sampler, auto)  # sampler='auto' -> SGHMC (driver/warmup.py)
    sampler = expand_shorthand(sampler, step_size)  # 'csgld': SGLD on its Cyclical schedule
    schedule = as_schedule(step_size) if auto is None else Constant(1.0)  # 'auto': replaced below
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
    if store is not None:
        store = check_path("store", store)

    if params is None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model: has no trainable parameters (requires_grad=True) to sample")
    else:
        chosen = set(select_params(model, params))
        named = [(n, p) for n, p in model.named_parameters() if n in chosen]
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
        raise ValueError(f"keep: unknown parameter names {unknown}; sampled parameters are {names}")
    ids = list(range(total_chains)) if chain_ids is None else [int(c) for c in chain_ids]
    return _RunSpec(sampler, sampler_auto, kernel, schedule, auto, gradient, noise, prefetch_noise,
                    train_mode_dropout, progress, resume, threshold, total_chains, tuple(ids), num_run,
                    num_draws, num_warmup, thin, chain_method, checkpoint, store, tuple(named),
                    tuple(names), tuple(keep_names), _check_stat_fns(stat_fns))


def _sampled_prior(energy: Energy, own_prior: bool, prior: Any, named: Sequence[tuple[str, Tensor]],
                   subset: bool) -> None:
    """The prior ``sample`` builds (``prior`` None or a float): centred on the initial weights of what
    is sampled (frozen or not, with ``params=``), its means one flat buffer (``w - theta_0`` is then
    one op per step, :class:`~pib_bayes.energy.BoundEnergy`). A given prior is left as it is."""
    if not own_prior:
        return
    if subset:  # params= chose what is sampled
        energy.prior = GaussianPrior(std=1.0 if prior is None else float(prior),
                                     mean={n: p.detach() for n, p in named})
    means = energy.prior.mean
    means.update(zip(list(means), _flat_copy(list(means.values())), strict=True))


def _plan_groups(runner: _Sampler, make_group: Callable[[list[int], bool], _Group], num_chains: int,
                 chain_method: str, model: nn.Module, train_mode_dropout: bool, device: torch.device,
                 progress: bool) -> tuple[str, str]:
    """``(method, reason)``: run the chains ``"vectorized"`` (one group of every chain) or
    ``"sequential"`` (one group per chain). ``"auto"`` and ``"vectorized"`` probe one energy
    evaluation of the stacked chains first; ``"auto"`` falls back to sequential when it fails
    (vmap cannot run every module), ``"vectorized"`` then raises."""
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
    return method, reason


@holds_lock("checkpoint", "store")
def sample(
    model: nn.Module,
    loss_fn: str | LossFn | Energy,
    data: tuple[Tensor, Tensor] | DataLoader | Any,
    *,
    beta: float | None = None,
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
    store: str | os.PathLike | None = None,
    gradient: str = "minibatch",
    divergence_threshold: float | None = 1e4,
    gradient_transform: GradientTransform | None = None,
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

            Or an :class:`~pib_bayes.Energy` built on ``model`` (then ``beta``, ``prior`` and ``task``
            stay None: the energy holds them): the energy is the loss, the prior and beta together,
            so the one object a hand-written loop steps on (``Energy.of_module``) runs here as is.
            It goes in the loss's place rather than as a separate ``energy=`` because it replaces
            exactly the loss-side arguments, and two ways to give the loss could disagree.
        data: ``(x, y)`` tensors or a TensorDataset (minibatched here, per-chain shuffles),
            or a DataLoader (iterated as is).
        beta: PIB trade-off > 0 (beta = T/n for temperature T); required unless ``loss_fn`` is an
            :class:`~pib_bayes.Energy`.
        prior: a :class:`~pib_bayes.prior.Prior`, a float sigma_0 (Gaussian centred at the
            initial weights), a torch distribution, or None (sigma_0 = 1).
        sampler: ``"sgld"``, ``"psgld"``, ``"sghmc"``, ``"sgnht"`` or a built
            :class:`~pib_bayes.samplers.Kernel`; ``sampler_kwargs`` go to its builder. ``"csgld"`` is
            shorthand for ``"sgld"`` with a :class:`~pib_bayes.samplers.Cyclical` ``step_size``
            (required); the metadata then records ``sampler="sgld"`` and the cyclical schedule.
            ``"auto"`` (with ``step_size="auto"`` only) lets the library choose the kernel
            as well: SGHMC with eta and friction from lambda_max (``metadata["sampler_auto"]`` says
            so); the default stays ``"sgld"``.
        step_size: a float (constant), a :class:`~pib_bayes.samplers.Schedule`, or ``"auto"``
            (an :class:`~pib_bayes.samplers.step_size.AutoStep` sets its options): a constant step
            from the energy's curvature at chain 0's initial weights, before any chain runs.
            lambda_max of the Hessian of U_B comes from power iteration with Hessian-vector
            products on ``AutoStep.num_batches`` minibatches; SGLD takes
            ``h = 2 eps / ((1 + eps) lambda_max)`` (relative variance bias <= eps = 0.05 in the
            stiffest direction, SPEC §2), pSGLD the same on the preconditioned Hessian, SGHMC
            ``eta`` and ``friction`` from it (:mod:`pib_bayes.samplers.step_size`). The choice,
            lambda_max, iterations and CPU seconds land in ``metadata["step_size_auto"]``
            (``AutoStep(adapt=True)``: estimated again mid-warm-up at the first chain's weights, the
            step reset, the second estimate under ``"adapted"``), and the
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
        checkpoint: a file to which the run state (weights, sampler state, every chain's RNG
            states, data order, step counters) is written atomically every ``checkpoint_every``
            steps, after each chain group and at the end. A checkpoint appends the draws kept since
            the previous one, as one segment file in ``.NAME.segments/`` beside it, before the
            state that commits them: its I/O is proportional to the new draws, not to the run
            (docs/files.md). The call holds an exclusive lock (``fcntl.flock`` of ``.NAME.lock``
            beside it, dropped by the OS however the process ends): a second run on the same
            checkpoint fails at once with :class:`~pib_bayes.io.LockedError`.
        resume: continue from ``checkpoint`` if it exists (a bool). It must come from the same run: the same
            settings, the same data (its length and a blake2b hash of its shapes, dtypes and of at
            most 4096 evenly spaced rows, every row of smaller data) and the same initial weights
            (a hash of them); otherwise one ``ValueError`` names what differs. A checkpoint from
            before this check is refused (it cannot be verified). With tensor data, a run killed at
            any moment and resumed gives draws bit-identical to an uninterrupted run; a DataLoader
            restarts its iteration (its data is hashed only over a TensorDataset). A finished
            run's checkpoint gives its posterior back without running the model at all.
        store: stream the draws to this posterior file (the format of
            :meth:`~pib_bayes.Posterior.save`) instead of holding them in memory: the run keeps one
            chunk (:data:`pib_bayes.store.CHUNK_BYTES`, at least one draw) of draws per chain in
            memory, appends each full window to segment files (beside ``checkpoint``, else in
            ``.NAME.segments/`` beside the store), and at the end writes the store from them chunk
            by chunk, atomically, and removes the segments (disk: about twice the draws' size while
            that runs). Returns ``Posterior.load(store, lazy=True)``. Locked like ``checkpoint``
            (a second writer gets :class:`~pib_bayes.io.LockedError`); must differ from it.
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
        gradient_transform: an advanced hook (:class:`~pib_bayes.gradients.GradientTransform`),
            ``(params, grads) -> (grads', stop)``, applied to every step's gradient after the
            divergence test and before the kernel's step; ``stop`` marks chains to stop (NaN
            weights). :func:`~pib_bayes.distributed.sample_distributed` all-reduces the shard
            gradients with it. Default None: the estimator's gradient as is.

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
    energy, own_prior = _as_energy(model, loss_fn, beta, prior, task)
    require_task(energy.task, energy.loss_fn)
    spec = _run_spec(model, sampler, step_size, sampler_kwargs, gradient, noise, prefetch_noise,
                     train_mode_dropout, progress, resume, divergence_threshold, num_chains, chain_ids,
                     num_draws, num_warmup, thin, chain_method, checkpoint, store, params, keep, stat_fns)
    _sampled_prior(energy, own_prior, prior, spec.named, subset=params is not None)
    check_prior_fits(energy.prior, {n: tuple(p.shape) for n, p in spec.named})
    draw_bytes = sum(p.numel() * p.element_size() for n, p in spec.named if n in spec.keep_names)
    window = window_rows(draw_bytes, spec.num_draws) if spec.store is not None else 0  # streamed draws
    _check_run_memory(list(spec.named), list(spec.keep_names), spec.num_chains, window or spec.num_draws)
    _check_run_disk(spec.store, spec.checkpoint, list(spec.named), list(spec.keep_names), spec.num_chains,
                    spec.num_draws, len(spec.stat_fns), sum(t.numel() * t.element_size() for n, t in [
                        *model.named_buffers(), *model.named_parameters()] if n not in spec.names))
    # the validated values under the names the rest of the run reads
    kernel, schedule, auto, sampler = spec.kernel, spec.schedule, spec.auto, spec.sampler
    named, names, keep_names = list(spec.named), list(spec.names), list(spec.keep_names)
    total_chains, ids, num_chains = spec.total_chains, list(spec.ids), spec.num_chains
    num_run = num_chains  # chains run by this call
    num_draws, num_warmup, thin, chain_method = spec.num_draws, spec.num_warmup, spec.thin, spec.chain_method
    gradient, noise, prefetch_noise, progress = spec.gradient, spec.noise, spec.prefetch_noise, spec.progress
    train_mode_dropout, resume, threshold = spec.train_mode_dropout, spec.resume, spec.threshold
    checkpoint, store, stat_fns = spec.checkpoint, spec.store, dict(spec.stat_fns)
    sampler_auto = spec.sampler_auto
    fixed = {n: b.detach().clone() for n, b in model.named_buffers()}
    fixed.update({n: p.detach().clone() for n, p in model.named_parameters() if n not in names})

    tensors = as_tensors(data)
    all_seeds = chain_seeds(seed, total_chains)
    seeds = [all_seeds[c] for c in ids]
    init_params = _initial_params(named, init, num_chains, energy.prior, seeds)
    if num_chains == 1:  # the one group moves these very tensors: one flat buffer, no copy
        init_params = dict(zip(names, _flat_copy([init_params[n] for n in names]), strict=True))
    if gradient == "cv" and tensors is None:
        _check_loader_has_length(data)

    loss_desc = getattr(energy.loss_fn, "__name__", None) or repr(energy.loss_fn)

    def describe(kernel: Kernel, schedule: dict[str, Any], method: str, reason: str | None) -> dict[str, Any]:
        """The run's metadata as known before it samples (a checkpoint's fingerprints derive from it)."""
        return {
            "library": "pib_bayes", "version": __version__, "beta": energy.beta, "prior": repr(energy.prior),
            "sampler": kernel.name, "sampler_settings": dict(kernel.settings), "schedule": schedule,
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

    # the data's and the initial weights' digests (which, with the metadata, identify a checkpoint's
    # run; hashing costs ~0.3 ms); a DataLoader over data that is not tensors: its length only
    hashes: dict[str, Any] = {}
    if checkpoint is not None:
        hashes["data"] = data_fingerprint(tensors if tensors is not None else _loader_tensors(data))
        hashes["initial_weights"] = tensor_fingerprint([init_params[n] for n in names])
        if tensors is None:
            hashes["n"] = _loader_length(data)
    # what identifies this run before any model evaluation (the metadata as the arguments give it): a
    # finished checkpoint of the same run is returned from here without running the model or the loss
    setup_fingerprint = run_fingerprint(describe(
        kernel, schedule.to_dict() if auto is None else {"auto": dataclasses.asdict(auto)}, chain_method,
        None), hashes)
    if checkpoint is None and resume:
        raise ValueError("resume: needs checkpoint=PATH (the file to resume from)")
    saved = _Checkpointer.read(checkpoint, setup_fingerprint) if resume else None
    dtype = init_params[names[0]].dtype
    shapes = {n: (num_run, num_draws, *init_params[n].shape[1:]) for n in keep_names}
    out = _Buffers(
        draws={n: torch.full(s if not window else (1, 1, *s[2:]), math.nan, dtype=dtype)
               for n, s in shapes.items()},
        stats={
            "energy": torch.full((num_run, num_draws), math.nan, dtype=dtype),
            "loss": torch.full((num_run, num_draws), math.nan, dtype=dtype),
            "step_size": torch.full((num_run, num_draws), math.nan, dtype=torch.float64),
            "diverging": torch.zeros((num_run, num_draws), dtype=torch.bool),
        },
        diverged=torch.zeros(num_run, dtype=torch.bool),
        divergence_step=torch.full((num_run,), -1, dtype=torch.long),
        segments=(_Segments(segments_dir(checkpoint if checkpoint is not None else store))
                  if checkpoint is not None or store is not None else None),
        window=window, shapes=shapes,
    )
    if saved is not None and saved.get("finished"):
        try:
            metadata = json.loads(saved["metadata_json"])
            if saved.get("store") is not None:  # streamed: the store holds the finished run
                if store is None or os.path.abspath(saved["store"]) != os.path.abspath(store):
                    raise ValueError(f"store: the finished run of checkpoint {str(checkpoint)!r} was "
                                     f"streamed to store={saved['store']!r}; pass that store= to get it back")
                assert out.segments is not None
                out.segments.remove()  # left by a run killed between its last checkpoint and this cleanup
                return Posterior.load(store, model=model, lazy=True)
            if store is not None:
                raise ValueError(f"store: the finished run of checkpoint {str(checkpoint)!r} was held in "
                                 "memory, not streamed; resume it without store=")
            _Checkpointer.restore(checkpoint, out, saved)
            return Posterior(out.draws, out.stats, metadata, fixed, out.diverged, out.divergence_step,
                             model=model)
        except (KeyError, TypeError) as err:
            raise FormatError(f"{checkpoint}: incomplete checkpoint ({err})") from None
    if out.segments is not None and saved is None:
        out.segments.start()  # a fresh run: segments of an earlier one are dropped

    auto_info: dict[str, Any] | None = None
    if auto is not None:
        kernel, schedule, auto_info = _auto_step_stage(
            auto, energy, kernel, sampler, sampler_kwargs, named, init, init_params, all_seeds, fixed,
            tensors, data, batch_size, int(seed), names)
    noise_report = _NoiseReport(auto_info, num_warmup, names, gradient) if auto_info is not None else None
    # AutoStep(adapt=True): a schedule whose step the adapter re-estimates mid-warm-up (driver/warmup.py)
    schedule, adapter = _make_adapter(auto, auto_info, schedule, num_warmup, names, kernel, noise_report)
    _warn_low_precision(named, schedule)  # at the step size the run uses ('auto': the chosen one)

    def make_batcher(chains: list[int]) -> TensorBatcher | LoaderBatcher:
        if tensors is None:
            if batch_size is not None:
                raise ValueError("batch_size: set the batch size on the DataLoader itself")
            return LoaderBatcher(data)
        return TensorBatcher(tensors[0], tensors[1], batch_size, [_generator(seeds[c][1]) for c in chains])

    runner = _Sampler(energy, names, fixed, kernel, schedule, stat_fns, train_mode_dropout,
                      gradient_transform)
    runner.noise_report = noise_report
    if tensors is not None:
        _check_model_takes_data(energy, {n: init_params[n][0] for n in names}, fixed, *tensors)

    def make_group(chains: list[int], vectorized: bool) -> _Group:
        params = _chain_weights(init_params, names, chains, num_chains)
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
        centre = _with_adapter(adapter, centre)  # AutoStep(adapt=True): its hook runs before each step
        return _Group(chains, params, state, source, make_batcher(chains), vectorized, prefetcher,
                      dropout_seed=dropout_seed, centre=centre)

    device = init_params[names[0]].device

    method, reason = _plan_groups(runner, make_group, num_chains, chain_method, model, train_mode_dropout,
                                  device, progress)
    groups = ([make_group(list(range(num_chains)), True)] if method == "vectorized"
              else [make_group([c], False) for c in range(num_chains)])

    # the metadata as the run resolved it (chain method, automatic step size), before it samples: the
    # checkpoint's second fingerprint derives from it, the Posterior's metadata is it plus the results
    metadata = describe(kernel, schedule.to_dict(), method, reason)
    fingerprint = "" if checkpoint is None else run_fingerprint(metadata, hashes)
    ckpt = (_Checkpointer(checkpoint, fingerprint, setup_fingerprint, out, checkpoint_every, store,
                          hooks={"adapter": adapter, "noise_report": noise_report})
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
    stats, diverged, divergence_step = out.stats, out.diverged, out.divergence_step

    metadata["schedule"] = schedule.to_dict()  # as it ran (AutoStep(adapt=True) re-estimates its step)
    if auto_info is not None:
        metadata["step_size_auto"] = {k: v for k, v in auto_info.items()
                                      if k not in ("gradient_noise", "report", "square_avg", "reestimate")}
        if adapter is not None:
            metadata["step_size_auto"]["adapted"] = adapter.summary()
        metadata["gradient_noise"] = {**noise_report.result, "warn_threshold": NOISE_WARN_THRESHOLD}
    if sampler_auto is not None:
        metadata["sampler_auto"] = sampler_auto
    if gradient == "cv":
        metadata["control_variate"] = {
            "centre": (f"mean of each chain's weights over warm-up steps [{num_warmup // 2}, {num_warmup})"
                       if num_warmup >= 2 else "each chain's initial weights"),
            "full_gradient_cpu_s": sum(g.centre.cpu_s for g in groups if g.centre is not None),
        }
    if store is not None:
        assert out.segments is not None
        from ..posterior import FORMAT_VERSION

        consolidate(out.segments, store, "posterior", FORMAT_VERSION, shapes, dtype, stats, fixed,
                    {"diverged": diverged, "divergence_step": divergence_step},
                    json.loads(json.dumps(metadata, default=str)))
    if ckpt is not None:  # the finished run, with what resume=True needs to hand it back unsampled
        ckpt.write(len(groups), None, metadata)
    if store is not None:
        assert out.segments is not None
        out.segments.remove()  # the store (and the finished checkpoint) hold the run now
        return Posterior.load(store, model=model, lazy=True)
    return Posterior(out.draws, stats, metadata, fixed, diverged, divergence_step, model=model)
