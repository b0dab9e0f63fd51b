"""pib_bayes: sample the PAC-Bayes Information Bottleneck posterior over neural-network weights.

Pipeline: energy/prior -> samplers -> posterior -> IIW, diagnostics, uncertainty, bounds;
adapters (pyro, cli, io, distributed) at the edges. Submodules that pull in heavy dependencies
(ArviZ, matplotlib, Pyro) are imported on first use: ``pib_bayes.diagnostics`` etc. just work.
"""

import importlib

from . import data, optim, samplers  # noqa: E402
from ._validate import PrecisionWarning  # noqa: E402
from ._version import __version__  # noqa: E402
from .driver import chain_seeds, sample  # noqa: E402
from .energy import (  # noqa: E402
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    Energy,
    GaussianLoss,
    HeteroscedasticGaussianLoss,
    beta_from_temperature,
)
from .posterior import DrawCollector, Posterior, Prediction  # noqa: E402
from .prior import DistributionPrior, FlatPrior, GaussianPrior  # noqa: E402

_LAZY = ("iiw", "diagnostics", "uncertainty", "bounds", "plots", "pyro", "distributed")

__all__ = [
    "__version__", "sample", "chain_seeds", "Energy", "GaussianLoss", "CrossEntropyLoss", "BCEWithLogitsLoss",
    "HeteroscedasticGaussianLoss", "beta_from_temperature", "Posterior", "Prediction", "DrawCollector",
    "GaussianPrior", "DistributionPrior", "FlatPrior", "PrecisionWarning", "data", "optim", "samplers",
    *_LAZY, "train_pib", "PIBTrainResult",
]


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name in ("train_pib", "PIBTrainResult"):  # imports pib_bayes.iiw (SciPy) on first use
        return getattr(importlib.import_module(".pib_train", __name__), name)
    raise AttributeError(f"module 'pib_bayes' has no attribute {name!r}")
