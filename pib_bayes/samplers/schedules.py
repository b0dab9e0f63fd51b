"""Step-size schedules, passed to any sampler (SPEC §2).

A schedule says, for the global step index ``t`` (0-based, warm-up included):

* ``step_size(t)``: the step size h_t (the noise always uses the same h_t as the drift);
* ``noise_scale(t)``: 1 normally, 0 in the noise-free exploration phase of cyclical SGLD;
* ``collect(t)``: whether a draw may be kept at step t (cyclical SGLD keeps draws only in the
  low-step-size sampling phase of each cycle); ``collects`` is None when every step may be kept.

Cyclical SGLD (cSGLD, Zhang et al. 2020) is no kernel of its own: it is SGLD stepped on a
:class:`Cyclical` schedule. ``sampler="csgld"`` is accepted as a shorthand for that pair
(:func:`expand_shorthand`, the one place that knows it); the run then records the kernel
``"sgld"`` and the schedule ``Cyclical(...)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

__all__ = ["Schedule", "Constant", "PolynomialDecay", "Cosine", "Cyclical", "as_schedule", "SHORTHANDS",
           "expand_shorthand"]


def _int_at_least(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return float(value)


def _positive(name: str, value: float) -> float:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
    return float(value)


class Schedule(ABC):
    """Base class: subclasses implement :meth:`step_size`.

    ``_args`` maps each constructor argument to the attribute holding it, so that a schedule's
    ``repr`` is the constructor call that rebuilds it (``eval(repr(s)) == s``).
    """

    _args: dict[str, str] = {}

    @abstractmethod
    def step_size(self, t: int) -> float: ...

    def noise_scale(self, t: int) -> float:
        return 1.0

    def collect(self, t: int) -> bool:
        return True

    @property
    def collects(self) -> Callable[[int], bool] | None:
        """Which steps may be kept: None when every step may (the default), else the predicate
        ``t -> bool`` (:meth:`collect`), e.g. a cyclical schedule's sampling phases."""
        return None if type(self).collect is Schedule.collect else self.collect

    def __call__(self, t: int) -> float:
        return self.step_size(t)

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self) -> str:
        pairs = self._args.items() if self._args else [(k, k) for k in self.to_dict() if k != "type"]
        args = ", ".join(f"{arg}={getattr(self, attr)!r}" for arg, attr in pairs)
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(vars(self).items()))))


class Constant(Schedule):
    """``h_t = h``.

    >>> Constant(0.01)(1000), Constant(0.01)
    (0.01, Constant(step_size=0.01))
    """

    _args = {"step_size": "h"}

    def __init__(self, step_size: float) -> None:
        self.h = _positive("step_size", step_size)

    def step_size(self, t: int) -> float:
        return self.h


class PolynomialDecay(Schedule):
    """``h_t = a (b + t)^(-gamma)`` (Welling & Teh 2011; gamma in (0.5, 1] satisfies Robbins-Monro).

    >>> PolynomialDecay(a=1.0, b=1.0, gamma=0.5)(3)
    0.5
    """

    _args = {"a": "a", "b": "b", "gamma": "gamma"}

    def __init__(self, a: float, b: float = 1.0, gamma: float = 0.55) -> None:
        self.a = _positive("a", a)
        self.b = _positive("b", b)
        if not 0 <= _number("gamma", gamma) <= 1:
            raise ValueError(f"gamma: must lie in [0, 1], got {gamma}")
        self.gamma = float(gamma)

    def step_size(self, t: int) -> float:
        return self.a * (self.b + t) ** (-self.gamma)


class Cosine(Schedule):
    """``h_t = h_min + (h_0 - h_min)/2 * (1 + cos(pi * min(t, T)/T))`` over ``T = total_steps``.

    >>> round(Cosine(1.0, total_steps=10)(5), 6)
    0.5
    """

    _args = {"step_size": "h0", "total_steps": "total_steps", "min_step_size": "h_min"}

    def __init__(self, step_size: float, total_steps: int, min_step_size: float = 0.0) -> None:
        self.h0 = _positive("step_size", step_size)
        self.total_steps = _int_at_least("total_steps", total_steps, 1)
        if not 0 <= _number("min_step_size", min_step_size) <= self.h0:
            raise ValueError(f"min_step_size: must lie in [0, step_size], got {min_step_size}")
        self.h_min = float(min_step_size)

    def step_size(self, t: int) -> float:
        frac = min(t, self.total_steps) / self.total_steps
        return self.h_min + 0.5 * (self.h0 - self.h_min) * (1 + math.cos(math.pi * frac))


class Cyclical(Schedule):
    """Cyclical step size of cSGLD (Zhang et al. 2020, eq. 1).

    With cycle length L and position r_t = (t mod L) / L in [0, 1):

        h_t = h_0 / 2 * (cos(pi r_t) + 1)

    The first ``exploration_fraction`` of each cycle is an optimisation (exploration) phase
    without noise; the rest is the sampling phase, the only part whose steps may be kept.
    (The paper's step size never reaches 0 at r < 1, so every step keeps a positive h.)

    >>> s = Cyclical(1.0, cycle_length=4, exploration_fraction=0.5)
    >>> [round(s(t), 4) for t in range(5)], [s.collect(t) for t in range(4)]
    ([1.0, 0.8536, 0.5, 0.1464, 1.0], [False, False, True, True])
    """

    _args = {"step_size": "h0", "cycle_length": "cycle_length",
             "exploration_fraction": "exploration_fraction"}

    def __init__(self, step_size: float, cycle_length: int, exploration_fraction: float = 0.5) -> None:
        self.h0 = _positive("step_size", step_size)
        self.cycle_length = _int_at_least("cycle_length", cycle_length, 2)
        if not 0 <= _number("exploration_fraction", exploration_fraction) < 1:
            raise ValueError(f"exploration_fraction: must lie in [0, 1), got {exploration_fraction}")
        self.exploration_fraction = float(exploration_fraction)

    def position(self, t: int) -> float:
        return (t % self.cycle_length) / self.cycle_length

    def step_size(self, t: int) -> float:
        return 0.5 * self.h0 * (math.cos(math.pi * self.position(t)) + 1.0)

    def exploring(self, t: int) -> bool:
        return self.position(t) < self.exploration_fraction

    def noise_scale(self, t: int) -> float:
        return 0.0 if self.exploring(t) else 1.0

    def collect(self, t: int) -> bool:
        return not self.exploring(t)


def as_schedule(step_size: float | Schedule) -> Schedule:
    """A float becomes :class:`Constant`; a :class:`Schedule` is returned unchanged."""
    if isinstance(step_size, Schedule):
        return step_size
    return Constant(_positive("step_size", step_size))


#: sampler names that stand for a kernel on a schedule: name -> (kernel name, schedule class)
SHORTHANDS: dict[str, tuple[str, type[Schedule]]] = {"csgld": ("sgld", Cyclical)}


def expand_shorthand(sampler: object, step_size: object) -> object:
    """The kernel a ``sampler`` argument names: ``"csgld"`` is ``"sgld"`` (its ``step_size`` must be a
    :class:`Cyclical` schedule, else one ``ValueError`` saying so); any other value comes back as is.

    >>> expand_shorthand("csgld", Cyclical(1e-3, cycle_length=10)), expand_shorthand("psgld", 1e-3)
    ('sgld', 'psgld')
    """
    if not isinstance(sampler, str) or sampler.lower() not in SHORTHANDS:
        return sampler
    kernel, schedule = SHORTHANDS[sampler.lower()]
    if not isinstance(step_size, schedule):
        if isinstance(step_size, str) or type(step_size).__name__ == "AutoStep":
            raise ValueError(f"step_size: 'auto' picks a constant step; sampler={sampler!r} needs a "
                             f"pib_bayes.samplers.{schedule.__name__} schedule (use sampler={kernel!r} "
                             "with 'auto')")
        raise ValueError(f"step_size: sampler={sampler!r} needs a pib_bayes.samplers.{schedule.__name__} "
                         f"schedule, got {step_size!r}")
    return kernel
