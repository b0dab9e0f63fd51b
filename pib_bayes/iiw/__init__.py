"""Information in the weights, I(w; S) (SPEC §3): estimators, tracking and PIB-regularised training.

- :func:`fisher`: the paper's fast Δθᵀ F Δθ estimator per layer, by forward-mode JVP;
- :func:`kl`: KL(N(mean, cov of the draws) ‖ prior), an upper bound on I(w;S);
- :func:`channel`: ½ log det(I + W⁻¹ B_c) from posteriors on several resamples of the data;
- :class:`IIWTracker` / :func:`iiw_stat_fns`: IIW curves during training or sampling, :meth:`IIWTracker.peak`;
- :class:`IIWRegularizer`: a differentiable IIW term for minimising L_S + β·IIW;
- :func:`fit_prior_mean`: a data-dependent prior mean fitted on a held-out split (``**PAPER_PRIOR``: the
  authors' recipe, then :func:`paper_init_`).

Every estimator returns an :class:`IIWResult`.
"""

from .fisher import fisher
from .prior_fit import PAPER_PRIOR, fit_prior_mean, paper_init_, split_for_prior
from .regularizer import IIWRegularizer
from .result import IIWResult
from .samples import STRUCTURES, channel, kl, ledoit_wolf
from .tracking import IIWTracker, Peak, iiw_stat_fn, iiw_stat_fns, peak

__all__ = [
    "IIWResult", "fisher", "kl", "channel", "ledoit_wolf", "STRUCTURES",
    "IIWTracker", "Peak", "peak", "iiw_stat_fns", "iiw_stat_fn", "IIWRegularizer",
    "fit_prior_mean", "split_for_prior", "paper_init_", "PAPER_PRIOR",
]
