"""pib_bayes: sample the PAC-Bayes Information Bottleneck posterior over neural-network weights.

Pipeline: energy/prior -> samplers -> posterior -> IIW, diagnostics, uncertainty.
"""

__version__ = "0.1.0"

from .driver import chain_seeds, sample  # noqa: E402
from .energy import Energy, GaussianLoss, beta_from_temperature  # noqa: E402
from .posterior import Posterior, Prediction  # noqa: E402
from .prior import DistributionPrior, FlatPrior, GaussianPrior  # noqa: E402

__all__ = [
    "__version__", "sample", "chain_seeds", "Energy", "GaussianLoss", "beta_from_temperature", "Posterior",
    "Prediction", "GaussianPrior", "DistributionPrior", "FlatPrior",
]
