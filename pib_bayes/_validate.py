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

__all__ = ["PrecisionWarning", "is_int", "is_real", "check_bool", "check_int", "check_count", "check_choice",
           "check_real", "check_fraction", "check_path", "check_tensors", "check_finite_tensor",
           "real_tensor", "check_posterior", "check_callable", "available_memory", "check_memory",
           "format_bytes", "warn_renamed", "renamed_args"]

_F = TypeVar("_F", bound=Callable[..., Any])

#: The release in which the deprecated names of :func:`renamed_args` and the config loader stop working.
REMOVED_IN = "0.3"


class PrecisionWarning(UserWarning):
    """A model whose weights are float16/bfloat16: Langevin updates smaller than half the spacing
    of the format's numbers round away (see :func:`~pib_bayes.sample`)."""


def is_int(value: object) -> bool:
    """An integer (Python or NumPy), not a bool: the test behind every integer argument.

    >>> is_int(3), is_int(np.int64(3)), is_int(True), is_int(3.0)
    (True, True, False, False)
    """
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))


def is_real(value: object) -> bool:
    """A real number (Python or NumPy int/float), not a bool, a string or a tensor.

    >>> is_real(0.5), is_real(np.float32(0.5)), is_real(2), is_real(False), is_real("0.5")
    (True, True, True, False, False)
    """
    return not isinstance(value, (bool, np.bool_)) and isinstance(value,
                                                                  (int, float, np.integer, np.floating))


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


def check_count(name: str, value: object, minimum: int = 0, what: str = "") -> int:
    """``int(value)`` for an int >= ``minimum``, else ONE ``ValueError`` (a wrong type included)
    ``"name: must be an int >= minimum (what), got value"``: the counts, sizes and steps of the
    public functions. (:func:`check_int` raises ``TypeError`` for a wrong type instead; the entry
    points that used this message before keep their ``ValueError``.)

    >>> check_count("num_bins", 10, 1)
    10
    >>> check_count("n", 0, 1, "examples used by the bound")
    Traceback (most recent call last):
    ...
    ValueError: n: must be an int >= 1 (examples used by the bound), got 0
    """
    if not is_int(value) or value < minimum:  # type: ignore[operator]
        why = f" ({what})" if what else ""
        raise ValueError(f"{name}: must be an int >= {minimum}{why}, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def check_fraction(name: str, value: object, what: str = "", *, closed: bool = False,
                   hint: str = "") -> float:
    """``float(value)`` for a real number in (0, 1) (``closed``: [0, 1]), else ONE ``ValueError``
    ``"name: what must lie in (0, 1), hint, got value"``: levels, confidences, fractions.

    >>> check_fraction("level", 0.9, "the credible level")
    0.9
    >>> check_fraction("delta", 1.5, "the confidence parameter", hint="e.g. 0.05")
    Traceback (most recent call last):
    ...
    ValueError: delta: the confidence parameter must lie in (0, 1), e.g. 0.05, got 1.5
    """
    inside = is_real(value) and (0 <= value <= 1 if closed else 0 < value < 1)  # type: ignore[operator]
    if not inside:
        interval = "[0, 1]" if closed else "(0, 1)"
        raise ValueError(f"{name}: {what + ' ' if what else ''}must lie in {interval}"
                         f"{', ' + hint if hint else ''}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


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
    """``value`` if it is callable, else a ``TypeError`` naming ``name``.

    >>> check_callable("loss_fn", len) is len
    True
    """
    if not callable(value):
        raise TypeError(f"{name}: expected a callable, got {type(value).__name__} {value!r}")
    return value


def check_finite_tensor(name: str, part: str, t: torch.Tensor) -> None:
    """A ``ValueError`` naming ``name`` (and ``part``, e.g. ``"x"``) when a floating or complex tensor
    holds NaN or infinite values; integer tensors always pass.

    >>> check_finite_tensor("data", "x", torch.zeros(2))
    """
    if (torch.is_floating_point(t) or t.is_complex()) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: {part} contains NaN or Inf values; remove or impute those rows first")


def check_tensors(x: object, y: object, name: str = "data") -> None:
    """Inputs ``x`` and targets ``y`` of a data set: tensors with one leading row per example, the same
    number of rows, at least one, finite; else ONE ``TypeError``/``ValueError`` naming ``name``.

    >>> check_tensors(torch.zeros(3, 2), torch.zeros(3))
    >>> check_tensors(torch.zeros(3, 2), torch.zeros(4))
    Traceback (most recent call last):
    ...
    ValueError: data: x has 3 examples but y has 4; they must match
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: expected tensors (x, y), got ({type(x).__name__}, {type(y).__name__})")
    if x.dim() == 0 or y.dim() == 0:
        raise ValueError(f"{name}: x and y need a leading row dimension, got a 0-d tensor")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: is empty (0 examples)")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: x has {x.shape[0]} examples but y has {y.shape[0]}; they must match")
    for label, t in (("x", x), ("y", y)):
        check_finite_tensor(name, label, t)


def real_tensor(name: str, t: Any, what: str = "a tensor") -> torch.Tensor:
    """``t`` as a floating-point tensor of finite values (integer tensors are converted to the default
    dtype); a ``TypeError``/``ValueError`` naming ``name`` otherwise.

    >>> real_tensor("y", torch.tensor([1, 2]))
    tensor([1., 2.])
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected {what}, got {type(t).__name__}; convert it with torch.as_tensor")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name}: expected real numbers, got dtype {t.dtype}")
    if not torch.is_floating_point(t):
        t = t.to(torch.get_default_dtype())
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or infinite values; remove or impute them first")
    return t


def check_posterior(name: str, value: object) -> Any:
    """``value`` if it is a :class:`~pib_bayes.Posterior`, else a ``TypeError`` naming ``name``
    (imported on call: this module is a leaf).

    >>> check_posterior("posterior", 3)
    Traceback (most recent call last):
    ...
    TypeError: posterior: expected a pib_bayes.Posterior (from pib_bayes.sample or Posterior.load), got int
    """
    from .posterior import Posterior

    if not isinstance(value, Posterior):
        raise TypeError(f"{name}: expected a pib_bayes.Posterior (from pib_bayes.sample or Posterior.load), "
                        f"got {type(value).__name__}")
    return value
