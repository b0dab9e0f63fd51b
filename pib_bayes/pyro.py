"""Pyro integration: Langevin samplers as a ``pyro.infer.MCMC`` kernel, conversions, a NUTS reference.

:class:`LangevinKernel` runs the library's SGLD / pSGLD / SGHMC kernels (the one shared update core
of :mod:`pib_bayes.samplers`) on a Pyro model inside :class:`pyro.infer.MCMC`. Its potential energy
is the tempered PIB energy of the model's unconstrained latent variables ``z``,

    U_B(z) = -(1/T) * sum_obs (N/B) log p(y_B | x(z))  -  log p(x(z))  -  log|det dx/dz|,
    T = n * beta,

where ``x(z) = biject_to(support)(z)`` maps each latent site to its support, the ``N/B`` factor is
the one ``pyro.plate(..., subsample_size=B)`` puts on every site inside the plate (so the
likelihood term is an unbiased estimate of the full-data log likelihood), and ``1/T = 1/(n beta)``
tempers the likelihood: ``beta = 1/n`` (T = 1, the default) is the ordinary Bayesian posterior,
``beta -> 0`` concentrates on the maximum-likelihood weights and a large beta pulls toward the
prior (SPEC §1: U = L_S/beta - log p with L_S the mean negative log-likelihood).

One step (SGLD, Welling & Teh 2011) on the minibatch drawn for that step:

    z <- z - h_t * grad U_B(z) + sqrt(2 h_t) * xi,    xi ~ N(0, I)

Pyro's own HMC/NUTS potential refuses subsampled plates, so the potential is built here from a
trace of the model. :func:`posterior_from_mcmc` turns a finished ``MCMC`` into a
:class:`~pib_bayes.Posterior`, :func:`to_predictive_samples` turns a Posterior into the samples
dict ``pyro.infer.Predictive`` takes, and :func:`nuts_reference` runs Pyro's NUTS on a small model
for a side-by-side check.
"""

from __future__ import annotations

import math
import multiprocessing
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor
from torch.distributions import biject_to

from ._validate import is_int, renamed_args
from ._version import __version__
from .driver import chain_seeds
from .energy import check_beta
from .posterior import Posterior
from .samplers.core import GaussianNoise, Kernel, KernelState, count_step, step_count
from .samplers.kernels import build_kernel
from .samplers.schedules import Cyclical, Schedule, as_schedule, expand_shorthand

__all__ = ["LangevinKernel", "posterior_from_mcmc", "to_predictive_samples", "nuts_reference"]

_MAX_SEED = 2**63 - 1


class _SubsampleWith(Messenger):
    """Draws every ``pyro.plate(..., subsample_size=B)`` subsample from our own generator.

    Pyro would call ``torch.randperm`` on the global RNG; drawing the indices here keeps each
    chain's minibatch sequence reproducible and independent of everything else using torch's RNG.
    A plate given explicit ``subsample=`` indices is left alone.
    """

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        if not isinstance(fn, _Subsample) or msg["value"] is not None:
            return
        if fn.subsample_size is None or fn.subsample_size >= fn.size:
            msg["value"] = torch.arange(fn.size, device=fn.device)
        else:
            perm = torch.randperm(fn.size, generator=self.generator)
            msg["value"] = perm[: fn.subsample_size].to(fn.device)


def _worker_chain_index() -> int | None:
    """None in the main process; in a worker process the chain index Pyro's ``MCMC`` gives it as the
    process name (``str(i)``), or -1 when the name says nothing."""
    if multiprocessing.parent_process() is None:
        return None
    name = multiprocessing.current_process().name
    return int(name) if name.isdigit() else -1


def _seed_triple(entropy: list[int]) -> tuple[int, int, int]:
    """(noise, data, init) seeds from entropy words, as :func:`pib_bayes.driver.chain_seeds` makes them."""
    words = np.random.SeedSequence(entropy).generate_state(3, dtype=np.uint64)
    return tuple(int(w) >> 1 for w in words)  # type: ignore[return-value]


class LangevinKernel(MCMCKernel):
    r"""SGLD (or pSGLD / SGHMC) on a Pyro model, as a :class:`pyro.infer.mcmc.mcmc_kernel.MCMCKernel`.

    Samples the tempered posterior ``q(x) ∝ p(x) p(y|x)^(1/T)``, ``T = n * beta``, over the model's
    continuous latent sites, in the unconstrained space ``z`` of each site's support (with the
    log-abs-det-Jacobian of ``biject_to(support)`` in the energy). Each call to :meth:`sample` is
    one step of the chosen kernel on the energy of a fresh minibatch; SGLD (Welling & Teh 2011):

        z <- z - h_t * grad U_B(z) + sqrt(2 h_t) * xi,    xi ~ N(0, I)

    pSGLD (Li et al. 2016) and SGHMC (Chen et al. 2014) are chosen with ``sampler``; see
    :mod:`pib_bayes.samplers.kernels` for their update equations. There is no Metropolis
    correction: with a constant step size the chain's stationary law carries the unadjusted-Langevin
    bias (on a Gaussian target of precision P, covariance ``P^{-1} (I - h P/2)^{-1}``, SPEC §2).

    Minibatching is the model's own: ``pyro.plate("data", N, subsample_size=B)`` draws B indices
    per step (from this kernel's generator) and Pyro scales every site in the plate by N/B.

    Args:
        model: a Pyro model (a callable with ``pyro.sample`` statements, or a ``PyroModule``); its
            arguments are those given to ``MCMC.run``.
        sampler: ``"sgld"``, ``"psgld"``, ``"sghmc"`` or a built :class:`~pib_bayes.samplers.Kernel`;
            ``sampler_kwargs`` go to its builder (e.g. ``{"friction": 0.1}`` for SGHMC).
        step_size: a float (constant ``h``) or a :class:`~pib_bayes.samplers.Schedule`, indexed by
            the global step (warm-up included). Cyclical schedules are refused: ``MCMC`` keeps
            every post-warm-up step, so their exploration phases could not be dropped.
        beta: the PIB trade-off. ``None`` (default) or ``1/n`` gives the Bayesian posterior; the
            likelihood is multiplied by ``1 / (n * beta)``.
        num_data: n, the number of data points ``beta`` refers to. Inferred, when ``beta`` is
            given, as the full size of the one plate every observed site sits in.
        seed: ``None`` (default): each chain seeds its noise and minibatch generators from torch's
            global RNG at :meth:`setup` (so ``pyro.set_rng_seed`` makes runs reproducible and the
            sequential chains of one run differ). An int: chain k of this kernel (the k-th
            :meth:`setup` call since construction or :meth:`reset_seed`) uses the streams of
            :func:`pib_bayes.driver.chain_seeds` ``(seed, ...)[k]`` — the same noise as chain k of
            :func:`pib_bayes.sample` — and its initial point is drawn from the ``init_seed`` of that
            triple without touching the global RNG. When ``MCMC`` runs chains in parallel worker
            processes (``num_chains`` below the CPU count) chain k is read from the worker's
            process name (Pyro names them ``"0"``, ``"1"``, ...), so the draws equal a sequential
            run's; a worker with another name mixes in its torch seed instead (reproducible, but
            different numbers).
        init_strategy: a Pyro init strategy (default ``init_to_uniform``, as Pyro's HMC), used
            unless ``MCMC(initial_params=...)`` (unconstrained values) is given.

    Diagnostics (``mcmc.diagnostics()`` per chain): ``divergences`` (post-warm-up indices of
    non-finite draws; a chain whose energy or weights become non-finite holds NaN from then on),
    ``divergence_step`` (global step, -1 if none), ``potential_energy`` (U_B at each draw, evaluated
    on the minibatch of the step taken from it), ``step_size`` (h used to reach each draw).

    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer import MCMC
    >>> def model(x, y):
    ...     w = pyro.sample("w", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", len(x), subsample_size=8) as i:
    ...         pyro.sample("obs", dist.Normal(w * x[i], 0.5), obs=y[i])
    >>> x = torch.randn(32); y = 2 * x + 0.5 * torch.randn(32)
    >>> mcmc = MCMC(LangevinKernel(model, step_size=1e-3, seed=0), num_samples=50, warmup_steps=50,
    ...             disable_progbar=True)
    >>> mcmc.run(x, y)
    >>> mcmc.get_samples()["w"].shape
    torch.Size([50])
    """

    def __init__(
        self,
        model: Callable[..., Any],
        sampler: str | Kernel = "sgld",
        step_size: float | Schedule = 1e-3,
        *,
        beta: float | None = None,
        num_data: int | None = None,
        seed: int | None = None,
        init_strategy: Callable = init_to_uniform,
        sampler_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model: expected a Pyro model (a callable), got {type(model).__name__}")
        self.model = model
        # 'csgld' is SGLD on a Cyclical schedule, which is refused below
        self.kernel = build_kernel(expand_shorthand(sampler, step_size), **dict(sampler_kwargs or {}))
        self.schedule = as_schedule(step_size)
        if isinstance(self.schedule, Cyclical):
            raise ValueError("step_size: a Cyclical schedule needs draws dropped in its exploration phases, "
                             "which pyro.infer.MCMC cannot do; use pib_bayes.sample for cyclical SGLD")
        self.beta = None if beta is None else check_beta(beta)
        bad_n = isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1
        if num_data is not None and bad_n:
            raise ValueError(f"num_data: must be an int >= 1 (the number of data points), got {num_data!r}")
        self.num_data = num_data
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed: must be None (use torch's global RNG) or an int >= 0, got {seed!r}")
        self.seed = seed
        self._temperature: float | None = 1.0 if beta is None else (
            None if num_data is None else num_data * self.beta)
        self.init_strategy = init_strategy
        self.transforms: dict[str, Any] | None = None
        self._chain_count = 0
        self._pending_init: list[dict[str, Tensor]] = []
        self._initial_params: dict[str, Tensor] | None = None
        self._reset_chain_state()
        super().__init__()

    # ------------------------------------------------------------------ setup
    def reset_seed(self) -> None:
        """Start counting chains from 0 again, so the next run repeats the streams of the first."""
        self._chain_count = 0

    def _reset_chain_state(self) -> None:
        self._warmup_steps = 0
        self._state: KernelState = {}  # the kernel's buffers and the chain's step count
        self._energies: list[float] = []
        self._step_sizes: list[float] = []
        self._divergences: list[int] = []
        self._divergence_step = -1
        self._last: dict[str, Tensor] | None = None

    def setup(self, warmup_steps: int, *args: Any, **kwargs: Any) -> None:
        """Start a chain: trace the model, fix the transforms, seed this chain's streams, reset the state.

        ``MCMC`` reuses one kernel object for sequential chains and calls this once per chain.
        """
        self._reset_chain_state()
        self._warmup_steps = int(warmup_steps)
        self._args, self._kwargs = args, kwargs
        worker = _worker_chain_index()
        k = self._chain_count if worker is None or worker < 0 else worker
        if self.seed is None:
            seeds = _seed_triple([int(v) for v in torch.randint(0, _MAX_SEED, (2,))])
        elif worker == -1:
            seeds = _seed_triple([self.seed, torch.initial_seed(), k])
        else:
            seeds = chain_seeds(self.seed, k + 1)[k]
        noise_seed, data_seed, init_seed = seeds
        self._chain_count += 1
        self._noise_seed, self._data_seed = noise_seed, data_seed
        self._data_gen = torch.Generator().manual_seed(data_seed)
        self._noise = GaussianNoise(torch.Generator().manual_seed(noise_seed))

        if self.seed is None:
            trace = self._prototype_trace()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                trace = self._prototype_trace()
        self._inspect(trace)
        pending, self._pending_init = self._pending_init, []
        init = None
        if pending:
            # parallel MCMC sets every worker's initial_params on this one object before forking
            init = pending[worker] if worker is not None and 0 <= worker < len(pending) else pending[-1]
        if init is None:
            init = {name: self.transforms[name](trace.nodes[name]["value"].detach()) for name in self._names}
        else:
            missing = sorted(set(self._names) - set(init))
            if missing:
                raise ValueError(f"initial_params: missing unconstrained values for sites {missing}")
            init = {name: torch.as_tensor(init[name]).detach().clone() for name in self._names}
        self._initial_params = init
        self._state = self.kernel.init([init[n].detach().clone() for n in self._names])

    def _prototype_trace(self):
        with _SubsampleWith(self._data_gen):
            model = InitMessenger(self.init_strategy)(self.model)
            return poutine.trace(model).get_trace(*self._args, **self._kwargs)

    def _inspect(self, trace) -> None:
        names, bijections, obs_plates = [], {}, []
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
                continue
            if site["is_observed"]:
                obs_plates.append({f.name: (f.full_size or f.size) for f in site["cond_indep_stack"]})
                continue
            fn = site["fn"]
            if fn.support.is_discrete:
                raise ValueError(f"model: latent site {name!r} is discrete; Langevin samplers need "
                                 "continuous latent variables (marginalise it out, or condition on it)")
            names.append(name)
            bijections[name] = biject_to(fn.support)
        if not names:
            raise ValueError("model: has no latent sample sites to sample")
        self._names, self._bijections = names, bijections
        self.transforms = {name: t.inv for name, t in bijections.items()}
        self._temperature = 1.0 if self.beta is None else self._resolve_n(obs_plates) * self.beta

    def _resolve_n(self, obs_plates: list[dict[str, int]]) -> int:
        if self.num_data is not None:
            return self.num_data
        common = set.intersection(*[set(p) for p in obs_plates]) if obs_plates else set()
        if len(common) != 1:
            raise ValueError("num_data: cannot infer n for beta (the observed sites do not share exactly one "
                             f"plate, they share {sorted(common)}); pass num_data=n")
        sizes = {p[next(iter(common))] for p in obs_plates}
        if len(sizes) != 1:
            raise ValueError(f"num_data: the observed sites' plate has several sizes {sorted(sizes)}; "
                             "pass num_data=n")
        return int(sizes.pop())

    # --------------------------------------------------------------- energy
    @property
    def temperature(self) -> float | None:
        """T = n * beta, the factor that divides the log likelihood (1 for the Bayesian posterior).

        None until :meth:`setup` has inferred n, when ``beta`` was given without ``num_data``.
        """
        return self._temperature

    def potential_energy(self, params: Mapping[str, Tensor]) -> Tensor:
        """U_B(z) at unconstrained ``params`` on a fresh minibatch (see the class docstring)."""
        values, log_det = {}, 0.0
        for name in self._names:
            z = params[name]
            t = self._bijections[name]
            x = t(z)
            values[name] = x
            log_det = log_det + t.log_abs_det_jacobian(z, x).sum()
        with _SubsampleWith(self._data_gen):
            conditioned = poutine.condition(self.model, data=values)
            trace = poutine.trace(conditioned).get_trace(*self._args, **self._kwargs)
        trace.compute_log_prob(lambda name, site: not isinstance(site["fn"], _Subsample))
        latent, likelihood = 0.0, 0.0
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
                continue
            if name in values:
                latent = latent + site["log_prob_sum"]
            elif site["is_observed"]:
                likelihood = likelihood + site["log_prob_sum"]
            else:
                raise ValueError(f"model: latent site {name!r} is not in the first trace; LangevinKernel "
                                 "needs a model with a fixed set of latent sites")
        return -(latent + likelihood / self._temperature + log_det)

    # ----------------------------------------------------------------- step
    @property
    def initial_params(self) -> dict[str, Tensor]:
        if self._initial_params is None:
            raise RuntimeError("initial_params: call setup() (MCMC.run does) before reading them")
        return self._initial_params

    @initial_params.setter
    def initial_params(self, params: Mapping[str, Tensor]) -> None:
        # MCMC sets this before each chain's setup(); setup() consumes it for that chain only
        self._pending_init.append(dict(params))

    @property
    def num_steps(self) -> int:
        """Steps this chain has taken (warm-up included): the t its schedule is evaluated at next.

        The chain's one step counter, kept in its sampler state
        (:func:`~pib_bayes.samplers.core.step_count`, as :func:`pib_bayes.sample`'s chains keep it);
        :meth:`setup` starts it at 0.
        """
        return step_count(self._state)

    def sample(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One Langevin step from ``params`` (unconstrained), returning the next draw."""
        t = self.num_steps  # the chain's one step counter: its sampler state's
        h = self.schedule.step_size(t)
        index = t - self._warmup_steps - 1  # post-warm-up index of the draw `params` (when >= 0)
        if self._divergence_step >= 0:
            energy = math.nan
            out = {n: params[n] for n in self._names}
        else:
            leaves = [params[n].detach().clone().requires_grad_(True) for n in self._names]
            with torch.enable_grad():
                u = self.potential_energy(dict(zip(self._names, leaves, strict=True)))
                grads = torch.autograd.grad(u, leaves)
            energy = float(u.detach())
            moved = [leaf.detach() for leaf in leaves]
            with torch.no_grad():
                self.kernel.step(moved, list(grads), self._state, h, self._noise,
                                 self.schedule.noise_scale(t))
            finite = math.isfinite(energy) and all(bool(torch.isfinite(m).all()) for m in moved)
            if not finite:
                self._divergence_step = t
                moved = [torch.full_like(m, math.nan) for m in moved]
            out = dict(zip(self._names, moved, strict=True))
        if index >= 0:
            self._energies.append(energy)
        count_step(self._state)
        if t >= self._warmup_steps:
            self._step_sizes.append(h)
            if self._divergence_step >= 0:
                self._divergences.append(t - self._warmup_steps)
        self._last = out
        return dict(out)

    # ---------------------------------------------------------- reporting
    def logging(self) -> OrderedDict:
        return OrderedDict([("step size", f"{self.schedule.step_size(max(self.num_steps - 1, 0)):.2e}"),
                            ("diverged", str(self._divergence_step >= 0))])

    def diagnostics(self) -> dict[str, Any]:
        """Per-chain statistics; ``divergences`` is what ``az.from_pyro`` reads (arviz 0.x)."""
        num_draws = max(self.num_steps - self._warmup_steps, 0)
        if len(self._energies) < num_draws and self._last is not None:
            # the last draw's energy: one extra evaluation (no step follows it)
            if self._divergence_step >= 0:
                self._energies.append(math.nan)
            else:
                with torch.no_grad():
                    self._energies.append(float(self.potential_energy(self._last)))
        return {
            "divergences": list(self._divergences),
            "divergence_step": int(self._divergence_step),
            "potential_energy": list(self._energies),
            "step_size": list(self._step_sizes),
        }

    def __repr__(self) -> str:
        return (f"LangevinKernel(sampler={self.kernel.name!r}, step_size={self.schedule!r}, "
                f"beta={self.beta}, num_data={self.num_data}, seed={self.seed})")


# ------------------------------------------------------------------- conversions
def posterior_from_mcmc(mcmc: pyro.infer.MCMC, model: torch.nn.Module | None = None) -> Posterior:
    """A finished ``pyro.infer.MCMC`` run as a :class:`~pib_bayes.Posterior`.

    Draws are the constrained samples of every saved site, ``(chain, draw, *shape)``. Sample
    statistics: ``diverging`` (from the kernel's ``divergences``), and, for a
    :class:`LangevinKernel`, ``energy`` and ``step_size``. A Langevin chain that became non-finite is
    flagged in ``diverged``/``divergence_step``; NUTS divergences are rejected transitions, so a
    NUTS chain is never flagged as a whole.

    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer import MCMC
    >>> def model():
    ...     pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> mcmc = MCMC(LangevinKernel(model, step_size=0.1, seed=0), num_samples=30, warmup_steps=5,
    ...             disable_progbar=True)
    >>> mcmc.run()
    >>> post = posterior_from_mcmc(mcmc)
    >>> post.draws["w"].shape, post.sample_stats["energy"].shape
    (torch.Size([1, 30, 2]), torch.Size([1, 30]))
    """
    samples = mcmc.get_samples(group_by_chain=True)
    if not samples:
        raise ValueError("mcmc: has no samples; call mcmc.run(...) first")
    draws = {k: v.detach().clone() for k, v in samples.items()}
    c, n = next(iter(draws.values())).shape[:2]
    per_chain = getattr(mcmc, "_diagnostics", None)  # the kernel's diagnostics() of each chain, as kept
    kept = isinstance(per_chain, list) and len(per_chain) == c and all(isinstance(d, dict) for d in per_chain)
    if not kept:
        # public route (also computes ESS/R-hat of every site, which the private list skips)
        diag_all = mcmc.diagnostics()
        per_chain = [{k: v[f"chain {i}"] for k, v in diag_all.items()
                      if isinstance(v, dict) and f"chain {i}" in v} for i in range(c)]
    diverging = torch.zeros(c, n, dtype=torch.bool)
    stats: dict[str, Tensor] = {}
    diverged = torch.zeros(c, dtype=torch.bool)
    divergence_step = torch.full((c,), -1, dtype=torch.long)
    for i, diag in enumerate(per_chain):
        idx = [int(j) for j in diag.get("divergences", [])]
        if idx:
            diverging[i, idx] = True
        for src, dst in (("potential_energy", "energy"), ("step_size", "step_size")):
            vals = diag.get(src)
            if isinstance(vals, list) and len(vals) == n:
                stats.setdefault(dst, torch.full((c, n), math.nan, dtype=torch.float64))[i] = torch.tensor(
                    vals, dtype=torch.float64)
        step = int(diag.get("divergence_step", -1))
        if step >= 0:
            diverged[i], divergence_step[i] = True, step
    stats["diverging"] = diverging
    kernel = mcmc.kernel
    metadata: dict[str, Any] = {
        "library": "pib_bayes", "version": __version__, "source": "pyro.infer.MCMC",
        "pyro_version": pyro.__version__, "pyro_kernel": type(kernel).__name__,
        "num_chains": int(c), "num_warmup": int(mcmc.warmup_steps), "num_draws": int(n),
        "sampled_params": list(draws), "kept_params": list(draws),
    }
    if isinstance(kernel, LangevinKernel):
        metadata.update({
            "sampler": kernel.kernel.name, "sampler_settings": dict(kernel.kernel.settings),
            "schedule": kernel.schedule.to_dict(), "beta": kernel.beta, "temperature": kernel.temperature,
            "num_data": kernel.num_data, "seed": kernel.seed,
        })
    else:
        metadata["sampler"] = type(kernel).__name__.lower()
    return Posterior(draws, stats, metadata, {}, diverged, divergence_step, model=model)


@renamed_args(post="posterior")
def to_predictive_samples(posterior: Posterior, include_diverged: bool = False) -> dict[str, Tensor]:
    """The ``posterior_samples`` dict for ``pyro.infer.Predictive``: name -> (chain * draw, *shape).

    Chains flagged as diverged are left out (with a warning) unless ``include_diverged``.

    >>> import torch
    >>> post = Posterior({"w": torch.zeros(2, 5, 3)}, {}, {})
    >>> to_predictive_samples(post)["w"].shape
    torch.Size([10, 3])
    """
    if not isinstance(posterior, Posterior):
        raise TypeError(f"posterior: expected a pib_bayes.Posterior, got {type(posterior).__name__}")
    return posterior.draws_for_prediction(include_diverged)


@renamed_args(num_samples="num_draws", warmup_steps="num_warmup")
def nuts_reference(
    model: Callable[..., Any],
    *args: Any,
    num_draws: int = 500,
    num_warmup: int = 500,
    num_chains: int = 1,
    seed: int = 0,
    **kwargs: Any,
) -> Posterior:
    """Pyro's NUTS (Hoffman & Gelman 2014) on a small model, as a :class:`~pib_bayes.Posterior`.

    A reference to check a Langevin posterior against. NUTS samples the untempered Bayesian
    posterior (beta = 1/n) and needs the full data: a model with ``subsample_size`` plates must be
    run here with ``subsample_size=None`` (Pyro's NUTS refuses subsample sites). ``args``/``kwargs``
    go to the model. Seeds Pyro's global RNG with ``seed`` (``pyro.set_rng_seed``).

    >>> import torch, pyro, pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("w", dist.Normal(0.0, 1.0))
    >>> nuts_reference(model, num_draws=20, num_warmup=20).draws["w"].shape
    torch.Size([1, 20])
    """
    for name, value in (("num_draws", num_draws), ("num_chains", num_chains)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
    if not is_int(num_warmup) or num_warmup < 0:
        raise ValueError(f"num_warmup: must be an int >= 0, got {num_warmup!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be an int >= 0, got {seed!r}")
    pyro.set_rng_seed(seed)
    mcmc = pyro.infer.MCMC(pyro.infer.NUTS(model), num_samples=num_draws, warmup_steps=num_warmup,
                           num_chains=num_chains, disable_progbar=True)
    try:
        mcmc.run(*args, **kwargs)
    except NotImplementedError as err:
        if "subsample" in str(err):
            raise ValueError("model: NUTS needs the full data; run the reference with the plate's "
                             "subsample_size=None") from err
        raise
    post = posterior_from_mcmc(mcmc)
    post.metadata.update({"sampler": "nuts", "seed": seed})
    return post
