"""Torch's intra-op threads against the CPU cores this process may use.

Idle torch (OpenMP) threads spin: more threads than usable cores, or a machine busy with other
jobs, can slow sampling a hundredfold. The library never changes thread settings on import; the
``pib-bayes`` command caps them (:func:`cap_threads`), and sampling warns once when they exceed
the usable cores (:func:`warn_if_oversubscribed`).
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = ["available_cores", "cap_threads", "warn_if_oversubscribed"]

_warned = False


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none).

    >>> available_cores() >= 1
    True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def cap_threads() -> int:
    """Lower ``torch.get_num_threads()`` to :func:`available_cores` if it is above; returns the count.

    >>> 1 <= cap_threads() <= available_cores()
    True
    """
    cores = available_cores()
    if torch.get_num_threads() > cores:
        torch.set_num_threads(cores)
    return torch.get_num_threads()


def warn_if_oversubscribed() -> None:
    """Warn (once per process) when torch uses more threads than this process has cores.

    >>> cap_threads() and warn_if_oversubscribed()  # capped: nothing to warn about
    """
    global _warned
    threads, cores = torch.get_num_threads(), available_cores()
    if threads > cores and not _warned:
        _warned = True
        warnings.warn(
            f"torch uses {threads} threads but this process may run on {cores} CPU cores: idle threads "
            f"spin and slow sampling down; call torch.set_num_threads({cores}) (or set OMP_NUM_THREADS)",
            RuntimeWarning, stacklevel=3,
        )
