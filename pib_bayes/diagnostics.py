"""Convergence diagnostics and ArviZ export for a :class:`~pib_bayes.Posterior` (SPEC §4).

R-hat (rank-normalised split R-hat), bulk/tail ESS and MCSE all come from ArviZ
(Vehtari, Gelman, Simpson, Carpenter & Bürkner 2021, "Rank-normalization, folding, and
localization: an improved R-hat"). A network with 10^5+ weights cannot be diagnosed weight by
weight, so :func:`summary` diagnoses *scalar summaries* that stay meaningful at any size and names
each one:

- ``energy``, ``loss`` (and ``iiw*`` when tracked): the sampler's own statistics per draw;
- ``log_lik``: sum_i log p(y_i | x_i, w) on the given data;
- ``pred[i]``: the prediction at probe input i (regression: f(x_i; w), the mean mu(x_i; w) for the
  heteroscedastic likelihood; classification: the softmax probability of the class the posterior
  mean predicts, P(y = 1) for binary cross-entropy);
- ``proj[j]``: <u_j, w> for k seeded random unit directions u_j in R^D, or, when D is small,
  every weight (``name[i,j]``).

ArviZ flags R-hat > 1.01 and bulk ESS < 100 per chain; :func:`summary` warns (a
:class:`ConvergenceWarning`) naming every quantity over those limits.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import Tensor
from torch.distributions import Categorical, Normal
from torch.func import vmap

from . import _arviz_compat as compat
from ._validate import (
    check_bool,
    check_count,
    check_finite_tensor,
    check_memory,
    check_posterior,
    check_tensors,
    format_bytes,
    is_real,
    renamed_args,
)
from .posterior import _OOM, Posterior

__all__ = ["ConvergenceWarning", "to_arviz", "summary", "scalar_quantities", "log_likelihood",
           "random_projections", "kernel_stein_discrepancy", "ksd"]


class ConvergenceWarning(UserWarning):
    """Chains that have not mixed: R-hat above the limit or too few effective draws."""


# ------------------------------------------------------------------------------------ helpers
def _kept_chains(post: Posterior, include_diverged: bool) -> list[int]:
    # Posterior.kept_chains warns (naming the chains and steps) when it leaves diverged chains out
    return post.kept_chains(include_diverged)


def _check_task(post: Posterior) -> str:
    task = post.task
    if task not in ("classification", "regression"):
        raise ValueError(f"post.metadata['task']: expected 'classification' or 'regression', got {task!r}")
    return task


def _outputs(post: Posterior, x: Tensor, chains: Sequence[int], chunk_size: int,
             name: str = "data") -> Tensor:
    """Raw model outputs f(x; w) for every draw of ``chains``: (C, N, *out_shape), through
    :meth:`Posterior.outputs`'s engines (batched / vmap / loop, with the loop as fallback).

    ``name`` is the argument ``x`` came from (``data`` or ``probe_x``): inputs the model cannot
    consume (wrong width, wrong dtype) raise a ``ValueError`` naming it.
    """
    model = post.model
    if model is None:
        raise ValueError("posterior: this Posterior has no model attached; pass model= to Posterior.load")
    # a model whose parameter names or shapes differ from the draws would silently evaluate its own
    # weights for every draw (functional_call ignores unknown keys)
    post.check_model(model)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a tensor of inputs x, got {type(x).__name__}")
    check_finite_tensor(name, "x", x)
    check_count("chunk_size", chunk_size, 1)
    c, n = len(chains), post.num_draws
    if not c:
        raise ValueError("posterior: holds no draws to evaluate the model with")
    with torch.no_grad():  # the draws are read a chunk at a time (Posterior.iter_draws)
        out = post._run_over_draws(model, list(chains), x, chunk_size, "auto", name)
    return out.reshape(c, n, *out.shape[1:])


def _observation_dist(post: Posterior, out: Tensor) -> torch.distributions.Distribution:
    """p(y | x, w) for outputs ``out``: Categorical(logits), Bernoulli(logits) (``BCEWithLogitsLoss``),
    Normal(mu, exp(log sigma)) (``HeteroscedasticGaussianLoss``) or Normal(f, noise_std)."""
    likelihood = post.metadata.get("likelihood")
    if likelihood == "bernoulli":
        return torch.distributions.Bernoulli(logits=out)
    if likelihood == "heteroscedastic_gaussian":
        mu, log_std = out.chunk(2, dim=-1)
        return Normal(mu, log_std.exp())
    if _check_task(post) == "classification":
        return Categorical(logits=out)
    noise_std = post.metadata.get("noise_std")
    if noise_std is None:
        raise ValueError("post.metadata['noise_std'] is None: the Gaussian log-likelihood of a regression "
                         "needs the observation noise; sample with loss_fn=GaussianLoss(noise_std) or set "
                         "post.metadata['noise_std']")
    return Normal(out, float(noise_std))


def _check_data(data: Any) -> tuple[Tensor, Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)):
        raise TypeError(f"data: expected a pair of tensors (x, y), got {type(data).__name__}")
    check_tensors(*data)
    return data[0], data[1]


def _targets(post: Posterior, out: Tensor, y: Tensor) -> Tensor:
    likelihood = post.metadata.get("likelihood")
    if likelihood in ("bernoulli", "heteroscedastic_gaussian"):  # one target per logit / per mean
        _check_task(post)
        like = out[0, 0] if likelihood == "bernoulli" else out[0, 0].chunk(2, dim=-1)[0]
        if y.numel() != like.numel():
            raise ValueError(f"data: y has {y.numel()} values but the model gives {like.numel()} "
                             f"{'logits' if likelihood == 'bernoulli' else 'means'}")
        return y.reshape(like.shape).to(out.dtype)
    if _check_task(post) == "classification":
        shape, k = out.shape[2:-1], out.shape[-1]  # one label per output row of logits
        if y.numel() != shape.numel():
            raise ValueError(f"data: y needs one class label per row of logits, shape {tuple(shape)}, got "
                             f"shape {tuple(y.shape)} (model outputs {tuple(out.shape[2:])})")
        if y.is_complex():
            raise ValueError(f"data: y must hold integer class labels, got dtype {y.dtype}")
        if torch.is_floating_point(y) and not bool((y == y.round()).all()):
            raise ValueError("data: y holds fractional class labels (y.long() would truncate them); pass "
                             "integer labels in [0, num_classes)")
        labels = y.reshape(shape).long()
        if bool((labels < 0).any()) or bool((labels >= k).any()):
            raise ValueError(f"data: y holds class labels outside [0, {k - 1}] (min {int(labels.min())}, max "
                             f"{int(labels.max())}); the model gives {k} classes")
        return labels
    if y.numel() != out[0, 0].numel():
        raise ValueError(f"data: y has {y.numel()} values but the model gives {out[0, 0].numel()} outputs")
    return y.reshape(out.shape[2:]).to(out.dtype)


@renamed_args(post="posterior")
def log_likelihood(posterior: Posterior, x: Tensor, y: Tensor, *, include_diverged: bool = False,
                   chunk_size: int = 64) -> Tensor:
    """Pointwise log-likelihood log p(y_i | x_i, w) for every draw: (chain, draw, n).

    Classification: log softmax(f(x_i; w))[y_i]. Regression: log N(y_i; f(x_i; w), s^2) summed
    over output dimensions, s = ``post.metadata["noise_std"]``. The model runs through
    ``torch.func.functional_call`` vmapped over ``chunk_size`` draws at a time.
    """
    post = check_posterior("posterior", posterior)
    x, y = _check_data((x, y))
    return _pointwise_loglik(post, x, y, _kept_chains(post, include_diverged), chunk_size)


def _pointwise_loglik(post: Posterior, x: Tensor, y: Tensor, chains: Sequence[int],
                      chunk_size: int) -> Tensor:
    out = _outputs(post, x, chains, chunk_size)
    lp = _observation_dist(post, out).log_prob(_targets(post, out, y))
    return lp.reshape(*lp.shape[:3], -1).sum(-1)


@renamed_args(post="posterior")
def random_projections(posterior: Posterior, num_projections: int, seed: int = 0,
                       chains: Sequence[int] | None = None) -> Tensor:
    """<u_j, w> for ``num_projections`` random unit directions u_j of the flattened weights: (C, N, k).

    u_j = g_j / ||g_j|| with g_j ~ N(0, I_D) from ``torch.Generator().manual_seed(seed)``, drawn
    parameter by parameter so no (chain, draw, D) copy of the weights is ever made.
    """
    post = check_posterior("posterior", posterior)
    check_count("num_projections", num_projections, 1)
    chains = list(range(post.num_chains)) if chains is None else list(chains)
    gen = torch.Generator().manual_seed(int(seed))
    c, n = len(chains), post.num_draws
    acc = torch.zeros(c, n, num_projections, dtype=torch.float64)
    sq_norm = torch.zeros(num_projections, dtype=torch.float64)
    directions = {}
    for k, shape in post.param_shapes.items():  # drawn parameter by parameter, in order
        directions[k] = torch.randn(math.prod(shape), num_projections, generator=gen, dtype=torch.float64)
        sq_norm += directions[k].square().sum(0)
    for _, sl, block in post.iter_draws(chains=chains):  # one chunk of draws at a time
        for k, v in block.items():
            acc[:, sl] += v.reshape(c, v.shape[1], -1).double() @ directions[k]
    return acc / sq_norm.sqrt()


WEIGHT_BLOCK_BYTES = 256 * 2**20
"""Largest (chain, draw, coordinate) float64 block of weights :func:`summary` diagnoses at once."""


def _parse_var_names(post: Posterior, var_names: Any) -> list[tuple[str, str, int]]:
    """``(label, parameter, flat index)`` for each selected weight: a parameter name selects all its
    coordinates (C order), ``name[i,j]`` one of them."""
    if isinstance(var_names, str) or not isinstance(var_names, Sequence) or not var_names:
        raise ValueError(f"var_names: expected a non-empty list of parameter names or coordinates "
                         f"'name[i,j]', got {var_names!r}")
    shapes = post.param_shapes
    out: list[tuple[str, str, int]] = []
    for entry in var_names:
        if not isinstance(entry, str):
            raise ValueError(f"var_names: entries must be strings, got {entry!r}")
        name, idx = entry, None
        if entry not in shapes and entry.endswith("]") and "[" in entry:
            name, _, inner = entry[:-1].rpartition("[")
            try:
                idx = tuple(int(i) for i in inner.split(",")) if inner else ()
            except ValueError:
                raise ValueError(f"var_names: {entry!r}: the index must be integers, e.g. 'w[0,1]'") from None
        if name not in shapes:
            raise ValueError(f"var_names: {entry!r} is not a parameter (or 'parameter[i,j]'); available: "
                             f"{list(shapes)}")
        shape = shapes[name]
        if idx is None:
            for flat, coord in enumerate(np.ndindex(*shape)):
                out.append((f"{name}[{','.join(map(str, coord))}]" if shape else name, name, flat))
            continue
        if len(idx) != len(shape) or any(not 0 <= i < s for i, s in zip(idx, shape, strict=False)):
            raise ValueError(f"var_names: {entry!r} is outside the shape {shape} of {name!r}")
        out.append((f"{name}[{','.join(map(str, idx))}]" if shape else name, name,
                    int(np.ravel_multi_index(idx, shape)) if shape else 0))
    return out


def _gather(post: Posterior, selection: Sequence[tuple[str, str, int]], chains: Sequence[int]) -> Tensor:
    """(C, N, len(selection)) float64 values of the selected weights, read chunk by chunk."""
    c, n = len(chains), post.num_draws
    check_memory("var_names", 8.0 * c * n * len(selection), f"{len(selection)} weights over {c} x {n} draws",
                 "select fewer weights")
    out = torch.empty(c, n, len(selection), dtype=torch.float64)
    by_name: dict[str, tuple[list[int], list[int]]] = {}
    for j, (_, name, flat) in enumerate(selection):
        cols, idx = by_name.setdefault(name, ([], []))
        cols.append(j)
        idx.append(flat)
    for _, sl, block in post.iter_draws(list(by_name), chains=list(chains)):
        for name, (cols, idx) in by_name.items():
            v = block[name]
            out[:, sl, cols] = v.reshape(c, v.shape[1], -1)[:, :, idx].double()
    return out


@renamed_args(post="posterior")
def scalar_quantities(posterior: Posterior, *, data: tuple[Tensor, Tensor] | None = None,
                      probe_x: Tensor | None = None, num_projections: int = 8, seed: int = 0,
                      max_weights: int = 32, include_diverged: bool = False,
                      chunk_size: int = 64, var_names: Sequence[str] | None = None,
                      ) -> tuple[dict[str, np.ndarray], dict[str, str], list[int]]:
    """The named scalar summaries that :func:`summary` diagnoses.

    Returns ``(values, kinds, chains)``: name -> array (chain, draw); name -> kind
    (``sample_stat``, ``log_likelihood``, ``prediction``, ``projection``, ``weight``); the
    indices of the chains used. Every weight is its own quantity when D <= ``max_weights``,
    otherwise ``num_projections`` seeded random projections stand in for the weights;
    ``var_names`` (parameter names, or single coordinates ``"name[i,j]"``) selects the weights
    that are their own quantities instead (no projections then). The draws are read chunk by
    chunk (:meth:`~pib_bayes.Posterior.iter_draws`).
    """
    return _quantities(posterior, data=data, probe_x=probe_x, num_projections=num_projections, seed=seed,
                       max_weights=max_weights, include_diverged=include_diverged, chunk_size=chunk_size,
                       var_names=var_names, weights_apart=False)


def _quantities(posterior: Posterior, *, data: tuple[Tensor, Tensor] | None, probe_x: Tensor | None,
                num_projections: int, seed: int, max_weights: int, include_diverged: bool, chunk_size: int,
                var_names: Sequence[str] | None, weights_apart: bool
                ) -> tuple[dict[str, np.ndarray], dict[str, str], list[int]]:
    """:func:`scalar_quantities`; with ``weights_apart`` the selected weights are left out (summary
    diagnoses them block by block)."""
    post = check_posterior("posterior", posterior)
    check_count("max_weights", max_weights, 0)
    check_count("chunk_size", chunk_size, 1)
    check_count("num_projections", num_projections, 1)
    if data is not None:
        data = _check_data(data)
    chains = _kept_chains(post, include_diverged)
    values: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}

    def add(name: str, kind: str, arr: Tensor) -> None:
        values[name] = arr.detach().double().numpy()
        kinds[name] = kind

    for key in ["energy", "loss"] + sorted(k for k in post.sample_stats if k.startswith("iiw")):
        if key in post.sample_stats:
            add(key, "sample_stat", post.sample_stats[key][chains])
    if data is not None:
        x, y = data
        add("log_lik", "log_likelihood", _pointwise_loglik(post, x, y, chains, chunk_size).sum(-1))
    if probe_x is not None:
        out = _outputs(post, probe_x, chains, chunk_size, name="probe_x")
        likelihood = post.metadata.get("likelihood")
        if likelihood == "bernoulli":  # P(y = 1): one logit per output
            pred = torch.sigmoid(out).reshape(*out.shape[:3], -1)
            pred = pred.squeeze(-1) if pred.shape[-1] == 1 else pred
        elif likelihood == "heteroscedastic_gaussian":  # the mean mu: the first half of the last dim
            pred = out.chunk(2, dim=-1)[0].reshape(*out.shape[:3], -1)
            pred = pred.squeeze(-1) if pred.shape[-1] == 1 else pred
        elif _check_task(post) == "classification":
            probs = torch.softmax(out, dim=-1)                        # (C, N, B, K)
            top = probs.reshape(-1, *probs.shape[2:]).nanmean(0).argmax(-1)  # class of the posterior mean
            pred = probs.gather(-1, top.expand(*probs.shape[:2], -1).unsqueeze(-1)).squeeze(-1)
        else:
            pred = out.reshape(*out.shape[:3], -1)
            pred = pred.squeeze(-1) if pred.shape[-1] == 1 else pred
        for idx in np.ndindex(*pred.shape[2:]):
            add(f"pred[{','.join(map(str, idx))}]", "prediction", pred[(slice(None), slice(None), *idx)])
    selection = _weight_selection(post, var_names, max_weights)
    if selection is None:
        proj = random_projections(post, num_projections, seed, chains)
        for j in range(num_projections):
            add(f"proj[{j}]", "projection", proj[..., j])
    elif not weights_apart:
        w = _gather(post, selection, chains)
        for j, (label, _, _) in enumerate(selection):
            add(label, "weight", w[..., j])
    return values, kinds, chains


def _weight_selection(post: Posterior, var_names: Any, max_weights: int) -> list[tuple[str, str, int]] | None:
    """The weights diagnosed one by one: those ``var_names`` selects, else every weight when D <=
    ``max_weights``; None means random projections instead."""
    if var_names is not None:
        return _parse_var_names(post, var_names)
    if post.num_params <= max_weights:
        return [(label, name, flat) for name, shape in post.param_shapes.items()
                for flat, label in enumerate(_weight_names_of(name, shape))]
    return None


def _weight_names_of(name: str, shape: tuple[int, ...]) -> list[str]:
    if not shape:
        return [name]
    return [f"{name}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape)]


def _as_dataset(values: dict[str, np.ndarray], chains: Sequence[int]) -> xr.Dataset:
    n = next(iter(values.values())).shape[1]
    return xr.Dataset({k: (("chain", "draw"), v) for k, v in values.items()},
                      coords={"chain": list(chains), "draw": np.arange(n)})


# ------------------------------------------------------------------------------------ summary
@renamed_args(post="posterior")
def summary(posterior: Posterior, *, data: tuple[Tensor, Tensor] | None = None, probe_x: Tensor | None = None,
            num_projections: int = 8, seed: int = 0, max_weights: int = 32, rhat_threshold: float = 1.01,
            min_ess_per_chain: float = 100.0, include_diverged: bool = False, chunk_size: int = 64,
            warn: bool = True, var_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Diagnose convergence on scalar summaries of the posterior, with ArviZ.

    For each quantity (see :func:`scalar_quantities`) the table has ``mean``, ``sd``,
    ``mcse_mean``, ``mcse_sd``, ``ess_bulk``, ``ess_tail``, ``r_hat`` (rank-normalised split R-hat,
    Vehtari et al. 2021; NaN with a single chain) and ``kind``. MCSE of the mean is
    sd / sqrt(ESS_bulk) in ArviZ's estimator. A :class:`ConvergenceWarning` names every quantity
    with R-hat > ``rhat_threshold`` (or non-finite) and every one with bulk ESS below
    ``min_ess_per_chain`` x number of chains. Chains flagged in ``post.diverged`` are left out
    with a warning naming them unless ``include_diverged``.

    Args:
        data: ``(x, y)`` adds ``log_lik`` = sum_i log p(y_i | x_i, w).
        probe_x: inputs whose predictions become ``pred[i]`` quantities.
        num_projections, seed: random projections of the weights when D > ``max_weights``.
        var_names: weights diagnosed one by one instead of the projections: parameter names (all
            their coordinates, labelled ``name[i,j]``) or single coordinates ``"name[i,j]"``.

    Memory: the draws are read a chunk at a time (:meth:`~pib_bayes.Posterior.iter_draws`), so a
    lazily read posterior larger than RAM is summarised in one pass per quantity family; the
    per-weight quantities are gathered and diagnosed in blocks of at most
    :data:`WEIGHT_BLOCK_BYTES` (chain x draw x coordinates in float64), one pass over the draws of
    the selected parameters per block.

    The table's ``attrs`` hold the chains used, the excluded chains and the projection seed.

    >>> import numpy as np, torch
    >>> from pib_bayes import Posterior
    >>> g = torch.Generator().manual_seed(0)
    >>> post = Posterior({"w": torch.randn(4, 500, 2, generator=g)},
    ...                  {"energy": torch.randn(4, 500, generator=g)}, {"task": "regression"})
    >>> table = summary(post)
    >>> list(table.index), bool((table["r_hat"] < 1.01).all())
    (['energy', 'w[0]', 'w[1]'], True)
    """
    post = check_posterior("posterior", posterior)
    check_bool("warn", warn)
    for name, val in (("rhat_threshold", rhat_threshold), ("min_ess_per_chain", min_ess_per_chain)):
        if not is_real(val) or not math.isfinite(val) or val <= 0:
            raise ValueError(f"{name}: must be a positive number, got {val!r}")
    if post.num_draws < 4:
        raise ValueError(f"posterior: ArviZ diagnostics need at least 4 draws per chain, "
                         f"got {post.num_draws}")
    values, kinds, chains = _quantities(
        post, data=data, probe_x=probe_x, num_projections=num_projections, seed=seed, max_weights=max_weights,
        include_diverged=include_diverged, chunk_size=chunk_size, var_names=var_names, weights_apart=True)
    cols = ("mcse_mean", "mcse_sd", "ess_bulk", "ess_tail", "r_hat")
    rows = {}
    if values:
        ds = _as_dataset(values, chains)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN R-hat with one chain is reported below
            diag = compat.diagnose(ds)
        for name, arr in values.items():
            rows[name] = {
                "mean": float(np.mean(arr)), "sd": float(np.std(arr, ddof=1)) if arr.size > 1 else math.nan,
                **{col: float(diag[col][name]) for col in cols},
                "kind": kinds[name],
            }
    selection = _weight_selection(post, var_names, max_weights)
    per_block = max(1, WEIGHT_BLOCK_BYTES // (8 * len(chains) * post.num_draws))
    for b0 in range(0, len(selection or ()), per_block):
        assert selection is not None
        part = selection[b0:b0 + per_block]
        arr = _gather(post, part, chains).numpy()  # (C, N, k): one variable over a coordinate dim
        ds = xr.Dataset({"w": (("chain", "draw", "coord"), arr)},
                        coords={"chain": list(chains), "draw": np.arange(arr.shape[1])})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            diag = compat.diagnose(ds)
        stats = {col: np.asarray(diag[col]["w"]).reshape(-1) for col in cols}
        flat = arr.reshape(-1, arr.shape[2])
        means = flat.mean(0)
        sds = flat.std(0, ddof=1) if flat.shape[0] > 1 else np.full(flat.shape[1], math.nan)
        for j, (label, _, _) in enumerate(part):
            rows[label] = {"mean": float(means[j]), "sd": float(sds[j]),
                           **{col: float(stats[col][j]) for col in cols}, "kind": "weight"}
    table = pd.DataFrame.from_dict(rows, orient="index")
    excluded = [c for c in range(post.num_chains) if c not in chains]
    table.attrs.update({"chains": list(chains), "excluded_chains": excluded, "projection_seed": seed,
                        "rhat_threshold": rhat_threshold, "min_ess": min_ess_per_chain * len(chains)})
    if warn:
        _warn(table, len(chains), rhat_threshold, min_ess_per_chain)
    return table


def format_above(value: float, threshold: float, decimals: int = 3) -> str:
    """``value`` with ``decimals`` decimals, or more when needed so that a value above ``threshold``
    never prints as the threshold (R-hat 1.0104 against 1.01 prints ``1.0104``, not ``1.010``).

    >>> format_above(1.0104, 1.01), format_above(1.25, 1.01), format_above(1.0099, 1.01)
    ('1.0104', '1.250', '1.010')
    """
    if not math.isfinite(value):
        return f"{value}"
    d = decimals
    while value > threshold and float(f"{value:.{d}f}") <= threshold and d < 12:
        d += 1
    return f"{value:.{d}f}"


def _warn(table: pd.DataFrame, num_chains: int, rhat_threshold: float, min_ess_per_chain: float) -> None:
    if num_chains < 2:
        warnings.warn("R-hat needs at least 2 chains (it is NaN with one); sample with num_chains >= 4",
                      ConvergenceWarning, stacklevel=3)
    else:
        bad = table[~(table["r_hat"] <= rhat_threshold)]
        if len(bad):
            listed = ", ".join(f"{k} ({format_above(v, rhat_threshold)})" for k, v in bad["r_hat"].items())
            warnings.warn(f"R-hat > {rhat_threshold} (chains have not mixed) for: {listed}; "
                          "run longer chains or a smaller step size", ConvergenceWarning, stacklevel=3)
    min_ess = min_ess_per_chain * num_chains
    low = table[~(table["ess_bulk"] >= min_ess)]
    if len(low):
        listed = ", ".join(f"{k} ({v:.0f})" for k, v in low["ess_bulk"].items())
        warnings.warn(f"bulk ESS < {min_ess:.0f} ({min_ess_per_chain:.0f} per chain) for: {listed}; "
                      "draw more samples or thin less", ConvergenceWarning, stacklevel=3)


# ------------------------------------------------------------------------------------ export
def _attr_value(v: Any) -> Any:
    # netCDF attributes hold strings and numbers only
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, float, str)):
        return v
    return json.dumps(v, default=str)


LARGE_EXPORT = 10_000
"""Weights above which :func:`to_arviz` (all parameters) warns that per-weight diagnostics are slow."""

LAZY_EXPORT_BYTES = 2**30
"""Most bytes of draws :func:`to_arviz` reads into memory from a lazily read posterior."""


@renamed_args(post="posterior")
def to_arviz(posterior: Posterior, *, params: None | Sequence[str] | str = None, num_projections: int = 8,
             seed: int = 0, data: tuple[Tensor, Tensor] | None = None, include_diverged: bool = False,
             chunk_size: int = 64, predictive_seed: int = 0) -> Any:
    """Export to ArviZ: ``InferenceData`` on arviz 0.x, ``xarray.DataTree`` on arviz 1.x.

    Groups:
        ``posterior``: one variable per parameter, dims ``(chain, draw, <name>_dim_0, ...)`` with
        integer coords (``params=None``: all stored parameters; a list: those; ``"projections"``:
        one variable ``projection`` (chain, draw, direction) of :func:`random_projections`).
        ``sample_stats``: every per-draw statistic (``energy``, ``loss``, ``step_size``,
        ``diverging``, IIW and sampler statistics when tracked).
        With ``data=(x, y)``: ``log_likelihood`` (``y``: chain, draw, obs; see
        :func:`log_likelihood`) so ``az.loo``/``az.waic`` work, ``posterior_predictive`` (``y``
        drawn from p(y | x_i, w) per draw, seeded by ``predictive_seed``) and ``observed_data``.

    The ``chain`` coordinate holds the original chain indices; diverged chains are left out with
    a warning unless ``include_diverged``. Metadata become attributes of every group.

    A lazily read posterior (:attr:`~pib_bayes.Posterior.lazy`, e.g. a store larger than RAM):
    the export holds its draws in memory, so the selected parameters are read (a chunk at a time)
    only up to :data:`LAZY_EXPORT_BYTES` (1 GiB); above that a ``ValueError`` names the size and
    points to ``params=[...]``, ``params="projections"`` (streamed),
    :func:`summary` and :meth:`~pib_bayes.Posterior.iter_draws`, or to opening the file itself
    lazily with ``xarray.open_dataset(path, group="posterior", engine="h5netcdf")``. The
    log-likelihood and predictive groups (``data=``) stream the draws in any case.

    >>> import torch
    >>> from pib_bayes import Posterior
    >>> post = Posterior({"w": torch.zeros(2, 5, 3)}, {"energy": torch.zeros(2, 5)}, {"task": "regression"})
    >>> idata = to_arviz(post)
    >>> dict(idata.posterior["w"].sizes)
    {'chain': 2, 'draw': 5, 'w_dim_0': 3}
    """
    post = check_posterior("posterior", posterior)
    if data is not None:
        data = _check_data(data)
    chains = _kept_chains(post, include_diverged)
    n = post.num_draws
    base = {"chain": list(chains), "draw": np.arange(n)}
    attrs = {k: _attr_value(v) for k, v in post.metadata.items()}
    attrs["excluded_chains"] = json.dumps([c for c in range(post.num_chains) if c not in chains])

    if isinstance(params, str):
        if params != "projections":
            raise ValueError(f"params: expected None, a list of parameter names or 'projections', "
                             f"got {params!r}")
        proj = random_projections(post, num_projections, seed, chains).numpy()
        posterior = xr.Dataset({"projection": (("chain", "draw", "direction"), proj)},
                               coords={**base, "direction": np.arange(num_projections)})
        attrs["projection_seed"] = seed
    else:
        names = post.param_names if params is None else list(params)
        shapes = post.param_shapes  # (`k in post.draws` on a lazy Mapping would read the variable)
        size = sum(math.prod(shapes[k]) for k in names if k in shapes)
        if size > LARGE_EXPORT:
            warnings.warn(
                f"to_arviz: exporting {size:,} weights; az.summary over all of them is slow (about 8 s of "
                f"CPU per 10,000 weights at 4 x 100 draws) and R-hat per weight says little: pass "
                f"params=[...] (or az.summary's var_names), params='projections', or use "
                f"pib_bayes.diagnostics.summary (scalar summaries)",
                UserWarning, stacklevel=2)
        unknown = [k for k in names if k not in shapes]
        if unknown:
            raise ValueError(f"params: unknown parameters {unknown}; available: {post.param_names}")
        if post.lazy:
            nbytes = len(chains) * n * sum(math.prod(post.param_shapes[k]) * post._dtype(k).itemsize
                                           for k in names)
            if nbytes > LAZY_EXPORT_BYTES:
                raise ValueError(
                    f"params: exporting {', '.join(names)} from a lazily read posterior would hold "
                    f"{format_bytes(nbytes)} of draws in memory (limit {format_bytes(LAZY_EXPORT_BYTES)}); "
                    "pass params=[a few parameters] or params='projections', use "
                    "pib_bayes.diagnostics.summary or Posterior.iter_draws (chunk by chunk), or open the "
                    "file lazily: xarray.open_dataset(path, group='posterior', engine='h5netcdf')")
        variables, coords = {}, dict(base)
        for k in names:
            if post.lazy:  # filled a chunk at a time: one copy of the variable, no concatenation
                buf = torch.empty(len(chains), n, *post.param_shapes[k], dtype=post._dtype(k))
                for _, sl, block in post.iter_draws([k], chains=chains):
                    buf[:, sl] = block[k]
                v = buf.numpy()
            else:
                v = post.draws[k][chains].detach().numpy()
            dims = [f"{k}_dim_{i}" for i in range(v.ndim - 2)]
            coords.update({d: np.arange(s) for d, s in zip(dims, v.shape[2:], strict=True)})
            variables[k] = (("chain", "draw", *dims), v)
        posterior = xr.Dataset(variables, coords=coords)

    sample_stats = xr.Dataset({k: (("chain", "draw"), v[chains].detach().numpy())
                               for k, v in post.sample_stats.items() if tuple(v.shape[:2]) == (
                                   post.num_chains, post.num_draws)}, coords=base)
    groups: dict[str, xr.Dataset] = {"posterior": posterior, "sample_stats": sample_stats}
    if data is not None:
        x, y = data
        out = _outputs(post, x, chains, chunk_size)
        dist = _observation_dist(post, out)
        target = _targets(post, out, y)
        lp = dist.log_prob(target)
        lp = lp.reshape(*lp.shape[:3], -1).sum(-1).numpy()
        with torch.random.fork_rng(devices=[]):  # seeded predictive draws, global RNG untouched
            torch.manual_seed(predictive_seed)
            y_rep = dist.sample().numpy()
        obs = np.arange(x.shape[0])
        y_dims = [f"y_dim_{i}" for i in range(target.dim() - 1)]
        y_coords = {d: np.arange(s) for d, s in zip(y_dims, target.shape[1:], strict=True)}
        groups["log_likelihood"] = xr.Dataset({"y": (("chain", "draw", "obs"), lp)},
                                              coords={**base, "obs": obs})
        groups["posterior_predictive"] = xr.Dataset({"y": (("chain", "draw", "obs", *y_dims), y_rep)},
                                                    coords={**base, "obs": obs, **y_coords})
        groups["observed_data"] = xr.Dataset({"y": (("obs", *y_dims), target.numpy())},
                                             coords={"obs": obs, **y_coords})
    for ds in groups.values():
        ds.attrs.update(attrs)
    return compat.from_datasets(groups)


# ------------------------------------------------------------------ kernel Stein discrepancy
def _as_rows(name: str, value: Any) -> Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a tensor or array of shape (m, d) or (chain, draw, d), "
                        f"got {type(value).__name__}")
    if value.dim() not in (2, 3) or not value.is_floating_point():
        raise ValueError(f"{name}: expected a floating tensor of shape (m, d) or (chain, draw, d), got shape "
                         f"{tuple(value.shape)} and dtype {value.dtype}")
    rows = value.detach().reshape(-1, value.shape[-1]).to(torch.float64)
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ValueError(f"{name}: holds no draws or no coordinates (shape {tuple(value.shape)})")
    check_finite_tensor(name, "it", rows)
    return rows


def _check_imq(c: Any, power: Any) -> tuple[float, float]:
    if not is_real(c) or not (math.isfinite(c) and c > 0):
        raise ValueError(f"c: the IMQ kernel's scale must be a finite number > 0, got {c!r}")
    if not is_real(power) or not -1.0 < power < 0.0:
        raise ValueError(f"power: the IMQ exponent must lie in (-1, 0) (Gorham & Mackey 2017; -0.5 is "
                         f"SPEC §4's), got {power!r}")
    return float(c), float(power)


def kernel_stein_discrepancy(draws: Tensor | np.ndarray, scores: Tensor | np.ndarray, *,
                             c: float = 1.0, power: float = -0.5, block_size: int | None = None) -> float:
    """Kernel Stein discrepancy (Gorham & Mackey 2017; SPEC §4) of draws against p ∝ exp(-U).

    With the draws x_1..x_m, their scores s_i = -grad U(x_i) and the IMQ kernel
    k(x, y) = (c^2 + |x - y|^2)^b (b = ``power``, SPEC: -1/2), the returned KSD is the square root of

        KSD^2 = (1/m^2) sum_{i,j} k_p(x_i, x_j),
        k_p(x, y) = div_x div_y k + grad_x k . s(y) + grad_y k . s(x) + k s(x) . s(y),

    in closed form, with r = x - y, u = c^2 + |r|^2 and d the dimension:

        grad_x k = 2 b u^(b-1) r = -grad_y k,
        div_x div_y k = -4 b (b - 1) |r|^2 u^(b-2) - 2 b d u^(b-1),
        k_p(x, y) = -4 b (b-1) |r|^2 u^(b-2) - 2 b d u^(b-1)
                    + 2 b u^(b-1) r . (s(y) - s(x)) + u^b s(x) . s(y).

    By Stein's identity E_p[k_p(x, y)] = 0 for independent x, y ~ p, so for exact i.i.d. draws
    E[m KSD^2] = E_p[k_p(x, x)] = -2 b d c^(2b-2) + c^(2b) E_p|s|^2 (for b = -1/2: d/c^3 + E|s|^2/c):
    KSD shrinks like 1/sqrt(m). Draws from any other law (a biased sampler, too large a step size,
    an unconverged chain) keep KSD^2 away from 0 as m grows: KSD detects a wrong stationary law,
    which R-hat (agreement between chains) cannot. For -1 < b < 0 it metrises weak convergence
    for distantly dissipative targets (Gorham & Mackey 2017, Theorem 8).

    The pairwise sums run in row blocks of ``block_size`` (default: about 2^22 pairs per block), so
    memory is O(m d + block_size m) and time O(m^2 d); the draws are centred first (k is
    translation invariant) to keep |x - y|^2 accurate. Computed in float64.

    Args:
        draws: (m, d) or (chain, draw, d) points.
        scores: the same shape: -grad U at each point (the log-density gradient of the target).
        c: the kernel's length scale (> 0); set it near the target's scale (e.g. 1 for
            standardised coordinates).
        power: the IMQ exponent b in (-1, 0).
        block_size: rows per block of the pairwise sum.

    Examples:
        >>> import torch
        >>> x = torch.randn(2000, 3, generator=torch.Generator().manual_seed(0))
        >>> exact = kernel_stein_discrepancy(x, -x)  # N(0, I) draws with their own scores
        >>> shifted = kernel_stein_discrepancy(x + 0.5, -(x + 0.5))  # N(0.5, I) draws vs N(0, I)
        >>> exact < 0.1 < shifted  # E[m KSD^2] = 2 d for exact draws: KSD ~ sqrt(6 / 2000) = 0.055
        True
    """
    x, s = _as_rows("draws", draws), _as_rows("scores", scores)
    if x.shape != s.shape:
        raise ValueError(f"scores: must have the shape of draws, (m, d) = {tuple(x.shape)}, got "
                         f"{tuple(s.shape)}")
    c, b = _check_imq(c, power)
    m, d = x.shape
    if block_size is None:
        block_size = max(1, min(m, (1 << 22) // m))
    check_count("block_size", block_size, 1)
    x = x - x.mean(0)
    xx, xs = x.square().sum(1), (x * s).sum(1)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    c2 = c * c
    for start in range(0, m, block_size):
        xi, si = x[start:start + block_size], s[start:start + block_size]
        r2 = (xx[start:start + block_size, None] + xx[None, :] - 2.0 * xi @ x.T).clamp_(min=0.0)
        u = r2 + c2
        # r . (s_j - s_i) with r = x_i - x_j: x_i.s_j - x_j.s_j - x_i.s_i + x_j.s_i
        rs = xi @ s.T - xs[None, :] - xs[start:start + block_size, None] + si @ x.T
        ub1 = u.pow(b - 1.0)
        kp = ((-4.0 * b * (b - 1.0)) * r2 / u - 2.0 * b * d + (2.0 * b) * rs + u * (si @ s.T)) * ub1
        total += kp.sum()
    return float(total.clamp(min=0.0).sqrt() / m)


def _energy_scores(energy: Any, draws: dict[str, Tensor], fixed: dict[str, Tensor], x: Tensor,
                   y: Tensor, wrt: list[str], chunk_size: int, batch_size: int) -> dict[str, Tensor]:
    """-grad U(w) = -(grad L_S(w) / beta - grad log p(w)) on the full data, per draw, w.r.t. ``wrt``.

    Draws are taken ``chunk_size`` at a time as batched leaves (the model vmapped over them, as in
    :func:`_outputs`; one draw at a time when vmap cannot run the model); the data in row batches of
    ``batch_size``, each backpropagated at once, weighted by its share of the n rows.
    """
    total = next(iter(draws.values())).shape[0]
    n = x.shape[0]
    out = {k: torch.empty_like(draws[k]) for k in wrt}
    use_vmap = True
    for start in range(0, total, chunk_size):
        leaves = {k: v[start:start + chunk_size].detach().clone().requires_grad_(k in wrt)
                  for k, v in draws.items()}
        targets = [leaves[k] for k in wrt]
        with torch.enable_grad():
            acc = list(torch.autograd.grad(-energy.prior.log_prob(leaves, batch_ndim=1).sum(), targets,
                                           allow_unused=True))
            acc = [torch.zeros_like(t) if g is None else g for g, t in zip(acc, targets, strict=True)]
            for b0 in range(0, n, batch_size):
                xb, yb = x[b0:b0 + batch_size], y[b0:b0 + batch_size]
                losses = None
                if use_vmap:
                    try:
                        losses = vmap(lambda p, xb=xb, yb=yb: energy.functional_loss(p, xb, yb, fixed))(
                            leaves)
                    except _OOM:
                        raise
                    except (RuntimeError, TypeError, ValueError, NotImplementedError):
                        use_vmap = False  # e.g. data-dependent control flow: one draw at a time
                if losses is None:
                    count = targets[0].shape[0]
                    try:
                        losses = torch.stack([energy.functional_loss({k: v[i] for k, v in leaves.items()},
                                                                     xb, yb, fixed) for i in range(count)])
                    except _OOM:
                        raise
                    except (RuntimeError, IndexError, TypeError) as err:
                        first = str(err).splitlines()[0] if str(err) else ""
                        raise ValueError(f"data: the model and loss cannot consume the data "
                                         f"({type(err).__name__}: {first}); pass the (x, y) the "
                                         "posterior was sampled on") from err
                part = losses.sum() * (xb.shape[0] / n / energy.beta)
                grads = torch.autograd.grad(part, targets, allow_unused=True)
                for a, g in zip(acc, grads, strict=True):
                    if g is not None:
                        a.add_(g)
        for k, g in zip(wrt, acc, strict=True):
            out[k][start:start + chunk_size] = -g
    return out


@renamed_args(post="posterior")
def ksd(posterior: Posterior, energy: Any, data: tuple[Tensor, Tensor], *,
        params: Sequence[str] | None = None, c: float = 1.0, power: float = -0.5, thin: int = 1,
        include_diverged: bool = False,
        batch_size: int | None = None, chunk_size: int = 64, block_size: int | None = None) -> float:
    """Kernel Stein discrepancy of a :class:`~pib_bayes.Posterior`'s draws against the Gibbs posterior.

    The target is p(w) ∝ exp(-U(w)) with the *full-data* energy U(w) = L_S(w) / beta - log p(w)
    of ``energy`` (a :class:`~pib_bayes.Energy`: model, loss, prior and beta) on ``data``; the
    score s(w) = -grad U(w) is computed at every kept draw (pooled over the non-diverged chains,
    every ``thin``-th draw), and :func:`kernel_stein_discrepancy` (IMQ kernel, Gorham & Mackey
    2017) of the flattened draws with those scores is returned. Smaller is closer; compare runs
    (step sizes, samplers) on the same ``energy``, ``data``, ``c`` and number of draws, since for
    exact draws KSD is about sqrt(E_p[k_p(w, w)] / m), not 0.

    ``params`` restricts the kernel to a subset S of the weights (e.g. the last layer of a large
    net): the draws are w_S and the scores the partial gradients -dU/dw_S, evaluated at the full
    draws (the other weights at their drawn values, not fixed). Stein's identity still holds for
    test functions of w_S alone, so this is a valid (weaker) discrepancy: zero in expectation for
    exact draws, it sees only errors visible in w_S. The same holds for projections w -> Q w with
    orthonormal rows and scores Q s(w) (Q Q^T = I keeps the divergence term right). The random
    unit directions of :func:`random_projections` are *not* orthogonal: with Q Q^T != I the plain
    formula on (Q w, Q s) is not zero-mean for exact draws, so do not feed those to
    :func:`kernel_stein_discrepancy` (tests/test_ksd.py shows both).

    Cost: one full-data gradient of U per draw (m of them, ``chunk_size`` draws batched, the data in
    row batches of ``batch_size``) plus O(m^2 d) for the pairwise sum (d = the number of weights
    in S), memory O(m d); thin the draws or restrict ``params`` for large nets.

    Args:
        posterior: the draws; every sampled parameter must have been kept (``sample(keep=None)``), as
            U needs all of them.
        energy: the :class:`~pib_bayes.Energy` of the target (the same model, loss, prior and
            beta as the sampling run).
        data: ``(x, y)``, the full data set S the energy averages over.
        params: names of the parameters the kernel acts on (default: all).
        c, power, block_size: the IMQ kernel (c^2 + |x - y|^2)^power and the block size of
            :func:`kernel_stein_discrepancy`.
        thin, include_diverged: which draws are used.
        batch_size: data rows per gradient pass (default: all n at once).
        chunk_size: draws per batched gradient pass.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import pib_bayes as pb
        >>> torch.manual_seed(0) and None
        >>> x = torch.randn(64, 2)
        >>> y = x @ torch.tensor([[1.0], [-0.5]]) + torch.randn(64, 1)
        >>> model, loss, prior = nn.Linear(2, 1), pb.GaussianLoss(1.0), pb.GaussianPrior(1.0)
        >>> energy = pb.Energy(model, loss, prior=prior, beta=1 / 8)  # Hessian eigenvalues 7.2-12.2
        >>> def run(h):
        ...     return pb.sample(model, loss, (x, y), beta=1 / 8, prior=prior, step_size=h, num_chains=2,
        ...                      num_warmup=200, num_draws=300, seed=0)
        >>> small, large = ksd(run(0.03), energy, (x, y)), ksd(run(0.15), energy, (x, y))
        >>> small < 1.0 < 2.0 < large  # h = 0.15: variance 1/(1 - h lambda/2) up to 12x too large
        True
    """
    from .energy import Energy

    post = check_posterior("posterior", posterior)
    if not isinstance(energy, Energy):
        raise TypeError(f"energy: expected a pib_bayes.Energy (model, loss, prior, beta of the target), "
                        f"got {type(energy).__name__}")
    x, y = _check_data(data)
    c, power = _check_imq(c, power)
    check_count("thin", thin, 1)
    check_count("chunk_size", chunk_size, 1)
    batch_size = x.shape[0] if batch_size is None else check_count("batch_size", batch_size, 1)
    post.check_model(energy.model)
    sampled = list(post.metadata.get("sampled_params", post.param_names))
    known = set(post.draws)  # (`in` on a lazily read mapping would read the variable)
    missing = [k for k in sampled if k not in known]
    if missing:
        raise ValueError(f"posterior: the draws of {missing} were not kept (sample(keep=...)); the energy's "
                         "gradient needs every sampled parameter, so sample with keep=None")
    names = post.param_names if params is None else list(params)
    if isinstance(params, str) or not names:
        raise ValueError(f"params: expected a non-empty list of parameter names, got {params!r}")
    unknown = [k for k in names if k not in known]
    if unknown:
        raise ValueError(f"params: unknown parameter names {unknown}; the draws hold {post.param_names}")
    chains = _kept_chains(post, include_diverged)
    draws = {k: v[chains][:, ::thin] for k, v in post.draws.items()}
    cshape = next(iter(draws.values())).shape[:2]
    flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in draws.items()}
    model = energy.model
    was_training = model.training
    model.eval()
    try:
        scores = _energy_scores(energy, flat, dict(post.fixed), x, y, names, chunk_size, batch_size)
    finally:
        model.train(was_training)
    m = cshape[0] * cshape[1]
    pts = torch.cat([flat[k].reshape(m, -1) for k in names], 1)
    sc = torch.cat([scores[k].reshape(m, -1) for k in names], 1)
    if not bool(torch.isfinite(sc).all()):
        raise ValueError("energy: the gradient of U is not finite at some draws; check the energy and data")
    return kernel_stein_discrepancy(pts, sc, c=c, power=power, block_size=block_size)
