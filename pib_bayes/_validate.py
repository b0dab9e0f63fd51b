"""Small argument checkers shared by the public entry points (issue 19).

Each raises ONE ``TypeError``/``ValueError`` whose message starts with the argument's name and says
what is expected, so a bad input never surfaces as a deep torch/Python exception or a silently
wrong result. Also: an estimate of the memory available to this process (for the resource
pre-checks of :func:`~pib_bayes.sample` and :meth:`~pib_bayes.Posterior.predict`) and the
:class:`PrecisionWarning` for low-precision models.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = ["PrecisionWarning", "check_bool", "check_int", "check_choice", "check_real", "check_path",
           "available_memory", "check_memory", "format_bytes", "warn_renamed", "renamed_args"]

_F = TypeVar("_F", bound=Callable[..., Any])

#: The release in which the deprecated names of :func:`renamed_args` and the config loader stop working.
REMOVED_IN = "0.3"


class PrecisionWarning(UserWarning):
    """A model whose weights are float16/bfloat16: Langevin updates smaller than half the spacing
    of the format's numbers round away (see :func:`~pib_bayes.sample`)."""


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool (or numpy bool), else a ``TypeError`` naming ``name``.

    >>> check_bool("resume", True)
    True
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    """``int(value)`` for an int (not a bool, not a float) within ``[minimum, maximum]``.

    >>> check_int("chunk_size", 3, minimum=1)
    3
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        lo = "" if minimum is None else f">= {minimum}"
        hi = "" if maximum is None else f"<= {maximum}"
        raise ValueError(f"{name}: must be an int {' and '.join(s for s in (lo, hi) if s)}, got {v}")
    return v


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``.

    >>> check_choice("chain_method", "auto", ("auto", "sequential"))
    'auto'
    """
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(repr(o) for o in options)}, got {value!r}")
    return value


def check_real(name: str, value: object, *, positive: bool = False, nonnegative: bool = False,
               finite: bool = True) -> float:
    """``float(value)`` for a real number (not a bool), optionally > 0 / >= 0 / finite.

    >>> check_real("tol", 1e-10, positive=True)
    1e-10
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)):
        raise ValueError(f"{name}: must be a finite number, got {v}")
    if positive and not v > 0:
        raise ValueError(f"{name}: must be > 0, got {v}")
    if nonnegative and not v >= 0:
        raise ValueError(f"{name}: must be >= 0, got {v}")
    return v


def check_path(name: str, value: object, *, must_exist: bool = False) -> str:
    """A file path: a ``str``/``os.PathLike`` that is not a directory and whose nearest existing
    ancestor is a directory (missing parent directories are created when the file is written).

    >>> check_path("checkpoint", "run.ckpt")
    'run.ckpt'
    """
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a file path (str or pathlib.Path), got {type(value).__name__} "
                        f"{value!r}")
    path = os.fspath(value)
    if not path:
        raise ValueError(f"{name}: expected a file path, got an empty string")
    if os.path.isdir(path):
        raise ValueError(f"{name}: {path!r} is a directory; pass a file path inside it, e.g. "
                         f"{os.path.join(path, 'run.ckpt')!r}")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"{name}: {parent!r} is a file, so {path!r} cannot be created below it")
    if must_exist and not os.path.isfile(path):
        raise ValueError(f"{name}: no such file {path!r}")
    return path


def available_memory() -> int:
    """Bytes of memory this process may still allocate: ``MemAvailable`` of /proc/meminfo (Linux),
    else physical pages x page size (``os.sysconf``), else 2**40 (1 TiB, so the checks never refuse
    a run on a platform where neither is known)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return 2**40


def format_bytes(n: float) -> str:
    """``1.5 GiB`` style.

    >>> format_bytes(3 * 2**30)
    '3.0 GiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


_ALWAYS_FITS = 2**26  # 64 MiB


def check_memory(name: str, needed: float, what: str, fix: str,
                 available: Callable[[], int] | None = None) -> None:
    """Raise ``ValueError`` naming ``name`` when ``needed`` bytes exceed the available memory.

    >>> check_memory("num_draws", 1024, "the draws", "use fewer draws")
    """
    if needed < _ALWAYS_FITS:  # not worth a look at /proc/meminfo (hot paths such as predict)
        return
    have = (available or available_memory)()
    if needed > have:
        raise ValueError(f"{name}: {what} would need about {format_bytes(needed)} ({int(needed):,} bytes) "
                         f"but only {format_bytes(have)} ({have:,} bytes) of memory is available; {fix}")


def warn_renamed(old: str, new: str, *, where: str = "", what: str = "the argument",
                 stacklevel: int = 3) -> None:
    """Warn (``FutureWarning``, shown by default) that ``old`` is a deprecated name of ``new``.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_renamed("post", "posterior", where="summary()")
    >>> print(caught[0].message)
    summary(): the argument 'post' is deprecated, use 'posterior' (the old name goes in 0.3)
    """
    prefix = f"{where}: " if where else ""
    warnings.warn(f"{prefix}{what} {old!r} is deprecated, use {new!r} "
                  f"(the old name goes in {REMOVED_IN})", FutureWarning, stacklevel=stacklevel)


def renamed_args(**renames: str) -> Callable[[_F], _F]:
    """Decorator: keyword arguments ``old=...`` of the decorated function still work, with a
    :func:`warn_renamed` ``FutureWarning``, as the new name (``renamed_args(post="posterior")``).
    Giving both the old and the new name is a ``TypeError``. The signature (``inspect.signature``
    follows ``__wrapped__``) and the docstring are the new function's.

    >>> @renamed_args(post="posterior")
    ... def count(posterior):
    ...     return posterior
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     count(post=3)
    3
    """

    def decorate(func: _F) -> _F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{new}: given twice, as {new!r} and as its deprecated name {old!r}; "
                                        f"pass only {new!r}")
                    warn_renamed(old, new, where=f"{func.__name__}()")
                    kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def check_callable(name: str, value: Any) -> Any:
    if not callable(value):
        raise TypeError(f"{name}: expected a callable, got {type(value).__name__} {value!r}")
    return value
