"""Diagnostic and uncertainty plots, written to files (matplotlib, Agg canvas; nothing is shown).

Every function draws on a bare ``matplotlib.figure.Figure`` (no pyplot state, no window),
saves it to ``path`` (format from the suffix: .png, .pdf, .svg) and returns the path.

- :func:`plot_trace` / :func:`plot_rank`: ArviZ trace and rank plots of chosen scalar summaries
  (the quantities of :func:`pib_bayes.diagnostics.summary`) or of an InferenceData's variables.
- :func:`plot_energy`: the energy U_B and every tracked IIW statistic over the sampling steps.
- :func:`plot_reliability`: reliability diagram (accuracy vs. confidence per bin).
- :func:`plot_regression_band`: predictive mean with its central credible band.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from . import _arviz_compat as compat
from ._validate import renamed_args
from .diagnostics import _as_dataset, scalar_quantities
from .posterior import Posterior
from .uncertainty import ClassificationUncertainty, RegressionUncertainty, ReliabilityData

__all__ = ["plot_trace", "plot_rank", "plot_energy", "plot_reliability", "plot_regression_band"]


def _path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"path: directory {parent!r} does not exist; create it first")
    return path


def _arviz_data(source: Posterior | Any, quantities: Sequence[str] | None,
                **kwargs: Any) -> tuple[Any, list[str]]:
    if isinstance(source, Posterior):
        values, _, chains = scalar_quantities(source, **kwargs)
        names = list(values) if quantities is None else list(quantities)
        unknown = [q for q in names if q not in values]
        if unknown:
            raise ValueError(f"quantities: unknown {unknown}; available: {list(values)}")
        return compat.from_datasets({"posterior": _as_dataset({k: values[k] for k in names}, chains)}), names
    try:
        available = list(compat.get_group(source, "posterior").data_vars)
    except (KeyError, AttributeError, TypeError):
        raise TypeError(f"source: expected a Posterior or ArviZ data with a posterior group, "
                        f"got {type(source).__name__}") from None
    names = available if quantities is None else list(quantities)
    unknown = [q for q in names if q not in available]
    if unknown:
        raise ValueError(f"quantities: unknown {unknown}; available: {available}")
    return source, names


def plot_trace(source: Posterior | Any, path: str | os.PathLike, *, quantities: Sequence[str] | None = None,
               data: tuple[Tensor, Tensor] | None = None, probe_x: Tensor | None = None,
               num_projections: int = 4, seed: int = 0, max_weights: int = 8,
               include_diverged: bool = False) -> str:
    """ArviZ trace plot (``az.plot_trace``): per quantity, its density per chain and its trace.

    ``source`` is a Posterior (its scalar summaries are plotted: energy, loss, IIW, ``log_lik``
    with ``data``, ``pred[i]`` with ``probe_x``, ``proj[j]`` or the weights; pick some with
    ``quantities``) or ArviZ data (``quantities`` = posterior variable names).
    """
    arviz_data, names = _arviz_data(source, quantities, data=data, probe_x=probe_x,
                                    num_projections=num_projections, seed=seed, max_weights=max_weights,
                                    include_diverged=include_diverged)
    return compat.plot_trace(arviz_data, _path(path), names)


def plot_rank(source: Posterior | Any, path: str | os.PathLike, *, quantities: Sequence[str] | None = None,
              data: tuple[Tensor, Tensor] | None = None, probe_x: Tensor | None = None,
              num_projections: int = 4, seed: int = 0, max_weights: int = 8,
              include_diverged: bool = False) -> str:
    """ArviZ rank plot (``az.plot_rank``) of each chain's ranks in the pooled draws: histograms on
    ArviZ 0.x, fractional-rank Delta-ECDFs with their envelope on 1.x.

    Mixed chains give flat histograms / ECDF differences inside the envelope (Vehtari et al. 2021).
    Arguments as :func:`plot_trace`.
    """
    arviz_data, names = _arviz_data(source, quantities, data=data, probe_x=probe_x,
                                    num_projections=num_projections, seed=seed, max_weights=max_weights,
                                    include_diverged=include_diverged)
    return compat.plot_rank(arviz_data, _path(path), names)


def _steps(post: Posterior) -> tuple[np.ndarray, str]:
    """Global step of each kept draw when the layout gives it (warmup + i * thin), else the draw index."""
    meta = post.metadata
    warm, thin = meta.get("num_warmup"), meta.get("thin")
    # a schedule that keeps only some steps (cyclical): the kept draws are not evenly spaced in steps
    schedule = meta.get("schedule")
    cyclical = isinstance(schedule, dict) and schedule.get("type") == "Cyclical"
    if isinstance(warm, int) and isinstance(thin, int) and not cyclical:
        return warm + thin * np.arange(post.num_draws), "sampler step"
    return np.arange(post.num_draws), "kept draw"


@renamed_args(post="posterior")
def plot_energy(posterior: Posterior, path: str | os.PathLike) -> str:
    """Energy U_B(w) = mean_B l / beta - log p(w) per chain over the steps, and IIW when tracked.

    One panel for ``energy`` and one per sample statistic named ``iiw`` or ``iiw*``; diverged
    chains are drawn too (dashed) since their last finite values show where they broke.
    """
    if not isinstance(posterior, Posterior):
        raise TypeError(f"posterior: expected a Posterior, got {type(posterior).__name__}")
    keys = [k for k in ["energy"] + sorted(k for k in posterior.sample_stats if k.startswith("iiw"))
            if k in posterior.sample_stats]
    if not keys:
        raise ValueError("posterior: sample_stats has neither 'energy' nor an 'iiw' statistic to plot")
    steps, xlabel = _steps(posterior)
    fig = Figure(figsize=(8, 2.6 * len(keys)))
    axes = np.asarray(fig.subplots(len(keys), 1, sharex=True, squeeze=False)).ravel()
    assert posterior.diverged is not None
    for ax, key in zip(axes, keys, strict=True):
        vals = posterior.sample_stats[key].detach().double().numpy()
        for c in range(posterior.num_chains):
            ls = "--" if bool(posterior.diverged[c]) else "-"
            ax.plot(steps, vals[c], lw=0.8, ls=ls, label=f"chain {c}")
        ax.set_ylabel(key)
    axes[0].legend(fontsize="small", ncol=min(posterior.num_chains, 4))
    axes[-1].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(_path(path))
    return os.fspath(path)


def plot_reliability(result: ClassificationUncertainty | ReliabilityData, path: str | os.PathLike) -> str:
    """Reliability diagram: per equal-width confidence bin, accuracy vs. mean confidence.

    Bars at the bin accuracy, the diagonal for perfect calibration, and the bin counts below.
    ``result`` comes from :func:`pib_bayes.uncertainty.classification_uncertainty` (with labels)
    or :func:`pib_bayes.uncertainty.expected_calibration_error`.
    """
    ece = None
    if isinstance(result, ClassificationUncertainty):
        if result.reliability is None:
            raise ValueError("result: has no reliability data; pass labels y to classification_uncertainty")
        rel, ece = result.reliability, result.ece
    elif isinstance(result, ReliabilityData):
        rel = result
    else:
        raise TypeError(f"result: expected ClassificationUncertainty or ReliabilityData, "
                        f"got {type(result).__name__}")
    edges = rel.bin_edges.double().numpy()
    width = np.diff(edges)
    acc = np.nan_to_num(rel.accuracy.double().numpy(), nan=0.0)
    conf = rel.confidence.double().numpy()
    fig = Figure(figsize=(5, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(edges[:-1], acc, width=width, align="edge", edgecolor="k", alpha=0.7, label="accuracy")
    has = ~np.isnan(conf)
    top.plot(conf[has], acc[has], "o", color="C3", ms=4, label="(confidence, accuracy)")
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(fontsize="small", loc="upper left")
    if ece is not None:
        top.set_title(f"ECE = {ece:.4f}")
    bottom.bar(edges[:-1], rel.count.numpy(), width=width, align="edge", edgecolor="k", color="C7")
    bottom.set_xlabel("confidence (max predictive probability)")
    bottom.set_ylabel("count")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(_path(path))
    return os.fspath(path)


def plot_regression_band(x: Tensor, result: RegressionUncertainty, path: str | os.PathLike, *,
                         y: Tensor | None = None, kind: str = "draws") -> str:
    """Predictive mean over a 1-d input with its central credible band at ``result.level``.

    ``kind="draws"`` shades ``result.lower``/``upper`` (quantiles of the draws' predictive);
    ``"gaussian"`` the mean ± z sqrt(variance) band; observed ``y`` are drawn as points.
    """
    if kind not in ("draws", "gaussian"):
        raise ValueError(f"kind: expected 'draws' or 'gaussian', got {kind!r}")
    if not isinstance(result, RegressionUncertainty):
        raise TypeError(f"result: expected a RegressionUncertainty, got {type(result).__name__}")
    xs = torch.as_tensor(x).reshape(-1)
    if xs.numel() != result.mean.numel():
        raise ValueError(f"x: needs one input per prediction ({result.mean.numel()}), got {xs.numel()}; "
                         "the band plot is for one input and one output dimension")
    order = torch.argsort(xs)
    if kind == "draws":
        lo, hi = result.lower, result.upper
    else:
        lo, hi = result.gaussian_lower, result.gaussian_upper

    def np_(t: Tensor) -> np.ndarray:
        return t.reshape(-1)[order].detach().double().numpy()

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.fill_between(np_(xs), np_(lo), np_(hi), alpha=0.3, label=f"{100 * result.level:g}% interval ({kind})")
    ax.plot(np_(xs), np_(result.mean), color="C0", label="predictive mean")
    if y is not None:
        ax.plot(xs.detach().double().numpy(), torch.as_tensor(y).reshape(-1).detach().double().numpy(), "k.",
                ms=3, label="observed")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(_path(path))
    return os.fspath(path)
