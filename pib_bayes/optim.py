"""Langevin samplers as ``torch.optim.Optimizer`` s, for users' own training loops.

They follow torch.optim's conventions (param groups, ``state_dict``, multi-tensor "foreach"
updates) and call the same kernels as :func:`pib_bayes.sample`, so from the same seed and data the
two produce identical trajectories. The gradient must be that of the energy
``U_B(w) = mean_B l / beta - log p(w)`` (see :class:`pib_bayes.Energy`), not of the bare loss.

>>> import torch
>>> from torch import nn
>>> from pib_bayes import Energy
>>> from pib_bayes.optim import SGLD
>>> torch.manual_seed(0) and None
>>> model = nn.Linear(3, 1)
>>> energy = Energy(model, "gaussian", prior=1.0, beta=0.05)
>>> opt = SGLD(model.parameters(), lr=1e-3, generator=torch.Generator().manual_seed(1))
>>> x, y = torch.randn(32, 3), torch.randn(32, 1)
>>> for _ in range(10):
...     opt.zero_grad()
...     energy.of_module(x, y).backward()
...     opt.step()
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ._validate import check_count, is_int
from .samplers.core import NOISES, SCRATCH, GaussianNoise, Kernel, NoisePrefetcher, Workspace, make_noise
from .samplers.kernels import build_psgld, build_sghmc, build_sgld, build_sgnht
from .samplers.schedules import Schedule

__all__ = ["SGLD", "PSGLD", "SGHMC", "SGNHT", "ScheduleLR"]


try:  # torch's registries of global step hooks (private; torch >= 2.0)
    from torch.optim.optimizer import _global_optimizer_post_hooks as _GLOBAL_POST_HOOKS
    from torch.optim.optimizer import _global_optimizer_pre_hooks as _GLOBAL_PRE_HOOKS
except ImportError:  # pragma: no cover - a torch without them: always take torch's wrapped step
    _GLOBAL_PRE_HOOKS = _GLOBAL_POST_HOOKS = {None: None}


def _plain_call(opt: Optimizer) -> bool:
    """No step hook registered (on ``opt`` or globally) and no profiler recording."""
    return not (opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks or _GLOBAL_PRE_HOOKS
                or _GLOBAL_POST_HOOKS or torch._C._autograd._profiler_enabled())


def _default_generator() -> torch.Generator:
    # Seeded from the global RNG, so torch.manual_seed(...) makes the noise reproducible.
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))


class _LangevinOptimizer(Optimizer):
    _hyper: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], defaults: dict[str, Any],
                 generator: torch.Generator | None, noise: str = "gaussian",
                 prefetch_noise: bool = False) -> None:
        self._check_hyper(defaults)
        if noise not in NOISES:
            raise ValueError(f"noise: expected one of {sorted(NOISES)} ('gaussian' is exact), got {noise!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        if not isinstance(prefetch_noise, bool):
            raise TypeError(f"prefetch_noise: expected True or False, got {prefetch_noise!r}")
        self._step_count = 0  # before Optimizer.__init__ (which may call add_param_group)
        super().__init__(params, defaults)
        self._set_runtime(noise, generator if generator is not None else _default_generator(), prefetch_noise)

    @property
    def step_count(self) -> int:
        """The number of :meth:`step` calls: the step index t of the next one, the one step counter a
        :class:`ScheduleLR` evaluates its schedule at. Saved by :meth:`state_dict` (``"step_count"``)
        and restored by :meth:`load_state_dict`, with the kernel state and the generator's.

        >>> import torch
        >>> w = torch.zeros(2, requires_grad=True)
        >>> opt = SGLD([w], lr=0.1, generator=torch.Generator().manual_seed(0))
        >>> for _ in range(3):
        ...     w.grad = torch.ones(2)
        ...     opt.step()
        >>> opt.step_count, opt.state_dict()["step_count"]
        (3, 3)
        """
        return self._step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._step_count = check_count("step_count", value, 0, "steps taken")

    def _set_runtime(self, noise: str, generator: torch.Generator, prefetch_noise: bool) -> None:
        """The noise source and the caches (not part of torch.optim's pickled state)."""
        self.noise, self.generator, self.prefetch_noise = noise, generator, prefetch_noise
        self._prefetcher = NoisePrefetcher(noise, generator) if prefetch_noise else None
        self._noise: dict[int, GaussianNoise] = {}
        self._kernels: dict[tuple, Kernel] = {}  # by hyper-parameter values: groups alike share one
        self._scratch: dict[int, Workspace] = {}  # per group: the kernel state's scratch (SCRATCH)
        self._flat_state: dict[tuple[int, str], Sequence[Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(noise=self.noise, prefetch_noise=self.prefetch_noise,
                     generator_device=self.generator.device, generator_state=self._generator_state(),
                     step_count=self._step_count)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        noise, prefetch = state.pop("noise", "gaussian"), state.pop("prefetch_noise", False)
        generator = torch.Generator(device=state.pop("generator_device", "cpu"))
        gen_state = state.pop("generator_state", None)
        if gen_state is not None:
            generator.set_state(gen_state)
        self._step_count = int(state.pop("step_count", 0))
        super().__setstate__(state)
        self._set_runtime(noise, generator, prefetch)

    def _generator_state(self) -> Tensor:
        return self._prefetcher.generator_states()[0] if self._prefetcher else self.generator.get_state()

    def _state_list(self, index: int, name: str, per_param: list[dict]) -> Sequence[Tensor]:
        """State ``name`` of these parameters: the kernel's own sequence when the tensors are still
        exactly the ones it made (then it carries its flat buffer: whole-buffer ops, no per-step
        tiling check), else a list (e.g. after ``load_state_dict`` or when the set of parameters
        with gradients changed)."""
        made = self._flat_state.get((index, name))
        if made is not None and len(made) == len(per_param) and all(
                st[name] is t for st, t in zip(per_param, made, strict=True)):
            return made
        return [st[name] for st in per_param]

    def _check_hyper(self, group: dict[str, Any]) -> None:
        """Validate one group's step size, noise scale and sampler settings (defaults and every group)."""
        lr, scale = group["lr"], group["noise_scale"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr: the step size must be a finite number > 0, got {lr!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale < math.inf:
            raise ValueError(f"noise_scale: must be a finite number >= 0 (1 = exact Langevin), got {scale!r}")
        self._build(**{h: group[h] for h in self._hyper})  # the kernel builder checks its own settings

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_hyper(self.param_groups[-1])  # per-group overrides get the same checks as defaults

    def _build(self, **hyper: Any) -> Kernel:
        raise NotImplementedError

    def _kernel(self, group: dict) -> Kernel:
        # built once per setting of the hyper-parameters (groups may override them); a kernel keeps
        # no buffers of its own, so groups with equal settings share it
        key = tuple(group[h] for h in self._hyper)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = self._build(**{h: group[h] for h in self._hyper})
        return kernel

    def step(self, closure=None):  # type: ignore[override]
        """One Langevin step on every parameter that has a gradient.

        Step hooks (``register_step_pre_hook`` / ``post_hook``, global ones included) and the
        profiler's ``Optimizer.step#...`` range run exactly as in torch.optim; when there are none
        and no profiler is recording, the step skips torch.optim's per-call wrapper (a
        ``record_function`` range: about a tenth of a small model's training step).
        """
        if _plain_call(self):
            return self._step(closure)
        return self._hooked_step(closure)

    step.hooked = True  # type: ignore[attr-defined]  # tells Optimizer.__init__ not to wrap it again

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; with ``set_to_none`` (the default) and no profiler
        recording, without its ``record_function`` range."""
        if not set_to_none or torch._C._autograd._profiler_enabled():
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        moves = []
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                moves.append((index, group, params))
        if self._prefetcher is not None:  # every group that draws, in order, from the worker's buffers
            drawing = [params for _, group, params in moves if group["noise_scale"] != 0]
            ready = iter(self._prefetcher.take(drawing))
        for index, group, params in moves:
            grads = [p.grad for p in params]
            kernel = self._kernel(group)
            state = {}
            if kernel.state_names:
                per_param = [self.state[p] for p in params]  # one (Python-level) tensor hash per param
                missing = [p for p, st in zip(params, per_param, strict=True)
                           if len(st) < len(kernel.state_names)]
                if missing:
                    fresh = kernel.init(missing)
                    for name in kernel.state_names:
                        for p, buf in zip(missing, fresh[name], strict=True):
                            self.state[p][name] = buf
                        self._flat_state[index, name] = fresh[name]
                state = {name: self._state_list(index, name, per_param) for name in kernel.state_names}
            if self._prefetcher is not None:
                noise = next(ready) if group["noise_scale"] != 0 else None
            else:
                noise = self._noise.get(index)
                if noise is None:
                    noise = self._noise[index] = make_noise(self.noise, self.generator)
            scratch = self._scratch.get(index)
            if scratch is not None:
                state[SCRATCH] = scratch
            kernel.step(params, grads, state, float(group["lr"]), noise, float(group["noise_scale"]))
            if scratch is None and SCRATCH in state:  # made on this first step: keep it for the next
                self._scratch[index] = state[SCRATCH]
        self._step_count += 1
        return loss

    _hooked_step = Optimizer.profile_hook_step(_step)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        out = super().state_dict()
        out["generator_state"] = self._generator_state()
        out["step_count"] = self._step_count
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """As ``torch.optim.Optimizer.load_state_dict``, with the noise generator's state and
        :attr:`step_count` (0 from a state dict saved without it, by pib_bayes before it was kept)."""
        state_dict = dict(state_dict)
        gen_state = state_dict.pop("generator_state", None)
        count = state_dict.pop("step_count", 0)
        if not is_int(count) or count < 0:
            raise ValueError(f"state_dict: 'step_count' must be an int >= 0, got {count!r}")
        super().load_state_dict(state_dict)
        self._step_count = count
        if gen_state is not None:
            if self._prefetcher is not None:
                self._prefetcher.set_generator_states([gen_state])
            else:
                self.generator.set_state(gen_state)


class SGLD(_LangevinOptimizer):
    """SGLD (Welling & Teh 2011): ``w <- w - lr * grad + noise_scale * sqrt(2 lr) * xi``.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: step size h (per group; torch LR schedulers and :class:`ScheduleLR` may change it,
            the noise follows it).
        noise_scale: 1 for exact Langevin dynamics, 0 for plain gradient descent (the
            exploration phase of cyclical SGLD).
        generator: a ``torch.Generator`` for the noise (its state is saved in ``state_dict``).
        noise: ``"gaussian"`` (exact Langevin, the default) or the opt-in ``"rademacher"``:
            +-1 signs, about 8x cheaper to draw on a CPU, same stationary mean and covariance on
            Gaussian targets but not the same law (see
            :class:`~pib_bayes.samplers.core.RademacherNoise` and docs/performance.md).
        prefetch_noise: draw the next step's noise on a worker thread while the model computes
            its gradients (:class:`~pib_bayes.samplers.core.NoisePrefetcher`): the same numbers as
            without, and on a large model the draw's time is hidden when a CPU core is free
            (torch intra-op threads fewer than cores); on a small model the hand-off costs more
            than the draw. Read the generator's state through ``state_dict``, not the generator.

    pSGLD, SGHMC and SGNHT take the same ``noise_scale``, ``generator``, ``noise`` and ``prefetch_noise``.
    """

    def __init__(self, params, lr: float, *, noise_scale: float = 1.0,
                 generator: torch.Generator | None = None, noise: str = "gaussian",
                 prefetch_noise: bool = False) -> None:
        super().__init__(params, {"lr": lr, "noise_scale": noise_scale}, generator, noise, prefetch_noise)

    def _build(self) -> Kernel:
        return build_sgld()


class PSGLD(_LangevinOptimizer):
    """pSGLD (Li et al. 2016) with an RMSprop preconditioner; see :func:`~pib_bayes.samplers.build_psgld`."""

    _hyper = ("alpha", "eps")

    def __init__(self, params, lr: float, *, alpha: float = 0.99, eps: float = 1e-5, noise_scale: float = 1.0,
                 generator: torch.Generator | None = None, noise: str = "gaussian",
                 prefetch_noise: bool = False) -> None:
        super().__init__(params, {"lr": lr, "alpha": alpha, "eps": eps, "noise_scale": noise_scale},
                         generator, noise, prefetch_noise)

    def _build(self, alpha: float, eps: float) -> Kernel:
        return build_psgld(alpha, eps)


class SGHMC(_LangevinOptimizer):
    """SGHMC (Chen et al. 2014) in momentum form; ``lr`` is eta.

    See :func:`~pib_bayes.samplers.build_sghmc`.
    """

    _hyper = ("friction",)

    def __init__(self, params, lr: float, *, friction: float = 0.1, noise_scale: float = 1.0,
                 generator: torch.Generator | None = None, noise: str = "gaussian",
                 prefetch_noise: bool = False) -> None:
        super().__init__(params, {"lr": lr, "friction": friction, "noise_scale": noise_scale}, generator,
                         noise, prefetch_noise)

    def _build(self, friction: float) -> Kernel:
        return build_sghmc(friction)


class SGNHT(_LangevinOptimizer):
    """SGNHT (Ding et al. 2014), the stochastic-gradient Nosé-Hoover thermostat; ``lr`` is the time step h.

        p  <- p - lr * grad - lr * xi * p + noise_scale * sqrt(2 A lr) * eta
        w  <- w + lr * p
        xi <- xi + lr * (p . p / D - 1)

    with ``A = diffusion``. There is one thermostat xi **per param group**, and D is the number of
    weights of that group that have a gradient: with the usual single group this is the SPEC's
    D = number of weights and the trajectory equals ``pib_bayes.sample(..., sampler="sgnht")``'s
    (one chain). Groups may differ in ``lr`` or ``diffusion``, so each group keeps its own
    kinetic energy p.p/D at 1 (a blockwise thermostat, which leaves the same target invariant).
    xi starts at ``init_thermostat`` (default A) and is stored, with the momentum, in each
    parameter's ``state`` (``"thermostat"``: the same 0-d tensor for every parameter of a group;
    the step reads the first parameter's and writes it to the others, so a parameter that gets
    its first gradient later joins its group's thermostat, unless it comes first in the group,
    which restarts xi at ``init_thermostat``). See :func:`~pib_bayes.samplers.build_sgnht`.

    Examples:
        >>> import torch
        >>> from pib_bayes.optim import SGNHT
        >>> w = torch.zeros(20_000, requires_grad=True)
        >>> opt = SGNHT([w], lr=0.05, diffusion=1.0, generator=torch.Generator().manual_seed(0))
        >>> g = torch.Generator().manual_seed(1)
        >>> for _ in range(1500):  # U = |w|^2 / 2, plus gradient noise of variance 4 the sampler is not told
        ...     w.grad = w.detach() + 2.0 * torch.randn(20_000, generator=g)
        ...     opt.step()
        >>> ke = float(opt.state[w]["momentum"].square().mean())  # p.p/D: held at 1 by the thermostat
        >>> xi = float(opt.state[w]["thermostat"])  # A + lr * 4 / 2 = 1.1 to first order in lr (1.13 exactly)
        >>> abs(ke - 1) < 0.05, abs(xi - 1.13) < 0.05  # the thermostat absorbed the extra noise
        (True, True)
    """

    _hyper = ("diffusion", "init_thermostat")

    def __init__(self, params, lr: float, *, diffusion: float = 1.0, init_thermostat: float | None = None,
                 noise_scale: float = 1.0, generator: torch.Generator | None = None, noise: str = "gaussian",
                 prefetch_noise: bool = False) -> None:
        super().__init__(params, {"lr": lr, "diffusion": diffusion, "init_thermostat": init_thermostat,
                                  "noise_scale": noise_scale}, generator, noise, prefetch_noise)

    def _build(self, diffusion: float, init_thermostat: float | None) -> Kernel:
        return build_sgnht(diffusion, init_thermostat)


class ScheduleLR(LRScheduler):
    """Drive an optimizer's ``lr`` *and* ``noise_scale`` from a :class:`~pib_bayes.samplers.Schedule`.

    With :class:`~pib_bayes.samplers.Cyclical` this is cyclical SGLD in a hand-written loop: call
    ``scheduler.step()`` after each ``optimizer.step()`` and keep draws where
    ``scheduler.collecting`` is true.

    The step t the schedule is evaluated at (h_t, the noise scale, ``collecting``) is the
    optimizer's own step count (:attr:`~pib_bayes.optim.SGLD.step_count`, the number of
    ``optimizer.step()`` calls, saved in the optimizer's ``state_dict``), not a count of its own:
    a scheduler built on a restored optimizer, or one whose state was not restored, continues where
    the optimizer is; ``last_epoch`` mirrors that count after every ``step()``. With any other torch
    optimizer (no step count) t is ``last_epoch``, as for a torch LR scheduler.

    >>> import torch
    >>> from pib_bayes.samplers import PolynomialDecay
    >>> w = torch.zeros(2, requires_grad=True)
    >>> opt = SGLD([w], lr=0.1, generator=torch.Generator().manual_seed(0))
    >>> schedule = PolynomialDecay(0.1, 1.0, 0.55)
    >>> sched = ScheduleLR(opt, schedule)
    >>> for _ in range(3):
    ...     w.grad = torch.ones(2)
    ...     opt.step()
    ...     sched.step()
    >>> saved = opt.state_dict()
    >>> again = SGLD([w], lr=0.1, generator=torch.Generator())
    >>> again.load_state_dict(saved)
    >>> ScheduleLR(again, schedule).get_last_lr() == [schedule.step_size(3)]  # resumes at t = 3
    True
    """

    def __init__(self, optimizer: Optimizer, schedule: Schedule, last_epoch: int = -1) -> None:
        self.schedule = schedule
        if isinstance(optimizer, _LangevinOptimizer) and last_epoch not in (-1, optimizer.step_count):
            raise ValueError(f"last_epoch: {last_epoch!r}, but the optimizer has taken "
                             f"{optimizer.step_count} steps (its step_count, restored by its "
                             "load_state_dict), the step the schedule is evaluated at; leave last_epoch=-1")
        super().__init__(optimizer, last_epoch)

    def _t(self) -> int:
        """The step the schedule is evaluated at: the optimizer's step count, else ``last_epoch``."""
        if isinstance(self.optimizer, _LangevinOptimizer):
            return self.optimizer.step_count
        return max(self.last_epoch, 0)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The step size h_t of every group at the current step (no other effect)."""
        t = self._t()
        return [self.schedule.step_size(t) for _ in self.optimizer.param_groups]

    def step(self, epoch: int | None = None) -> None:  # type: ignore[override]
        """Set every group's ``lr`` to h_t and ``noise_scale`` to the schedule's noise scale at t (0 in
        a cyclical schedule's exploration phase), t the optimizer's step count (with another torch
        optimizer: ``last_epoch``, advanced by one). A given ``epoch`` (deprecated in torch) sets
        the optimizer's step count to it."""
        if epoch is None:
            super().step()
        else:
            if isinstance(self.optimizer, _LangevinOptimizer):
                self.optimizer.step_count = epoch  # the one counter moves, not a copy of it
            super().step(epoch)
        t = self._t()
        for group in self.optimizer.param_groups:
            group["noise_scale"] = self.schedule.noise_scale(t)
        if isinstance(self.optimizer, _LangevinOptimizer):
            self.last_epoch = t  # torch's counter mirrors the optimizer's, never runs apart from it

    @property
    def collecting(self) -> bool:
        """Whether the schedule collects the draw of the current step t (a cyclical schedule's
        sampling phase)."""
        return self.schedule.collect(self._t())
