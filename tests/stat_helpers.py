"""Monte-Carlo error helpers for statistical tests: tolerances come from sd/sqrt(ESS), ESS from ArviZ."""

from __future__ import annotations

import warnings

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az


def mcse_of_mean(samples: np.ndarray) -> float:
    """MCSE of the mean of a (chain, draw) array: sd / sqrt(bulk ESS)."""
    samples = np.asarray(samples, dtype=float)
    return float(samples.std() / np.sqrt(az.ess(samples)))


def mean_and_mcse(samples: np.ndarray) -> tuple[float, float]:
    samples = np.asarray(samples, dtype=float)
    return float(samples.mean()), mcse_of_mean(samples)
