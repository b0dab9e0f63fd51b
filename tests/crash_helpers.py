"""A run killed part-way, for the crash-and-resume tests (a stand-in for SIGKILL between two steps)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


class Crash(Exception):
    """Raised by :func:`crashing_stat`'s statistic to stop a run in the middle."""


def crashing_stat(kept: int | None, name: str = "0.weight") -> Callable[[dict[str, Tensor]], Tensor]:
    """A ``stat_fns`` entry returning ``params[name].sum()`` that raises :class:`Crash` from call
    ``kept + 1`` on (one call per chain and kept draw); ``None`` never raises."""
    calls = {"n": 0}

    def stat(params: dict[str, Tensor]) -> Tensor:
        calls["n"] += 1
        if kept is not None and calls["n"] > kept:
            raise Crash
        return params[name].sum()

    return stat
