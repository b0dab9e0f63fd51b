"""pib_bayes: sample the PAC-Bayes Information Bottleneck posterior over neural-network weights.

Pipeline: energy/prior -> samplers -> posterior -> IIW, diagnostics, uncertainty, bounds;
adapters (pyro, cli, io, distributed) at the edges. Submodules that pull in heavy dependencies
(ArviZ, matplotlib, Pyro) are imported on first use: ``pib_bayes.diagnostics`` etc. just work.
"""

import importlib

__version__ = "0.1.0"

from . import data, optim, samplers  # noqa: E402
from ._validate import PrecisionWarning  # noqa: E402
from .driver import chain_seeds, sample  # noqa: E402
from .energy import Energy, GaussianLoss, beta_from_temperature  # noqa: E402
from .posterior import Posterior, Prediction  # noqa: E402
from .prior import DistributionPrior, FlatPrior, GaussianPrior  # noqa: E402

_LAZY = ("iiw", "diagnostics", "uncertainty", "bounds", "plots", "pyro", "distributed")

__all__ = [
    "__version__", "sample", "chain_seeds", "Energy", "GaussianLoss", "beta_from_temperature", "Posterior",
    "Prediction", "GaussianPrior", "DistributionPrior", "FlatPrior", "PrecisionWarning", "data", "optim",
    "samplers", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pib_bayes' has no attribute {name!r}")
