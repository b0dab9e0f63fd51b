"""Convergence diagnostics and ArviZ export for a :class:`~pib_bayes.Posterior` (SPEC §4).

R-hat (rank-normalised split R-hat), bulk/tail ESS and MCSE all come from ArviZ
(Vehtari, Gelman, Simpson, Carpenter & Bürkner 2021, "Rank-normalization, folding, and
localization: an improved R-hat"). A network with 10^5+ weights cannot be diagnosed weight by
weight, so :func:`summary` diagnoses *scalar summaries* that stay meaningful at any size and names
each one:

- ``energy``, ``loss`` (and ``iiw*`` when tracked): the sampler's own statistics per draw;
- ``log_lik``: sum_i log p(y_i | x_i, w) on the given data;
- ``pred[i]``: the prediction at probe input i (regression: f(x_i; w); classification: the
  softmax probability of the class the posterior mean predicts);
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
from torch.func import functional_call, vmap

from . import _arviz_compat as compat
from ._validate import check_bool
from .posterior import Posterior

__all__ = ["ConvergenceWarning", "to_arviz", "summary", "scalar_quantities", "log_likelihood",
           "random_projections"]


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: only the CUDA name


class ConvergenceWarning(UserWarning):
    """Chains that have not mixed: R-hat above the limit or too few effective draws."""


# ------------------------------------------------------------------------------------ helpers
def _check_post(post: Any) -> Posterior:
    if not isinstance(post, Posterior):
        raise TypeError(f"post: expected a pib_bayes.Posterior (from pib_bayes.sample or Posterior.load), "
                        f"got {type(post).__name__}")
    return post


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be an int >= {minimum}, got {value!r}")
    return value


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
    """Raw model outputs f(x; w) for every draw of ``chains``: (C, N, *out_shape).

    ``name`` is the argument ``x`` came from (``data`` or ``probe_x``): inputs the model cannot
    consume (wrong width, wrong dtype) raise a ``ValueError`` naming it.
    """
    model = post.model
    if model is None:
        raise ValueError("post: this Posterior has no model attached; pass model= to Posterior.load")
    # a model whose parameter names or shapes differ from the draws would silently evaluate its own
    # weights for every draw (functional_call ignores unknown keys)
    post.check_model(model)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a tensor of inputs x, got {type(x).__name__}")
    _check_finite(name, "x", x)
    _check_count("chunk_size", chunk_size, 1)
    c, n = len(chains), post.num_draws
    draws = {k: v[list(chains)].reshape(c * n, *v.shape[2:]) for k, v in post.draws.items()}
    fixed = post.fixed
    was_training = model.training
    model.eval()
    try:
        batched = vmap(lambda p: functional_call(model, {**fixed, **p}, (x,)))
        with torch.no_grad():
            chunks = [{k: v[s:s + chunk_size] for k, v in draws.items()} for s in range(0, c * n, chunk_size)]
            if not chunks:
                raise ValueError("post: holds no draws to evaluate the model with")
            try:  # the first chunk doubles as the check that the model can consume x
                outs = [batched(chunks[0])]
            except _OOM:
                raise
            except (RuntimeError, IndexError, TypeError) as err:
                raise ValueError(f"{name}: the model cannot be evaluated on x of shape {tuple(x.shape)} and "
                                 f"dtype {x.dtype} ({type(err).__name__}: {str(err).splitlines()[0]}); pass "
                                 "inputs of the shape and dtype the model was sampled with") from err
            outs += [batched(chunk) for chunk in chunks[1:]]
    finally:
        model.train(was_training)
    out = torch.cat(outs)
    return out.reshape(c, n, *out.shape[1:])


def _observation_dist(post: Posterior, out: Tensor) -> torch.distributions.Distribution:
    """p(y | x, w) for outputs ``out``: Categorical(logits) or Normal(f, noise_std)."""
    if _check_task(post) == "classification":
        return Categorical(logits=out)
    noise_std = post.metadata.get("noise_std")
    if noise_std is None:
        raise ValueError("post.metadata['noise_std'] is None: the Gaussian log-likelihood of a regression "
                         "needs the observation noise; sample with loss_fn=GaussianLoss(noise_std) or set "
                         "post.metadata['noise_std']")
    return Normal(out, float(noise_std))


def _check_finite(name: str, part: str, t: Tensor) -> None:
    if (torch.is_floating_point(t) or t.is_complex()) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: {part} contains NaN or infinite values; remove or impute those rows first")


def _check_data(data: Any) -> tuple[Tensor, Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)):
        raise TypeError(f"data: expected a pair of tensors (x, y), got {type(data).__name__}")
    x, y = data
    if x.dim() == 0 or y.dim() == 0:
        raise ValueError("data: x and y need a leading row dimension, got a 0-d tensor")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"data: x and y need the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("data: holds no rows; pass at least one (x, y) pair")
    _check_finite("data", "x", x)
    _check_finite("data", "y", y)
    return x, y


def _targets(post: Posterior, out: Tensor, y: Tensor) -> Tensor:
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


def log_likelihood(post: Posterior, x: Tensor, y: Tensor, *, include_diverged: bool = False,
                   chunk_size: int = 64) -> Tensor:
    """Pointwise log-likelihood log p(y_i | x_i, w) for every draw: (chain, draw, n).

    Classification: log softmax(f(x_i; w))[y_i]. Regression: log N(y_i; f(x_i; w), s^2) summed
    over output dimensions, s = ``post.metadata["noise_std"]``. The model runs through
    ``torch.func.functional_call`` vmapped over ``chunk_size`` draws at a time.
    """
    _check_post(post)
    x, y = _check_data((x, y))
    return _pointwise_loglik(post, x, y, _kept_chains(post, include_diverged), chunk_size)


def _pointwise_loglik(post: Posterior, x: Tensor, y: Tensor, chains: Sequence[int],
                      chunk_size: int) -> Tensor:
    out = _outputs(post, x, chains, chunk_size)
    lp = _observation_dist(post, out).log_prob(_targets(post, out, y))
    return lp.reshape(*lp.shape[:3], -1).sum(-1)


def random_projections(post: Posterior, num_projections: int, seed: int = 0,
                       chains: Sequence[int] | None = None) -> Tensor:
    """<u_j, w> for ``num_projections`` random unit directions u_j of the flattened weights: (C, N, k).

    u_j = g_j / ||g_j|| with g_j ~ N(0, I_D) from ``torch.Generator().manual_seed(seed)``, drawn
    parameter by parameter so no (chain, draw, D) copy of the weights is ever made.
    """
    if isinstance(num_projections, bool) or not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"num_projections: must be an int >= 1, got {num_projections!r}")
    chains = list(range(post.num_chains)) if chains is None else list(chains)
    gen = torch.Generator().manual_seed(int(seed))
    c, n = len(chains), post.num_draws
    acc = torch.zeros(c, n, num_projections, dtype=torch.float64)
    sq_norm = torch.zeros(num_projections, dtype=torch.float64)
    for v in post.draws.values():
        w = v[chains].reshape(c, n, -1).double()
        g = torch.randn(w.shape[-1], num_projections, generator=gen, dtype=torch.float64)
        acc += w @ g
        sq_norm += g.square().sum(0)
    return acc / sq_norm.sqrt()


def _weight_names(post: Posterior) -> list[str]:
    names = []
    for k, v in post.draws.items():
        shape = tuple(v.shape[2:])
        if not shape:
            names.append(k)
            continue
        for idx in np.ndindex(*shape):
            names.append(f"{k}[{','.join(map(str, idx))}]")
    return names


def scalar_quantities(post: Posterior, *, data: tuple[Tensor, Tensor] | None = None,
                      probe_x: Tensor | None = None, num_projections: int = 8, seed: int = 0,
                      max_weights: int = 32, include_diverged: bool = False,
                      chunk_size: int = 64) -> tuple[dict[str, np.ndarray], dict[str, str], list[int]]:
    """The named scalar summaries that :func:`summary` diagnoses.

    Returns ``(values, kinds, chains)``: name -> array (chain, draw); name -> kind
    (``sample_stat``, ``log_likelihood``, ``prediction``, ``projection``, ``weight``); the
    indices of the chains used. Every weight is its own quantity when D <= ``max_weights``,
    otherwise ``num_projections`` seeded random projections stand in for the weights.
    """
    _check_post(post)
    _check_count("max_weights", max_weights, 0)
    _check_count("chunk_size", chunk_size, 1)
    _check_count("num_projections", num_projections, 1)
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
        if _check_task(post) == "classification":
            probs = torch.softmax(out, dim=-1)                        # (C, N, B, K)
            top = probs.reshape(-1, *probs.shape[2:]).nanmean(0).argmax(-1)  # class of the posterior mean
            pred = probs.gather(-1, top.expand(*probs.shape[:2], -1).unsqueeze(-1)).squeeze(-1)
        else:
            pred = out.reshape(*out.shape[:3], -1)
            pred = pred.squeeze(-1) if pred.shape[-1] == 1 else pred
        for idx in np.ndindex(*pred.shape[2:]):
            add(f"pred[{','.join(map(str, idx))}]", "prediction", pred[(slice(None), slice(None), *idx)])
    d = post.num_params
    if d <= max_weights:
        flat = post.flat()[chains]
        for j, name in enumerate(_weight_names(post)):
            add(name, "weight", flat[..., j])
    else:
        proj = random_projections(post, num_projections, seed, chains)
        for j in range(num_projections):
            add(f"proj[{j}]", "projection", proj[..., j])
    return values, kinds, chains


def _as_dataset(values: dict[str, np.ndarray], chains: Sequence[int]) -> xr.Dataset:
    n = next(iter(values.values())).shape[1]
    return xr.Dataset({k: (("chain", "draw"), v) for k, v in values.items()},
                      coords={"chain": list(chains), "draw": np.arange(n)})


# ------------------------------------------------------------------------------------ summary
def summary(post: Posterior, *, data: tuple[Tensor, Tensor] | None = None, probe_x: Tensor | None = None,
            num_projections: int = 8, seed: int = 0, max_weights: int = 32, rhat_threshold: float = 1.01,
            min_ess_per_chain: float = 100.0, include_diverged: bool = False, chunk_size: int = 64,
            warn: bool = True) -> pd.DataFrame:
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
    _check_post(post)
    check_bool("warn", warn)
    for name, val in (("rhat_threshold", rhat_threshold), ("min_ess_per_chain", min_ess_per_chain)):
        if not isinstance(val, (int, float)) or isinstance(val, bool) or not math.isfinite(val) or val <= 0:
            raise ValueError(f"{name}: must be a positive number, got {val!r}")
    if post.num_draws < 4:
        raise ValueError(f"post: ArviZ diagnostics need at least 4 draws per chain, got {post.num_draws}")
    values, kinds, chains = scalar_quantities(
        post, data=data, probe_x=probe_x, num_projections=num_projections, seed=seed, max_weights=max_weights,
        include_diverged=include_diverged, chunk_size=chunk_size)
    ds = _as_dataset(values, chains)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN R-hat with one chain is reported below
        diag = compat.diagnose(ds)
    cols = ("mcse_mean", "mcse_sd", "ess_bulk", "ess_tail", "r_hat")
    rows = {}
    for name, arr in values.items():
        rows[name] = {
            "mean": float(np.mean(arr)), "sd": float(np.std(arr, ddof=1)) if arr.size > 1 else math.nan,
            **{col: float(diag[col][name]) for col in cols},
            "kind": kinds[name],
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    excluded = [c for c in range(post.num_chains) if c not in chains]
    table.attrs.update({"chains": list(chains), "excluded_chains": excluded, "projection_seed": seed,
                        "rhat_threshold": rhat_threshold, "min_ess": min_ess_per_chain * len(chains)})
    if warn:
        _warn(table, len(chains), rhat_threshold, min_ess_per_chain)
    return table


def _warn(table: pd.DataFrame, num_chains: int, rhat_threshold: float, min_ess_per_chain: float) -> None:
    if num_chains < 2:
        warnings.warn("R-hat needs at least 2 chains (it is NaN with one); sample with num_chains >= 4",
                      ConvergenceWarning, stacklevel=3)
    else:
        bad = table[~(table["r_hat"] <= rhat_threshold)]
        if len(bad):
            listed = ", ".join(f"{k} ({v:.3f})" for k, v in bad["r_hat"].items())
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


def to_arviz(post: Posterior, *, params: None | Sequence[str] | str = None, num_projections: int = 8,
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

    >>> import torch
    >>> from pib_bayes import Posterior
    >>> post = Posterior({"w": torch.zeros(2, 5, 3)}, {"energy": torch.zeros(2, 5)}, {"task": "regression"})
    >>> idata = to_arviz(post)
    >>> dict(idata.posterior["w"].sizes)
    {'chain': 2, 'draw': 5, 'w_dim_0': 3}
    """
    _check_post(post)
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
        unknown = [k for k in names if k not in post.draws]
        if unknown:
            raise ValueError(f"params: unknown parameters {unknown}; available: {post.param_names}")
        variables, coords = {}, dict(base)
        for k in names:
            v = post.draws[k][chains].detach().numpy()
            dims = [f"{k}_dim_{i}" for i in range(v.ndim - 2)]
            coords.update({d: np.arange(s) for d, s in zip(dims, v.shape[2:], strict=True)})
            variables[k] = (("chain", "draw", *dims), v)
        posterior = xr.Dataset(variables, coords=coords)

    sample_stats = xr.Dataset({k: (("chain", "draw"), v[chains].detach().numpy())
                               for k, v in post.sample_stats.items() if tuple(v.shape[:2]) == tuple(
                                   post.draws[post.param_names[0]].shape[:2])}, coords=base)
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
